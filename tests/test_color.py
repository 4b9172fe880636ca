"""data/color.py's brightness and contrast against tf.image, and contrast's mean over a mask."""

import numpy as np
import tensorflow as tf

from pseudoseg_jax.data import color

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


def test_color_ops_agree_with_tf_image_on_contrast_and_brightness():
  x = edge_case_pixels()
  np.testing.assert_allclose(color.adjust_contrast(x, 1.3), tf.image.adjust_contrast(x, 1.3),
                             rtol=0, atol=TOLERANCE)
  np.testing.assert_allclose(color.adjust_brightness(x, -0.2), tf.image.adjust_brightness(x, -0.2),
                             rtol=0, atol=0)
