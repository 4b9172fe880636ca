"""Data sources: which tf.data.Datasets of raw examples a config trains and evaluates on.

Every source yields dicts with 'id' (string), 'image' (uint8 [H, W, 3]) and 'mask' (uint8
[H, W, 1], class indices, ignore label in void areas); the pipeline does the rest. One loader per
source (a module each; synthetic_shapes's is here), chosen by config.data.name from the one plain
table DATASETS below: no registry to hide the flow. The Source they return is in source.py.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import ml_collections
import tensorflow_datasets as tfds

from pseudoseg_jax.data.datasets import coco, folder, synthetic_shapes, voc
from pseudoseg_jax.data.datasets.source import Source, read_config
from pseudoseg_jax.writers import log


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


def load_synthetic_shapes(config: ml_collections.ConfigDict) -> Source:
  """The embedded dataset, generated into data_dir on first use (well under a minute).

  'synthetic_shapes/tiny' is a 40 + 20 image variant for tests; 'synthetic_shapes/colour_cue' the
  same task with colour a cue to the class (synthetic_shapes's docstring).
  """
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
                                 read_config=read_config()),
      eval=builder.as_dataset(split=config.data.eval_split, shuffle_files=False,
                              read_config=read_config()),
      num_labeled=splits[labeled_split].num_examples,
      num_eval=splits[config.data.eval_split].num_examples,
      class_names=tuple(synthetic_shapes.CLASS_NAMES),
      unlabeled=builder.as_dataset(split=unlabeled_split, shuffle_files=False,
                                   read_config=read_config()),
      num_unlabeled=splits[unlabeled_split].num_examples,
  )


@dataclasses.dataclass(frozen=True)
class Dataset:
  """What config.data.name selects."""
  load: Callable[[ml_collections.ConfigDict], Source]
  # The class names known without loading the data (None where only the data would tell): what a
  # trained model's outputs are called when its data may be gone.
  class_names: Callable[[ml_collections.ConfigDict], Optional[tuple]]


def _fixed_class_names(class_names: tuple) -> Callable[[ml_collections.ConfigDict], tuple]:
  return lambda config: tuple(class_names)


DATASETS = {
    "synthetic_shapes": Dataset(load_synthetic_shapes,
                                _fixed_class_names(synthetic_shapes.CLASS_NAMES)),
    "synthetic_shapes/tiny": Dataset(load_synthetic_shapes,
                                     _fixed_class_names(synthetic_shapes.CLASS_NAMES)),
    "synthetic_shapes/colour_cue": Dataset(load_synthetic_shapes,
                                           _fixed_class_names(synthetic_shapes.CLASS_NAMES)),
    "voc": Dataset(voc.load_voc, _fixed_class_names(voc.CLASS_NAMES)),
    "coco": Dataset(coco.load_coco, _fixed_class_names(coco.CLASS_NAMES)),
    "coco_voc": Dataset(coco.load_coco_voc, _fixed_class_names(voc.CLASS_NAMES)),
    "folder": Dataset(folder.load_folder, folder.class_names_in_root),
}
SOURCES = tuple(DATASETS)


def load_source(config: ml_collections.ConfigDict) -> Source:
  if config.data.name not in DATASETS:
    raise ValueError(f"config.data.name={config.data.name!r} is not a known dataset; "
                     f"known: {', '.join(SOURCES)}.")
  source = DATASETS[config.data.name].load(config)
  if (config.method == "pseudoseg" and config.pseudoseg.weak_labels
      and not source.unlabeled_has_masks):
    raise ValueError(
        f"config.pseudoseg.weak_labels=True needs image-level labels for the unlabeled images, "
        f"but the unlabeled images of '{config.data.name}' come without masks to read them from.")
  return source


def class_names(config: ml_collections.ConfigDict) -> Optional[tuple]:
  """The class names of config.data.name's dataset without loading it; None if unknown."""
  dataset = DATASETS.get(config.data.name)
  return dataset.class_names(config) if dataset else None
