"""Colour jitter of the strong view (SPEC section 6): brightness, contrast, saturation and hue in
random order, on images in [0, 1], clipped after each op.

Saturation and hue are written as a few elementwise ops on the max, min and channels of each pixel
instead of TF's AdjustSaturation / AdjustHue kernels, which convert every pixel to HSV and back
one at a time (~40 ns a pixel each on CPU). The maths is theirs, rearranged in real arithmetic:

  saturation: HSV keeps V = max and the hue (each channel's place between min and max), and scales
    S = range / V by k, clipped to 1; so every channel's distance below V scales by
    min(k, V / range).
  hue: the rotation keeps min and max; the hue h in [0, 6) puts channel c at
    max - range * clip(min(t, 4 - t), 0, 1) with t = (h + n_c) mod 6, n = (5, 3, 1) for r, g, b.

They agree with the kernels to float rounding (~1e-6 on [0, 1], tests/test_color.py). On a whole
crop, `jitter_and_place` runs the four ops, normalization, padding and flip as one XLA-compiled
function of static shape, which fuses them into a few passes over memory: the window's variable
size would otherwise mean a compilation per shape.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

# Channel offsets of r, g, b on the hue circle (units of 60 degrees) in the HSV -> RGB formula.
_HUE_OFFSETS = (5.0, 3.0, 1.0)


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


# --------------------------------------------------------------------------------------------------
# The four ops on float32 [..., 3] in [0, 1].
# --------------------------------------------------------------------------------------------------


def adjust_saturation(x, factor):
  """tf.image.adjust_saturation(x, factor) to float rounding, for x in [0, 1]."""
  value, _, spread = _max_min_range(x)
  # Greys (range 0) have no hue: they stay, whatever the factor, as in the kernel.
  stretch = tf.minimum(tf.cast(factor, x.dtype), value / _nonzero(spread))
  return value - (value - x) * stretch


def adjust_hue(x, delta):
  """tf.image.adjust_hue(x, delta) to float rounding, for x in [0, 1] and |delta| <= 1."""
  value, low, spread = _max_min_range(x)
  r, g, b = _channels(x)
  safe = _nonzero(spread)
  # The hexcone hue in [-1, 5]; which formula applies depends on the largest channel.
  hue = tf.where(r >= value, (g - b) / safe,
                 tf.where(g >= value, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
  hue = hue + 6.0 * tf.cast(delta, x.dtype)
  offsets = tf.constant(_HUE_OFFSETS, x.dtype)
  # Wrapped into [0, 6] with floor, not floormod, which XLA's CPU backend runs ~10x slower (fmod).
  # The formula is 6-periodic and continuous, so a wrap that rounds to the other end is harmless.
  t = hue + offsets
  t = t - 6.0 * tf.floor(t / 6.0)
  return value - spread * tf.clip_by_value(tf.minimum(t, 4.0 - t), 0.0, 1.0)


def adjust_brightness(x, delta):
  return x + tf.cast(delta, x.dtype)


def adjust_contrast(x, factor, valid=None):
  """tf.image.adjust_contrast over the pixels where `valid` ([h, w, 1] bool), or all of them."""
  if valid is None:
    mean = tf.reduce_mean(x, axis=[-3, -2], keepdims=True)
  else:
    count = tf.reduce_sum(tf.cast(valid, x.dtype))
    mean = tf.reduce_sum(tf.where(valid, x, 0.0), axis=[-3, -2], keepdims=True) / count
  return (x - mean) * tf.cast(factor, x.dtype) + mean


def apply_color_jitter(image, jitter: ColorJitter, valid=None):
  """float [h, w, 3] in [0, 255] -> float32 in [0, 255]: the four ops in `jitter.order`.

  Works on [0, 1] (the range tf.image.adjust_* expects) and clips after every op, so that an
  overshoot of one op is not undone by the next. `valid` ([h, w, 1] bool) limits contrast's mean
  to those pixels (the window inside a padded canvas).
  """
  ops = (lambda x: adjust_brightness(x, jitter.brightness_delta),
         lambda x: adjust_contrast(x, jitter.contrast_factor, valid),
         lambda x: adjust_saturation(x, jitter.saturation_factor),
         lambda x: adjust_hue(x, jitter.hue_delta))
  x = tf.cast(image, tf.float32) / 255.0
  for step in range(len(ops)):
    x = tf.switch_case(jitter.order[step], [lambda op=op, x=x: op(x) for op in ops])
    x = tf.clip_by_value(x, 0.0, 1.0)
  return x * 255.0


def color_jitter(image, seed, *, brightness: float = 0.5, contrast: float = 0.5,
                 saturation: float = 0.5, hue: float = 0.25):
  """Random brightness, contrast, saturation and hue in random order (SPEC: probability 1).

  image: float [h, w, 3] in [0, 255] (a crop window). Returns float32 in [0, 255]. Contrast's
  per-channel mean is over `image`. Unfused, any shape; `jitter_and_place` is the fast path.
  """
  jitter = sample_color_jitter(seed, brightness=brightness, contrast=contrast,
                               saturation=saturation, hue=hue)
  return apply_color_jitter(image, jitter)


# --------------------------------------------------------------------------------------------------
# Fused: jitter, normalize, pad and flip a window in one compiled function.
# --------------------------------------------------------------------------------------------------


def jitter_and_place(window, seed, crop_size, flip, *, brightness: float = 0.5,
                     contrast: float = 0.5, saturation: float = 0.5, hue: float = 0.25):
  """augment.place_normalized_image(color_jitter(window, seed, ...), geometry), to float rounding.

  window: float32 [vh, vw, 3] in [0, 255], vh <= crop_h, vw <= crop_w; crop_size: static
  (crop_h, crop_w); flip: bool scalar. Returns float32 [crop_h, crop_w, 3], padding 0.
  """
  jitter = sample_color_jitter(seed, brightness=brightness, contrast=contrast,
                               saturation=saturation, hue=hue)
  crop_h, crop_w = crop_size
  window = tf.convert_to_tensor(window, tf.float32)
  size = tf.shape(window)[:2]
  # The static shape XLA needs: the window at the top-left of a crop-sized canvas.
  canvas = tf.pad(window, [[0, crop_h - size[0]], [0, crop_w - size[1]], [0, 0]])
  canvas = tf.ensure_shape(canvas, [crop_h, crop_w, 3])
  return _jitter_canvas(canvas, size, flip, jitter)


@tf.function(jit_compile=True)
def _jitter_canvas(canvas, size, flip, jitter: ColorJitter):
  """The compiled body of `jitter_and_place`; one compilation per crop size."""
  rows = tf.range(tf.shape(canvas)[0])[:, None, None] < size[0]
  cols = tf.range(tf.shape(canvas)[1])[None, :, None] < size[1]
  valid = rows & cols
  jittered = apply_color_jitter(canvas, jitter, valid)
  # augment.normalize_image's expression, so the window's pixels are the same bits.
  placed = tf.where(valid, jittered / 127.5 - 1.0, 0.0)
  return tf.where(flip, tf.reverse(placed, axis=[1]), placed)


# --------------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------------


def _channels(x):
  """r, g, b as [..., 1] slices (sliced, not reduced: XLA fuses slices, reductions over 3 are slow)."""
  return x[..., 0:1], x[..., 1:2], x[..., 2:3]


def _max_min_range(x):
  r, g, b = _channels(x)
  value = tf.maximum(tf.maximum(r, g), b)
  low = tf.minimum(tf.minimum(r, g), b)
  return value, low, value - low


def _nonzero(spread):
  """The divisor where spread is 0 (a grey pixel); the result is then multiplied by 0 anyway."""
  return tf.where(spread > 0.0, spread, 1.0)


def _stateless_uniform_around(seed, center: float, half_width: float):
  """float32 scalar ~ U(center - half_width, center + half_width)."""
  return tf.random.stateless_uniform(
      [], seed, minval=center - half_width, maxval=center + half_width)
