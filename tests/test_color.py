"""The vectorized saturation and hue against TF's kernels, and the fused strong-view path against
the unfused one."""

import numpy as np
import pytest
import tensorflow as tf

from pseudoseg_jax.data import augment, color

TOLERANCE = 1e-5  # On [0, 1]: float rounding of a rearranged formula.


def edge_case_pixels():
  """Greys, pure primaries and secondaries, 0 and 1, near-ties, and random pixels."""
  special = [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0],
             [0, 1, 1], [1, 0, 1], [1, 0.5, 0], [0.2, 0.2, 0.9], [0.9, 0.2, 0.2], [0.3, 0.3, 0.3001],
             [1, 1, 0.999999], [0, 0, 1e-6], [0.7, 0.1, 0.4]]
  rng = np.random.default_rng(0)
  random = rng.uniform(0, 1, (4000, 3))
  quantized = rng.integers(0, 256, (4000, 3)) / 255.0  # Ties are common in 8-bit images.
  pixels = np.concatenate([special, random, quantized]).astype(np.float32)
  return pixels.reshape(-1, 8, 3)  # 16 + 8000 pixels.


@pytest.mark.parametrize("factor", [0.0, 0.5, 0.8, 1.0, 1.3, 1.5, 4.0])
def test_adjust_saturation_equals_the_tf_kernel(factor):
  x = edge_case_pixels()
  np.testing.assert_allclose(color.adjust_saturation(x, factor),
                             tf.image.adjust_saturation(x, factor), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("delta", [-1.0, -0.25, -0.1, -1e-7, 0.0, 0.05, 1 / 6, 0.25, 0.5, 1.0])
def test_adjust_hue_equals_the_tf_kernel_including_wrap_around(delta):
  x = edge_case_pixels()
  np.testing.assert_allclose(color.adjust_hue(x, delta), tf.image.adjust_hue(x, delta), rtol=0,
                             atol=TOLERANCE)


def test_adjust_saturation_and_hue_in_a_dataset_and_compiled():
  x = edge_case_pixels()
  compiled = tf.function(lambda im: color.adjust_hue(color.adjust_saturation(im, 1.4), -0.2),
                         jit_compile=True)
  got = next(iter(tf.data.Dataset.from_tensors(x).map(compiled)))
  want = tf.image.adjust_hue(tf.image.adjust_saturation(x, 1.4), -0.2)
  np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)


def test_color_ops_agree_with_tf_image_on_contrast_and_brightness():
  x = edge_case_pixels()
  np.testing.assert_allclose(color.adjust_contrast(x, 1.3), tf.image.adjust_contrast(x, 1.3),
                             rtol=0, atol=TOLERANCE)
  np.testing.assert_allclose(color.adjust_brightness(x, -0.2), tf.image.adjust_brightness(x, -0.2),
                             rtol=0, atol=0)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("window_size", [(20, 13), (24, 31), (7, 31)])
def test_jitter_and_place_equals_placing_the_jittered_window(flip, window_size):
  rng = np.random.default_rng(sum(window_size) + flip)
  window = rng.uniform(0, 255, window_size + (3,)).astype(np.float32)
  geometry = augment.Geometry(scaled_size=tf.constant(window_size), crop_offset=tf.constant([0, 0]),
                              flip=tf.constant(flip), crop_size=(24, 31))
  for i in range(6):
    seed = tf.constant([i, 3], tf.int64)
    want = augment.place_normalized_image(color.color_jitter(window, seed), geometry)
    got = color.jitter_and_place(window, seed, geometry.crop_size, geometry.flip)
    assert got.shape == (24, 31, 3)
    # [-1, 1] is twice the [0, 1] range the ops' tolerance is stated on.
    np.testing.assert_allclose(got, want, rtol=0, atol=2 * TOLERANCE)
