"""tf.data streams, per process: labeled training, unlabeled training (weak + strong views of one
geometry) and padded evaluation.

Inputs are tf.data.Datasets of dicts {'image': uint8 [H, W, 3], 'mask': uint8 [H, W, 1] or [H, W]
(class indices, ignore label for unlabeled pixels), 'id': tf.string (optional)}; other keys are
dropped. Unlabeled sources may lack 'mask'.
Batch sizes are PER PROCESS; each process reads a disjoint shard of the source.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from pseudoseg_jax.data import augment, color
from pseudoseg_jax.writers import log

AUTOTUNE = tf.data.AUTOTUNE
Seed = Union[int, Sequence[int]]


def hide_tensorflow_from_accelerators() -> None:
  """Keeps TensorFlow off GPUs so that it neither grabs their memory nor competes with JAX."""
  try:
    if tf.config.get_visible_devices("GPU"):
      tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    # Visible devices cannot change once the TF runtime is initialized; whoever did that chose.
    log.warning("TensorFlow was initialized before the input pipeline; it may still see GPUs.")


def as_numpy_batches(dataset: tf.data.Dataset) -> Iterator[dict]:
  """Iterates a (prefetched) dataset as dicts of numpy arrays; strings come back as bytes."""
  return iter(dataset.prefetch(AUTOTUNE).as_numpy_iterator())


# --------------------------------------------------------------------------------------------------
# Training streams: labeled, and unlabeled with a weak and a strong view.
# --------------------------------------------------------------------------------------------------

# Mixed into the unlabeled stream's seeds, so that a dataset used as both labeled and unlabeled
# source is not shuffled and cropped identically in both streams. Any constant that no real seed or
# process index would take works.
UNLABELED_STREAM_TAG = 0x756E6C62


def labeled_stream(dataset: tf.data.Dataset, *, batch_size: int, crop_size: augment.CropSize,
                   scales: Sequence[float] = augment.DEFAULT_SCALES, ignore_label: int,
                   num_classes: int, seed: Seed, process_index: int = 0, process_count: int = 1,
                   shuffle_buffer: int = 2_048, start_batch: int = 0,
                   num_examples: Optional[int] = None) -> tf.data.Dataset:
  """Infinite stream of augmented labeled batches; a deterministic function of (seed, process).

  Batch k of the stream is the same whatever `start_batch` the stream starts from (see
  `_training_stream`), which is what makes a resumed run identical to an uninterrupted one.

  Yields {'image': float32 [B, h, w, 3] in [-1, 1], 'mask': int32 [B, h, w],
  'valid': int32 [B, h, w] (1 = real pixel, 0 = padding),
  'image_labels': float32 [B, num_classes - 1]} with (h, w) = crop_size and B = batch_size.
  `seed` is an int or a tuple of ints (e.g. (config.seed, start_step)).
  """
  augment_example = functools.partial(
      augment_labeled_example, crop_size=crop_size, scales=scales, ignore_label=ignore_label,
      num_classes=num_classes)
  return _training_stream(
      dataset, _image_and_mask, augment_example, batch_size=batch_size, seed=seed,
      process_index=process_index, process_count=process_count, shuffle_buffer=shuffle_buffer,
      start_batch=start_batch, num_examples=num_examples)


def unlabeled_stream(dataset: tf.data.Dataset, *, batch_size: int, crop_size: augment.CropSize,
                     scales: Sequence[float] = augment.DEFAULT_SCALES, ignore_label: int,
                     num_classes: int, seed: Seed, process_index: int = 0,
                     process_count: int = 1, shuffle_buffer: int = 2_048,
                     strong_augment: bool = True, cutout_size: int = 0,
                     color_jitter: Sequence[float] = color.SPEC_JITTER, start_batch: int = 0,
                     num_examples: Optional[int] = None) -> tf.data.Dataset:
  """Infinite stream of (weak, strong) view pairs; a deterministic function of (seed, process),
  which `start_batch` seeks into as in `labeled_stream`.

  Yields, with (h, w) = crop_size and B = batch_size:
    'weak_image': float32 [B, h, w, 3] in [-1, 1]: scale, pad, crop, flip.
    'strong_image': float32 [B, h, w, 3]: the same geometry, plus colour jitter (of the crop
      window's real pixels, see augment_unlabeled_example) before padding
      and a cutout box (normalized 0) after cropping; equal to 'weak_image' when not
      `strong_augment` (the ablation switch; then there is no cutout either).
    'valid': int32 [B, h, w]: 1 = real pixel, 0 = padding or inside the cutout box.
    'mask': int32 [B, h, w]: the hidden ground truth under the weak view (ignore_label on padding,
      NOT blanked by the cutout), only to monitor pseudo-label accuracy; all ignore_label when the
      source has no masks.
    'image_labels': float32 [B, num_classes - 1]: classes present in 'mask' outside the cutout box
      (as the original), for the weakly-labeled setting.
  `cutout_size` is the box side in pixels (SPEC: 100 for crop 513; 0 = no cutout).
  `color_jitter` is the strong view's (brightness, contrast, saturation, hue) strengths
  (color.color_jitter; SPEC's by default).
  """
  read_example = functools.partial(_image_and_mask, missing_mask_label=ignore_label)
  augment_example = functools.partial(
      augment_unlabeled_example, crop_size=crop_size, scales=scales, ignore_label=ignore_label,
      num_classes=num_classes, strong_augment=strong_augment, cutout_size=cutout_size,
      color_jitter=color_jitter)
  return _training_stream(
      dataset, read_example, augment_example, batch_size=batch_size, seed=seed,
      stream_tag=UNLABELED_STREAM_TAG, process_index=process_index, process_count=process_count,
      shuffle_buffer=shuffle_buffer, start_batch=start_batch, num_examples=num_examples)


def augment_labeled_example(example, seed, *, crop_size: augment.CropSize,
                            scales: Sequence[float], ignore_label: int, num_classes: int) -> dict:
  """Scale, pad, crop, flip (SPEC section 6, labeled stream) and labels read off the crop."""
  example = _image_and_mask(example)
  geometry = augment.sample_geometry(seed, tf.shape(example["image"])[:2], crop_size, scales)
  window = augment.resize_window(example["image"], geometry)
  return _weak_view(window, example["mask"], geometry, ignore_label=ignore_label,
                    num_classes=num_classes)


def augment_unlabeled_example(example, seed, *, crop_size: augment.CropSize,
                              scales: Sequence[float], ignore_label: int, num_classes: int,
                              strong_augment: bool = True, cutout_size: int = 0,
                              color_jitter: Sequence[float] = color.SPEC_JITTER,
                              jitter_colors: Optional[Callable] = None) -> dict:
  """One geometry, two views (SPEC section 6); the keys of `unlabeled_stream`, unbatched.

  `jitter_colors(window, seed)` maps [0, 255] to [0, 255]; tests swap it to see the geometry
  through the strong view; None is color.color_jitter with the strengths `color_jitter`. It sees the crop window's real pixels (augment.resize_window), not the
  whole scaled image: the one deliberate difference from the original, which only moves
  contrast's per-channel mean (window mean instead of whole-image mean); padding stays 127.5.
  """
  example = _image_and_mask(example, missing_mask_label=ignore_label)
  geometry_seed, jitter_seed, cutout_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=3))
  geometry = augment.sample_geometry(
      geometry_seed, tf.shape(example["image"])[:2], crop_size, scales)
  # Resized once: both views are cut from the same pixels.
  window = augment.resize_window(example["image"], geometry)
  weak = _weak_view(window, example["mask"], geometry, ignore_label=ignore_label,
                    num_classes=num_classes)
  views = {"weak_image": weak.pop("image"), **weak}
  if not strong_augment:
    return views | {"strong_image": views["weak_image"]}
  jitter_colors = jitter_colors or functools.partial(
      color.color_jitter, **dict(zip(color.JITTER_FIELDS, color_jitter)))
  strong_image = augment.place_normalized_image(jitter_colors(window, jitter_seed), geometry)
  box = augment.sample_cutout_box(cutout_seed, geometry.crop_size, cutout_size)
  # The original voids the box in the label it derives image-level labels from, so those name only
  # classes the strong view still shows. 'mask' itself keeps the box: it only serves monitoring,
  # which skips invalid pixels anyway.
  mask_outside_box = augment.fill_box(views["mask"], box, ignore_label)
  return views | {
      "strong_image": augment.fill_box(strong_image, box, augment.NORMALIZED_FILL_VALUE),
      "valid": augment.fill_box(views["valid"], box, 0),
      "image_labels": augment.image_labels_from_mask(mask_outside_box, num_classes=num_classes,
                                                     ignore_label=ignore_label),
  }


def stream_seeds(seed: Seed, process_index: int, stream_tag: int = 0) -> tuple:
  """(shuffle key, augmentation key): int64 [2] each, derived from (seed, process, stream).

  The process index is mixed in so that hosts do not draw identical crops at the same step; a
  nonzero `stream_tag` too, so that different streams of one run differ.
  """
  parts = [seed] if isinstance(seed, (int, np.integer)) else list(seed)
  parts = [int(p) % 2**63 for p in parts] + [int(process_index)]
  if stream_tag:
    parts.append(int(stream_tag))
  key = tf.constant([parts[0], 1], tf.int64)
  for part in parts[1:]:
    key = tf.random.experimental.stateless_fold_in(key, tf.constant(part, tf.int64))
  shuffle_key, augment_key = tf.unstack(tf.random.experimental.stateless_split(key, num=2))
  return shuffle_key, augment_key


def epoch_shuffle_seed(shuffle_key, epoch):
  """The shuffle seed of one epoch: a function of (key, epoch) alone, so any epoch can be
  started without replaying the ones before it."""
  epoch_key = tf.random.experimental.stateless_fold_in(shuffle_key, epoch)
  return tf.random.stateless_uniform([], seed=epoch_key, minval=0, maxval=tf.int64.max,
                                     dtype=tf.int64)


def without_autograph(map_fn: Callable) -> Callable:
  """`map_fn` for Dataset.map as written, not rewritten by AutoGraph.

  The pipeline's functions branch only on Python values (shapes, config) and use tf.cond /
  tf.switch_case where the data decides, so AutoGraph has nothing to convert; converting them
  anyway parsed and rewrote their source on every stream built: 8.5 of the 10.3 s a tiny training
  run spent building its tf.data streams.
  """
  return tf.autograph.experimental.do_not_convert(map_fn)


def shard_size(num_examples: int, process_index: int, process_count: int) -> int:
  """How many examples `Dataset.shard(process_count, process_index)` keeps."""
  return len(range(process_index, num_examples, process_count))


def _training_stream(dataset: tf.data.Dataset, read_example: Callable, augment_example: Callable,
                     *, batch_size: int, seed: Seed, process_index: int, process_count: int,
                     shuffle_buffer: int, stream_tag: int = 0, start_batch: int = 0,
                     num_examples: Optional[int] = None) -> tf.data.Dataset:
  """Shard, shuffle each epoch, then `augment_example(example, seed)` with a seed per element.

  Indexed by position: element i of this process's stream (epoch i // n, n = shard size) comes
  from that epoch's own shuffle seed and is augmented with a key folded from i. Starting at
  `start_batch` opens the epoch it falls in and skips into it, reading (not augmenting) less than
  one epoch of the shard; the batches are bit-identical to those of a stream started at 0. No
  iterator state needs saving: the step number in the checkpoint is the data position.
  `num_examples` (the whole source's, before sharding) saves a counting pass where tf.data does
  not know the cardinality.
  """
  hide_tensorflow_from_accelerators()  # Before the first TF op below initializes the runtime.
  if num_examples is None:
    num_examples = count_examples(dataset)
  examples_per_epoch = shard_size(num_examples, process_index, process_count)
  if examples_per_epoch < 1:
    raise ValueError(f"Process {process_index} of {process_count} has no training examples: the "
                     f"source holds {num_examples}, fewer than the processes reading it.")
  shuffle_key, augment_key = stream_seeds(seed, process_index, stream_tag)
  start = start_batch * batch_size
  start_epoch, skip_in_epoch = divmod(start, examples_per_epoch)
  shard = dataset.shard(process_count, process_index)  # Before shuffling: disjoint per process.
  shard = shard.map(without_autograph(read_example), num_parallel_calls=AUTOTUNE,
                    deterministic=True)

  def one_epoch(epoch):
    return shard.shuffle(shuffle_buffer, seed=epoch_shuffle_seed(shuffle_key, epoch),
                         reshuffle_each_iteration=False)

  ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(one_epoch)
  ds = ds.skip(skip_in_epoch).enumerate(start=start)

  def augment_indexed(index, example):
    return augment_example(example, tf.random.experimental.stateless_fold_in(augment_key, index))

  ds = ds.map(without_autograph(augment_indexed), num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.with_options(stream_options()).prefetch(AUTOTUNE)


def _weak_view(window, mask, geometry: augment.Geometry, *, ignore_label: int,
               num_classes: int) -> dict:
  """Places the image's window (augment.resize_window) and the mask in the crop; the labeled
  stream's keys."""
  # int32 before placing: the ignore label (the fill) need not fit the mask's own dtype.
  mask_window = tf.cast(augment.resize_label_window(mask[..., 0], geometry), tf.int32)
  return {
      "image": augment.place_normalized_image(window, geometry),
      "mask": augment.place_window(mask_window, geometry, ignore_label),
      "valid": augment.valid_mask(geometry),
      # The padding holds only the ignore label, which names no class: the window says it all.
      "image_labels": augment.image_labels_from_mask(
          mask_window, num_classes=num_classes, ignore_label=ignore_label),
  }


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
  ds = ds.map(without_autograph(
      lambda ex: pad_eval_example(ex, crop_size=crop_size, ignore_label=ignore_label)),
              num_parallel_calls=AUTOTUNE, deterministic=True)
  # The two take()s fix the batch count even if num_examples is wrong for this source.
  ds = ds.take(shard_size).concatenate(
      tf.data.Dataset.from_tensors(dummy_eval_example(crop_size, ignore_label)).repeat())
  ds = ds.take(num_batches * batch_size).batch(batch_size, drop_remainder=True)
  return ds.with_options(stream_options()).prefetch(AUTOTUNE)


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
  return int(dataset.with_options(stream_options()).reduce(np.int64(0),
                                                          lambda count, _: count + 1))


def pad_eval_example(example, *, crop_size: augment.CropSize, ignore_label: int) -> dict:
  """Pads image (127.5 -> normalized 0) and mask (ignore_label) bottom/right to crop_size."""
  crop_h, crop_w = augment.as_height_width(crop_size)
  example = _image_and_mask(example) | {"id": example["id"]}
  image, mask = example["image"], tf.cast(example["mask"][..., 0], tf.int32)
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


def _image_and_mask(example, *, missing_mask_label: Optional[int] = None) -> dict:
  """Keeps the image (uint8 [H, W, 3]) and the mask as [H, W, 1] (it may come as [H, W]).

  The mask keeps its dtype (uint8 in the shuffle buffer is a quarter of int32); users cast.
  An example without a mask gets one full of `missing_mask_label`, or a KeyError if that is None.
  """
  image = example["image"]
  if "mask" in example:
    mask = example["mask"]
  elif missing_mask_label is not None:
    fill = tf.constant(missing_mask_label, _label_dtype(missing_mask_label))
    mask = tf.fill(tf.shape(image)[:2], fill)
  else:
    raise KeyError("The example has no 'mask'; labeled and evaluation sources need masks.")
  mask = tf.reshape(mask, [tf.shape(mask)[0], tf.shape(mask)[1], 1])
  return {"image": image, "mask": mask}


def _label_dtype(label: int) -> tf.DType:
  """uint8 when the value fits (the usual ignore label 255), else int32."""
  return tf.uint8 if 0 <= label <= 255 else tf.int32


def stream_options() -> tf.data.Options:
  """The options of every dataset this project iterates (the streams here, the loaders' scans of
  a split): deterministic order, and no autotuning model thread.

  An autotuned iterator runs a model thread that sleeps between optimizations, twice as long
  each time up to 60 s, and releasing the iterator joins that thread. The release is meant to cut
  the sleep short, yet on TensorFlow 2.21 the thread often slept its period out (seen in gdb: the
  main thread in RootDataset::Iterator's destructor, the model thread in Model::OptimizeLoop's
  timed wait), more so with a numpy_function in the map (the folder dataset's mask reader): a
  finished training run lingered 10-50 s after its last log line, in a process or in a notebook
  that drops the run's iterators. Evaluation iterators are released after every evaluation.
  Without autotuning, AUTOTUNE still means min(16, cores) parallel calls, and a prefetch buffer
  still grows while its consumer waits.
  """
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = False
  return options
