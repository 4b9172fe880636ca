"""tf.data streams: the labeled training stream and the padded evaluation stream, per process.

Inputs are tf.data.Datasets of dicts {'image': uint8 [H, W, 3], 'mask': uint8 [H, W, 1] or [H, W]
(class indices, ignore label for unlabeled pixels), 'id': tf.string (optional)}; other keys are
dropped.
Batch sizes are PER PROCESS; each process reads a disjoint shard of the source.
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from pseudoseg_jax.data import augment

AUTOTUNE = tf.data.AUTOTUNE
Seed = Union[int, Sequence[int]]


def hide_tensorflow_from_accelerators() -> None:
  """Keeps TensorFlow off GPUs so that it neither grabs their memory nor competes with JAX."""
  try:
    if tf.config.get_visible_devices("GPU"):
      tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    # Visible devices cannot change once the TF runtime is initialized; whoever did that chose.
    logging.warning("TensorFlow was initialized before the input pipeline; it may still see GPUs.")


def as_numpy_batches(dataset: tf.data.Dataset) -> Iterator[dict]:
  """Iterates a (prefetched) dataset as dicts of numpy arrays; strings come back as bytes."""
  return iter(dataset.prefetch(AUTOTUNE).as_numpy_iterator())


# --------------------------------------------------------------------------------------------------
# Labeled training stream.
# --------------------------------------------------------------------------------------------------


def labeled_stream(dataset: tf.data.Dataset, *, batch_size: int, crop_size: augment.CropSize,
                   scales: Sequence[float] = augment.DEFAULT_SCALES, ignore_label: int,
                   num_classes: int, seed: Seed, process_index: int = 0, process_count: int = 1,
                   shuffle_buffer: int = 2_048) -> tf.data.Dataset:
  """Infinite stream of augmented labeled batches; a deterministic function of (seed, process).

  Yields {'image': float32 [B, h, w, 3] in [-1, 1], 'mask': int32 [B, h, w],
  'image_labels': float32 [B, num_classes - 1]} with (h, w) = crop_size and B = batch_size.
  `seed` is an int or a tuple of ints (e.g. (config.seed, start_step)).
  """
  hide_tensorflow_from_accelerators()
  shuffle_seed, augment_key = stream_seeds(seed, process_index)
  ds = dataset.shard(process_count, process_index)  # Before shuffle/repeat: disjoint per process.
  ds = ds.map(_image_and_mask, num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True).repeat()
  # The running element index (over all epochs) gives every example its own augmentation seed.
  ds = ds.enumerate()

  def augment_indexed(index, example):
    example_seed = tf.random.experimental.stateless_fold_in(augment_key, index)
    return augment_labeled_example(
        example, example_seed, crop_size=crop_size, scales=scales, ignore_label=ignore_label,
        num_classes=num_classes)

  ds = ds.map(augment_indexed, num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.with_options(_deterministic_options()).prefetch(AUTOTUNE)


def augment_labeled_example(example, seed, *, crop_size: augment.CropSize,
                            scales: Sequence[float], ignore_label: int, num_classes: int) -> dict:
  """Scale, pad, crop, flip (SPEC section 6, labeled stream) and labels read off the crop."""
  example = _image_and_mask(example)
  image, mask = example["image"], example["mask"]
  geometry = augment.sample_geometry(seed, tf.shape(image)[:2], crop_size, scales)
  image = augment.apply_geometry_to_image(image, geometry)
  mask = augment.apply_geometry_to_label(mask, geometry, fill_value=ignore_label)[..., 0]
  return {
      "image": augment.normalize_image(image),
      "mask": mask,
      "image_labels": augment.image_labels_from_mask(
          mask, num_classes=num_classes, ignore_label=ignore_label),
  }


def stream_seeds(seed: Seed, process_index: int):
  """(shuffle seed: Python int, augmentation key: int64 [2]), both derived from (seed, process).

  The process index is mixed in so that hosts do not draw identical crops at the same step.
  """
  parts = [seed] if isinstance(seed, (int, np.integer)) else list(seed)
  parts = [int(p) % 2**63 for p in parts] + [int(process_index)]
  shuffle_seed = int(np.random.SeedSequence(parts + [0]).generate_state(1, np.uint32)[0])
  key = tf.constant([parts[0], 1], tf.int64)
  for part in parts[1:]:
    key = tf.random.experimental.stateless_fold_in(key, tf.constant(part, tf.int64))
  return shuffle_seed, key


# --------------------------------------------------------------------------------------------------
# Evaluation stream.
# --------------------------------------------------------------------------------------------------


def eval_stream(dataset: tf.data.Dataset, *, batch_size: int, crop_size: augment.CropSize,
                ignore_label: int, process_index: int = 0, process_count: int = 1,
                num_examples: Optional[int] = None) -> tf.data.Dataset:
  """Finite stream of whole images padded bottom/right to crop_size, equal batch counts per process.

  Yields {'image': float32 [B, h, w, 3] (padding = 0), 'mask': int32 [B, h, w] (padding =
  ignore_label), 'id': string [B]}. Process p gets examples p, p + P, p + 2P, ...; the last batches
  are filled with dummy examples (id '', mask all ignore_label) so that every process yields
  `eval_batches_per_process(...)` batches and multi-host jit never waits on a missing batch.
  Images are never cropped: one larger than the crop raises tf.errors.InvalidArgumentError when
  read.
  `num_examples` avoids a counting pass when the source's cardinality is unknown.
  """
  hide_tensorflow_from_accelerators()
  crop_size = augment.as_height_width(crop_size)
  if num_examples is None:
    num_examples = count_examples(dataset)
  num_batches = eval_batches_per_process(num_examples, batch_size, process_count)
  shard_size = len(range(process_index, num_examples, process_count))

  ds = dataset
  if "id" not in ds.element_spec:
    # Name examples by their position in the source so that errors and outputs stay traceable.
    ds = ds.enumerate().map(lambda index, ex: {**ex, "id": tf.strings.as_string(index)})
  ds = ds.shard(process_count, process_index)
  ds = ds.map(lambda ex: pad_eval_example(ex, crop_size=crop_size, ignore_label=ignore_label),
              num_parallel_calls=AUTOTUNE, deterministic=True)
  # The two take()s fix the batch count even if num_examples is wrong for this source.
  ds = ds.take(shard_size).concatenate(
      tf.data.Dataset.from_tensors(dummy_eval_example(crop_size, ignore_label)).repeat())
  ds = ds.take(num_batches * batch_size).batch(batch_size, drop_remainder=True)
  return ds.with_options(_deterministic_options()).prefetch(AUTOTUNE)


def eval_batches_per_process(num_examples: int, batch_size: int, process_count: int) -> int:
  """Every process yields this many: the largest shard, ceil(n / P) examples, in batches of B."""
  largest_shard = -(-num_examples // process_count)
  return -(-largest_shard // batch_size)


def count_examples(dataset: tf.data.Dataset) -> int:
  """The cardinality when tf.data knows it, else one full pass over the dataset."""
  cardinality = int(dataset.cardinality())
  if cardinality == tf.data.INFINITE_CARDINALITY:
    raise ValueError("The evaluation dataset is infinite; it must be finite.")
  if cardinality >= 0:
    return cardinality
  return int(dataset.reduce(np.int64(0), lambda count, _: count + 1))


def pad_eval_example(example, *, crop_size: augment.CropSize, ignore_label: int) -> dict:
  """Pads image (127.5 -> normalized 0) and mask (ignore_label) bottom/right to crop_size."""
  crop_h, crop_w = augment.as_height_width(crop_size)
  example = _image_and_mask(example) | {"id": example["id"]}
  image, mask = example["image"], example["mask"][..., 0]
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  message = tf.strings.format(
      "Eval image {} is {}x{} (height x width), larger than the eval crop {}x{}. Images are "
      "padded, never cropped, at evaluation: raise config.eval_crop_size to at least {} (DeepLab "
      "uses sizes 4k + 1: 513 for VOC, 641 for COCO).",
      (example["id"], height, width, crop_h, crop_w, tf.maximum(height, width)))
  fits = tf.debugging.Assert((height <= crop_h) & (width <= crop_w), [message], summarize=1)
  with tf.control_dependencies([fits]):
    image = augment.pad_bottom_right(tf.cast(image, tf.float32), [crop_h, crop_w],
                                     augment.IMAGE_FILL_VALUE)
    mask = augment.pad_bottom_right(mask, [crop_h, crop_w], ignore_label)
  return {
      "image": augment.normalize_image(tf.ensure_shape(image, [crop_h, crop_w, 3])),
      "mask": tf.ensure_shape(mask, [crop_h, crop_w]),
      "id": example["id"],
  }


def dummy_eval_example(crop_size: augment.CropSize, ignore_label: int) -> dict:
  """A padding-only example: contributes nothing to the confusion matrix."""
  crop_h, crop_w = augment.as_height_width(crop_size)
  return {
      "image": tf.zeros([crop_h, crop_w, 3], tf.float32),
      "mask": tf.fill([crop_h, crop_w], tf.constant(ignore_label, tf.int32)),
      "id": tf.constant("", tf.string),
  }


# --------------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------------


def _image_and_mask(example) -> dict:
  """Keeps the image (uint8 [H, W, 3]) and the mask as int32 [H, W, 1] (it may come as [H, W])."""
  image = example["image"]
  mask = tf.cast(example["mask"], tf.int32)
  mask = tf.reshape(mask, [tf.shape(mask)[0], tf.shape(mask)[1], 1])
  return {"image": image, "mask": mask}


def _deterministic_options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options
