"""The labeled training stream and the padded evaluation stream, on small synthetic datasets."""

import numpy as np
import pytest
import tensorflow as tf

from pseudoseg_jax.data import augment, color, pipeline

NUM_CLASSES = 9
IGNORE = 255


def labeled_source(num_examples=8, size=16, mask_rank=3):
  """Example i has a random image and a mask made of class i + 1 (so labels reveal identity)."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, [num_examples, size, size, 3]).astype(np.uint8)
  masks = np.broadcast_to(np.arange(1, num_examples + 1, dtype=np.uint8)[:, None, None],
                          [num_examples, size, size]).copy()
  masks[:, :2, :2] = IGNORE  # Some ignore pixels, which must never become image labels.
  if mask_rank == 3:
    masks = masks[..., None]
  return tf.data.Dataset.from_tensor_slices({
      "image": images, "mask": masks, "id": [f"img{i}" for i in range(num_examples)],
      "image_labels": np.zeros([num_examples, NUM_CLASSES - 1], np.float32)})


def variable_size_source(sizes, with_ids=True):
  """Images of different sizes; pixel values and masks equal example index + 1."""
  def generate():
    for i, (h, w) in enumerate(sizes):
      example = {"image": np.full([h, w, 3], i + 1, np.uint8),
                 "mask": np.full([h, w], (i % (NUM_CLASSES - 1)) + 1, np.uint8)}
      if with_ids:
        example["id"] = f"img{i}".encode()
      yield example
  signature = {"image": tf.TensorSpec([None, None, 3], tf.uint8),
               "mask": tf.TensorSpec([None, None], tf.uint8)}
  if with_ids:
    signature["id"] = tf.TensorSpec([], tf.string)
  return tf.data.Dataset.from_generator(generate, output_signature=signature)


def labeled_batches(num_batches, source=None, **overrides):
  kwargs = dict(batch_size=4, crop_size=13, scales=augment.DEFAULT_SCALES, ignore_label=IGNORE,
                num_classes=NUM_CLASSES, seed=0, shuffle_buffer=8)
  kwargs.update(overrides)
  stream = pipeline.labeled_stream(source or labeled_source(), **kwargs)
  iterator = pipeline.as_numpy_batches(stream)
  return [next(iterator) for _ in range(num_batches)]


def test_labeled_stream_shapes_dtypes_and_ranges():
  (batch,) = labeled_batches(1)
  assert batch["image"].shape == (4, 13, 13, 3) and batch["image"].dtype == np.float32
  assert batch["mask"].shape == (4, 13, 13) and batch["mask"].dtype == np.int32
  assert batch["image_labels"].shape == (4, NUM_CLASSES - 1)
  assert batch["image_labels"].dtype == np.float32
  assert batch["valid"].shape == (4, 13, 13) and batch["valid"].dtype == np.int32
  assert set(batch) == {"image", "mask", "valid", "image_labels"}
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  assert set(np.unique(batch["mask"])) <= set(range(1, 9)) | {IGNORE}


def test_labeled_stream_valid_marks_the_padding():
  # Masks without ignore pixels: ignore_label in the output means padding, nothing else.
  source = variable_size_source([(8, 12), (14, 6), (16, 16), (5, 5)], with_ids=False)
  batches = labeled_batches(2, source=source, shuffle_buffer=4)
  valid = np.concatenate([b["valid"] for b in batches])
  masks = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(valid, (masks != IGNORE).astype(np.int32))
  assert (valid == 0).any() and (valid == 1).any()


def test_labeled_stream_accepts_rank2_masks():
  (batch,) = labeled_batches(1, source=labeled_source(mask_rank=2))
  assert batch["mask"].shape == (4, 13, 13)


def test_labeled_stream_image_labels_match_masks():
  for batch in labeled_batches(3):
    for mask, labels in zip(batch["mask"], batch["image_labels"]):
      present = {c for c in np.unique(mask) if c not in (0, IGNORE)}
      assert set(np.flatnonzero(labels) + 1) == present
      assert len(present) == 1  # One example per crop; ignore pixels never count.


def test_labeled_stream_runs_over_epochs_with_new_augmentations():
  # 8 examples, batch 4: batches 0-1 are epoch one and 2-3 epoch two, each a permutation of all ids.
  batches = labeled_batches(4, scales=(1.0,), crop_size=16)
  ids = [np.flatnonzero(labels)[0] for b in batches for labels in b["image_labels"]]
  assert sorted(ids[:8]) == sorted(ids[8:]) == list(range(8))
  assert ids[:8] != ids[8:]  # Reshuffled each epoch.


def test_labeled_stream_shards_are_disjoint_across_processes():
  seen = []
  for process_index in range(2):
    batches = labeled_batches(4, batch_size=2, process_index=process_index, process_count=2)
    seen.append({int(np.flatnonzero(labels)[0]) for b in batches for labels in b["image_labels"]})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(8))


def test_stream_seeds_differ_by_seed_process_and_stream():
  def seeds(s, p, tag=0):
    shuffle_key, augment_key = pipeline.stream_seeds(s, p, stream_tag=tag)
    return tuple(shuffle_key.numpy()), tuple(augment_key.numpy())
  keys = {seeds(s, p) for s, p in [(0, 0), (0, 1), (1, 0), ((0, 5), 0)]}
  keys.add(seeds(0, 0, pipeline.UNLABELED_STREAM_TAG))
  assert len(keys) == 5
  assert seeds(0, 0) == seeds(0, 0)


# ----------------------------------------------------------------------------- unlabeled stream


def unlabeled_batches(num_batches, source=None, **overrides):
  kwargs = dict(batch_size=4, crop_size=13, scales=augment.DEFAULT_SCALES, ignore_label=IGNORE,
                num_classes=NUM_CLASSES, seed=0, shuffle_buffer=8, cutout_size=6)
  kwargs.update(overrides)
  stream = pipeline.unlabeled_stream(source or labeled_source(), **kwargs)
  iterator = pipeline.as_numpy_batches(stream)
  return [next(iterator) for _ in range(num_batches)]


def test_unlabeled_stream_shapes_dtypes_and_keys():
  (batch,) = unlabeled_batches(1)  # The source's 'id' and 'image_labels' are dropped.
  assert set(batch) == {"weak_image", "strong_image", "valid", "mask", "image_labels"}
  for key in ("weak_image", "strong_image"):
    assert batch[key].shape == (4, 13, 13, 3) and batch[key].dtype == np.float32
    assert batch[key].min() >= -1.0 and batch[key].max() <= 1.0
  for key in ("valid", "mask"):
    assert batch[key].shape == (4, 13, 13) and batch[key].dtype == np.int32
  assert batch["image_labels"].shape == (4, NUM_CLASSES - 1)
  assert batch["image_labels"].dtype == np.float32
  assert not np.array_equal(batch["weak_image"], batch["strong_image"])


@pytest.mark.parametrize("make_batches, image_key", [(labeled_batches, "image"),
                                                     (unlabeled_batches, "strong_image")])
def test_training_streams_are_a_function_of_the_seed(make_batches, image_key):
  first = make_batches(2, seed=(3, 100))
  again = make_batches(2, seed=(3, 100))
  other = make_batches(2, seed=(3, 101))
  tf.nest.map_structure(np.testing.assert_array_equal, first, again)
  assert not np.array_equal(first[0][image_key], other[0][image_key])


# Batch size 3 over a shard of 8 (or 4): epochs end inside batches, and start batches 1-7 land in
# the first, second and later epochs, before and after the shuffle buffer (4) has filled.
@pytest.mark.parametrize("make_batches", [labeled_batches, unlabeled_batches])
@pytest.mark.parametrize("process_index, process_count", [(0, 1), (1, 2)])
def test_a_stream_started_at_batch_k_equals_the_uninterrupted_stream_from_k(
    make_batches, process_index, process_count):
  kwargs = dict(batch_size=3, shuffle_buffer=4, seed=11, process_index=process_index,
                process_count=process_count)
  uninterrupted = make_batches(9, **kwargs)
  for start_batch in (1, 3, 4, 7):
    resumed = make_batches(9 - start_batch, start_batch=start_batch, **kwargs)
    tf.nest.map_structure(np.testing.assert_array_equal, uninterrupted[start_batch:], resumed)


def test_a_stream_seeks_the_same_without_a_known_cardinality():
  sizes = [(10 + i, 12) for i in range(7)]
  kwargs = dict(batch_size=2, shuffle_buffer=3, scales=(1.0,))
  uninterrupted = labeled_batches(6, source=variable_size_source(sizes), **kwargs)
  assert variable_size_source(sizes).cardinality() == tf.data.UNKNOWN_CARDINALITY
  counted = labeled_batches(3, source=variable_size_source(sizes), start_batch=3, **kwargs)
  told = labeled_batches(3, source=variable_size_source(sizes), start_batch=3, num_examples=7,
                         **kwargs)
  tf.nest.map_structure(np.testing.assert_array_equal, uninterrupted[3:], counted)
  tf.nest.map_structure(np.testing.assert_array_equal, uninterrupted[3:], told)


def test_a_cached_source_is_read_once_however_many_epochs_the_stream_runs():
  reads = []

  def count_read(image):
    reads.append(1)
    return image

  source = labeled_source().map(lambda ex: {**ex, "image": tf.ensure_shape(
      tf.numpy_function(count_read, [ex["image"]], tf.uint8), [16, 16, 3])}).cache()
  labeled_batches(8, source=source, num_examples=8)  # Four epochs of 8 examples.
  assert len(reads) == 8


def test_a_process_without_examples_is_refused():
  with pytest.raises(ValueError, match=r"Process 2 of 3 has no training examples: the source "
                                       r"holds 2"):
    labeled_batches(1, source=labeled_source(num_examples=2), process_index=2, process_count=3)


def test_unlabeled_stream_differs_from_the_labeled_stream_on_the_same_source():
  (labeled,) = labeled_batches(1, seed=7)
  (unlabeled,) = unlabeled_batches(1, seed=7, strong_augment=False)
  assert not np.array_equal(labeled["image"], unlabeled["weak_image"])


def test_unlabeled_stream_without_strong_augment_gives_two_equal_views():
  source = variable_size_source([(8, 12), (14, 6), (16, 16), (5, 5)], with_ids=False)
  batches = unlabeled_batches(2, source=source, shuffle_buffer=4, strong_augment=False)
  for batch in batches:
    np.testing.assert_array_equal(batch["strong_image"], batch["weak_image"])
    # No cutout: only padding (the one place these masks hold the ignore label) is invalid.
    np.testing.assert_array_equal(batch["valid"], (batch["mask"] != IGNORE).astype(np.int32))
  assert any((b["valid"] == 0).any() for b in batches)


def test_unlabeled_stream_image_labels_name_the_classes_outside_the_cutout():
  batches = unlabeled_batches(4, cutout_size=13)
  for batch in batches:
    for mask, labels, valid in zip(batch["mask"], batch["image_labels"], batch["valid"]):
      visible = {c for c in np.unique(mask[valid == 1]) if c not in (0, IGNORE)}
      assert set(np.flatnonzero(labels) + 1) == visible
      assert (valid == 0).sum() >= 7 * 7  # The box, at least a quarter inside the crop ...
      assert (mask[valid == 0] != IGNORE).any()  # ... leaves the ground truth under it alone.
  # These masks are one class per image, so it does not fall under the box in most crops.
  assert any(batch["image_labels"].any() for batch in batches)


def test_unlabeled_stream_fills_missing_masks_with_the_ignore_label():
  images = np.random.default_rng(5).integers(0, 256, [4, 16, 16, 3]).astype(np.uint8)
  source = tf.data.Dataset.from_tensor_slices({"image": images})
  (batch,) = unlabeled_batches(1, source=source)
  assert (batch["mask"] == IGNORE).all() and not batch["image_labels"].any()


# ----------------------------------------------------------------------------- weak vs strong view

VIEW_SIZE, VIEW_CROP, VIEW_CUTOUT = 64, 24, 10
VIEW_SCALES = (0.25, 0.5, 1.0)  # 16 px (padded), 32 and 64 px (not padded) for a 24 px crop.
NUM_VIEW_SEEDS = 16


def coordinate_example():
  """R = 4 * row, G = 4 * col, B = 200; the mask is row * 64 + col (never the ignore label -1)."""
  rows, cols = np.meshgrid(np.arange(VIEW_SIZE), np.arange(VIEW_SIZE), indexing="ij")
  image = np.stack([4 * rows, 4 * cols, np.full_like(rows, 200)], axis=-1).astype(np.uint8)
  return {"image": image, "mask": (rows * VIEW_SIZE + cols).astype(np.int32)}


def blocky_example():
  """A 4 x 4 grid of flat, distinct random colours, with uneven band widths.

  Uneven, so that no flip or shift maps the grid onto itself: a misplaced strong view would put
  two colours where the weak view has one.
  """
  row_band = np.digitize(np.arange(VIEW_SIZE), [7, 20, 37])
  col_band = np.digitize(np.arange(VIEW_SIZE), [5, 16, 35])
  colours = np.random.default_rng(6).integers(0, 256, [4, 4, 3]).astype(np.uint8)
  return {"image": colours[row_band[:, None], col_band[None, :]],
          "mask": coordinate_example()["mask"]}


def both_views(example, jitter_colors=None, color_jitter=color.SPEC_JITTER):
  """augment_unlabeled_example for NUM_VIEW_SEEDS seeds, in Dataset.map; checked equal eagerly."""
  def views(seed):
    return pipeline.augment_unlabeled_example(
        example, seed, crop_size=VIEW_CROP, scales=VIEW_SCALES, ignore_label=-1, num_classes=2,
        cutout_size=VIEW_CUTOUT, jitter_colors=jitter_colors, color_jitter=color_jitter)
  seeds = np.stack([np.arange(NUM_VIEW_SEEDS), np.full(NUM_VIEW_SEEDS, 99)], axis=1)
  outs = list(tf.data.Dataset.from_tensor_slices(seeds).map(views).as_numpy_iterator())
  tf.nest.map_structure(np.testing.assert_array_equal,
                        tf.nest.map_structure(np.asarray, views(tf.constant(seeds[0]))), outs[0])
  return outs


def cutout_and_padding(out):
  """(box, padding) as bool [h, w]: padding from the mask, the box = the rest of valid == 0."""
  padding = out["mask"] == -1
  return (out["valid"] == 0) & ~padding, padding


def test_weak_and_strong_views_share_one_geometry():
  # Without colour jitter the strong view must be the weak view with a hole.
  outs = both_views(coordinate_example(), jitter_colors=lambda image, seed: image)
  full_boxes = 0
  for out in outs:
    weak, strong = out["weak_image"], out["strong_image"]
    box, padding = cutout_and_padding(out)
    # The views differ exactly inside the box, where the strong view is the fill (normalized 0).
    np.testing.assert_array_equal((weak != strong).any(-1), box)
    assert (strong[box] == 0).all()
    # The box is one clipped square: a filled rectangle of side <= VIEW_CUTOUT.
    rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
    assert box.sum() == rows.size * cols.size
    assert rows.size <= VIEW_CUTOUT and cols.size <= VIEW_CUTOUT
    full_boxes += box.sum() == VIEW_CUTOUT**2
    # Padding is the mean pixel in both views; real pixels keep B = 200 in the weak view.
    assert (weak[padding] == 0).all() and (strong[padding] == 0).all()
    np.testing.assert_allclose(weak[~padding][:, 2], 200 / 127.5 - 1, atol=1e-5)
    check_coordinates_follow_the_mask(out, ~padding)
  assert full_boxes > 0
  flips = {bool(direction) for direction in map(columns_decrease, outs)}
  assert flips == {True, False}
  assert {bool(cutout_and_padding(out)[1].any()) for out in outs} == {True, False}


def check_coordinates_follow_the_mask(out, real):
  """The weak view's decoded (row, col) match the mask's within the resize's blur."""
  grid_rows, grid_cols = np.divmod(out["mask"], VIEW_SIZE)
  # A monotone grid: rows grow downwards, columns move one way in every row.
  row_steps = np.diff(grid_rows, axis=0)[real[1:] & real[:-1]]
  col_steps = np.diff(grid_cols, axis=1)[real[:, 1:] & real[:, :-1]]
  assert (row_steps >= 0).all()
  assert (col_steps >= 0).all() or (col_steps <= 0).all()
  # Nearest resize steps 1 / scale source rows per output row (4, 2 or 1 here).
  scale = 1.0 / np.median(row_steps)
  assert scale in VIEW_SCALES
  # Bilinear vs nearest: within half a source pixel, more near borders where filters clamp.
  tolerance = 0.5 + 1.0 / scale + 1e-3
  decoded = (out["weak_image"][real][:, :2] + 1.0) * 127.5 / 4.0
  assert np.abs(decoded[:, 0] - grid_rows[real]).max() <= tolerance
  assert np.abs(decoded[:, 1] - grid_cols[real]).max() <= tolerance
  # Padding sits on the side the columns run towards: right without a flip, left with one.
  padded_cols = np.flatnonzero(~real.any(0))
  if padded_cols.size:
    assert padded_cols[0] == 0 if columns_decrease(out) else padded_cols[-1] == VIEW_CROP - 1


def columns_decrease(out):
  first_row = out["mask"][0][out["mask"][0] >= 0] % VIEW_SIZE
  return first_row.size > 1 and first_row[0] > first_row[-1]


def test_colour_jitter_changes_colours_but_not_where_pixels_go():
  no_jitter = both_views(blocky_example(), jitter_colors=lambda image, seed: image)
  jittered = both_views(blocky_example())
  for plain, out in zip(no_jitter, jittered):
    # Same geometry and cutout whatever the jitter does: same weak view, mask and valid map.
    for key in ("weak_image", "mask", "valid"):
      np.testing.assert_array_equal(out[key], plain[key])
    box, padding = cutout_and_padding(out)
    assert (out["strong_image"][padding | box] == 0).all()
    # Jitter acts pixel by pixel (plus the crop window's per-channel mean, for contrast), so
    # wherever the weak view shows one colour the strong view shows one colour too; a misplaced
    # pixel would break this.
    real = ~(padding | box)
    weak_colours, groups = np.unique(out["weak_image"][real], axis=0, return_inverse=True)
    strong = out["strong_image"][real]
    for group in range(len(weak_colours)):
      members = strong[groups.ravel() == group]
      assert np.ptp(members, axis=0).max() <= 1e-4
    assert not np.allclose(strong, out["weak_image"][real], atol=0.05)


def test_zero_colour_jitter_strengths_leave_the_strong_view_the_weak_view_with_a_hole():
  for out in both_views(blocky_example(), color_jitter=(0.0, 0.0, 0.0, 0.0)):
    box, padding = cutout_and_padding(out)
    real = ~(padding | box)
    np.testing.assert_allclose(out["strong_image"][real], out["weak_image"][real], atol=2e-5)


def test_hue_only_jitter_keeps_each_pixels_brightest_and_darkest_channel_values():
  """A hue rotation permutes and blends channels between a pixel's max and min, keeping both."""
  changed = 0
  for out in both_views(blocky_example(), color_jitter=(0.0, 0.0, 0.0, 0.25)):
    box, padding = cutout_and_padding(out)
    real = ~(padding | box)
    weak, strong = out["weak_image"][real], out["strong_image"][real]
    np.testing.assert_allclose(strong.max(-1), weak.max(-1), atol=1e-4)
    np.testing.assert_allclose(strong.min(-1), weak.min(-1), atol=1e-4)
    changed += not np.allclose(strong, weak, atol=0.05)
  assert changed >= NUM_VIEW_SEEDS // 2


# ----------------------------------------------------------------------------- evaluation stream


def eval_batches(source, process_index=0, process_count=1, batch_size=2, crop_size=10):
  stream = pipeline.eval_stream(source, batch_size=batch_size, crop_size=crop_size,
                                ignore_label=IGNORE, process_index=process_index,
                                process_count=process_count)
  return list(pipeline.as_numpy_batches(stream))


EVAL_SIZES = [(10, 10), (7, 9), (4, 10), (10, 3), (5, 5), (1, 1), (8, 6)]


def test_eval_stream_pads_bottom_right_without_other_changes():
  batches = eval_batches(variable_size_source(EVAL_SIZES))
  assert len(batches) == 4
  batch = batches[0]
  assert batch["image"].shape == (2, 10, 10, 3) and batch["image"].dtype == np.float32
  assert batch["mask"].shape == (2, 10, 10) and batch["mask"].dtype == np.int32
  assert batch["id"].tolist() == [b"img0", b"img1"]
  image, mask = batch["image"][1], batch["mask"][1]  # img1 is 7x9 with pixel value 2, class 2.
  np.testing.assert_allclose(image[:7, :9], 2 / 127.5 - 1)
  assert (image[7:] == 0).all() and (image[:, 9:] == 0).all()
  assert (mask[:7, :9] == 2).all() and (mask[7:] == IGNORE).all() and (mask[:, 9:] == IGNORE).all()


def test_eval_stream_pads_the_last_batch_with_ignored_dummies():
  batches = eval_batches(variable_size_source(EVAL_SIZES))
  last = batches[-1]
  assert last["id"].tolist() == [b"img6", b""]
  assert (last["mask"][1] == IGNORE).all() and (last["image"][1] == 0).all()


@pytest.mark.parametrize("num_examples", [7, 8, 1])
def test_eval_shards_cover_every_example_once_in_equal_batch_counts(num_examples):
  sizes = (EVAL_SIZES * 2)[:num_examples]
  per_process = [eval_batches(variable_size_source(sizes), process_index=p, process_count=2)
                 for p in range(2)]
  expected = pipeline.eval_batches_per_process(num_examples, batch_size=2, process_count=2)
  assert [len(b) for b in per_process] == [expected, expected]
  ids = [i for batches in per_process for b in batches for i in b["id"].tolist()]
  real = [i for i in ids if i]
  assert sorted(real) == sorted(f"img{i}".encode() for i in range(num_examples))
  for batches in per_process:
    for b in batches:
      for example_id, mask in zip(b["id"], b["mask"]):
        if not example_id:
          assert (mask == IGNORE).all()


def test_eval_stream_names_examples_by_position_without_ids():
  batches = eval_batches(variable_size_source(EVAL_SIZES[:3], with_ids=False),
                         process_index=1, process_count=2)
  assert [b["id"].tolist() for b in batches] == [[b"1", b""]]


def test_eval_stream_with_known_cardinality():
  batches = eval_batches(labeled_source(num_examples=5), crop_size=16, batch_size=4)
  assert [b["id"].tolist() for b in batches] == [
      [b"img0", b"img1", b"img2", b"img3"], [b"img4", b"", b"", b""]]


def test_eval_stream_refuses_to_crop_an_oversize_image():
  source = variable_size_source([(5, 5), (12, 9)])
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"img1.*12x9.*config\.eval_crop_size to at least 12"):
    eval_batches(source, crop_size=10)


def test_eval_batches_per_process():
  assert pipeline.eval_batches_per_process(7, batch_size=2, process_count=2) == 2
  assert pipeline.eval_batches_per_process(8, batch_size=2, process_count=2) == 2
  assert pipeline.eval_batches_per_process(9, batch_size=2, process_count=2) == 3
  assert pipeline.eval_batches_per_process(0, batch_size=2, process_count=2) == 0


def test_eval_stream_batch_count_follows_num_examples():
  source = variable_size_source(EVAL_SIZES)  # Unknown cardinality: num_examples skips a count.
  stream = pipeline.eval_stream(source, batch_size=2, crop_size=10, ignore_label=IGNORE,
                                num_examples=len(EVAL_SIZES))
  assert len(list(stream)) == 4
  # A wrong count still yields exactly the promised batches, so hosts never disagree.
  stream = pipeline.eval_stream(source, batch_size=2, crop_size=10, ignore_label=IGNORE,
                                num_examples=11)
  assert len(list(stream)) == 6


# ----------------------------------------------------------------------------- releasing a stream


TRAINING_STREAM_ARGS = dict(batch_size=2, crop_size=13, ignore_label=IGNORE,
                            num_classes=NUM_CLASSES, seed=0, shuffle_buffer=8)


@pytest.mark.parametrize("make_stream", [
    lambda: pipeline.labeled_stream(labeled_source(), **TRAINING_STREAM_ARGS),
    lambda: pipeline.unlabeled_stream(labeled_source(), **TRAINING_STREAM_ARGS),
    lambda: pipeline.eval_stream(labeled_source(), batch_size=2, crop_size=16,
                                 ignore_label=IGNORE),
], ids=["labeled", "unlabeled", "eval"])
def test_streams_run_no_autotuning_thread_that_their_release_would_wait_for(make_stream):
  # An autotuned iterator's release can wait out the model thread's sleep (up to a minute,
  # pipeline.stream_options): finished training processes lingered 10-50 s after their last line.
  # Checked on what as_numpy_batches iterates, its own prefetch included.
  stream = make_stream().prefetch(pipeline.AUTOTUNE)
  assert stream.options().autotune.enabled is False
  assert stream.options().deterministic is True
