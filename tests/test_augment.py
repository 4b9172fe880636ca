"""Known-answer tests for the single-example ops, each run eagerly and in tf.data.Dataset.map."""

import numpy as np
import tensorflow as tf

from pseudoseg_jax.data import augment, color


def eager_and_in_dataset(fn, *args):
  """Runs fn eagerly and in Dataset.map (unknown static shapes); asserts equal, returns numpy."""
  return eager_and_in_dataset_many(fn, [args])[0]


def eager_and_in_dataset_many(fn, arg_tuples):
  """eager_and_in_dataset over many argument tuples, in one dataset (tf.data starts slowly)."""
  arg_tuples = [tuple(np.asarray(a) for a in args) for args in arg_tuples]
  eager = [fn(*[tf.constant(a) for a in args]) for args in arg_tuples]
  signature = tuple(tf.TensorSpec([None] * a.ndim, tf.as_dtype(a.dtype)) for a in arg_tuples[0])
  dataset = tf.data.Dataset.from_generator(lambda: iter(arg_tuples), output_signature=signature)
  in_dataset = list(dataset.map(fn))
  eager, in_dataset = (tf.nest.map_structure(np.asarray, out) for out in (eager, in_dataset))
  tf.nest.map_structure(np.testing.assert_array_equal, eager, in_dataset)
  return eager


def seed(i):
  return np.array([i, 1234], np.int64)


# ----------------------------------------------------------------------------- deterministic ops


def test_scaled_size_truncates_like_deeplab_and_keeps_one_pixel():
  assert eager_and_in_dataset(lambda s: augment.scaled_size(s, 0.75), [333, 500]).tolist() == [
      249, 375]  # 249.75 -> 249, floor as in DeepLab.
  assert eager_and_in_dataset(lambda s: augment.scaled_size(s, 1.25), [7, 10]).tolist() == [8, 12]
  assert eager_and_in_dataset(lambda s: augment.scaled_size(s, 0.5), [1, 3]).tolist() == [1, 1]


def test_resize_image_is_antialiased_bilinear():
  impulse = np.zeros([9, 9, 1], np.float32)
  impulse[4, 4] = 255.0
  shrunk = eager_and_in_dataset(lambda x: augment.resize_image(x, [3, 3]), impulse)[..., 0]
  # The triangle filter spreads the impulse over 3x3 source pixels: 255 / 9, mass preserved.
  # (Plain bilinear would sample the impulse alone and output 255 at the centre.)
  np.testing.assert_allclose(shrunk[1, 1], 255.0 / 9, rtol=1e-5)
  np.testing.assert_allclose(shrunk.sum() * 9, 255.0, rtol=1e-5)
  assert shrunk.dtype == np.float32


def test_resize_image_at_same_size_is_identity():
  image = np.random.default_rng(0).integers(0, 256, [5, 7, 3]).astype(np.uint8)
  same = eager_and_in_dataset(lambda x: augment.resize_image(x, [5, 7]), image)
  np.testing.assert_allclose(same, image.astype(np.float32), atol=1e-4)


def test_resize_label_is_nearest_and_invents_no_class():
  labels = np.random.default_rng(1).choice(np.array([0, 3, 7, 255], np.uint8), [6, 6])
  sizes = [[4, 4], [3, 5], [13, 7]]
  resized = eager_and_in_dataset_many(augment.resize_label, [(labels, size) for size in sizes])
  for size, out in zip(sizes, resized):
    assert out.shape == tuple(size) and out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 3, 7, 255}


def test_resize_label_doubling_repeats_each_pixel():
  labels = np.array([[1, 2], [3, 4]], np.int32)[..., None]
  doubled = eager_and_in_dataset(lambda x: augment.resize_label(x, [4, 4]), labels)[..., 0]
  np.testing.assert_array_equal(doubled, np.kron(labels[..., 0], np.ones([2, 2], np.int32)))


def test_pad_bottom_right_places_fill_below_and_right():
  image = np.arange(6, dtype=np.float32).reshape(2, 3, 1)
  padded = eager_and_in_dataset(lambda x: augment.pad_bottom_right(x, [4, 5], 127.5), image)
  assert padded.shape == (4, 5, 1)
  np.testing.assert_array_equal(padded[:2, :3], image)
  assert (padded[2:] == 127.5).all() and (padded[:, 3:] == 127.5).all()

  label = np.ones([2, 3], np.uint8)
  padded = eager_and_in_dataset(lambda x: augment.pad_bottom_right(x, [2, 4], 255), label)
  np.testing.assert_array_equal(padded, [[1, 1, 1, 255], [1, 1, 1, 255]])


def test_crop_window_is_a_contiguous_window():
  grid = np.arange(6 * 7, dtype=np.int32).reshape(6, 7, 1)
  window = eager_and_in_dataset(lambda x, o: augment.crop_window(x, o, (3, 4)), grid, [2, 1])
  np.testing.assert_array_equal(window, grid[2:5, 1:5])


def test_flip_left_right_if_reverses_columns():
  grid = np.arange(12, dtype=np.float32).reshape(3, 4, 1)
  flipped, kept = eager_and_in_dataset_many(augment.flip_left_right_if,
                                            [(grid, True), (grid, False)])
  np.testing.assert_array_equal(flipped, grid[:, ::-1])
  np.testing.assert_array_equal(kept, grid)


def test_normalize_image_maps_0_padding_and_255_exactly():
  values = np.array([0.0, 127.5, 255.0], np.float32)
  np.testing.assert_array_equal(eager_and_in_dataset(augment.normalize_image, values), [-1, 0, 1])
  uint8 = np.array([0, 255], np.uint8)
  np.testing.assert_array_equal(eager_and_in_dataset(augment.normalize_image, uint8), [-1, 1])


def test_image_labels_from_mask_excludes_background_and_ignore():
  mask = np.array([[0, 2, 2], [5, 255, 0]], np.uint8)[..., None]
  labels = eager_and_in_dataset(
      lambda m: augment.image_labels_from_mask(m, num_classes=6, ignore_label=255), mask)
  np.testing.assert_array_equal(labels, [0, 1, 0, 0, 1])
  assert labels.dtype == np.float32
  empty = eager_and_in_dataset(
      lambda m: augment.image_labels_from_mask(m, num_classes=6, ignore_label=255),
      np.full([2, 2], 255, np.uint8))
  np.testing.assert_array_equal(empty, np.zeros(5))


# ----------------------------------------------------------------------------- sampled geometry


def sample_many(image_size, crop_size, scales, count=64):
  def sample(s):
    g = augment.sample_geometry(s, image_size, crop_size, scales)
    return g.scaled_size, g.crop_offset, g.flip
  return eager_and_in_dataset_many(sample, [(seed(i),) for i in range(count)])


def test_sample_geometry_respects_scales_crop_bounds_and_flips_both_ways():
  scales = (0.5, 1.0, 1.75)
  samples = sample_many([40, 60], 33, scales)
  allowed = {(int(40 * s), int(60 * s)) for s in scales}
  assert {tuple(size) for size, _, _ in samples} == allowed
  for size, offset, _ in samples:
    padded = np.maximum(size, 33)
    assert (offset >= 0).all() and (offset <= padded - 33).all()
  assert {bool(flip) for _, _, flip in samples} == {True, False}
  # Crop offsets vary when there is room to move.
  assert len({tuple(o) for size, o, _ in samples if (size > 33).all()}) > 1


def test_sample_geometry_is_a_pure_function_of_the_seed():
  a = sample_many([40, 60], 33, augment.DEFAULT_SCALES, count=8)
  b = sample_many([40, 60], 33, augment.DEFAULT_SCALES, count=8)
  tf.nest.map_structure(np.testing.assert_array_equal, a, b)
  assert len({(tuple(s), tuple(o), bool(f)) for s, o, f in a}) > 1


def coordinate_maps(height, width):
  """An image whose channels are (row, col, 200) and a label map r * width + c, aligned."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  image = np.stack([rows, cols, np.full_like(rows, 200)], axis=-1).astype(np.float32)
  label = (rows * width + cols).astype(np.int32)
  return image, label


def transform_coordinate_maps(image, label, s):
  """One geometry applied to the image, the coordinate labels (fill -1) and a ones map (fill 0)."""
  g = augment.sample_geometry(s, tf.shape(image)[:2], 21, augment.DEFAULT_SCALES)
  return {
      "image": augment.apply_geometry_to_image(image, g),
      "image_again": augment.apply_geometry_to_image(image, g),
      "label": augment.apply_geometry_to_label(label, g, fill_value=-1),
      "ones": augment.apply_geometry_to_label(tf.ones_like(label, tf.uint8), g, fill_value=0),
      "valid": augment.valid_mask(g),
      "scale": tf.cast(g.scaled_size[0], tf.float32) / tf.cast(tf.shape(image)[0], tf.float32),
      "flip": g.flip,
  }


NUM_ALIGNMENT_SEEDS = 12


def test_one_geometry_keeps_image_labels_and_valid_mask_aligned():
  height, width = 16, 23
  image, label = coordinate_maps(height, width)
  outs = eager_and_in_dataset_many(
      transform_coordinate_maps, [(image, label, seed(i)) for i in range(NUM_ALIGNMENT_SEEDS)])
  for out in outs:
    check_aligned(out, width)
  # The seeds cover both flips and both padded and unpadded crops.
  assert {bool(out["flip"]) for out in outs} == {True, False}
  assert {bool((out["valid"] == 0).any()) for out in outs} == {True, False}


def check_aligned(out, width):
  assert out["image"].shape == (21, 21, 3) and out["label"].shape == (21, 21)

  # The same geometry twice gives bit-identical images (weak and strong views can share it).
  np.testing.assert_array_equal(out["image"], out["image_again"])

  # Padding lands in the same place in every map.
  valid = out["valid"] == 1
  np.testing.assert_array_equal(out["ones"], out["valid"])
  np.testing.assert_array_equal(out["label"] == -1, ~valid)
  assert (out["image"][~valid] == 127.5).all()
  np.testing.assert_allclose(out["image"][valid][:, 2], 200.0, atol=1e-3)

  # On real pixels the label's source coordinate agrees with the interpolated image coordinate:
  # within half a source pixel for nearest vs bilinear, more near borders where filters clamp.
  label_rows, label_cols = np.divmod(out["label"][valid], width)
  tolerance = 0.5 + 1.0 / out["scale"] + 1e-3
  assert np.abs(out["image"][valid][:, 0] - label_rows).max() <= tolerance
  assert np.abs(out["image"][valid][:, 1] - label_cols).max() <= tolerance
  assert np.median(np.abs(out["image"][valid][:, 1] - label_cols)) <= 0.5 + 1e-3

  # A flip shows up in both maps as columns that decrease from left to right.
  first_row = out["label"][0][valid[0]] % width
  if first_row.size > 1:
    steps = np.diff(first_row)
    assert (steps <= 0).all() if out["flip"] else (steps >= 0).all()


def test_image_stages_compose_to_apply_geometry_to_image():
  image = np.random.default_rng(2).integers(0, 256, [30, 20, 3]).astype(np.uint8)

  def both(x, s):
    g = augment.sample_geometry(s, tf.shape(x)[:2], 25)
    return (augment.apply_geometry_to_image(x, g),
            augment.place_window(augment.resize_window(x, g), g, augment.IMAGE_FILL_VALUE))

  whole, staged = eager_and_in_dataset(both, image, seed(3))
  np.testing.assert_array_equal(whole, staged)


def test_rank3_labels_keep_their_channel_and_dtype():
  label = np.random.default_rng(3).integers(0, 5, [12, 9, 1]).astype(np.uint8)

  def geometry_on_label(x, s):
    g = augment.sample_geometry(s, tf.shape(x)[:2], (10, 14))
    return augment.apply_geometry_to_label(x, g, fill_value=255)

  out = eager_and_in_dataset(geometry_on_label, label, seed(5))
  assert out.shape == (10, 14, 1) and out.dtype == np.uint8
  assert set(np.unique(out)) <= set(range(5)) | {255}


# ----------------------------------------------------------------------------- colour jitter


def random_image(height=12, width=10, rng_seed=4):
  return np.random.default_rng(rng_seed).uniform(0, 255, [height, width, 3]).astype(np.float32)


def test_color_jitter_stays_in_range_and_is_a_function_of_the_seed():
  image = random_image()
  jittered = eager_and_in_dataset_many(color.color_jitter, [(image, seed(i)) for i in range(8)])
  again = eager_and_in_dataset_many(color.color_jitter, [(image, seed(i)) for i in range(8)])
  for out, out_again in zip(jittered, again):
    assert out.shape == image.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 255.0
    np.testing.assert_array_equal(out, out_again)
  assert len({out.tobytes() for out in jittered}) == len(jittered)
  assert not any(np.allclose(out, image, atol=1.0) for out in jittered)


def test_sample_color_jitter_draws_orders_and_factors_from_their_ranges():
  def sample(s):
    return color.sample_color_jitter(s)._asdict()
  samples = eager_and_in_dataset_many(sample, [(seed(i),) for i in range(64)])
  orders = {tuple(s["order"]) for s in samples}
  assert all(sorted(order) == [0, 1, 2, 3] for order in orders)
  assert len(orders) >= 8  # Orders vary; 64 draws from 24 permutations hit far more than 8.
  for name, low, high in [("brightness_delta", -0.5, 0.5), ("contrast_factor", 0.5, 1.5),
                          ("saturation_factor", 0.5, 1.5), ("hue_delta", -0.25, 0.25)]:
    values = np.array([s[name] for s in samples])
    assert values.min() >= low and values.max() <= high
    assert values.max() - values.min() > 0.5 * (high - low)  # Spread over the range.


def jitter_with_order(order, **factors):
  return color.ColorJitter(order=tf.constant(order, tf.int32), **{
      name: tf.constant(value, tf.float32) for name, value in factors.items()})


STRONG_FACTORS = dict(brightness_delta=0.3, contrast_factor=1.4, saturation_factor=0.6,
                      hue_delta=0.2)


def test_apply_color_jitter_applies_the_ops_in_the_given_order_clipping_after_each():
  image = random_image()
  jitter = jitter_with_order([2, 0, 3, 1], **STRONG_FACTORS)
  x = image / 255.0
  for op in (lambda y: tf.image.adjust_saturation(y, 0.6),
             lambda y: tf.image.adjust_brightness(y, 0.3),
             lambda y: tf.image.adjust_hue(y, 0.2),
             lambda y: tf.image.adjust_contrast(y, 1.4)):
    x = tf.clip_by_value(op(x), 0.0, 1.0)
  out = eager_and_in_dataset(lambda im: color.apply_color_jitter(im, jitter), image)
  np.testing.assert_allclose(out, x.numpy() * 255.0, rtol=1e-5, atol=1e-3)


def test_the_order_changes_the_result():
  image = random_image()
  first = color.apply_color_jitter(image, jitter_with_order([0, 1, 2, 3], **STRONG_FACTORS))
  last = color.apply_color_jitter(image, jitter_with_order([3, 2, 1, 0], **STRONG_FACTORS))
  assert np.abs(first.numpy() - last.numpy()).max() > 1.0


def test_hue_and_saturation_keep_a_grey_image_grey():
  grey = np.broadcast_to(np.linspace(10, 240, 30, dtype=np.float32).reshape(5, 6, 1), [5, 6, 3])

  def hue_and_saturation_only(im, s):
    return color.color_jitter(im, s, brightness=0.0, contrast=0.0)

  outs = eager_and_in_dataset_many(hue_and_saturation_only, [(grey, seed(i)) for i in range(4)])
  for out in outs:
    np.testing.assert_allclose(out, grey, atol=1e-3)


# ----------------------------------------------------------------------------- cutout


def test_cutout_mask_is_a_box_of_the_size_around_an_interior_centre():
  box = eager_and_in_dataset(lambda c: augment.cutout_mask(c, (20, 24), 6), [10, 12])
  expected = np.zeros([20, 24], np.int32)
  expected[7:13, 9:15] = 1  # An even side 2k covers [c - k, c + k).
  np.testing.assert_array_equal(box, expected)
  odd = eager_and_in_dataset(lambda c: augment.cutout_mask(c, (20, 24), 5), [10, 12])
  assert odd.sum() == 25 and odd[8:13, 10:15].all()


def test_cutout_mask_is_clipped_at_the_crop_borders():
  corner, edge = eager_and_in_dataset_many(
      lambda c: augment.cutout_mask(c, (20, 24), 6), [([0, 0],), ([19, 12],)])
  expected = np.zeros([20, 24], np.int32)
  expected[:3, :3] = 1
  np.testing.assert_array_equal(corner, expected)
  expected = np.zeros([20, 24], np.int32)
  expected[16:, 9:15] = 1
  np.testing.assert_array_equal(edge, expected)


def test_cutout_size_zero_cuts_nothing():
  box = eager_and_in_dataset(lambda s: augment.sample_cutout(s, (9, 7), 0), seed(0))
  assert box.shape == (9, 7) and box.dtype == np.int32 and not box.any()


def test_sample_cutout_is_a_function_of_the_seed_and_centres_vary():
  boxes = eager_and_in_dataset_many(lambda s: augment.sample_cutout(s, (16, 16), 4),
                                    [(seed(i),) for i in range(16)])
  again = eager_and_in_dataset_many(lambda s: augment.sample_cutout(s, (16, 16), 4),
                                    [(seed(i),) for i in range(16)])
  tf.nest.map_structure(np.testing.assert_array_equal, boxes, again)
  assert len({box.tobytes() for box in boxes}) > 8
  for box in boxes:
    rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
    assert box.sum() == rows.size * cols.size  # A filled rectangle ...
    assert 2 <= rows.size <= 4 and 2 <= cols.size <= 4  # ... of side 4, at least half inside.


def test_cut_out_fills_every_channel_inside_the_box_only():
  image = random_image(4, 5)
  box = np.zeros([4, 5], np.int32)
  box[1:3, 2:4] = 1
  out = eager_and_in_dataset(augment.cut_out, image, box)
  assert (out[box == 1] == augment.IMAGE_FILL_VALUE).all()
  np.testing.assert_array_equal(out[box == 0], image[box == 0])
