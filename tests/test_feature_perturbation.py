"""UniMatch's feature perturbation (config.pseudoseg.feature_perturbation, feature_dropout): the
channel dropout's known answers, the heads' split from the backbone, and one tiny step per mode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pseudoseg_jax import config as config_lib
from pseudoseg_jax import steps
from pseudoseg_jax.models.deeplab import drop_channels
from tests.test_pseudoseg_step import random_batch, tiny_config


def test_drop_channels_zeroes_whole_channels_and_scales_the_rest():
  x = jnp.ones((4, 3, 5, 64))
  dropped = np.asarray(drop_channels(x, 0.25, jax.random.key(0)))
  per_channel = dropped[:, 0, 0, :]
  # Each image's channel is dropped or kept at every pixel alike, and kept ones scaled by 1 / 0.75.
  np.testing.assert_array_equal(dropped, np.broadcast_to(per_channel[:, None, None], x.shape))
  np.testing.assert_allclose(np.unique(per_channel), [0.0, 1 / 0.75], rtol=1e-6)
  assert 0.15 < (per_channel == 0).mean() < 0.35
  # Images draw their own channels.
  assert not np.array_equal(per_channel[0] == 0, per_channel[1] == 0)


def test_config_rejects_unknown_feature_perturbation_and_a_rate_of_one():
  config = tiny_config()
  config.pseudoseg.feature_perturbation = "weak"
  with pytest.raises(ValueError, match="feature_perturbation"):
    config_lib.validate(config)
  config = tiny_config()
  config.pseudoseg.feature_dropout = 1.0
  with pytest.raises(ValueError, match="feature_dropout"):
    config_lib.validate(config)


def no_dropout_config(**pseudoseg):
  config = tiny_config(**pseudoseg)
  config.model.aspp_dropout = config.model.cls_dropout = 0.0
  return config


def test_heads_of_the_backbone_features_are_the_model():
  config = no_dropout_config()
  graphdef, params, batch_stats = steps.init_model(config, 0)
  model = nnx.merge(graphdef, params, batch_stats)
  images = random_batch(0)["unlabeled"]["weak_image"]
  whole = model(images, train=False)
  parts = model.heads(model.backbone_features(images, train=False), train=False, rngs=None)
  np.testing.assert_array_equal(parts["logits"], whole["logits"])
  np.testing.assert_array_equal(parts["cls_logits"], whole["cls_logits"])
  dropped = model(images, train=False, rngs=nnx.Rngs(dropout=0), feature_dropout=0.5)
  assert float(jnp.max(jnp.abs(dropped["logits"] - whole["logits"]))) > 1e-4
  np.testing.assert_array_equal(dropped["features"]["stage4"], whole["features"]["stage4"])


def losses_of(config, batch, teacher=False):
  graphdef, params, batch_stats = steps.init_model(config, 0)
  teacher_state = {"params": params, "batch_stats": batch_stats} if teacher else None
  loss = jax.jit(functools.partial(steps.pseudoseg_loss, graphdef=graphdef, config=config))
  return loss(params, batch_stats, batch, jax.random.key(0), teacher=teacher_state)[1][1]


def same_views_batch():
  batch = random_batch(0)
  batch["unlabeled"]["strong_image"] = batch["unlabeled"]["weak_image"]
  return batch


def test_undropped_stream_on_the_strong_view_equals_the_consistency_loss():
  # With nothing dropped, one view and no other dropout, the stream's pass is the strong pass.
  metrics = losses_of(no_dropout_config(feature_perturbation="stream", feature_dropout=0.0),
                      same_views_batch())
  assert float(metrics["train/consistency_loss"]) > 0
  np.testing.assert_allclose(metrics["train/feature_perturbation_loss"],
                             metrics["train/consistency_loss"], rtol=1e-5)


def test_stream_with_a_mean_teacher_learns_the_teachers_labels():
  batch = same_views_batch()
  undropped = losses_of(no_dropout_config(teacher="ema", feature_perturbation="stream",
                                          feature_dropout=0.0), batch, teacher=True)
  np.testing.assert_allclose(undropped["train/feature_perturbation_loss"],
                             undropped["train/consistency_loss"], rtol=1e-5)
  dropped = losses_of(no_dropout_config(teacher="ema", feature_perturbation="stream",
                                        feature_dropout=0.5), batch, teacher=True)
  assert abs(float(dropped["train/feature_perturbation_loss"])
             - float(dropped["train/consistency_loss"])) > 1e-4
  np.testing.assert_allclose(dropped["train/consistency_loss"],
                             undropped["train/consistency_loss"], rtol=1e-6)


def test_strong_mode_perturbs_only_the_strong_pass():
  batch = same_views_batch()
  plain = losses_of(no_dropout_config(), batch)
  strong = losses_of(no_dropout_config(feature_perturbation="strong", feature_dropout=0.5), batch)
  assert "train/feature_perturbation_loss" not in strong
  np.testing.assert_allclose(strong["train/supervised_loss"], plain["train/supervised_loss"],
                             rtol=1e-6)
  assert abs(float(strong["train/consistency_loss"])
             - float(plain["train/consistency_loss"])) > 1e-4


@pytest.mark.parametrize("mode", ["strong", "stream"])
def test_a_step_with_feature_perturbation_trains(mode):
  config = tiny_config(teacher="ema", cutmix_probability=0.5, feature_perturbation=mode)
  graphdef, _, state = steps.create_train_state(config, 0)
  step = jax.jit(functools.partial(steps.train_step, graphdef=graphdef, config=config))
  new_state, metrics = step(state, random_batch(0))
  assert bool(metrics["train/all_finite"])
  assert ("train/feature_perturbation_loss" in metrics) == (mode == "stream")
  moved = [float(jnp.max(jnp.abs(a - b))) for a, b in
           zip(jax.tree.leaves(new_state.params), jax.tree.leaves(state.params))]
  assert max(moved) > 0
