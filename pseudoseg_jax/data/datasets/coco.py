"""COCO 2017 semantic segmentation (81 classes) from TFDS's coco/2017_panoptic, and COCO -> VOC.

'coco': the 80 COCO thing categories become classes 1-80 in category-id order (person = 1 ...
toothbrush = 80); stuff segments and the pixels panoptic leaves unlabeled (segment id 0) are
background 0. Crowd segments keep their category. Ids are the image file stems ('000000177254'),
as in the paper's split lists (`train2017/000000177254`). 'coco_voc': the cross-dataset setting
(SPEC 8), COCO images with VOC classes labeled in VOC's 21 classes, evaluated on VOC val.

Masks come from the panoptic PNG (segment id = R + 256 G + 256^2 B) and the segments' labels, by
`semantic_mask` inside tf.data. Label indices are mapped to classes by category NAME, whatever the
order of the builder's ClassLabel.

One-time costs: the builder must be prepared beforehand (PREPARE_INSTRUCTIONS; hours, ~20 GB).
Then the first run lists each split's ids and the things each image holds by reading every record
with image decoding skipped (train: 118,287 records, 19 GB of JPEG read once, some minutes), and
caches that list as JSON next to the prepared data (INDEX_FILE in builder.data_dir).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Optional, Sequence

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from pseudoseg_jax.data import pipeline
from pseudoseg_jax.data.datasets import subsets, voc
from pseudoseg_jax.data.datasets.source import Source, read_config
from pseudoseg_jax.writers import log

BUILDER_NAME = "coco/2017_panoptic"
# The 80 thing categories of COCO 2017 in category-id order (ids 1-90 with gaps), as the panoptic
# json names them.
THING_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush")
CLASS_NAMES = ("background",) + THING_NAMES
NUM_CLASSES = len(CLASS_NAMES)
# COCO thing name -> VOC class name; every other COCO category is VOC background.
COCO_TO_VOC = {
    "airplane": "aeroplane", "bicycle": "bicycle", "bird": "bird", "boat": "boat",
    "bottle": "bottle", "bus": "bus", "car": "car", "cat": "cat", "chair": "chair", "cow": "cow",
    "dining table": "diningtable", "dog": "dog", "horse": "horse", "motorcycle": "motorbike",
    "person": "person", "potted plant": "pottedplant", "sheep": "sheep", "couch": "sofa",
    "train": "train", "tv": "tvmonitor"}
# A part of coco_voc's config.data.unlabeled_split naming a VOC split ('train+voc_train_aug').
VOC_SPLIT_PREFIX = "voc_"
INDEX_FILE = "pseudoseg_index_{split}.json"
INDEX_FORMAT = 1
# A labeled subset up to this share of its split is cached in memory still encoded (COCO 1/32:
# 3,697 images, ~0.6 GB); a larger one is filtered on every pass instead, which then reads little
# that is not used.
MAX_CACHED_SHARE = 1 / 8

PREPARE_INSTRUCTIONS = """\
TFDS's {builder} is not prepared under {data_dir} (config.data.data_dir={config_dir!r}). This
project never downloads it: prepare it once yourself.
  1. From https://cocodataset.org/#download put into a manual directory MANUAL:
       train2017.zip (18 GB), val2017.zip (0.8 GB) and
       panoptic_annotations_trainval2017.zip (0.8 GB; TFDS extracts the panoptic_train2017.zip
       and panoptic_val2017.zip inside it).
     TFDS then takes each archive from there (matched by file name) instead of downloading it.
  2. Build (hours; ~20 GB under DATA, as much again for the extracted archives):
       tfds build {builder} --data_dir=DATA --manual_dir=MANUAL
     or in Python:
       tfds.builder('{builder}', data_dir=DATA).download_and_prepare(
           download_config=tfds.download.DownloadConfig(manual_dir=MANUAL))
  3. Set config.data.data_dir=DATA."""

_SKIP_IMAGE_DECODING = {"image": tfds.decode.SkipDecoding(),
                        "panoptic_image": tfds.decode.SkipDecoding()}


# ---------------------------------------------------------------- classes
def thing_ids_by_name() -> dict[str, int]:
  """'person' -> 1 ... 'toothbrush' -> 80."""
  return {name: index + 1 for index, name in enumerate(THING_NAMES)}


def voc_class_of_thing(voc_class_names: Sequence[str]) -> np.ndarray:
  """int32 [81]: VOC class index of each thing id (index 0 and non-VOC things: 0)."""
  classes = np.zeros([NUM_CLASSES], np.int32)
  for coco_name, voc_name in COCO_TO_VOC.items():
    classes[thing_ids_by_name()[coco_name]] = voc_class_names.index(voc_name)
  return classes


def check_label_names(label_names: Sequence[str], where: str) -> None:
  """Raises unless every thing name is among the builder's label names."""
  known = set(label_names)
  missing = [name for name in THING_NAMES if name not in known]
  if missing:
    raise ValueError(
        f"The panoptic_objects label names of {where} lack {len(missing)} of the 80 COCO thing "
        f"categories ({', '.join(missing[:5])}...): not the COCO 2017 panoptic categories "
        f"(names: {', '.join(label_names[:5])}...).")


def thing_of_label(label_names: Sequence[str]) -> np.ndarray:
  """int32 [num labels]: the thing id (1-80) of each TFDS label index, 0 for stuff."""
  thing_ids = thing_ids_by_name()
  return np.array([thing_ids.get(name, 0) for name in label_names], np.int32)


# ---------------------------------------------------------------- masks (inside tf.data)
def segment_ids(panoptic_rgb: tf.Tensor) -> tf.Tensor:
  """int32 [H, W] segment ids of a panoptic PNG's RGB: R + 256 G + 256^2 B."""
  rgb = tf.cast(panoptic_rgb, tf.int32)
  return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def semantic_mask(panoptic_rgb: tf.Tensor, object_ids: tf.Tensor,
                  object_semantic_classes: tf.Tensor) -> tf.Tensor:
  """uint8 [H, W, 1]: each pixel gets the class of the segment whose id it holds, 0 if none."""
  # A sorted-id search rather than one comparison per segment: COCO images have up to ~100
  # segments, and [H, W, segments] booleans would be large.
  ids = tf.cast(object_ids, tf.int32)
  order = tf.argsort(ids)
  # A sentinel above every 24-bit id keeps the search's insertion point a valid index, also for
  # an image without segments.
  sorted_ids = tf.concat([tf.gather(ids, order), [tf.int32.max]], axis=0)
  sorted_classes = tf.concat(
      [tf.gather(tf.cast(object_semantic_classes, tf.int32), order), [0]], axis=0)
  pixel_ids = segment_ids(panoptic_rgb)
  flat_ids = tf.reshape(pixel_ids, [-1])
  position = tf.searchsorted(sorted_ids, flat_ids)
  found = tf.equal(tf.gather(sorted_ids, position), flat_ids)
  classes = tf.where(found, tf.gather(sorted_classes, position), 0)
  return tf.cast(tf.reshape(classes, tf.concat([tf.shape(pixel_ids), [1]], 0)), tf.uint8)


def example_id(filename: tf.Tensor) -> tf.Tensor:
  """'000000177254.jpg' -> '000000177254'."""
  return tf.strings.regex_replace(filename, r"\.[^.]*$", "")


def to_semantic_example(example: Mapping, class_of_label: np.ndarray) -> dict:
  """A decoded coco/2017_panoptic example -> {'id', 'image', 'mask'}; `class_of_label` maps the
  builder's label indices to semantic classes."""
  objects = example["panoptic_objects"]
  classes = tf.gather(tf.constant(class_of_label, tf.int32), objects["label"])
  return {"id": example_id(example["image/filename"]), "image": example["image"],
          "mask": semantic_mask(example["panoptic_image"], objects["id"], classes)}


# ---------------------------------------------------------------- the prepared builder
def prepared_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The prepared coco/2017_panoptic builder; raises with PREPARE_INSTRUCTIONS if not prepared."""
  builder = tfds.builder(BUILDER_NAME, data_dir=config.data.data_dir or None)
  if not builder.is_prepared():
    raise FileNotFoundError(PREPARE_INSTRUCTIONS.format(
        builder=BUILDER_NAME, data_dir=builder.data_dir, config_dir=config.data.data_dir))
  return builder


def label_names(builder: tfds.core.DatasetBuilder) -> list[str]:
  """The builder's panoptic_objects label names, checked to hold the 80 things."""
  names = list(builder.info.features["panoptic_objects"]["label"].names)
  check_label_names(names, f"{BUILDER_NAME} in {builder.data_dir}")
  return names


def check_split(builder: tfds.core.DatasetBuilder, split: str, field: str) -> None:
  if split not in builder.info.splits:
    raise ValueError(f"config.data.{field}={split!r} is not a split of {BUILDER_NAME} "
                     f"(splits: {', '.join(builder.info.splits)}).")


def check_num_classes(config: ml_collections.ConfigDict, expected: int, what: str) -> None:
  if config.data.num_classes != expected:
    raise ValueError(f"config.data.num_classes={config.data.num_classes} but "
                     f"config.data.name={config.data.name!r} has {expected} classes ({what}).")


# ---------------------------------------------------------------- which images a split holds
@dataclasses.dataclass(frozen=True)
class SplitIndex:
  ids: list[str]  # In record order.
  things: list[list[int]]  # Thing ids (1-80) present in each image, sorted.


def scan_split(builder: tfds.core.DatasetBuilder, split: str,
               thing_of_label_index: np.ndarray) -> SplitIndex:
  """Ids and present things of every record of a split, reading no image."""
  ids, things = [], []
  for image_id, labels in ids_and_labels(builder, split).as_numpy_iterator():
    ids.append(image_id.decode())
    present = np.unique(thing_of_label_index[labels])
    things.append([int(thing) for thing in present if thing])
  return SplitIndex(ids, things)


def ids_and_labels(builder: tfds.core.DatasetBuilder, split: str) -> tf.data.Dataset:
  """(id, panoptic label indices) of each record of a split, images left encoded; with the streams'
  options (no autotuning thread for the iterator's release to wait on)."""
  dataset = builder.as_dataset(split=split, shuffle_files=False, decoders=_SKIP_IMAGE_DECODING)
  dataset = dataset.map(lambda e: (example_id(e["image/filename"]), e["panoptic_objects"]["label"]),
                        num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.with_options(pipeline.stream_options())


def split_index(builder: tfds.core.DatasetBuilder, split: str,
                thing_of_label_index: np.ndarray) -> SplitIndex:
  """scan_split, cached as JSON in the builder's data dir (read back if it matches the split)."""
  path = os.path.join(builder.data_dir, INDEX_FILE.format(split=split))
  num_examples = builder.info.splits[split].num_examples
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      cached = json.load(f)
    if cached.get("format") == INDEX_FORMAT and len(cached.get("ids", ())) == num_examples:
      return SplitIndex(cached["ids"], cached["things"])
    log.warning("Ignoring the stale image list %s: it does not match the split.", path)
  log.info("Listing the %d images of %s split '%s' (once: reads every record, no decoding; "
           "some minutes for train).", num_examples, BUILDER_NAME, split)
  index = scan_split(builder, split, thing_of_label_index)
  try:
    with tf.io.gfile.GFile(path + ".tmp", "w") as f:
      json.dump({"format": INDEX_FORMAT, "ids": index.ids, "things": index.things}, f)
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
  except (OSError, tf.errors.OpError) as error:  # A read-only data dir: rescan next time.
    log.warning("Could not cache the image list of split '%s' in %s: %s", split, path, error)
  return index


# ---------------------------------------------------------------- the datasets
def _slim_encoded(example: Mapping) -> dict:
  """What the semantic example needs, images still encoded (what the in-memory cache holds)."""
  objects = example["panoptic_objects"]
  return {"id": example_id(example["image/filename"]),
          "image/filename": example["image/filename"], "image": example["image"],
          "panoptic_image": example["panoptic_image"],
          "panoptic_objects": {"id": objects["id"], "label": objects["label"]}}


def semantic_examples(builder: tfds.core.DatasetBuilder, split: str, class_of_label: np.ndarray,
                      ids: Optional[Sequence[str]] = None) -> tf.data.Dataset:
  """{'id', 'image', 'mask'} of a split, or of `ids` only, filtered before any image is decoded."""
  encoded = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config(),
                               decoders=_SKIP_IMAGE_DECODING).map(_slim_encoded)
  if ids is not None:
    encoded = subsets.keep_ids_cached(encoded, ids,
                                      split_size=builder.info.splits[split].num_examples,
                                      max_cached_share=MAX_CACHED_SHARE)
  features = builder.info.features

  def decode(example):
    return to_semantic_example(
        {**example, "image": features["image"].decode_example(example["image"]),
         "panoptic_image": features["panoptic_image"].decode_example(example["panoptic_image"])},
        class_of_label)

  return encoded.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _check_unlabeled_pool(config: ml_collections.ConfigDict, num_unlabeled: int, what: str) -> None:
  """An empty unlabeled pool only matters to PseudoSeg: say so before training starts."""
  if not num_unlabeled and config.method == "pseudoseg":
    raise ValueError(f"The unlabeled pool is empty: every image of {what} is labeled (set "
                     f"config.data.unlabeled_includes_labeled=True to reuse them).")


def _unlabeled_images(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                      split: str, labeled_ids: Sequence[str], things: np.ndarray,
                      class_of_label: np.ndarray) -> tuple[Optional[tf.data.Dataset], int]:
  """COCO `split` minus the labeled images (unless config.data.unlabeled_includes_labeled), and
  how many; (None, 0) when none are left."""
  pool_ids = split_index(builder, split, things).ids  # Cached: cheap to read again.
  ids = subsets.unlabeled_ids(pool_ids, labeled_ids,
                              include_labeled=config.data.unlabeled_includes_labeled)
  if not ids:
    return None, 0
  return semantic_examples(builder, split, class_of_label, subsets.subset_or_all(ids, pool_ids)), len(ids)


def load_coco(config: ml_collections.ConfigDict) -> Source:
  """The 81-class Source: labeled images from train_split, unlabeled from unlabeled_split."""
  data = config.data
  check_num_classes(config, NUM_CLASSES, "background + the 80 COCO things")
  builder = prepared_builder(config)
  unlabeled_split = data.unlabeled_split or data.train_split
  for field, split in (("train_split", data.train_split), ("unlabeled_split", unlabeled_split),
                       ("eval_split", data.eval_split)):
    check_split(builder, split, field)
  things = thing_of_label(label_names(builder))
  class_of_label = things  # Here the thing ids are the classes.
  pool_ids = split_index(builder, data.train_split, things).ids
  labeled_ids = subsets.labeled_ids_from_config(
      data, pool_ids, pool_name=f"{BUILDER_NAME} split '{data.train_split}' ({builder.data_dir})")
  unlabeled, num_unlabeled = _unlabeled_images(config, builder, unlabeled_split, labeled_ids,
                                               things, class_of_label)
  _check_unlabeled_pool(config, num_unlabeled, f"{BUILDER_NAME} split '{unlabeled_split}'")
  return Source(
      labeled=semantic_examples(builder, data.train_split, class_of_label,
                                subsets.subset_or_all(labeled_ids, pool_ids)),
      eval=semantic_examples(builder, data.eval_split, class_of_label),
      num_labeled=len(labeled_ids),
      num_eval=builder.info.splits[data.eval_split].num_examples,
      class_names=CLASS_NAMES,
      unlabeled=unlabeled,
      num_unlabeled=num_unlabeled,
  )


# ---------------------------------------------------------------- COCO -> VOC
def voc_pool_ids(index: SplitIndex, voc_of_thing: np.ndarray) -> list[str]:
  """The ids of the images holding at least one thing that is a VOC class."""
  return [image_id for image_id, things in zip(index.ids, index.things)
          if any(voc_of_thing[thing] for thing in things)]


def parse_unlabeled_split(spec: str, train_split: str) -> tuple[Optional[str], Optional[str]]:
  """coco_voc's unlabeled_split -> (COCO split, VOC split), either None: '' -> (train_split,
  None); 'train+voc_train_aug' -> ('train', 'train_aug'); 'voc_train_aug' -> (None, 'train_aug')."""
  parts = [part for part in (spec or train_split).split("+") if part]
  voc_parts = [part[len(VOC_SPLIT_PREFIX):] for part in parts if part.startswith(VOC_SPLIT_PREFIX)]
  coco_parts = [part for part in parts if not part.startswith(VOC_SPLIT_PREFIX)]
  if len(voc_parts) > 1 or len(coco_parts) > 1:
    raise ValueError(f"config.data.unlabeled_split={spec!r} may name one COCO split and one VOC "
                     f"split ('{VOC_SPLIT_PREFIX}' + its name), e.g. 'train+voc_train_aug'.")
  return (coco_parts or [None])[0], (voc_parts or [None])[0]


def mix_proportionally(first: tf.data.Dataset, first_size: int, second: tf.data.Dataset,
                       second_size: int) -> tf.data.Dataset:
  """Both datasets interleaved at random in proportion to their sizes, with a fixed seed: merely
  concatenated, a shuffle buffer much smaller than the first would see only it for most of it."""
  weight = first_size / (first_size + second_size)
  return tf.data.Dataset.sample_from_datasets([first, second], weights=[weight, 1 - weight],
                                              seed=0, stop_on_empty_dataset=False)


def _check_voc_splits(config: ml_collections.ConfigDict, voc_unlabeled_split: Optional[str],
                      voc_splits: Sequence[str]) -> None:
  data = config.data
  for field, split in (("eval_split", data.eval_split), ("unlabeled_split", voc_unlabeled_split)):
    if split is not None and split not in voc_splits:
      raise ValueError(f"config.data.{field} names VOC split {split!r}, which is not one of "
                       f"{', '.join(voc_splits)}.")
  if voc_unlabeled_split == data.eval_split:
    raise ValueError(f"config.data.unlabeled_split={data.unlabeled_split!r} trains on the VOC "
                     f"split the model is evaluated on (config.data.eval_split).")


def load_coco_voc(config: ml_collections.ConfigDict) -> Source:
  """The 21-class cross-dataset Source: COCO train images with VOC classes labeled, the other COCO
  train images (plus VOC's train_aug with unlabeled_split='train+voc_train_aug') unlabeled, VOC val
  (config.data.eval_split) to evaluate."""
  data = config.data
  check_num_classes(config, len(voc.CLASS_NAMES), "PASCAL VOC's background + 20")
  coco_unlabeled_split, voc_unlabeled_split = parse_unlabeled_split(data.unlabeled_split,
                                                                    data.train_split)
  _check_voc_splits(config, voc_unlabeled_split, voc.SPLITS)
  builder = prepared_builder(config)
  for field, split in (("train_split", data.train_split),
                       ("unlabeled_split", coco_unlabeled_split)):
    if split is not None:
      check_split(builder, split, field)
  things = thing_of_label(label_names(builder))
  voc_of_thing = voc_class_of_thing(voc.CLASS_NAMES)
  class_of_label = voc_of_thing[things]
  train_index = split_index(builder, data.train_split, things)
  pool_ids = voc_pool_ids(train_index, voc_of_thing)
  labeled_ids = subsets.labeled_ids_from_config(
      data, pool_ids, pool_name=f"the {len(pool_ids)} images with VOC classes of {BUILDER_NAME} "
      f"split '{data.train_split}' ({builder.data_dir})")
  unlabeled, num_unlabeled = (
      _unlabeled_images(config, builder, coco_unlabeled_split, labeled_ids, things, class_of_label)
      if coco_unlabeled_split else (None, 0))
  if voc_unlabeled_split:
    voc_images, num_voc_images = voc.load_voc_split(config, voc_unlabeled_split)
    unlabeled = (voc_images if unlabeled is None else
                 mix_proportionally(unlabeled, num_unlabeled, voc_images, num_voc_images))
    num_unlabeled += num_voc_images
  _check_unlabeled_pool(config, num_unlabeled, f"unlabeled_split {data.unlabeled_split!r}")
  eval_images, num_eval = voc.load_voc_split(config, data.eval_split)
  return Source(
      labeled=semantic_examples(builder, data.train_split, class_of_label,
                                subsets.subset_or_all(labeled_ids, train_index.ids)),
      eval=eval_images,
      num_labeled=len(labeled_ids),
      num_eval=num_eval,
      class_names=tuple(voc.CLASS_NAMES),
      unlabeled=unlabeled,
      num_unlabeled=num_unlabeled,
  )
