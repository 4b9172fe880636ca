"""The crop-window geometry (augment.resize_window, resize_label_window, place_window) against the
whole-image path it replaces: scale the whole image, pad bottom/right, crop, flip.

Images agree to float rounding of the resize's sample positions (see augment.resize_window), labels
and valid masks bit for bit. Colour jitter on the window is checked against jitter with the window's
own statistics, the one deliberate change (contrast's mean).
"""

import numpy as np
import pytest
import tensorflow as tf

from pseudoseg_jax.data import augment, color
from test_augment import eager_and_in_dataset_many

IMAGE_TOLERANCE = 1e-3  # On [0, 255] values, for images with natural slopes (smooth_image).


def whole_image_reference(image, geometry, fill_value=augment.IMAGE_FILL_VALUE):
  """The previous implementation: resize everything, pad, crop, flip."""
  scaled = augment.resize_image(image, geometry.scaled_size)
  return _pad_crop_flip(scaled, geometry, fill_value)


def whole_label_reference(label, geometry, fill_value):
  return _pad_crop_flip(augment.resize_label(label, geometry.scaled_size), geometry, fill_value)


def _pad_crop_flip(x, geometry, fill_value):
  padded = augment.pad_bottom_right(x, geometry.padded_size, fill_value)
  window = augment.crop_window(padded, geometry.crop_offset, geometry.crop_size)
  return augment.flip_left_right_if(window, geometry.flip)


def smooth_image(height, width, rng):
  """Sums of sinusoids with periods of 9+ pixels: slopes up to ~40 levels per pixel, like
  photographs away from their sharpest edges."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  channels = []
  for _ in range(3):
    phase, period_r, period_c = rng.uniform(0, 6.3), rng.uniform(9, 40), rng.uniform(9, 40)
    channels.append(127.5 + 60 * np.sin(2 * np.pi * rows / period_r + phase)
                    + 60 * np.cos(2 * np.pi * cols / period_c - phase))
  return np.clip(np.stack(channels, -1), 0, 255).astype(np.float32)


def geometries(rng, count):
  """Random geometries that cover scales 0.5 and 2.0 (and the rest), windows at offset 0, windows
  touching the image's bottom/right edge, and windows reaching into the padding."""
  cases = []
  for i in range(count):
    height, width = (int(n) for n in rng.integers(5, 130, 2))
    scale = augment.DEFAULT_SCALES[i % len(augment.DEFAULT_SCALES)]
    scaled = np.maximum(np.floor(np.array([height, width]) * scale).astype(np.int32), 1)
    crop = tuple(int(n) for n in rng.integers(4, 110, 2))
    padded = np.maximum(scaled, crop)
    room = padded - crop
    kind = i % 3  # 0: random offset, 1: at the bottom/right edge, 2: at the top/left corner.
    offset = [rng.integers(0, r + 1) for r in room] if kind == 0 else (room if kind == 1 else
                                                                       [0, 0])
    geometry = augment.Geometry(
        scaled_size=tf.constant(scaled, tf.int32), crop_offset=tf.constant(offset, tf.int32),
        flip=tf.constant(bool(rng.integers(2))), crop_size=crop)
    cases.append(((height, width), geometry))
  return cases


def test_window_geometry_equals_the_whole_image_path():
  rng = np.random.default_rng(0)
  cases = geometries(rng, 140)
  covered = set()
  for (height, width), geometry in cases:
    image = smooth_image(height, width, rng)
    label = rng.integers(0, 9, [height, width]).astype(np.uint8)
    got = augment.apply_geometry_to_image(tf.constant(image.astype(np.uint8)), geometry).numpy()
    want = whole_image_reference(image.astype(np.uint8), geometry).numpy()
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=IMAGE_TOLERANCE)
    for fill, source in [(255, label), (7, label[..., None]), (0, np.ones_like(label))]:
      np.testing.assert_array_equal(augment.apply_geometry_to_label(source, geometry, fill),
                                    whole_label_reference(source, geometry, fill))
    valid = augment.valid_mask(geometry).numpy()
    np.testing.assert_array_equal(valid, whole_label_reference(np.ones_like(label), geometry, 0))
    scaled, offset = geometry.scaled_size.numpy(), geometry.crop_offset.numpy()
    covered.add(("padded", bool((valid == 0).any())))
    covered.add(("touches edge", bool((offset + geometry.crop_size == scaled).any())))
    covered.add(("scale", float(scaled[0]) / height))
  assert {("padded", True), ("padded", False), ("touches edge", True)} <= covered
  assert {("scale", 0.5), ("scale", 2.0)} <= covered


def test_window_geometry_is_the_same_in_a_dataset():
  rng = np.random.default_rng(1)
  image = smooth_image(40, 50, rng).astype(np.uint8)
  label = rng.integers(0, 9, [40, 50]).astype(np.int32)

  def both(image, label, s):
    g = augment.sample_geometry(s, tf.shape(image)[:2], (33, 41))
    return {"image": augment.apply_geometry_to_image(image, g),
            "want_image": whole_image_reference(image, g),
            "label": augment.apply_geometry_to_label(label, g, -1),
            "want_label": whole_label_reference(label, g, -1)}

  seeds = [np.array([i, 77], np.int64) for i in range(14)]
  for out in eager_and_in_dataset_many(both, [(image, label, s) for s in seeds]):
    np.testing.assert_allclose(out["image"], out["want_image"], rtol=0, atol=IMAGE_TOLERANCE)
    np.testing.assert_array_equal(out["label"], out["want_label"])


def test_window_resize_differs_only_by_sample_position_rounding_on_sharp_images():
  # White noise (0-255 from one pixel to the next) is the worst case: the window's sample
  # positions round differently from the whole resize's by a few ulps of a source coordinate,
  # and the output moves by that much times the slope (<= 255 per source pixel).
  rng = np.random.default_rng(2)
  for (height, width), geometry in geometries(rng, 70):
    image = rng.integers(0, 256, [height, width, 3]).astype(np.uint8)
    got = augment.apply_geometry_to_image(image, geometry).numpy()
    want = whole_image_reference(image, geometry).numpy()
    bound = 255 * 8 * np.spacing(np.float32(max(height, width)))
    np.testing.assert_allclose(got, want, rtol=0, atol=bound)


def test_an_unscaled_window_is_a_plain_slice():
  image = np.random.default_rng(3).integers(0, 256, [20, 30, 3]).astype(np.uint8)
  geometry = augment.Geometry(scaled_size=tf.constant([20, 30]), crop_offset=tf.constant([4, 9]),
                              flip=tf.constant(False), crop_size=(12, 12))
  window = augment.resize_window(image, geometry)
  np.testing.assert_array_equal(window, image[4:16, 9:21].astype(np.float32))


def test_place_window_flips_then_fills_the_side_the_padding_ends_on():
  window = np.arange(6, dtype=np.int32).reshape(2, 3)
  for flip in (False, True):
    geometry = augment.Geometry(scaled_size=tf.constant([2, 3]), crop_offset=tf.constant([0, 0]),
                                flip=tf.constant(flip), crop_size=(3, 5))
    placed = augment.place_window(window, geometry, -1).numpy()
    padded = np.full([3, 5], -1, np.int32)
    padded[:2, :3] = window
    np.testing.assert_array_equal(placed, padded[:, ::-1] if flip else padded)


def test_place_normalized_image_equals_normalizing_the_placed_image():
  rng = np.random.default_rng(4)
  for _, geometry in geometries(rng, 12):
    window = rng.uniform(0, 255, list(augment.visible_size(geometry).numpy()) + [3])
    window = window.astype(np.float32)
    np.testing.assert_array_equal(
        augment.place_normalized_image(window, geometry),
        augment.normalize_image(augment.place_window(window, geometry, 127.5)))


# ----------------------------------------------------------------------------- jitter on the window


def jitter(order, contrast=1.0, brightness=0.0, saturation=1.0, hue=0.0):
  return color.ColorJitter(
      order=tf.constant(order, tf.int32), brightness_delta=tf.constant(brightness),
      contrast_factor=tf.constant(contrast), saturation_factor=tf.constant(saturation),
      hue_delta=tf.constant(hue))


def a_padded_upscaled_case():
  """A 2x geometry whose window shows the right part of the image, with padding below."""
  image = smooth_image(30, 40, np.random.default_rng(5))
  image[:, :10] = 250.0  # A bright band outside the window: it moves the whole image's mean only.
  geometry = augment.Geometry(scaled_size=tf.constant([60, 80]), crop_offset=tf.constant([0, 30]),
                              flip=tf.constant(True), crop_size=(64, 50))
  return image, geometry


def visible_part_of_whole_resize(image, geometry):
  size, offset = augment.visible_size(geometry).numpy(), geometry.crop_offset.numpy()
  scaled = augment.resize_image(image, geometry.scaled_size).numpy()
  return scaled[offset[0]:offset[0] + size[0], offset[1]:offset[1] + size[1]]


def test_contrast_uses_the_mean_of_the_window_not_of_the_scaled_image():
  image, geometry = a_padded_upscaled_case()
  contrast = jitter([1, 0, 2, 3], contrast=1.4)
  window = augment.resize_window(image, geometry)
  got = augment.place_window(color.apply_color_jitter(window, contrast), geometry, 127.5)
  # Known answer: (x - m) * 1.4 + m per channel, m the WINDOW's mean, clipped; padding untouched.
  x = visible_part_of_whole_resize(image, geometry) / 255.0
  mean = x.mean(axis=(0, 1))
  expected_window = np.clip((x - mean) * 1.4 + mean, 0, 1) * 255.0
  expected = augment.place_window(expected_window.astype(np.float32), geometry, 127.5)
  np.testing.assert_allclose(got, expected, rtol=0, atol=IMAGE_TOLERANCE)
  # The old order (jitter the whole scaled image, then crop) differs: its mean saw the bright band.
  scaled = augment.resize_image(image, geometry.scaled_size)
  old = _pad_crop_flip(color.apply_color_jitter(scaled, contrast), geometry, 127.5)
  assert np.abs(old.numpy() - got.numpy()).max() > 5.0


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
def test_jittered_window_equals_jitter_with_the_window_statistics(order):
  image, geometry = a_padded_upscaled_case()
  params = jitter(order, contrast=0.7, brightness=0.2, saturation=1.3, hue=-0.1)
  got = color.apply_color_jitter(augment.resize_window(image, geometry), params)
  want = color.apply_color_jitter(visible_part_of_whole_resize(image, geometry), params)
  np.testing.assert_allclose(got, want, rtol=0, atol=IMAGE_TOLERANCE)


def test_without_contrast_the_window_jitter_equals_cropping_the_whole_jitter():
  # Brightness, saturation and hue act pixel by pixel: only contrast's mean can tell the two apart.
  image, geometry = a_padded_upscaled_case()
  params = jitter([2, 0, 3, 1], brightness=-0.3, saturation=0.6, hue=0.2)
  window = augment.resize_window(image, geometry)
  got = augment.place_window(color.apply_color_jitter(window, params), geometry, 127.5)
  scaled = augment.resize_image(image, geometry.scaled_size)
  want = _pad_crop_flip(color.apply_color_jitter(scaled, params), geometry, 127.5)
  np.testing.assert_allclose(got, want, rtol=0, atol=IMAGE_TOLERANCE)


# ----------------------------------------------------------------------------- cutout box


def test_cutout_box_is_the_box_of_sample_cutout_and_fill_box_equals_cut_out():
  image = np.random.default_rng(6).uniform(0, 255, [21, 17, 3]).astype(np.float32)
  labels = np.arange(21 * 17, dtype=np.int32).reshape(21, 17)

  def both(image, labels, s):
    box = augment.sample_cutout_box(s, (21, 17), 8)
    mask = augment.sample_cutout(s, (21, 17), 8)
    return {"image": augment.fill_box(image, box, 0.0), "want_image": augment.cut_out(image, mask,
                                                                                       0.0),
            "labels": augment.fill_box(labels, box, -1),
            "want_labels": tf.where(mask > 0, -1, labels), "mask": mask}

  seeds = [np.array([i, 5], np.int64) for i in range(24)]
  outs = eager_and_in_dataset_many(both, [(image, labels, s) for s in seeds])
  for out in outs:
    np.testing.assert_array_equal(out["image"], out["want_image"])
    np.testing.assert_array_equal(out["labels"], out["want_labels"])
  sizes = {int(out["mask"].sum()) for out in outs}
  assert 64 in sizes and min(sizes) < 64  # Whole boxes and boxes clipped at the crop's border.


def test_fill_box_of_size_zero_changes_nothing():
  box = augment.sample_cutout_box(np.array([1, 2], np.int64), (9, 7), 0)
  x = np.arange(63, dtype=np.float32).reshape(9, 7)
  np.testing.assert_array_equal(augment.fill_box(x, box, 0.0), x)


# ----------------------------------------------------------------------------- the pipeline's views


def whole_image_views(example, seed, crop_size, cutout_size, ignore_label, num_classes):
  """augment_unlabeled_example as it was (whole-image path), without colour jitter."""
  geometry_seed, _, cutout_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  g = augment.sample_geometry(geometry_seed, tf.shape(example["image"])[:2], crop_size)
  image = whole_image_reference(example["image"], g)
  mask = whole_label_reference(tf.cast(example["mask"], tf.int32), g, ignore_label)
  cutout = augment.sample_cutout(cutout_seed, g.crop_size, cutout_size)
  return {
      "weak_image": augment.normalize_image(image), "mask": mask,
      "strong_image": augment.normalize_image(augment.cut_out(image, cutout)),
      "valid": augment.valid_mask(g) * (1 - cutout),
      "image_labels": augment.image_labels_from_mask(
          tf.where(cutout > 0, ignore_label, mask), num_classes=num_classes,
          ignore_label=ignore_label)}


def test_unlabeled_views_equal_the_whole_image_path_seed_for_seed():
  from pseudoseg_jax.data import pipeline  # Here, not above: the module under test is augment.
  rng = np.random.default_rng(7)
  example = {"image": smooth_image(45, 61, rng).astype(np.uint8),
             "mask": rng.choice(np.array([0, 2, 5, 255], np.uint8), [45, 61])}
  kwargs = dict(crop_size=(50, 40), ignore_label=255, num_classes=6, cutout_size=12)
  for i in range(20):
    seed = tf.constant([i, 3], tf.int64)
    got = pipeline.augment_unlabeled_example(
        example, seed, scales=augment.DEFAULT_SCALES, jitter_colors=lambda image, _: image,
        **kwargs)
    want = whole_image_views(example, seed, **kwargs)
    assert set(got) == set(want)
    for key in ("weak_image", "strong_image"):
      assert got[key].dtype == tf.float32 and got[key].shape == want[key].shape
      np.testing.assert_allclose(got[key], want[key], rtol=0, atol=IMAGE_TOLERANCE / 127.5)
    for key in ("mask", "valid", "image_labels"):
      assert got[key].dtype == want[key].dtype
      np.testing.assert_array_equal(got[key], want[key])
