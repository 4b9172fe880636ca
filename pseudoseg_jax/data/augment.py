"""Preprocessing ops on single examples (SPEC section 6), usable eagerly and inside tf.data.map.

Geometry is split in two steps so that several aligned maps share ONE random transform:

    geometry = sample_geometry(seed, tf.shape(image)[:2], crop_size=513)
    image = apply_geometry_to_image(image, geometry)               # antialiased bilinear, pad 127.5
    mask = apply_geometry_to_label(mask, geometry, fill_value=255)  # nearest, pad 255
    valid = valid_mask(geometry)                                    # 1 = real pixel, 0 = padding

Only the crop window is ever computed. The transform is "scale the whole image, pad it bottom/right,
crop, flip", but the crop throws most of a scaled image away, so `resize_window` computes just the
real pixels the crop shows (window ∩ scaled image) straight from the source, and `place_window`
flips them and adds the padding. This equals scaling the whole image and cropping: bit for bit for
labels, to float rounding of the sample positions for images (see `resize_window`). The image path
stays two stages because the strong view's colours are jittered between them, before padding:

    window = resize_window(image, geometry)
    weak_view = place_window(window, geometry, IMAGE_FILL_VALUE)
    strong_view = place_window(color.color_jitter(window, jitter_seed), geometry, IMAGE_FILL_VALUE)
    cutout = sample_cutout(cutout_seed, geometry.crop_size, cutout_size=100)
    strong_view = cut_out(strong_view, cutout)                      # fill 127.5 inside the box

Deviation from the original (and from this module before): the jitter sees the window, not the
whole scaled image. Every jitter op is per pixel except contrast, whose per-channel mean is now the
mean over the window's real pixels instead of over the whole scaled image.

Randomness is stateless: `sample_geometry` is a pure function of (seed, image size), so the same
seed gives the same transform every time, on every host, after every restart.

Size rule: a factor s maps a side n to max(1, floor(n * s)), as DeepLab's
`randomly_scale_image_and_label` (it casts the float product to int). The default factors are
multiples of 0.25, exactly representable, so the product is exact and the floor never flips on
rounding noise.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Sequence, Tuple, Union

import tensorflow as tf

DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
IMAGE_FILL_VALUE = 127.5  # Normalizes to exactly 0, the "mean pixel" of DeepLab's [-1, 1] models.
# normalize_image(IMAGE_FILL_VALUE), exactly: padding added after normalizing is the same bits.
NORMALIZED_FILL_VALUE = 0.0
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


def visible_size(geometry: Geometry):
  """int32 [2]: rows and columns of real (scaled) pixels in the crop window, at its top-left.

  At least 1 each: an offset leaves the window inside the image unless the image is smaller than
  the crop, and then the offset is 0.
  """
  crop_size = tf.constant(geometry.crop_size, tf.int32)
  return tf.minimum(crop_size, geometry.scaled_size - geometry.crop_offset)


def resize_window(image, geometry: Geometry):
  """Stage 1 for images: float32 [vh, vw, C] in [0, 255], the real pixels of the crop window.

  Equals resize_image(image, geometry.scaled_size) cut to the window (offset crop_offset, size
  `visible_size`), but costs only the window. ScaleAndTranslate is the op tf.image.resize runs for
  antialiased bilinear, with the same scale (new size / old size, float32); a translation of
  -offset makes its output start at the window. It derives each output pixel's filter from that
  pixel's sample position alone, so the window's pixels get the same filters as in the whole
  resize; the only difference is float rounding of the position ((x + 0.5) / s + offset / s here,
  (x + offset + 0.5) / s there), a few ulps of a source coordinate, which moves an output by at
  most that much times the local intensity slope: ~1e-5 on smooth regions, up to ~1e-2 (of 255)
  across a sharp 0-255 edge at coordinates ~500.
  """
  image = tf.convert_to_tensor(image)
  image_size = tf.shape(image)[:2]
  size = visible_size(geometry)
  offset = geometry.crop_offset

  def cut_unscaled():
    # Scale 1 is exactly the identity (weights 1 and 0), so slicing gives the same bits for free.
    return tf.cast(tf.slice(image, tf.concat([offset, [0]], 0), tf.concat([size, [-1]], 0)),
                   tf.float32)

  def resize_and_cut():
    scale = tf.cast(geometry.scaled_size, tf.float32) / tf.cast(image_size, tf.float32)
    window = tf.raw_ops.ScaleAndTranslate(
        images=image[None], size=size, scale=scale, translation=-tf.cast(offset, tf.float32),
        kernel_type="triangle", antialias=True)
    return window[0]

  window = tf.cond(tf.reduce_all(geometry.scaled_size == image_size), cut_unscaled,
                   resize_and_cut)
  return tf.ensure_shape(window, [None, None, image.shape[-1]])


def resize_label_window(label, geometry: Geometry):
  """Like `resize_window` for label-like maps [h, w(, C)]: nearest, same dtype, bit-identical to
  resize_label(label, geometry.scaled_size) cut to the window.

  The rows and columns are picked by the formula of TF's nearest resize (half-pixel centres,
  float32): source index min(floor((i + 0.5) * (in / out)), in - 1) for output index i.
  """
  label = tf.convert_to_tensor(label)
  size = visible_size(geometry)
  image_size = tf.shape(label)[:2]
  rows = _nearest_source_indices(geometry.crop_offset[0], size[0], image_size[0],
                                 geometry.scaled_size[0])
  cols = _nearest_source_indices(geometry.crop_offset[1], size[1], image_size[1],
                                 geometry.scaled_size[1])
  # Gathering along axis 1 moves one element at a time; along axis 0 it copies whole rows, so the
  # columns are gathered as rows of the transpose (about 4x faster on CPU).
  perm = [1, 0] + list(range(2, len(label.shape)))
  window_rows = tf.transpose(tf.gather(label, rows, axis=0), perm)
  return tf.transpose(tf.gather(window_rows, cols, axis=0), perm)


def place_window(window, geometry: Geometry, fill_value):
  """Stage 2: the visible window [vh, vw(, C)] -> [crop_h, crop_w(, C)]: flip, then fill.

  Same result as padding the scaled image bottom/right, cropping and flipping; flipping first
  only touches the window, and the fill then goes left instead of right. Built by concatenation,
  which is about twice as fast as tf.pad on CPU.
  """
  crop_h, crop_w = geometry.crop_size
  window = tf.convert_to_tensor(window)
  window = flip_left_right_if(window, geometry.flip)
  shape = tf.shape(window)
  fill = tf.cast(fill_value, window.dtype)
  side = tf.fill(tf.concat([[shape[0], crop_w - shape[1]], shape[2:]], 0), fill)
  rows = tf.cond(geometry.flip, lambda: tf.concat([side, window], 1),
                 lambda: tf.concat([window, side], 1))
  bottom = tf.fill(tf.concat([[crop_h - shape[0], crop_w], shape[2:]], 0), fill)
  placed = tf.concat([rows, bottom], 0)
  return tf.ensure_shape(placed, [crop_h, crop_w] + window.shape[2:].as_list())


def place_normalized_image(window, geometry: Geometry):
  """place_window of normalize_image(window), fill NORMALIZED_FILL_VALUE: the same bits as
  normalizing the placed image, with the normalization done on the window only."""
  return place_window(normalize_image(window), geometry, NORMALIZED_FILL_VALUE)


def apply_geometry_to_image(image, geometry: Geometry, fill_value=IMAGE_FILL_VALUE):
  """Image [h, w, C] (any dtype) -> float32 [crop_h, crop_w, C] in [0, 255] plus padding."""
  return place_window(resize_window(image, geometry), geometry, fill_value)


def apply_geometry_to_label(label, geometry: Geometry, fill_value):
  """Label-like map [h, w] or [h, w, C] -> [crop_h, crop_w(, C)], same dtype, nearest resize.

  Any per-pixel map aligned with the image works: class masks (fill the ignore label), a valid mask
  (fill 0), coordinate maps in tests.
  """
  if len(label.shape) not in (2, 3):
    raise ValueError(f"Expected a [height, width] or [height, width, channels] map, got "
                     f"{label.shape}.")
  return place_window(resize_label_window(label, geometry), geometry, fill_value)


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
# Strong view only: cutout (after cropping). Colour jitter lives in color.py.
# --------------------------------------------------------------------------------------------------


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
  box = sample_cutout_box(seed, crop_size, cutout_size)
  crop_h, crop_w = as_height_width(crop_size)
  rows = tf.range(crop_h)
  cols = tf.range(crop_w)
  inside_rows = (rows >= box.start[0]) & (rows < box.end[0])
  inside_cols = (cols >= box.start[1]) & (cols < box.end[1])
  return tf.cast(inside_rows[:, None] & inside_cols[None, :], tf.int32)


class CutoutBox(NamedTuple):
  """A cutout box clipped to the crop: rows start[0]:end[0], columns start[1]:end[1] (int32 [2])."""

  start: tf.Tensor
  end: tf.Tensor


def sample_cutout_box(seed, crop_size: CropSize, cutout_size: int) -> CutoutBox:
  """The box of `sample_cutout` (same seed, same box) as corners, for `fill_box`."""
  if cutout_size < 0:
    raise ValueError(f"cutout_size must be >= 0, got {cutout_size}.")
  crop_h, crop_w = as_height_width(crop_size)
  row_seed, col_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  row = tf.random.stateless_uniform([], row_seed, minval=0, maxval=crop_h, dtype=tf.int32)
  col = tf.random.stateless_uniform([], col_seed, minval=0, maxval=crop_w, dtype=tf.int32)
  start = tf.stack([row, col]) - cutout_size // 2
  limit = tf.constant([crop_h, crop_w], tf.int32)
  return CutoutBox(start=tf.clip_by_value(start, 0, limit),
                   end=tf.clip_by_value(start + cutout_size, 0, limit))


def fill_box(x, box: CutoutBox, fill_value):
  """x [h, w(, C)] with x[start[0]:end[0], start[1]:end[1]] set to `fill_value`.

  Same result as `cut_out` with the box's mask; a slice update copies x once, where a masked
  tf.where costs about ten times as much on CPU.
  """
  x = tf.convert_to_tensor(x)
  tail = tf.shape(x)[2:]
  begin = tf.concat([box.start, tf.zeros_like(tail)], 0)
  end = tf.concat([box.end, tail], 0)
  value = tf.fill(end - begin, tf.cast(fill_value, x.dtype))
  return tf.raw_ops.TensorStridedSliceUpdate(input=x, begin=begin, end=end,
                                             strides=tf.ones_like(begin), value=value)


def cut_out(image, cutout, fill_value=IMAGE_FILL_VALUE):
  """Sets every channel to `fill_value` where `cutout` ([h, w], nonzero = inside the box) is set."""
  image = tf.convert_to_tensor(image)
  inside = tf.cast(cutout, tf.bool)[..., None]
  return tf.where(inside, tf.cast(fill_value, image.dtype), image)


def _nearest_source_indices(offset, count, source_size, scaled_size):
  """int32 [count]: the source index TF's nearest resize (half-pixel centres) reads for output
  indices offset .. offset + count - 1, computed with the kernel's float32 operations:
  scale = in / out, floor((i + 0.5) * scale), clamped to [0, in - 1]."""
  scale = tf.cast(source_size, tf.float32) / tf.cast(scaled_size, tf.float32)
  position = (tf.cast(tf.range(count) + offset, tf.float32) + 0.5) * scale
  return tf.clip_by_value(tf.cast(tf.floor(position), tf.int32), 0, source_size - 1)


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
