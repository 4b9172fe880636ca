"""The PseudoSeg loss and step on a tiny model: gradient routing, ablation switches, sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pseudoseg_jax import config as config_lib
from pseudoseg_jax import losses, pseudo_labels, sharding, steps, train
from pseudoseg_jax.models.resize import resize_bilinear

CROP = 33
NUM_CLASSES = 5
IGNORE = 255


def tiny_config(**pseudoseg):
  config = config_lib.base_config()
  config.method = "pseudoseg"
  config.total_steps = 10
  config.batch_size = 4
  config.crop_size = config.eval_crop_size = CROP
  config.data.num_classes = NUM_CLASSES
  config.model.backbone = "resnet_tiny"
  config.model.output_stride = 8
  config.model.aspp_rates = (2, 4, 6)
  config.model.aspp_channels = config.model.decoder_channels = 16
  config.model.low_level_channels = 8
  config.model.sgc_attention_dim = 8
  config.pseudoseg.unlabeled_batch_size = 8
  config.pseudoseg.cutout_size = 8
  config.pseudoseg.update(pseudoseg)
  config_lib.validate(config)
  return config


def random_batch(seed, labeled_size=4, unlabeled_size=8):
  rng = np.random.default_rng(seed)

  def mask(n):
    m = rng.integers(0, NUM_CLASSES, (n, CROP, CROP)).astype(np.int32)
    m[:, -4:] = IGNORE  # Padding rows.
    return m

  def valid(n):
    v = np.ones((n, CROP, CROP), np.int32)
    v[:, -4:] = 0
    return v

  unlabeled_valid = valid(unlabeled_size)
  unlabeled_valid[:, 5:15, 5:15] = 0  # A cutout box.
  image = lambda n: rng.uniform(-1, 1, (n, CROP, CROP, 3)).astype(np.float32)  # noqa: E731
  labels = lambda n: (rng.uniform(size=(n, NUM_CLASSES - 1)) < 0.5).astype(np.float32)  # noqa
  return {
      "labeled": {"image": image(labeled_size), "mask": mask(labeled_size),
                  "valid": valid(labeled_size), "image_labels": labels(labeled_size)},
      "unlabeled": {"weak_image": image(unlabeled_size), "strong_image": image(unlabeled_size),
                    "valid": unlabeled_valid, "mask": mask(unlabeled_size),
                    "image_labels": labels(unlabeled_size)},
  }


@pytest.fixture(scope="module")
def model_state():
  config = tiny_config()
  graphdef, params, batch_stats = steps.init_model(config, 0)
  return graphdef, params, batch_stats


def part(params, name):
  return jax.tree.leaves(params[name])


def test_sgc_loss_trains_only_the_sgc_head(model_state):
  graphdef, params, batch_stats = model_state
  labeled = random_batch(0)["labeled"]

  @jax.jit
  def sgc_loss_grads(params):
    def loss(params):
      model = nnx.merge(graphdef, params, batch_stats)
      outputs = model(labeled["image"], train=True, rngs=nnx.Rngs(dropout=jax.random.key(0)))
      cam = steps.class_activation_maps(model, outputs["features"], labeled["image_labels"])
      valid = pseudo_labels.resize_nearest(labeled["valid"], outputs["logits"].shape[1:3])
      logits = steps.sgc_logits(model, outputs["features"], cam, valid)
      return losses.masked_cross_entropy(resize_bilinear(logits, (CROP, CROP)), labeled["mask"],
                                         IGNORE)
    return jax.grad(loss)(params)

  grads = sgc_loss_grads(params)
  for name in ("backbone", "aspp", "decoder", "cls_head"):
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in part(grads, name)), name
  assert set(grads["sgc"]) == {"key", "query", "mix", "offset"}
  for name, grad in grads["sgc"].items():
    assert float(jnp.max(jnp.abs(grad))) > 0, name


def pseudo_labels_for(config, model_state, batch, weak_logits):
  graphdef, params, batch_stats = model_state

  @jax.jit
  def run(weak_logits):
    model = nnx.merge(graphdef, params, batch_stats)
    return steps.make_pseudo_labels(model, weak_logits, batch["unlabeled"], config=config)
  return jax.device_get(run(weak_logits))


@pytest.fixture(scope="module")
def unlabeled_case():
  batch = random_batch(1)
  weak_logits = np.random.default_rng(2).normal(size=(8, 9, 9, NUM_CLASSES)).astype(np.float32)
  return batch, weak_logits * 3


def test_decoder_source_sharpens_the_decoder_softmax(model_state, unlabeled_case):
  batch, weak_logits = unlabeled_case
  config = tiny_config(pseudo_label_source="decoder", temperature=0.5)
  out = pseudo_labels_for(config, model_state, batch, weak_logits)
  expected = pseudo_labels.sharpen(jax.nn.softmax(weak_logits), 0.5)
  np.testing.assert_allclose(out["targets"], expected, rtol=1e-5, atol=1e-7)
  assert "sgc_logits" not in out
  # Weights: the valid mask resized to decoder resolution (padding rows and the cutout box out).
  expected_valid = pseudo_labels.resize_nearest(batch["unlabeled"]["valid"], (9, 9))
  np.testing.assert_array_equal(out["weights"], expected_valid)
  assert 0 < out["weights"].mean() < 1


@pytest.mark.parametrize("calibrated", [True, False])
def test_fusion_source_fuses_decoder_and_sgc(model_state, unlabeled_case, calibrated):
  batch, weak_logits = unlabeled_case
  config = tiny_config(calibrated=calibrated, gamma=0.3, temperature=0.7)
  out = pseudo_labels_for(config, model_state, batch, weak_logits)
  assert out["sgc_logits"].shape == weak_logits.shape
  expected = pseudo_labels.calibrated_fusion(weak_logits, out["sgc_logits"], temperature=0.7,
                                             gamma=0.3, group_size=4, calibrate=calibrated)
  np.testing.assert_allclose(out["targets"], expected, rtol=1e-5, atol=1e-7)


def test_hard_labels_with_a_threshold(model_state, unlabeled_case):
  batch, weak_logits = unlabeled_case
  config = tiny_config(pseudo_label_source="sgc", soft_labels=False, confidence_threshold=0.4)
  out = pseudo_labels_for(config, model_state, batch, weak_logits)
  probs = jax.nn.softmax(out["sgc_logits"])  # Hard labels are not sharpened.
  np.testing.assert_array_equal(out["targets"].argmax(-1), np.argmax(probs, -1))
  np.testing.assert_array_equal(out["targets"].sum(-1), 1.0)
  confident = (np.max(probs, -1) >= 0.4).astype(np.float32)
  np.testing.assert_array_equal(out["weights"], out["valid"] * confident)


def test_weak_labels_decide_the_cam(model_state, unlabeled_case):
  batch, weak_logits = unlabeled_case
  batch = jax.tree.map(np.copy, batch)
  batch["unlabeled"]["image_labels"][:] = 0
  batch["unlabeled"]["image_labels"][:, 1] = 1  # Every image: class 2 only.
  out = pseudo_labels_for(tiny_config(weak_labels=True), model_state, batch, weak_logits)
  cam = out["cam"]
  assert np.all(cam[..., [0, 2, 3]] == 0)
  np.testing.assert_allclose(cam[..., 1].max(axis=(1, 2)), 1.0, rtol=1e-6)


def loss_and_grads_on(devices, config, batch):
  graphdef, _, state = steps.create_train_state(config, 0)
  mesh = sharding.make_mesh(devices)
  replicated = sharding.replicated(mesh)
  fn = jax.jit(jax.value_and_grad(
      functools.partial(steps.pseudoseg_loss, graphdef=graphdef, config=config), has_aux=True),
      out_shardings=replicated)
  (loss, (stats, metrics)), grads = fn(jax.device_put(state.params, replicated),
                                       jax.device_put(state.batch_stats, replicated),
                                       sharding.to_global(batch, mesh), jax.random.key(3))
  return jax.device_get((loss, stats, grads, metrics))


def test_pseudoseg_loss_does_not_depend_on_the_device_count():
  config = tiny_config()
  batch = random_batch(4)
  one = loss_and_grads_on(jax.devices()[:1], config, batch)
  four = loss_and_grads_on(jax.devices()[:4], config, batch)
  metrics = one[3]
  for name in ("supervised", "sgc", "classification", "consistency"):
    assert np.isfinite(metrics[f"train/{name}_loss"]) and metrics[f"train/{name}_loss"] > 0
  assert 0 <= metrics["pseudo/accuracy"] <= 1 and "pseudo/sgc_accuracy" in metrics
  for a, b in zip(jax.tree.leaves(one[:3]), jax.tree.leaves(four[:3])):
    np.testing.assert_allclose(a, b, rtol=5e-5, atol=2e-6)
  for name, grad in one[2]["sgc"].items():
    assert float(np.abs(grad).max()) > 0, name


def test_pseudo_label_accuracy_is_class_balanced_against_the_hidden_truth():
  # 4 pixels at decoder resolution: truth [0, 0, 0, 1]; pseudo labels [0, 0, 1, 1]; the last pixel
  # is in the cutout (not counted). Background recall 2/3, class 1 has no counted pixel: 2/3.
  truth = np.array([[[0, 0], [0, 1]]], np.int32)
  targets = jax.nn.one_hot(jnp.array([[[0, 0], [1, 1]]]), 3)
  valid = jnp.array([[[1.0, 1.0], [1.0, 0.0]]])
  pseudo = {"targets": targets, "valid": valid, "weights": valid}
  outputs = {"logits": jax.nn.one_hot(jnp.array([[[0, 1], [0, 1]]]), 3)}
  metrics = steps.pseudo_label_metrics(outputs, pseudo, outputs, {"mask": truth},
                                       num_classes=3, ignore_label=IGNORE)
  np.testing.assert_allclose(metrics["pseudo/accuracy"], 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(metrics["pseudo/decoder_accuracy"], 2 / 3, rtol=1e-6)
  truth[0, 1, 1] = 2  # A class under the cutout does not count.
  metrics = steps.pseudo_label_metrics(outputs, pseudo, outputs, {"mask": truth},
                                       num_classes=3, ignore_label=IGNORE)
  np.testing.assert_allclose(metrics["pseudo/accuracy"], 2 / 3, rtol=1e-6)
  truth[0, 1, 0] = 1  # Pseudo labels: background 2/2, class 1 1/1; decoder: 1/2 and 0/1.
  metrics = steps.pseudo_label_metrics(outputs, pseudo, outputs, {"mask": truth},
                                       num_classes=3, ignore_label=IGNORE)
  np.testing.assert_allclose(metrics["pseudo/accuracy"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(metrics["pseudo/decoder_accuracy"], 0.25, rtol=1e-6)


def test_pseudo_label_class_counts_sum_into_per_class_recall_and_precision():
  # Step 1: truth [0, 0, 2, 2], pseudo labels [0, 2, 2, 0]. Step 2: truth [0, 2, 2, 2], pseudo
  # labels [0, 2, 2, 2], its last pixel in the cutout. Class 0: 3 true pixels, 2 right, 3 labeled;
  # class 2: 4 true, 3 right, 4 labeled; class 1 never true nor labeled.
  def counts(truth, labels, valid):
    outputs = {"logits": jax.nn.one_hot(jnp.array(labels), 3)}
    pseudo = {"targets": outputs["logits"], "valid": jnp.array(valid, jnp.float32),
              "weights": jnp.array(valid, jnp.float32)}
    metrics = steps.pseudo_label_metrics(outputs, pseudo, outputs,
                                         {"mask": np.array(truth, np.int32)},
                                         num_classes=3, ignore_label=IGNORE)
    return {name: metrics[name] for name in steps.PSEUDO_LABEL_CLASS_COUNTS}

  first = counts([[[0, 0], [2, 2]]], [[[0, 2], [2, 0]]], [[[1, 1], [1, 1]]])
  second = counts([[[0, 2], [2, 2]]], [[[0, 2], [2, 2]]], [[[1, 1], [1, 0]]])
  np.testing.assert_array_equal(first["pseudo/class_pixels"], [2, 0, 2])
  np.testing.assert_array_equal(second["pseudo/class_correct"], [1, 0, 2])
  summed = {name: np.sum([first[name], second[name]], axis=0) for name in first}
  quality = train.per_class_pseudo_label_quality(summed)
  np.testing.assert_allclose(quality["pseudo/recall_per_class"], [2 / 3, np.nan, 3 / 4])
  np.testing.assert_allclose(quality["pseudo/precision_per_class"], [2 / 3, np.nan, 3 / 4])


def test_consistency_weight_is_constant_or_ramped_up():
  config = tiny_config(consistency_weight=2.0)
  assert float(steps.consistency_weight(config, 0)) == 2.0
  config = tiny_config(consistency_weight=2.0, consistency_rampup_steps=100)
  weights = [float(steps.consistency_weight(config, step)) for step in (0, 50, 100, 500)]
  np.testing.assert_allclose(weights, [2 * np.exp(-5), 2 * np.exp(-1.25), 2.0, 2.0], rtol=1e-6)
