"""What every dataset loader returns (Source) and how every one reads TFDS records.

Its own module so that the loaders import it at the top and the package's name -> loader table
(datasets/__init__.py) can import the loaders, without a cycle.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf
import tensorflow_datasets as tfds


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


def read_config() -> tfds.ReadConfig:
  # Deterministic file order: the pipeline shuffles with its own seed.
  return tfds.ReadConfig(shuffle_seed=0, interleave_cycle_length=1)
