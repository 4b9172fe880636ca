"""Mixed precision (`config.model.dtype = "bfloat16"`): the network computes in bfloat16 while the
parameters, their gradients, the optimizer state, the batch-norm statistics, the losses and the
pseudo labels stay float32; a bfloat16 run follows the float32 run of the same seed and batches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pseudoseg_jax import steps
from test_pseudoseg_step import random_batch, tiny_config

NUM_STEPS = 6
PSEUDOSEG_LOSSES = ("train/loss", "train/supervised_loss", "train/sgc_loss",
                    "train/consistency_loss", "train/classification_loss")


def training_run(dtype: str):
  """(final state, per-step metrics) of NUM_STEPS supervised steps on fixed random batches (the
  supervised step compiles in a third of PseudoSeg's time; PseudoSeg's own float32 parts are
  checked by tracing below)."""
  config = tiny_config()
  config.method = "supervised"
  config.model.dtype = dtype
  config.optimizer.learning_rate = 0.5  # The loss falls from 1.6 to 0.7 in 6 steps.
  graphdef, _, state = steps.create_train_state(config, 0)
  step = jax.jit(functools.partial(steps.train_step, graphdef=graphdef, config=config))
  batch = learnable_batch()
  history = []
  for _ in range(NUM_STEPS):
    state, metrics = step(state, batch)
    history.append(jax.device_get(metrics))
  return state, history


def learnable_batch():
  """Pixels labeled by the sign of their red value: a rule a few steps of training pick up."""
  batch = random_batch(0)["labeled"]
  batch["mask"] = np.where(batch["image"][..., 0] > 0, 1, 2).astype(np.int32)
  return batch


@pytest.fixture(scope="module")
def runs():
  return {dtype: training_run(dtype) for dtype in ("float32", "bfloat16")}


def dtypes(tree) -> set:
  return {jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(tree)}


def test_bfloat16_keeps_the_state_and_the_losses_in_float32(runs):
  state, history = runs["bfloat16"]
  assert dtypes(state.params) == {jnp.dtype(jnp.float32)}
  assert dtypes(state.batch_stats) == {jnp.dtype(jnp.float32)}
  assert dtypes(state.opt_state) <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
  for name in ("train/loss", "train/supervised_loss", "train/grad_norm"):
    assert history[-1][name].dtype == np.float32, name
    assert np.isfinite(history[-1][name]), name
  assert all(metrics["train/all_finite"] for metrics in history)


def test_pseudoseg_losses_and_pseudo_labels_are_float32_under_bfloat16():
  config = tiny_config()
  config.model.dtype = "bfloat16"
  graphdef, params, batch_stats = steps.init_model(config, 0)
  loss = functools.partial(steps.pseudoseg_loss, graphdef=graphdef, config=config, step=0)
  value, (new_stats, metrics) = jax.eval_shape(loss, params, batch_stats, random_batch(0),
                                               jax.random.key(0))
  assert value.dtype == jnp.float32
  for name in PSEUDOSEG_LOSSES[1:]:
    assert metrics[name].dtype == jnp.float32, name
  assert dtypes(new_stats) == {jnp.dtype(jnp.float32)}

  def pseudo_labels(params, batch_stats, unlabeled, key):
    model = nnx.merge(graphdef, params, batch_stats)
    return steps.unlabeled_forward(model, unlabeled, key, config=config)[1]

  pseudo = jax.eval_shape(pseudo_labels, params, batch_stats, random_batch(0)["unlabeled"],
                          jax.random.key(0))
  assert pseudo["targets"].dtype == jnp.float32 and pseudo["weights"].dtype == jnp.float32
  assert pseudo["cam"].dtype == jnp.float32 and pseudo["sgc_logits"].dtype == jnp.float32


def test_the_network_really_computes_in_bfloat16():
  config = tiny_config()
  config.model.dtype = "bfloat16"
  graphdef, params, batch_stats = steps.init_model(config, 0)
  model = nnx.merge(graphdef, params, batch_stats)
  outputs = jax.eval_shape(lambda x: model(x, train=False),
                           jnp.zeros((2, 33, 33, 3), jnp.float32))
  assert outputs["features"]["stage4"].dtype == jnp.bfloat16
  assert outputs["logits"].dtype == jnp.float32  # Cast once, before losses and softmaxes.


def test_bfloat16_training_follows_float32(runs):
  full, mixed = runs["float32"][1], runs["bfloat16"][1]
  # Step 1 starts from the same parameters: only bfloat16 rounding (8 bits of mantissa, about
  # 0.4% per op) separates the losses.
  for name in ("train/loss", "train/pixel_accuracy"):
    np.testing.assert_allclose(mixed[0][name], full[0][name], rtol=0.03, err_msg=name)
  # Both runs learn, by about as much.
  full_drop = full[0]["train/supervised_loss"] - full[-1]["train/supervised_loss"]
  mixed_drop = mixed[0]["train/supervised_loss"] - mixed[-1]["train/supervised_loss"]
  assert full_drop > 0.5 and mixed_drop > 0.5, (full_drop, mixed_drop)  # From ln 5 = 1.61.
  # And along the same path: every step's loss within 2% (measured: 0.5% at most).
  np.testing.assert_allclose([m["train/loss"] for m in mixed], [m["train/loss"] for m in full],
                             rtol=0.02)

