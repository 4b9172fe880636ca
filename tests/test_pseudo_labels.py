"""Pseudo-label arithmetic (SPEC 2-5): known answers, autodiff cross-checks, masking, sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf
from jax.sharding import NamedSharding, PartitionSpec

from pseudoseg_jax import losses, pseudo_labels, sharding


def pixel(values):
  return jnp.asarray(values, jnp.float32).reshape(1, 1, 1, -1)


# --------------------------------------------------------------------------------------------------
# Calibrated fusion.
# --------------------------------------------------------------------------------------------------


def test_calibrated_fusion_reproduces_the_spec_known_answer():
  d, a = pixel([2, 1, 0]), pixel([0, 3, 0])
  scale = pseudo_labels.calibration_scale(d, a, group_size=1)
  np.testing.assert_allclose(scale.ravel(), [0.654654], atol=1e-6)
  averaged = pseudo_labels.calibrated_fusion(d, a, temperature=1.0, group_size=1)
  np.testing.assert_allclose(averaged.ravel(), [.334167, .535617, .130216], atol=2e-6)
  sharpened = pseudo_labels.calibrated_fusion(d, a, temperature=0.5, gamma=0.5, group_size=1)
  np.testing.assert_allclose(sharpened.ravel(), [.268749, .690443, .040808], atol=2e-6)


def test_plain_average_and_gamma_weighting():
  d, a = pixel([2, 1, 0]), pixel([0, 3, 0])
  plain = pseudo_labels.calibrated_fusion(d, a, temperature=1.0, group_size=1, calibrate=False)
  expected = 0.5 * jax.nn.softmax(d) + 0.5 * jax.nn.softmax(a)
  np.testing.assert_allclose(plain, expected, atol=1e-6)
  decoder_only = pseudo_labels.calibrated_fusion(d, a, temperature=1.0, gamma=1.0, group_size=1,
                                                 calibrate=False)
  np.testing.assert_allclose(decoder_only, jax.nn.softmax(d), atol=1e-6)


def test_one_scale_per_group_of_consecutive_images():
  rng = np.random.default_rng(0)
  d = rng.normal(size=(8, 3, 3, 5)).astype(np.float32)
  a = rng.normal(size=(8, 3, 3, 5)).astype(np.float32)
  scale = np.asarray(pseudo_labels.calibration_scale(d, a, group_size=4)).ravel()
  for group in (slice(0, 4), slice(4, 8)):
    expected = 1 / np.sqrt(np.mean(np.concatenate([d[group], a[group]]) ** 2) + 1e-8)
    np.testing.assert_allclose(scale[group], expected, rtol=1e-5)
  assert abs(scale[0] - scale[4]) > 1e-3
  # Changing the second group leaves the first group's pseudo labels untouched.
  changed = d.copy()
  changed[5] *= 10
  before = pseudo_labels.calibrated_fusion(d, a, group_size=4)
  after = pseudo_labels.calibrated_fusion(changed, a, group_size=4)
  np.testing.assert_array_equal(before[:4], after[:4])
  assert not np.allclose(before[4:], after[4:])
  with pytest.raises(ValueError, match="fusion_group_size=3"):
    pseudo_labels.calibration_scale(d, a, group_size=3)


def test_fusion_does_not_depend_on_how_the_batch_is_sharded():
  rng = np.random.default_rng(1)
  d = rng.normal(size=(8, 5, 5, 4)).astype(np.float32) * 3
  a = rng.normal(size=(8, 5, 5, 4)).astype(np.float32)
  fuse = functools.partial(pseudo_labels.calibrated_fusion, temperature=0.5, gamma=0.5,
                           group_size=4)
  results = []
  for count in (1, 4):
    mesh = sharding.make_mesh(jax.devices()[:count])
    spread = NamedSharding(mesh, PartitionSpec("data"))
    inputs = [jax.device_put(x, spread) for x in (d, a)]
    out = jax.jit(fuse, out_shardings=NamedSharding(mesh, PartitionSpec()))(*inputs)
    results.append(np.asarray(out))
  np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_sharpening_and_hard_labels():
  probs = pixel([0.5, 0.3, 0.2])
  sharpened = pseudo_labels.sharpen(probs, 0.5)
  np.testing.assert_allclose(sharpened.ravel(), np.array([25, 9, 4]) / 38, rtol=1e-6)
  assert pseudo_labels.sharpen(probs, 1.0) is probs
  labels, confident = pseudo_labels.hard_labels(jnp.concatenate([probs, pixel([.1, .8, .1])]),
                                                threshold=0.6)
  np.testing.assert_array_equal(labels.ravel(), [0, 1])
  np.testing.assert_array_equal(confident.ravel(), [0, 1])


# --------------------------------------------------------------------------------------------------
# Grad-CAM.
# --------------------------------------------------------------------------------------------------


def autodiff_grad_cam(features, kernel, bias):
  """Grad-CAM as defined: per class, spatial mean of d logit_c / d features, weighted sum, ReLU."""
  def logits(f):
    return jnp.mean(f, axis=(1, 2)) @ kernel + bias
  _, vjp = jax.vjp(logits, features)
  cams = []
  for c in range(kernel.shape[1]):
    cotangent = jnp.zeros((features.shape[0], kernel.shape[1])).at[:, c].set(1.0)
    (grads,) = vjp(cotangent)
    weights = jnp.mean(grads, axis=(1, 2), keepdims=True)
    cams.append(jax.nn.relu(jnp.sum(weights * features, axis=-1)))
  return jnp.stack(cams, axis=-1)


def test_closed_form_cam_equals_autodiff_grad_cam():
  keys = jax.random.split(jax.random.key(0), 3)
  features = jax.nn.relu(jax.random.normal(keys[0], (2, 5, 6, 16)))
  kernel = jax.random.normal(keys[1], (16, 4))
  bias = jax.random.normal(keys[2], (4,))
  expected = autodiff_grad_cam(features, kernel, bias)
  closed_form = pseudo_labels.grad_cam(features, kernel)
  assert float(jnp.max(expected)) > 0 and float(jnp.min(expected)) == 0  # ReLU is exercised.
  np.testing.assert_allclose(closed_form, expected, rtol=1e-5, atol=1e-7)


def test_normalized_cam_keeps_labeled_classes_scaled_to_one():
  cam = jnp.stack([jnp.full((3, 3), 2.0), jnp.arange(9.0).reshape(3, 3), jnp.zeros((3, 3))],
                  axis=-1)[None]
  normalized = pseudo_labels.normalize_cam(cam, jnp.array([[1.0, 1.0, 1.0]]))
  np.testing.assert_allclose(normalized[0, ..., 0], 1.0)
  np.testing.assert_allclose(normalized[0, ..., 1], np.arange(9.0).reshape(3, 3) / 8)
  np.testing.assert_array_equal(normalized[0, ..., 2], 0.0)  # All-zero map: no NaN.
  dropped = pseudo_labels.normalize_cam(cam, jnp.array([[0.0, 1.0, 1.0]]))
  np.testing.assert_array_equal(dropped[0, ..., 0], 0.0)
  labels = pseudo_labels.predicted_image_labels(jnp.array([[-1.0, 0.0, 2.0]]))
  np.testing.assert_array_equal(labels, [[0.0, 1.0, 1.0]])


# --------------------------------------------------------------------------------------------------
# Self-attention.
# --------------------------------------------------------------------------------------------------


def test_masked_keys_get_zero_attention_and_invalid_queries_attend_uniformly():
  keys = jax.random.split(jax.random.key(1), 2)
  query = jax.random.normal(keys[0], (2, 6, 4))
  key = jax.random.normal(keys[1], (2, 6, 4))
  valid = jnp.array([[1, 1, 1, 1, 0, 0], [1, 0, 1, 0, 1, 1]], jnp.float32)
  weights = np.asarray(pseudo_labels.attention_weights(query, key, valid))
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  for n in range(2):
    valid_positions = np.asarray(valid[n]) > 0
    rows = weights[n][valid_positions]
    assert np.all(rows[:, ~valid_positions] == 0.0)
    assert np.all(rows[:, valid_positions] > 0)
    # The original's float32 arithmetic: -1e9 swamps the logits of an invalid query.
    np.testing.assert_allclose(weights[n][~valid_positions], 1 / 6, rtol=1e-6)


def test_attention_refinement_adds_the_residual_and_background():
  cam = jnp.array([[[[1.0, 0.0]], [[0.0, 0.5]]]])  # [1, 2, 1, 2]
  zeros = jnp.zeros((1, 2, 1, 3))  # Equal logits: uniform attention over the two positions.
  refined = pseudo_labels.refine_with_attention(cam, zeros, zeros, jnp.ones((1, 2, 1)))
  np.testing.assert_allclose(refined, cam + jnp.array([0.5, 0.25]), rtol=1e-6)
  with_background = pseudo_labels.with_background(refined)
  np.testing.assert_allclose(with_background[..., 0], 2 - jnp.max(refined, axis=-1), rtol=1e-6)


def test_center_only_batch_norm_uses_the_batch_statistics():
  x = jax.random.normal(jax.random.key(2), (3, 4, 5, 6)) * 3 + 7
  offset = jnp.arange(6.0)
  y = pseudo_labels.center_only_batch_norm(x, offset)
  np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), offset, atol=1e-5)
  variance = jnp.var(x, axis=(0, 1, 2))
  np.testing.assert_allclose(jnp.var(y, axis=(0, 1, 2)), variance / (variance + 1e-3), rtol=1e-5)


@pytest.mark.parametrize("in_size,out_size", [(97, 25), (97, 13), (33, 9), (513, 33), (10, 25)])
def test_resize_nearest_matches_tf1(in_size, out_size):
  x = np.arange(2 * in_size * in_size, dtype=np.float32).reshape(2, in_size, in_size, 1)
  expected = tf.compat.v1.image.resize_nearest_neighbor(x, [out_size, out_size]).numpy()
  np.testing.assert_array_equal(pseudo_labels.resize_nearest(x, (out_size, out_size)), expected)
  np.testing.assert_array_equal(pseudo_labels.resize_nearest(x[..., 0], (out_size, out_size)),
                                expected[..., 0])


# --------------------------------------------------------------------------------------------------
# Losses used with pseudo labels.
# --------------------------------------------------------------------------------------------------


def test_consistency_loss_counts_thresholded_pixels_in_the_denominator():
  logits = jnp.log(jnp.array([[[[0.5, 0.5]], [[0.9, 0.1]]]]))  # [1, 2, 1, 2]
  targets = jnp.array([[[[1.0, 0.0]], [[0.0, 1.0]]]])
  per_pixel = np.array([-np.log(0.5), -np.log(0.1)])
  both = losses.consistency_cross_entropy(logits, targets, jnp.ones((1, 2, 1)), jnp.array(2.0))
  np.testing.assert_allclose(both, per_pixel.mean(), rtol=1e-6)
  # A pixel below the confidence threshold leaves the numerator but stays in the denominator.
  first = losses.consistency_cross_entropy(logits, targets, jnp.array([[[1.0], [0.0]]]),
                                           jnp.array(2.0))
  np.testing.assert_allclose(first, per_pixel[0] / 2, rtol=1e-6)
  assert float(losses.consistency_cross_entropy(logits, targets, jnp.zeros((1, 2, 1)),
                                                jnp.array(0.0))) == 0.0


def test_multilabel_sigmoid_cross_entropy_matches_optax():
  logits = jnp.array([[-30.0, 0.3, 4.0], [2.0, -1.0, 50.0]])
  labels = jnp.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
  expected = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))
  np.testing.assert_allclose(losses.multilabel_sigmoid_cross_entropy(logits, labels), expected,
                             rtol=1e-6)
