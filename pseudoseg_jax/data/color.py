"""Colour jitter of the strong view (SPEC section 6): brightness, contrast, saturation and hue in
random order, on images in [0, 1], clipped after each op; all four are tf.image's kernels.

(Contrast was a composition of TF ops for a while, to take its mean over a mask: 6 of the 13 CPU ms
an unlabeled pair's augmentation took at crop 513, against 0.6 ms for tf.image.adjust_contrast's
single kernel, which computes the same (x - mean) * factor + mean.)

(Measured on the 2-core CPU, benchmarks/input_pipeline.py at crop 513: saturation and hue rewritten
as elementwise TF ops on each pixel's max/min cost more per pair than TF's HSV kernels (71 against
45 CPU ms); compiled with jit_compile they cost less in isolation, but inside tf.data kept the
default-threaded stream on one core (14.7 pairs/s against 24 with one thread). So: the kernels.)
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

# The strengths color_jitter takes, in this order, and SPEC's values for them.
JITTER_FIELDS = ("brightness", "contrast", "saturation", "hue")
SPEC_JITTER = (0.5, 0.5, 0.5, 0.25)


class ColorJitter(NamedTuple):
  """One sampled colour jitter, on images in [0, 1].

  order: int32 [4], a permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue); order[k] is
    the op applied k-th.
  brightness_delta: added to every value. contrast_factor: scales the distance from each channel's
    mean. saturation_factor: scales HSV saturation. hue_delta: rotates HSV hue (1 = full turn).
  """

  order: tf.Tensor
  brightness_delta: tf.Tensor
  contrast_factor: tf.Tensor
  saturation_factor: tf.Tensor
  hue_delta: tf.Tensor


def sample_color_jitter(seed, *, brightness: float = 0.5, contrast: float = 0.5,
                        saturation: float = 0.5, hue: float = 0.25) -> ColorJitter:
  """Samples the op order and each op's parameter from `seed` (shape [2]).

  Ranges as tf.image.random_*: delta ~ U(-brightness, brightness), factors ~ U(1 - s, 1 + s),
  hue delta ~ U(-hue, hue). A strength of 0 gives the op's neutral value.
  """
  order_seed, brightness_seed, contrast_seed, saturation_seed, hue_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=5))
  # Sorting i.i.d. uniforms gives a uniformly random permutation.
  order = tf.cast(tf.argsort(tf.random.stateless_uniform([4], order_seed)), tf.int32)
  return ColorJitter(
      order=order,
      brightness_delta=_stateless_uniform_around(brightness_seed, 0.0, brightness),
      contrast_factor=_stateless_uniform_around(contrast_seed, 1.0, contrast),
      saturation_factor=_stateless_uniform_around(saturation_seed, 1.0, saturation),
      hue_delta=_stateless_uniform_around(hue_seed, 0.0, hue))


def apply_color_jitter(image, jitter: ColorJitter):
  """float [h, w, 3] in [0, 255] -> float32 in [0, 255]: the four ops in `jitter.order`.

  Works on [0, 1] (the range tf.image.adjust_* expects) and clips after every op, so that an
  overshoot of one op is not undone by the next.
  """
  ops = (lambda x: tf.image.adjust_brightness(x, jitter.brightness_delta),
         lambda x: tf.image.adjust_contrast(x, jitter.contrast_factor),
         lambda x: tf.image.adjust_saturation(x, jitter.saturation_factor),
         lambda x: tf.image.adjust_hue(x, jitter.hue_delta))
  x = tf.cast(image, tf.float32) / 255.0
  for step in range(len(ops)):
    x = tf.switch_case(jitter.order[step], [lambda op=op, x=x: op(x) for op in ops])
    x = tf.clip_by_value(x, 0.0, 1.0)
  return x * 255.0


def color_jitter(image, seed, *, brightness: float = 0.5, contrast: float = 0.5,
                 saturation: float = 0.5, hue: float = 0.25):
  """Random brightness, contrast, saturation and hue in random order (SPEC: probability 1).

  image: float [h, w, 3] in [0, 255] (a crop window). Returns float32 in [0, 255]. Contrast's
  per-channel mean is over `image`. Any window shape.
  """
  jitter = sample_color_jitter(seed, brightness=brightness, contrast=contrast,
                               saturation=saturation, hue=hue)
  return apply_color_jitter(image, jitter)


# --------------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------------


def _stateless_uniform_around(seed, center: float, half_width: float):
  """float32 scalar ~ U(center - half_width, center + half_width)."""
  return tf.random.stateless_uniform(
      [], seed, minval=center - half_width, maxval=center + half_width)
