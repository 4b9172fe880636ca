"""Preprocessing ops on single examples (SPEC section 6), usable eagerly and inside tf.data.map.

Geometry is split in two steps so that several aligned maps share ONE random transform:

    geometry = sample_geometry(seed, tf.shape(image)[:2], crop_size=513)
    image = apply_geometry_to_image(image, geometry)               # antialiased bilinear, pad 127.5
    mask = apply_geometry_to_label(mask, geometry, fill_value=255)  # nearest, pad 255
    valid = valid_mask(geometry)                                    # 1 = real pixel, 0 = padding

The image path is itself two stages, `scale_image` then `place_image` (pad, crop, flip), because the
original jitters the strong view's colours after scaling but before padding (contrast uses the mean
of the whole scaled image, so the order changes the result):

    scaled = scale_image(image, geometry)
    weak_view = place_image(scaled, geometry)
    strong_view = place_image(color_jitter(scaled, jitter_seed), geometry)
    cutout = sample_cutout(cutout_seed, geometry.crop_size, cutout_size=100)
    strong_view = cut_out(strong_view, cutout)                      # fill 127.5 inside the box

Randomness is stateless: `sample_geometry` is a pure function of (seed, image size), so the same
seed gives the same transform every time, on every host, after every restart.

Size rule: a factor s maps a side n to max(1, floor(n * s)), as DeepLab's
`randomly_scale_image_and_label` (it casts the float product to int). The default factors are
multiples of 0.25, exactly representable, so the product is exact and the floor never flips on
rounding noise.
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple, Sequence, Tuple, Union

import tensorflow as tf

DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
IMAGE_FILL_VALUE = 127.5  # Normalizes to exactly 0, the "mean pixel" of DeepLab's [-1, 1] models.
FLIP_PROBABILITY = 0.5

CropSize = Union[int, Tuple[int, int]]


def as_height_width(crop_size: CropSize) -> Tuple[int, int]:
  """An int n means an n x n crop; a pair is (height, width)."""
  if isinstance(crop_size, numbers.Integral):
    return (int(crop_size), int(crop_size))
  height, width = crop_size
  return (int(height), int(width))


# --------------------------------------------------------------------------------------------------
# Single deterministic ops.
# --------------------------------------------------------------------------------------------------


def scaled_size(size, scale):
  """[height, width] -> max(1, floor(size * scale)) as int32 (DeepLab's truncation)."""
  size = tf.cast(size, tf.float32)
  new_size = tf.cast(tf.math.floor(size * tf.cast(scale, tf.float32)), tf.int32)
  return tf.maximum(new_size, 1)


def resize_image(image, size):
  """Bilinear with antialiasing (the original's TF2 resize); float32 output, values not clipped."""
  image = tf.cast(image, tf.float32)
  # Antialiasing only matters when shrinking, and at equal size the op is the identity.
  return tf.image.resize(image, _height_width_tensor(size), method="bilinear", antialias=True)


def resize_label(label, size):
  """Nearest neighbour, so no class index is invented. Keeps the dtype; rank 2 or 3.

  Half-pixel centres (TF2 default), the same sampling grid as `resize_image`, so labels stay on
  their pixels. The original used align_corners=True for labels, shifting them by up to half a
  source pixel against the image; we deliberately keep them aligned.
  """
  size = _height_width_tensor(size)
  return _as_rank3_then_back(label, lambda x: tf.image.resize(x, size, method="nearest"))


def pad_bottom_right(x, size, fill_value):
  """Pads rows at the bottom and columns at the right up to `size` = [height, width]; never crops.

  A `size` smaller than the input is an error (tf.pad rejects negative paddings).
  """
  size = tf.convert_to_tensor(size, tf.int32)
  shape = tf.shape(x)
  extra = size - shape[:2]
  paddings = [[0, extra[0]], [0, extra[1]]] + [[0, 0]] * (len(x.shape) - 2)
  return tf.pad(x, paddings, constant_values=tf.cast(fill_value, x.dtype))


def crop_window(x, offset, size: CropSize):
  """The contiguous window x[top:top+height, left:left+width] with a static output shape."""
  height, width = as_height_width(size)
  offset = tf.cast(offset, tf.int32)
  begin = tf.concat([offset, tf.zeros([len(x.shape) - 2], tf.int32)], axis=0)
  window = tf.slice(x, begin, [height, width] + [-1] * (len(x.shape) - 2))
  return tf.ensure_shape(window, [height, width] + x.shape[2:].as_list())


def flip_left_right_if(x, flip):
  """Reverses the columns when `flip` (a bool tensor) is true."""
  return tf.cond(flip, lambda: tf.reverse(x, axis=[1]), lambda: x)


def normalize_image(image):
  """[0, 255] -> [-1, 1], as x / 127.5 - 1 rather than x * (2/255) - 1: 2/255 is inexact in float32,
  while this maps 0 -> -1, 127.5 -> 0 and 255 -> 1 exactly, so padding is exactly 0 for the net."""
  return tf.cast(image, tf.float32) / 127.5 - 1.0


def image_labels_from_mask(mask, *, num_classes: int, ignore_label: int):
  """Multi-hot float32 [num_classes - 1] of the foreground classes present (class c -> index c - 1).

  Background (0) and `ignore_label` are excluded; values outside [0, num_classes) are ignored too.
  """
  values = tf.reshape(tf.cast(mask, tf.int32), [-1])
  in_range = (values >= 0) & (values < num_classes) & (values != ignore_label)
  # bincount drops values >= maxlength, so out-of-range pixels are parked at num_classes.
  values = tf.where(in_range, values, num_classes)
  counts = tf.math.bincount(values, minlength=num_classes, maxlength=num_classes, dtype=tf.int32)
  return tf.cast(counts[1:] > 0, tf.float32)


# --------------------------------------------------------------------------------------------------
# One random geometry, shared by every aligned map of an example.
# --------------------------------------------------------------------------------------------------


class Geometry(NamedTuple):
  """One sampled scale-pad-crop-flip transform.

  scaled_size: int32 [2], the (height, width) after scaling.
  crop_offset: int32 [2], (top, left) of the crop window in the padded, scaled image.
  flip: bool scalar, whether columns are reversed after cropping.
  crop_size: static (height, width) of the output; a Python pair, so output shapes are static.
    Sample and apply inside the same function (do not return a Geometry from a Dataset.map).
  """

  scaled_size: tf.Tensor
  crop_offset: tf.Tensor
  flip: tf.Tensor
  crop_size: Tuple[int, int]

  @property
  def padded_size(self):
    """Bottom/right padding brings each side up to at least the crop."""
    return tf.maximum(self.scaled_size, tf.constant(self.crop_size, tf.int32))


def sample_geometry(seed, image_size, crop_size: CropSize,
                    scales: Sequence[float] = DEFAULT_SCALES) -> Geometry:
  """Samples scale, crop offset and flip from `seed` (shape [2], int32/int64) and the image size.

  Each decision has its own seed split from `seed`. The scale is uniform over `scales`; the crop
  offset is uniform over all windows of the padded image; the flip has probability 0.5.
  """
  if not scales:
    raise ValueError("scales must list at least one scale factor.")
  crop_size = as_height_width(crop_size)
  scale_seed, top_seed, left_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=4))
  scale_index = tf.random.stateless_uniform(
      [], scale_seed, minval=0, maxval=len(scales), dtype=tf.int32)
  scale = tf.gather(tf.constant(scales, tf.float32), scale_index)
  new_size = scaled_size(tf.convert_to_tensor(image_size)[:2], scale)
  padded = tf.maximum(new_size, tf.constant(crop_size, tf.int32))
  # maxval is exclusive: offsets 0 .. padded - crop inclusive.
  top = tf.random.stateless_uniform(
      [], top_seed, minval=0, maxval=padded[0] - crop_size[0] + 1, dtype=tf.int32)
  left = tf.random.stateless_uniform(
      [], left_seed, minval=0, maxval=padded[1] - crop_size[1] + 1, dtype=tf.int32)
  flip = tf.random.stateless_uniform([], flip_seed) < FLIP_PROBABILITY
  return Geometry(scaled_size=new_size, crop_offset=tf.stack([top, left]), flip=flip,
                  crop_size=crop_size)


def scale_image(image, geometry: Geometry):
  """Stage 1 for images: float32 [h', w', C], still in [0, 255] (colour jitter goes after this)."""
  return resize_image(image, geometry.scaled_size)


def place_image(scaled_image, geometry: Geometry, fill_value=IMAGE_FILL_VALUE):
  """Stage 2 for images: pad bottom/right with `fill_value`, crop the window, flip."""
  return _pad_crop_flip(tf.cast(scaled_image, tf.float32), geometry, fill_value)


def apply_geometry_to_image(image, geometry: Geometry, fill_value=IMAGE_FILL_VALUE):
  """Image [h, w, C] (any dtype) -> float32 [crop_h, crop_w, C] in [0, 255] plus padding."""
  return place_image(scale_image(image, geometry), geometry, fill_value)


def apply_geometry_to_label(label, geometry: Geometry, fill_value):
  """Label-like map [h, w] or [h, w, C] -> [crop_h, crop_w(, C)], same dtype, nearest resize.

  Any per-pixel map aligned with the image works: class masks (fill the ignore label), a valid mask
  (fill 0), coordinate maps in tests.
  """
  return _pad_crop_flip(resize_label(label, geometry.scaled_size), geometry, fill_value)


def valid_mask(geometry: Geometry, dtype=tf.int32):
  """[crop_h, crop_w]: 1 where the output shows a real (scaled) pixel, 0 on padding.

  Computed in closed form; equals apply_geometry_to_label(ones, geometry, fill_value=0).
  """
  crop_h, crop_w = geometry.crop_size
  rows = tf.range(crop_h) + geometry.crop_offset[0] < geometry.scaled_size[0]
  cols = tf.range(crop_w) + geometry.crop_offset[1] < geometry.scaled_size[1]
  valid = tf.cast(rows[:, None] & cols[None, :], dtype)
  return flip_left_right_if(valid, geometry.flip)


# --------------------------------------------------------------------------------------------------
# Strong view only: colour jitter (before padding) and cutout (after cropping).
# --------------------------------------------------------------------------------------------------


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
    x = tf.switch_case(jitter.order[step], [functools.partial(op, x) for op in ops])
    x = tf.clip_by_value(x, 0.0, 1.0)
  return x * 255.0


def color_jitter(image, seed, *, brightness: float = 0.5, contrast: float = 0.5,
                 saturation: float = 0.5, hue: float = 0.25):
  """Random brightness, contrast, saturation and hue in random order (SPEC: probability 1).

  image: float [h, w, 3] in [0, 255], the output of `scale_image`. Returns float32 in [0, 255].
  """
  jitter = sample_color_jitter(seed, brightness=brightness, contrast=contrast,
                               saturation=saturation, hue=hue)
  return apply_color_jitter(image, jitter)


def cutout_mask(center, crop_size: CropSize, cutout_size: int):
  """int32 [crop_h, crop_w]: 1 inside a cutout_size-square box at `center`, clipped to the crop.

  The box spans rows center[0] - cutout_size // 2 up to (excluding) that plus cutout_size, and
  columns likewise, so an even size of 2k covers [c - k, c + k) as in the original. Size 0: no box.
  """
  if cutout_size < 0:
    raise ValueError(f"cutout_size must be >= 0, got {cutout_size}.")
  crop_h, crop_w = as_height_width(crop_size)
  start = tf.cast(center, tf.int32) - cutout_size // 2
  rows = tf.range(crop_h) - start[0]
  cols = tf.range(crop_w) - start[1]
  inside_rows = (rows >= 0) & (rows < cutout_size)
  inside_cols = (cols >= 0) & (cols < cutout_size)
  return tf.cast(inside_rows[:, None] & inside_cols[None, :], tf.int32)


def sample_cutout(seed, crop_size: CropSize, cutout_size: int):
  """`cutout_mask` of one box whose centre is uniform over the crop's pixels (seed shape [2])."""
  crop_h, crop_w = as_height_width(crop_size)
  row_seed, col_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  row = tf.random.stateless_uniform([], row_seed, minval=0, maxval=crop_h, dtype=tf.int32)
  col = tf.random.stateless_uniform([], col_seed, minval=0, maxval=crop_w, dtype=tf.int32)
  return cutout_mask(tf.stack([row, col]), crop_size, cutout_size)


def cut_out(image, cutout, fill_value=IMAGE_FILL_VALUE):
  """Sets every channel to `fill_value` where `cutout` ([h, w], nonzero = inside the box) is set."""
  image = tf.convert_to_tensor(image)
  inside = tf.cast(cutout, tf.bool)[..., None]
  return tf.where(inside, tf.cast(fill_value, image.dtype), image)


def _pad_crop_flip(x, geometry: Geometry, fill_value):
  padded = pad_bottom_right(x, geometry.padded_size, fill_value)
  window = crop_window(padded, geometry.crop_offset, geometry.crop_size)
  return flip_left_right_if(window, geometry.flip)


def _height_width_tensor(size):
  """tf.image.resize needs a size of static shape [2]; a size built in a graph may not have one."""
  return tf.ensure_shape(tf.cast(size, tf.int32), [2])


def _as_rank3_then_back(x, fn):
  """Runs an op written for [h, w, C] on a rank-2 or rank-3 map, returning the input's rank."""
  if len(x.shape) == 2:
    return fn(x[..., None])[..., 0]
  if len(x.shape) == 3:
    return fn(x)
  raise ValueError(f"Expected a [height, width] or [height, width, channels] map, got {x.shape}.")


def _stateless_uniform_around(seed, center: float, half_width: float):
  """float32 scalar ~ U(center - half_width, center + half_width)."""
  return tf.random.stateless_uniform(
      [], seed, minval=center - half_width, maxval=center + half_width)
