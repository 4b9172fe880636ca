"""PASCAL VOC 2012 with the SBD augmented masks ("train_aug") as a TFDS builder, from files you download.

Splits: 'train' (the 1,464 finely labeled images, VOC ImageSets/Segmentation/train.txt), 'val'
(1,449) and 'train_aug' (10,582: VOC train plus SBD's train and val, minus VOC val). Features: 'id'
('2007_000032'), 'image' (the VOC JPEG, stored as downloaded), 'mask' (uint8 [H, W, 1], 0-20 and
255 on VOC's void band). Where VOC has its own mask (train and val ids) it is used; the other
train_aug masks come from SBD (`cls/*.mat`) or from a SegmentationClassAug folder or archive.
Masks are read as class indices from palette ('P') or grayscale ('L') PNGs and from SBD's .mat,
never through RGB (label_files.py). Every image and mask is checked when the dataset is prepared:
a corrupt file, a size mismatch or a value outside 0-20/255 stops the preparation naming the file,
or, with skip_bad_examples=True, is skipped, logged and counted. Archives are unpacked by TFDS's
extractor, which skips members with '..' or absolute paths and never creates links
(tests/test_security.py pins that); ids from split lists are file stems, never paths.

    builder = voc.VocAug(data_dir=DATA_DIR)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=MANUAL_DIR))  # ~10 min, once
    ds = builder.as_dataset(split="train_aug")
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator, Optional, Sequence

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from pseudoseg_jax import paths
from pseudoseg_jax.data import pipeline
from pseudoseg_jax.data.datasets import label_files, subsets
from pseudoseg_jax.data.datasets.source import Source, read_config

CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_LABEL = 255
SPLITS = ("train", "val", "train_aug")

VOC_ARCHIVE = "VOCtrainval_11-May-2012.tar"
SBD_ARCHIVE = "benchmark.tgz"
AUG_ARCHIVE = "SegmentationClassAug.zip"

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Put into the manual directory (config.data.manual_dir, or DATA_DIR/downloads/manual):
  1. PASCAL VOC 2012 trainval: {VOC_ARCHIVE}
     (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/{VOC_ARCHIVE}), or its extracted
     VOCdevkit/ folder.
  2. The augmented masks, one of:
     - SBD: {SBD_ARCHIVE}
       (http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/{SBD_ARCHIVE})
       or its extracted benchmark_RELEASE/ folder (dataset/cls/*.mat, dataset/train.txt, val.txt);
     - SegmentationClassAug: {AUG_ARCHIVE} or a SegmentationClassAug/ folder of PNGs named by
       image id (palette or grayscale class indices, as the PyTorch peers distribute them).
"""


@dataclasses.dataclass(frozen=True)
class VocFiles:
  """Where the VOC tree and the augmented masks are, once archives are extracted."""
  voc_root: str  # Holds JPEGImages/, SegmentationClass/, ImageSets/Segmentation/.
  aug_mask_dir: Optional[str] = None  # SegmentationClassAug PNGs.
  sbd_root: Optional[str] = None  # SBD's dataset/ folder: cls/, img/, train.txt, val.txt.


# ---------------------------------------------------------------- locating the downloaded files
def _first_dir(candidates: Sequence[str], marker: str) -> Optional[str]:
  """The first candidate folder that contains `marker`."""
  for candidate in candidates:
    if tf.io.gfile.isdir(os.path.join(candidate, marker)):
      return candidate
  return None


def find_voc_root(path: str) -> Optional[str]:
  return _first_dir([os.path.join(path, "VOCdevkit", "VOC2012"), os.path.join(path, "VOC2012"),
                     os.path.join(path, "TrainVal", "VOCdevkit", "VOC2012"), path], "JPEGImages")


def find_sbd_root(path: str) -> Optional[str]:
  return _first_dir([os.path.join(path, "benchmark_RELEASE", "dataset"),
                     os.path.join(path, "dataset"), path], "cls")


def find_aug_mask_dir(path: str) -> Optional[str]:
  for candidate in (os.path.join(path, "SegmentationClassAug"),
                    os.path.join(path, "VOCdevkit", "VOC2012", "SegmentationClassAug")):
    if tf.io.gfile.isdir(candidate):
      return candidate
  return None


def _find(manual_dir: str, archive: str, find: Callable, extract: Callable) -> Optional[str]:
  """`find` in the manual dir itself, else in the extracted archive if it is there."""
  found = find(manual_dir)
  archive_path = os.path.join(manual_dir, archive)
  if found is None and tf.io.gfile.exists(archive_path):
    found = find(str(extract(archive_path)))
  return found


def locate_files(manual_dir: str, extract: Callable[[str], str]) -> VocFiles:
  """The VOC root and one source of augmented masks, extracting archives with `extract`."""
  voc_root = _find(manual_dir, VOC_ARCHIVE, find_voc_root, extract)
  if voc_root is None:
    raise FileNotFoundError(
        f"No PASCAL VOC 2012 in {manual_dir}: found neither {VOC_ARCHIVE} nor a VOCdevkit/VOC2012 "
        f"folder with JPEGImages/.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  aug_mask_dir = find_aug_mask_dir(voc_root) or _find(manual_dir, AUG_ARCHIVE, find_aug_mask_dir,
                                                      extract)
  sbd_root = None if aug_mask_dir else _find(manual_dir, SBD_ARCHIVE, find_sbd_root, extract)
  if aug_mask_dir is None and sbd_root is None:
    raise FileNotFoundError(
        f"No augmented masks in {manual_dir} for the train_aug split: found none of {SBD_ARCHIVE}, "
        f"benchmark_RELEASE/, {AUG_ARCHIVE}, SegmentationClassAug/.\n"
        f"{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  return VocFiles(voc_root=voc_root, aug_mask_dir=aug_mask_dir, sbd_root=sbd_root)


# ---------------------------------------------------------------- masks
def read_sbd_mask(path: str) -> np.ndarray:
  """uint8 [H, W] class indices of an SBD cls/*.mat file (struct GTcls, field Segmentation).

  loadmat never unpickles or runs anything: MATLAB objects and function handles come back as
  inert object or record arrays, which the checks below refuse."""
  import scipy.io  # Only needed to prepare the dataset.
  try:
    contents = scipy.io.loadmat(paths.readable(path), squeeze_me=True, struct_as_record=False)
    segmentation = contents["GTcls"].Segmentation
  except (OSError, ValueError, KeyError, AttributeError, TypeError,
          NotImplementedError,  # A v7.3 (HDF5) .mat, which loadmat does not read.
          scipy.io.matlab.MatReadError) as error:
    raise label_files.BadExampleError(
        f"SBD mask {path} cannot be read as a GTcls struct with a Segmentation field: "
        f"{error}") from error
  values = np.asarray(segmentation)
  if values.dtype.kind not in "biuf" or values.ndim != 2:
    raise label_files.BadExampleError(
        f"SBD mask {path}: GTcls.Segmentation is a {values.dtype} array of shape {values.shape}, "
        f"not a 2-D array of class indices.")
  if values.size and not 0 <= values.min() <= values.max() <= 255:  # uint8 would wrap them.
    raise label_files.BadExampleError(
        f"SBD mask {path} holds values outside 0-255 ({values.min()}..{values.max()}).")
  return values.astype(np.uint8)


def _list_stems(folder: str, extension: str) -> list[str]:
  return sorted(os.path.splitext(name)[0] for name in tf.io.gfile.listdir(folder)
                if name.lower().endswith(extension))


def split_ids(files: VocFiles) -> dict[str, list[str]]:
  """The ids of 'train', 'val' and 'train_aug' (sorted)."""
  segmentation_lists = os.path.join(files.voc_root, "ImageSets", "Segmentation")
  ids = {split: sorted(subsets.read_id_list(os.path.join(segmentation_lists, f"{split}.txt")))
         for split in ("train", "val")}
  if files.aug_mask_dir:
    augmented = _list_stems(files.aug_mask_dir, ".png")
  else:
    augmented = [i for split in ("train", "val")
                 for i in subsets.read_id_list(os.path.join(files.sbd_root, f"{split}.txt"))]
  validation = set(ids["val"])
  ids["train_aug"] = sorted((set(augmented) | set(ids["train"])) - validation)
  return ids


@dataclasses.dataclass(frozen=True)
class ExampleFiles:
  example_id: str
  image_path: str
  mask_path: str


def example_files(example_id: str, files: VocFiles) -> ExampleFiles:
  """VOC's own mask where it has one, else the augmented one; VOC's JPEG, else SBD's."""
  image_path = os.path.join(files.voc_root, "JPEGImages", f"{example_id}.jpg")
  if not tf.io.gfile.exists(image_path) and files.sbd_root:
    image_path = os.path.join(files.sbd_root, "img", f"{example_id}.jpg")
  mask_path = os.path.join(files.voc_root, "SegmentationClass", f"{example_id}.png")
  if not tf.io.gfile.exists(mask_path):
    mask_path = (os.path.join(files.aug_mask_dir, f"{example_id}.png") if files.aug_mask_dir
                 else os.path.join(files.sbd_root, "cls", f"{example_id}.mat"))
  for path in (image_path, mask_path):
    if not tf.io.gfile.exists(path):
      raise label_files.BadExampleError(f"Image id {example_id}: {path} does not exist.")
  return ExampleFiles(example_id, image_path, mask_path)


def read_example(example: ExampleFiles) -> dict:
  """The builder's features of one example, every file checked (label_files.BadExampleError)."""
  if example.mask_path.endswith(".mat"):
    mask = read_sbd_mask(example.mask_path)
    label_files.check_same_size(label_files.read_image_size(example.image_path), mask.shape,
                                image_path=example.image_path, mask_path=example.mask_path)
    label_files.check_mask_values(mask, num_classes=NUM_CLASSES, ignore_label=IGNORE_LABEL,
                                  path=example.mask_path)
  else:
    mask = label_files.read_checked_mask(example.mask_path, example.image_path,
                                         num_classes=NUM_CLASSES, ignore_label=IGNORE_LABEL)
  return {"id": example.example_id, "image": example.image_path,
          "mask": mask.astype(np.uint8)[..., None]}


# ---------------------------------------------------------------- the builder
class VocAug(tfds.core.GeneratorBasedBuilder):
  """PASCAL VOC 2012 + SBD (train_aug); see the module docstring.

  Registered as 'voc_aug': TFDS's own 'voc' (detection boxes, no masks) keeps its name, and
  both can be loaded in one process.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "train (1,464), val (1,449), train_aug (10,582); ids; index masks."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, *, skip_bad_examples: bool = False, **kwargs):
    self._skip_bad_examples = skip_bad_examples
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__.split("\n\n    builder")[0],
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        }),
        homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
        # Sorted by id, so a split reads the same on every machine.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    files = locate_files(str(dl_manager.manual_dir), dl_manager.extract)
    return {split: self._generate_examples(ids, files)
            for split, ids in split_ids(files).items()}

  def _generate_examples(self, ids: Sequence[str], files: VocFiles) -> Iterator[tuple[str, dict]]:
    examples = label_files.read_good(
        ids, lambda example_id: read_example(example_files(example_id, files)),
        skip_bad=self._skip_bad_examples, what="PASCAL VOC")
    yield from examples


# ---------------------------------------------------------------- what training reads
def prepared_builder(config: ml_collections.ConfigDict) -> VocAug:
  """The builder, prepared from config.data.manual_dir on first use."""
  builder = VocAug(data_dir=config.data.data_dir or None,
                skip_bad_examples=config.data.skip_bad_examples)
  if not builder.is_prepared():
    download_config = tfds.download.DownloadConfig(manual_dir=config.data.manual_dir or None)
    builder.download_and_prepare(download_config=download_config)
  return builder


def read_split_ids(builder: tfds.core.DatasetBuilder, split: str) -> list[str]:
  """The ids of a prepared split, read without decoding any image."""
  return [i.decode() for i in split_id_dataset(builder, split).as_numpy_iterator()]


def split_id_dataset(builder: tfds.core.DatasetBuilder, split: str) -> tf.data.Dataset:
  """The ids of a split's records, images left encoded; with the streams' options (no autotuning
  thread for the iterator's release to wait on)."""
  dataset = builder.as_dataset(split=split, shuffle_files=False, decoders=_skip_image_decoding())
  return dataset.map(lambda example: example["id"]).with_options(pipeline.stream_options())


def _skip_image_decoding() -> dict:
  return {"image": tfds.decode.SkipDecoding(), "mask": tfds.decode.SkipDecoding()}


def examples_with_ids(builder: tfds.core.DatasetBuilder, split: str,
                      ids: Optional[Sequence[str]] = None) -> tf.data.Dataset:
  """The split's examples (decoded), or those of `ids` only, filtered on the encoded records.

  A subset under half of the split (a labeled subset) is cached in memory still encoded, so later
  epochs do not rescan the split for it; a larger one (the unlabeled pool minus the labeled
  images) is filtered on every pass, which costs little as most records are kept.
  """
  if ids is None:
    return builder.as_dataset(split=split, shuffle_files=False, read_config=read_config())
  encoded = subsets.keep_ids_cached(
      builder.as_dataset(split=split, shuffle_files=False, read_config=read_config(),
                         decoders=_skip_image_decoding()),
      ids, split_size=builder.info.splits[split].num_examples, max_cached_share=0.5)
  features = builder.info.features
  return encoded.map(
      lambda example: {"id": example["id"],
                       "image": features["image"].decode_example(example["image"]),
                       "mask": features["mask"].decode_example(example["mask"])},
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def load_voc_split(config: ml_collections.ConfigDict, split: str) -> tuple[tf.data.Dataset, int]:
  """A whole prepared split and its size (for sources that mix VOC with other data)."""
  builder = prepared_builder(config)
  _check_split(split, "split")
  return examples_with_ids(builder, split), builder.info.splits[split].num_examples


def _check_split(split: str, field: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"config.data.{field}={split!r} is not a split of voc "
                     f"(splits: {', '.join(SPLITS)}).")


def load_voc(config: ml_collections.ConfigDict) -> Source:
  """The Source of config.data: labeled images from train_split, unlabeled from unlabeled_split."""
  data = config.data
  if data.num_classes != NUM_CLASSES:
    raise ValueError(f"config.data.num_classes={data.num_classes} but PASCAL VOC has "
                     f"{NUM_CLASSES} classes (background + 20).")
  unlabeled_split = data.unlabeled_split or data.train_split
  for field, split in (("train_split", data.train_split), ("unlabeled_split", unlabeled_split),
                       ("eval_split", data.eval_split)):
    _check_split(split, field)
  builder = prepared_builder(config)
  pool_ids = read_split_ids(builder, data.train_split)
  labeled_ids = subsets.labeled_ids_from_config(data, pool_ids,
                                                pool_name=f"voc split '{data.train_split}'")
  unlabeled_pool = (pool_ids if unlabeled_split == data.train_split
                    else read_split_ids(builder, unlabeled_split))
  unlabeled_ids = subsets.unlabeled_ids(unlabeled_pool, labeled_ids,
                                        include_labeled=data.unlabeled_includes_labeled)
  if not unlabeled_ids:
    raise ValueError(f"The unlabeled pool is empty: every image of voc split '{unlabeled_split}' "
                     f"is labeled (set config.data.unlabeled_includes_labeled=True to reuse them).")
  return Source(
      labeled=examples_with_ids(builder, data.train_split, subsets.subset_or_all(labeled_ids, pool_ids)),
      eval=examples_with_ids(builder, data.eval_split),
      num_labeled=len(labeled_ids),
      num_eval=builder.info.splits[data.eval_split].num_examples,
      class_names=CLASS_NAMES,
      unlabeled=examples_with_ids(builder, unlabeled_split,
                                  subsets.subset_or_all(unlabeled_ids, unlabeled_pool)),
      num_unlabeled=len(unlabeled_ids),
  )
