"""The labeled training stream and the padded evaluation stream, on small synthetic datasets."""

import numpy as np
import pytest
import tensorflow as tf

from pseudoseg_jax.data import augment, pipeline

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
  assert set(batch) == {"image", "mask", "image_labels"}
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  assert set(np.unique(batch["mask"])) <= set(range(1, 9)) | {IGNORE}


def test_labeled_stream_accepts_rank2_masks():
  (batch,) = labeled_batches(1, source=labeled_source(mask_rank=2))
  assert batch["mask"].shape == (4, 13, 13)


def test_labeled_stream_image_labels_match_masks():
  for batch in labeled_batches(3):
    for mask, labels in zip(batch["mask"], batch["image_labels"]):
      present = {c for c in np.unique(mask) if c not in (0, IGNORE)}
      assert set(np.flatnonzero(labels) + 1) == present
      assert len(present) == 1  # One example per crop; ignore pixels never count.


def test_labeled_stream_is_a_function_of_the_seed():
  first = labeled_batches(2, seed=(3, 100))
  again = labeled_batches(2, seed=(3, 100))
  other = labeled_batches(2, seed=(3, 101))
  tf.nest.map_structure(np.testing.assert_array_equal, first, again)
  assert not np.array_equal(first[0]["image"], other[0]["image"])


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


def test_stream_seeds_differ_by_seed_and_process():
  keys = {(pipeline.stream_seeds(s, p)[0], tuple(pipeline.stream_seeds(s, p)[1].numpy()))
          for s, p in [(0, 0), (0, 1), (1, 0), ((0, 5), 0)]}
  assert len(keys) == 4


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
