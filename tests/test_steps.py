"""The jitted train step: sharding-invariant loss and gradients, and checkpoint round trips."""

import functools

import jax
import numpy as np
import optax
import pytest

from pseudoseg_jax import checkpointing, sharding, steps, train
from pseudoseg_jax import config as config_lib

CROP = 33


def tiny_config():
  config = config_lib.base_config()
  config.total_steps = 10
  config.batch_size = 4
  config.crop_size = config.eval_crop_size = CROP
  config.data.num_classes = 5
  config.model.backbone = "resnet_tiny"
  config.model.aspp_channels = config.model.decoder_channels = 16
  config.model.low_level_channels = 8
  config_lib.validate(config)
  return config


def random_batch(seed, batch_size=4, num_classes=5):
  rng = np.random.default_rng(seed)
  mask = rng.integers(0, num_classes, (batch_size, CROP, CROP)).astype(np.int32)
  mask[:, :3] = 255  # An ignore band, as padding would leave.
  image = rng.uniform(-1, 1, (batch_size, CROP, CROP, 3)).astype(np.float32)
  return {"image": image, "mask": mask}


@pytest.fixture(scope="module")
def setup():
  config = tiny_config()
  graphdef, _, state = steps.create_train_state(config, 0)
  return config, graphdef, state


def loss_and_grads_on(devices, setup, batch):
  config, graphdef, state = setup
  mesh = sharding.make_mesh(devices)
  replicated = sharding.replicated(mesh)
  state = jax.device_put(state, replicated)
  global_batch = sharding.to_global(batch, mesh)
  fn = jax.jit(jax.value_and_grad(
      functools.partial(steps.supervised_loss, graphdef=graphdef, config=config), has_aux=True),
      out_shardings=replicated)
  (loss, (stats, _)), grads = fn(state.params, state.batch_stats, global_batch,
                                 jax.random.key(7))
  return jax.device_get((loss, stats, grads))


def test_loss_gradients_and_batch_stats_do_not_depend_on_the_device_count(setup):
  assert len(jax.devices()) >= 4, "conftest sets 4 CPU devices"
  batch = random_batch(0)
  one = loss_and_grads_on(jax.devices()[:1], setup, batch)
  four = loss_and_grads_on(jax.devices()[:4], setup, batch)
  assert np.isfinite(one[0]) and one[0] > 0
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  # The gradients are not trivially zero: the comparison above means something.
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(one[2])) > 1e-4


@pytest.fixture(scope="module")
def trained(setup):
  """(state, losses, last metrics) after 5 steps on one batch, sharded over 4 devices."""
  config, graphdef, state = setup
  mesh = sharding.make_mesh(jax.devices()[:4])
  step_fn = jax.jit(functools.partial(steps.train_step, graphdef=graphdef, config=config))
  batch = sharding.to_global(random_batch(1), mesh)
  state = jax.device_put(state, sharding.replicated(mesh))
  losses = []
  for _ in range(5):
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics["train/loss"]))
  return state, losses, metrics


def test_train_step_lowers_the_loss_on_a_fixed_batch(trained):
  state, losses, metrics = trained
  assert int(state.step) == 5
  assert losses[-1] < losses[0]
  lr = float(metrics["train/learning_rate"])
  # Poly schedule at step 4 of 10: 0.007 * (1 - 4/10) ** 0.9.
  assert lr == pytest.approx(0.007 * 0.6 ** 0.9, rel=1e-5)


def test_the_schedule_with_an_array_length_is_optax_poly_decay():
  config = tiny_config()
  config.optimizer.end_learning_rate = 1e-4  # Not 0, so that the end value is checked too.
  opt = config.optimizer
  reference = optax.polynomial_schedule(init_value=opt.learning_rate,
                                        end_value=opt.end_learning_rate, power=opt.poly_power,
                                        transition_steps=10)
  with_array_length = jax.jit(lambda step, total: steps.learning_rate_schedule(config, total)(step))
  for step in (0, 1, 4, 9, 10, 12):
    expected = float(reference(step))
    assert float(with_array_length(step, np.int32(10))) == expected, step
    assert float(steps.learning_rate_schedule(config)(step)) == expected, step
  assert float(with_array_length(12, np.int32(10))) == pytest.approx(1e-4)


def test_the_compiled_step_does_not_depend_on_total_steps(setup):
  """A run resumed with a larger total_steps (or a sweep over lengths) reuses the compiled program:
  the persistent compilation cache is keyed on the program's text."""
  config, graphdef, state = setup
  mesh = sharding.make_mesh(jax.devices()[:1])
  batch = sharding.to_global(random_batch(0), mesh)

  def program(total_steps):
    run_config = config.copy_and_resolve_references()
    run_config.total_steps = total_steps
    train_fn = train.make_train_fn(run_config, graphdef, state, mesh)
    return train_fn.lower(state, batch, train.schedule_length(run_config, mesh)).as_text()

  assert program(10) == program(30_000)


def test_weight_decay_applies_to_kernels_only(setup):
  _, _, state = setup
  mask = steps.weight_decay_mask(state.params)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert any(flat.values()) and not all(flat.values())
  for path, decayed in flat.items():
    assert decayed == path.endswith("['kernel']"), path


def test_xception_depthwise_kernels_are_not_decayed():
  # DeepLab regularizes Xception's pointwise kernels but not its depthwise ones.
  unit = {"separable_conv1_depthwise": {"conv": {"kernel": 1.0}, "bn": {"scale": 1.0}},
          "separable_conv1_pointwise": {"conv": {"kernel": 1.0}, "bn": {"scale": 1.0}}}
  mask = steps.weight_decay_mask({"backbone": {"entry_flow": {"block1": {"unit_1": unit}}}})
  decayed = mask["backbone"]["entry_flow"]["block1"]["unit_1"]
  assert decayed["separable_conv1_pointwise"]["conv"]["kernel"] is True
  assert decayed["separable_conv1_depthwise"]["conv"]["kernel"] is False
  assert decayed["separable_conv1_pointwise"]["bn"]["scale"] is False


def test_checkpoint_round_trip_restores_every_array(setup, trained, tmp_path):
  config = setup[0]
  trained = trained[0]  # Its momentum and batch statistics are no longer their initial values.
  manager = checkpointing.make_manager(str(tmp_path), keep=2)
  checkpointing.save(manager, 5, trained)
  manager.wait_until_finished()

  fresh = steps.create_train_state(config, 99)[2]
  restored = checkpointing.restore_latest(checkpointing.make_manager(str(tmp_path), keep=2), fresh)
  assert int(restored.step) == 5
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert type(restored.opt_state) is type(trained.opt_state)


def test_keeps_only_the_last_checkpoints(setup, tmp_path):
  _, _, state = setup
  manager = checkpointing.make_manager(str(tmp_path), keep=2)
  for step in (1, 2, 3):
    checkpointing.save(manager, step, state)
  manager.wait_until_finished()
  assert sorted(manager.all_steps()) == [2, 3]


def test_restoring_a_different_model_names_the_checkpoint_and_tensors(setup, tmp_path):
  _, _, state = setup
  manager = checkpointing.make_manager(str(tmp_path), keep=1)
  checkpointing.save(manager, 5, state)
  manager.wait_until_finished()
  other = tiny_config()
  other.model.decoder_channels = 24
  other_state = steps.create_train_state(other, 0)[2]
  with pytest.raises(ValueError, match=r"checkpoints/5 was written for a different model") as info:
    checkpointing.restore_latest(manager, other_state)
  assert "shape of ['params']" in str(info.value)
  assert manager.latest_step() == 5  # Nothing was deleted or overwritten.


def test_initial_weights_come_from_the_cpu_backend_whatever_the_default_device(setup):
  """rbg draws with each backend's own generator, so init runs on the host's CPU backend: the same
  seed then gives the same weights on CPU, GPU and TPU hosts. Here another default device (of the
  4 virtual CPU devices) must not move the program or change a bit."""
  config, _, _ = setup
  _, params, _ = steps.init_model(config, 0)
  with jax.default_device(jax.devices()[2]):
    _, elsewhere, _ = steps.init_model(config, 0)
  for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(elsewhere)):
    assert ours.devices() == theirs.devices() == {jax.local_devices(backend="cpu")[0]}
    np.testing.assert_array_equal(ours, theirs)


def test_initialization_falls_back_to_the_default_device_without_a_cpu_backend(monkeypatch):
  devices = jax.local_devices()

  def local_devices(backend=None):
    if backend == "cpu":
      raise RuntimeError("Unknown backend cpu")  # What JAX_PLATFORMS=tpu gives.
    return devices

  monkeypatch.setattr(jax, "local_devices", local_devices)
  assert steps.initialization_device() == devices[0]
