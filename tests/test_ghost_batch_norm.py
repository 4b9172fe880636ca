"""Per-group ("ghost") batch-norm statistics, config.model.bn_group_size (SPEC 7): known answers on
single layers, nnx.BatchNorm's results for group size 0 / the whole batch / eval mode, the config
checks, a tiny DeepLab, the SGC norm, and jit over a sharded batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pseudoseg_jax import pseudo_labels, steps
from pseudoseg_jax.config import base_config
from pseudoseg_jax.models import build_model
from pseudoseg_jax.models.resnet import GhostBatchNorm

CHANNELS = 3
MOMENTUM = 0.9
NUM_CLASSES = 5


def ghost_layer(group_size, dtype=None):
  return GhostBatchNorm(CHANNELS, group_size=group_size, momentum=MOMENTUM, epsilon=1e-5,
                        dtype=dtype, rngs=nnx.Rngs(0))


def flax_layer(dtype=None):
  return nnx.BatchNorm(CHANNELS, momentum=MOMENTUM, epsilon=1e-5, dtype=dtype, rngs=nnx.Rngs(0))


def running_stats(layer):
  return np.asarray(layer.mean[...]), np.asarray(layer.var[...])


def two_groups(seed=0):
  """[4, 3, 5, C]: images 0-1 around -3 (spread 0.5), images 2-3 around 5 (spread 2)."""
  rng = np.random.default_rng(seed)
  first = rng.normal(-3.0, 0.5, (2, 3, 5, CHANNELS))
  second = rng.normal(5.0, 2.0, (2, 3, 5, CHANNELS))
  return np.concatenate([first, second]).astype(np.float32)


# --- single layers: known answers ---------------------------------------------------------------

def test_each_group_is_normalized_with_its_own_statistics():
  x = two_groups()
  y = np.asarray(ghost_layer(2)(jnp.asarray(x), use_running_average=False))
  for group in (y[:2], y[2:]):
    np.testing.assert_allclose(group.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(group.var(axis=(0, 1, 2)), 1.0, atol=1e-4)
  whole_batch = np.asarray(flax_layer()(jnp.asarray(x), use_running_average=False))
  assert abs(whole_batch[:2].mean()) > 0.5  # Global statistics would not centre each group.


def test_running_averages_move_towards_the_mean_over_groups():
  x = two_groups(seed=1)
  layer = ghost_layer(2)
  old_mean, old_var = np.array([0.5, -1.0, 2.0]), np.array([1.5, 0.25, 3.0])
  layer.mean[...] = jnp.asarray(old_mean, jnp.float32)
  layer.var[...] = jnp.asarray(old_var, jnp.float32)
  layer(jnp.asarray(x), use_running_average=False)
  groups = x.astype(np.float64).reshape(2, -1, CHANNELS)  # [group, G * positions, C]
  expected_mean = MOMENTUM * old_mean + (1 - MOMENTUM) * groups.mean(axis=1).mean(axis=0)
  expected_var = MOMENTUM * old_var + (1 - MOMENTUM) * groups.var(axis=1).mean(axis=0)
  mean, var = running_stats(layer)
  np.testing.assert_allclose(mean, expected_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, expected_var, rtol=1e-5, atol=1e-6)


# --- the default path is nnx.BatchNorm's --------------------------------------------------------

@pytest.mark.parametrize("group_size", [0, 4])
def test_whole_batch_group_equals_nnx_batch_norm(group_size):
  x = jnp.asarray(two_groups())
  ghost, reference = ghost_layer(group_size), flax_layer()
  for _ in range(2):
    np.testing.assert_array_equal(ghost(x, use_running_average=False),
                                  reference(x, use_running_average=False))
  for ours, theirs in zip(running_stats(ghost), running_stats(reference)):
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_grouped_arithmetic_matches_nnx_batch_norm_on_identical_groups(dtype, tolerance):
  # Two copies of one batch: each group's statistics are the whole batch's, so the grouped code
  # path must reproduce flax's, in both compute dtypes.
  half = two_groups()
  x = jnp.asarray(np.concatenate([half, half]))
  ghost, reference = ghost_layer(4, dtype), flax_layer(dtype)
  ours, theirs = ghost(x, use_running_average=False), reference(x, use_running_average=False)
  assert ours.dtype == theirs.dtype == dtype
  np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32),
                             rtol=tolerance, atol=tolerance)
  for ours, theirs in zip(running_stats(ghost), running_stats(reference)):
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_eval_mode_ignores_the_grouping():
  x = jnp.asarray(two_groups())
  ghost, reference = ghost_layer(2), flax_layer()
  ghost(x, use_running_average=False)
  reference.mean[...], reference.var[...] = ghost.mean[...], ghost.var[...]
  odd_batch = x[:3]  # 3 images: not a multiple of the group size, which eval does not use.
  np.testing.assert_array_equal(ghost(odd_batch, use_running_average=True),
                                reference(odd_batch, use_running_average=True))


# --- config checks ------------------------------------------------------------------------------

def tiny_config(**overrides):
  config = base_config().model
  config.backbone = "resnet_tiny"
  config.aspp_channels = config.decoder_channels = 16
  config.low_level_channels = 8
  config.sgc_attention_dim = 8
  config.update(overrides)
  return config


@pytest.mark.parametrize("value", [-2, 2.0, True, "4"])
def test_bad_group_size_in_the_config_names_the_field(value):
  config = tiny_config()
  config.unlock()
  config["bn_group_size"] = None  # Clear the type so ConfigDict accepts a wrongly typed value.
  config["bn_group_size"] = value
  with pytest.raises(ValueError, match=rf"model.bn_group_size must be an int >= 0.*{value!r}"):
    build_model(config, NUM_CLASSES, rngs=nnx.Rngs(0))


def test_group_size_that_does_not_divide_the_batch_names_field_value_and_batch():
  with pytest.raises(ValueError, match=r"model.bn_group_size=3 must divide .* \(4 images\)"):
    ghost_layer(3)(jnp.asarray(two_groups()), use_running_average=False)
  with pytest.raises(ValueError, match=r"model.bn_group_size must be an int >= 0, got -1"):
    ghost_layer(-1)


# --- the model ----------------------------------------------------------------------------------

def abstract_model(group_size):
  return nnx.eval_shape(lambda: build_model(tiny_config(bn_group_size=group_size), NUM_CLASSES,
                                            rngs=nnx.Rngs(0)))


def shapes_and_dtypes(model, kind):
  return jax.tree.map(lambda a: (a.shape, a.dtype), nnx.to_pure_dict(nnx.state(model, kind)))


def stand_in_values(tree, seed=0):
  """He-scaled normal kernels, unit scales and variances, zero offsets: initializing the real model
  eagerly or under jit costs 12-16 s on 2 CPU cores, this well under one."""
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    if len(leaf.shape) >= 2:
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape), leaf.dtype)
    unit = str(path[-1].key) in ("scale", "var")
    return (jnp.ones if unit else jnp.zeros)(leaf.shape, leaf.dtype)
  return jax.tree_util.tree_map_with_path(value, tree)


@pytest.mark.parametrize("method, batch_size, unlabeled_batch_size, field", [
    ("supervised", 6, 8, "batch_size=6"), ("pseudoseg", 8, 6, "pseudoseg.unlabeled_batch_size=6")])
def test_a_config_whose_batches_do_not_split_into_groups_is_refused_at_once(
    method, batch_size, unlabeled_batch_size, field):
  from pseudoseg_jax import config as config_lib
  config = base_config()
  config.method, config.batch_size = method, batch_size
  config.pseudoseg.unlabeled_batch_size = unlabeled_batch_size
  config.pseudoseg.fusion_group_size = 2
  config.model.bn_group_size = 4
  with pytest.raises(ValueError, match=rf"config.model.bn_group_size=4 must divide config.{field}"):
    config_lib.validate(config)
  config.model.bn_group_size = 2
  config_lib.validate(config)


def test_group_size_changes_no_parameter_or_statistic():
  whole, grouped = abstract_model(0), abstract_model(2)
  assert grouped.backbone.bn1.group_size == 2
  assert grouped.aspp.projection.bn.group_size == 2
  assert grouped.sgc.norm_group_size == 2
  for kind in (nnx.Param, nnx.BatchStat):  # Checkpoints are interchangeable.
    assert shapes_and_dtypes(grouped, kind) == shapes_and_dtypes(whole, kind)


@pytest.fixture(scope="module")
def train_passes():
  """One jitted training-mode pass of the same weights on 4 images with bn_group_size 0 and 2:
  {group size: (logits, new batch stats, SGC logits of a CAM of all classes)}."""
  graphdefs = {}
  for group_size in (0, 2):
    graphdefs[group_size], params, stats = nnx.split(abstract_model(group_size), nnx.Param,
                                                     nnx.BatchStat)
  params, stats = (stand_in_values(nnx.to_pure_dict(tree)) for tree in (params, stats))
  images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 33, 33, 3)), jnp.float32)

  @jax.jit
  def forward(params, stats, images):
    results = {}
    for group_size, graphdef in graphdefs.items():
      model = nnx.merge(graphdef, params, stats)
      outputs = model(images, train=True, rngs=nnx.Rngs(dropout=0))
      cam = steps.class_activation_maps(model, outputs["features"],
                                        jnp.ones((images.shape[0], NUM_CLASSES - 1)))
      valid = jnp.ones(outputs["logits"].shape[:3])
      results[group_size] = (outputs["logits"], nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
                             steps.sgc_logits(model, outputs["features"], cam, valid))
    return results
  return forward(params, stats, images)


def test_tiny_deeplab_with_groups_of_two_differs_from_whole_batch(train_passes):
  (whole_logits, whole_stats, _), (grouped_logits, grouped_stats, _) = (train_passes[0],
                                                                        train_passes[2])
  assert bool(jnp.isfinite(grouped_logits).all())
  assert not np.allclose(grouped_logits, whole_logits, atol=1e-3)
  assert jax.tree.structure(grouped_stats) == jax.tree.structure(whole_stats)
  assert not np.allclose(grouped_stats["backbone"]["bn1"]["var"],
                         whole_stats["backbone"]["bn1"]["var"])


def test_tiny_deeplab_rejects_a_batch_the_group_size_does_not_divide():
  model, odd_batch = abstract_model(2), jax.ShapeDtypeStruct((3, 33, 33, 3), jnp.float32)
  with pytest.raises(ValueError, match=r"model.bn_group_size=2 .* \(3 images\)"):
    nnx.eval_shape(lambda m, x: m(x, train=True, rngs=nnx.Rngs(0)), model, odd_batch)
  nnx.eval_shape(lambda m, x: m(x, train=False), model, odd_batch)  # Eval: any batch.


# --- the SGC head's center-only norm ------------------------------------------------------------

def test_sgc_center_only_norm_normalizes_each_group():
  x = jnp.asarray(two_groups())
  offset = jnp.arange(float(CHANNELS))
  y = np.asarray(pseudo_labels.center_only_batch_norm(x, offset, group_size=2))
  for x_group, y_group in ((x[:2], y[:2]), (x[2:], y[2:])):
    np.testing.assert_allclose(y_group.mean(axis=(0, 1, 2)), offset, atol=1e-5)
    variance = np.var(np.asarray(x_group, np.float64), axis=(0, 1, 2))
    np.testing.assert_allclose(y_group.var(axis=(0, 1, 2)), variance / (variance + 1e-3),
                               rtol=1e-4)
  np.testing.assert_allclose(pseudo_labels.center_only_batch_norm(x, offset, group_size=4),
                             pseudo_labels.center_only_batch_norm(x, offset), rtol=1e-6,
                             atol=1e-6)


def per_pair_channel_means(sgc_logits):
  """[2, C]: each channel's mean over images 0-1 and over images 2-3 (the offsets start at 0)."""
  return np.asarray(sgc_logits).reshape(2, -1, NUM_CLASSES).mean(axis=1)


def test_model_sgc_norm_uses_the_model_group_size(train_passes):
  np.testing.assert_allclose(per_pair_channel_means(train_passes[2][2]), 0.0, atol=1e-4)
  assert np.abs(per_pair_channel_means(train_passes[0][2])).max() > 1e-2


# --- jit over a sharded batch -------------------------------------------------------------------

def test_jit_over_a_sharded_batch_equals_eager():
  devices = jax.devices()
  x = np.concatenate([two_groups(seed) for seed in range(len(devices))])  # 4 images per device.
  graphdef, state = nnx.split(ghost_layer(2))

  @jax.jit
  def forward(state, x):
    layer = nnx.merge(graphdef, state)
    return layer(x, use_running_average=False), nnx.state(layer)

  mesh = Mesh(np.asarray(devices), ("data",))
  sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
  y, new_state = forward(state, sharded)
  eager = nnx.merge(graphdef, state)
  np.testing.assert_allclose(y, eager(jnp.asarray(x), use_running_average=False), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(new_state["mean"][...], eager.mean[...], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state["var"][...], eager.var[...], rtol=1e-5, atol=1e-6)
