"""Data sources: which tf.data.Datasets of raw examples a config trains and evaluates on.

Every source yields dicts with 'id' (string), 'image' (uint8 [H, W, 3]) and 'mask' (uint8
[H, W, 1], class indices, ignore label in void areas); the pipeline does the rest. One function per
source, chosen by config.data.name with a plain if: no registry to hide the flow.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from pseudoseg_jax.writers import log

SOURCES = ("synthetic_shapes", "synthetic_shapes/tiny", "voc", "coco", "coco_voc", "folder")


@dataclasses.dataclass(frozen=True)
class Source:
  labeled: tf.data.Dataset  # Pixel-labeled training images.
  eval: tf.data.Dataset
  num_labeled: int
  num_eval: int
  class_names: tuple
  # PseudoSeg's pool of extra images. Their masks, where a source has them, serve only to derive
  # image-level labels (weakly-labeled setting) and to monitor pseudo-label accuracy.
  unlabeled: tf.data.Dataset | None = None
  num_unlabeled: int = 0
  # False when the unlabeled images come without masks (a user's folder): then there are no
  # image-level labels for PseudoSeg's weakly-labeled setting and no pseudo-label accuracy.
  unlabeled_has_masks: bool = True


def _check_num_classes(config: ml_collections.ConfigDict, class_names: tuple) -> None:
  if config.data.num_classes != len(class_names):
    raise ValueError(
        f"config.data.num_classes={config.data.num_classes} but dataset "
        f"'{config.data.name}' has {len(class_names)} classes ({', '.join(class_names)}).")


def _split_with_limit(split: str, num_labeled: int, pool_size: int, name: str) -> str:
  if num_labeled > pool_size:
    raise ValueError(f"config.data.num_labeled={num_labeled} exceeds the {pool_size} images of "
                     f"split '{split}' of dataset '{name}'.")
  return f"{split}[:{num_labeled}]" if num_labeled else split


def _read_config() -> tfds.ReadConfig:
  # Deterministic file order: the pipeline shuffles with its own seed.
  return tfds.ReadConfig(shuffle_seed=0, interleave_cycle_length=1)


def load_synthetic_shapes(config: ml_collections.ConfigDict) -> Source:
  """The embedded dataset, generated into data_dir on first use (well under a minute).

  'synthetic_shapes/tiny' is a 40 + 20 image variant for tests.
  """
  from pseudoseg_jax.data.datasets import synthetic_shapes

  _, _, builder_config = config.data.name.partition("/")
  builder = synthetic_shapes.SyntheticShapes(config=builder_config or "default",
                                             data_dir=config.data.data_dir or None)
  if not builder.is_prepared():
    log.info("Generating %s into %s (once; about 15 s on 2 CPU cores).", config.data.name,
             builder.data_dir)
  tfds.display_progress_bar(False)
  builder.download_and_prepare()
  _check_num_classes(config, synthetic_shapes.CLASS_NAMES)
  splits = builder.info.splits
  for field in ("train_split", "eval_split"):
    if config.data[field] not in splits:
      raise ValueError(f"config.data.{field}={config.data[field]!r} is not a split of "
                       f"synthetic_shapes (splits: {', '.join(splits)}).")
  if config.data.labeled_list or config.data.labeled_fraction:
    raise ValueError("synthetic_shapes takes its labeled images as the first "
                     "config.data.num_labeled of the train split; config.data.labeled_list and "
                     "config.data.labeled_fraction are for real datasets.")
  unlabeled_split = config.data.unlabeled_split or config.data.train_split
  if unlabeled_split not in splits:
    raise ValueError(f"config.data.unlabeled_split={unlabeled_split!r} is not a split of "
                     f"synthetic_shapes (splits: {', '.join(splits)}).")
  pool_size = splits[config.data.train_split].num_examples
  labeled_split = _split_with_limit(config.data.train_split, config.data.num_labeled, pool_size,
                                    "synthetic_shapes")
  if (unlabeled_split == config.data.train_split and config.data.num_labeled
      and not config.data.unlabeled_includes_labeled):
    unlabeled_split = f"{unlabeled_split}[{config.data.num_labeled}:]"
  return Source(
      labeled=builder.as_dataset(split=labeled_split, shuffle_files=False,
                                 read_config=_read_config()),
      eval=builder.as_dataset(split=config.data.eval_split, shuffle_files=False,
                              read_config=_read_config()),
      num_labeled=splits[labeled_split].num_examples,
      num_eval=splits[config.data.eval_split].num_examples,
      class_names=tuple(synthetic_shapes.CLASS_NAMES),
      unlabeled=builder.as_dataset(split=unlabeled_split, shuffle_files=False,
                                   read_config=_read_config()),
      num_unlabeled=splits[unlabeled_split].num_examples,
  )


def load_source(config: ml_collections.ConfigDict) -> Source:
  source = _load_by_name(config)
  if (config.method == "pseudoseg" and config.pseudoseg.weak_labels
      and not source.unlabeled_has_masks):
    raise ValueError(
        f"config.pseudoseg.weak_labels=True needs image-level labels for the unlabeled images, "
        f"but the unlabeled images of '{config.data.name}' come without masks to read them from.")
  return source


def _load_by_name(config: ml_collections.ConfigDict) -> Source:
  name = config.data.name
  if name.startswith("synthetic_shapes") and name in SOURCES:
    return load_synthetic_shapes(config)
  if name == "voc":
    from pseudoseg_jax.data.datasets import voc
    return voc.load_voc(config)
  if name == "coco":
    from pseudoseg_jax.data.datasets import coco
    return coco.load_coco(config)
  if name == "coco_voc":
    from pseudoseg_jax.data.datasets import coco
    return coco.load_coco_voc(config)
  if name == "folder":
    from pseudoseg_jax.data.datasets import folder
    return folder.load_folder(config)
  raise ValueError(f"config.data.name={config.data.name!r} is not a known dataset; "
                   f"known: {', '.join(SOURCES)}.")
