"""Which images are labeled, which are the unlabeled pool: id lists, seeded fractions, id filters.

Every real source (VOC, COCO, a user's folder) picks its labeled images the same way:
  - `config.data.labeled_list`: a file of ids, one per line. The paper's lists and the PyTorch
    peers' lists work unchanged: a line may be a bare id (`2007_000032`), a path
    (`train2017/000000177254`, `JPEGImages/2007_000032.jpg`), or an image and mask path pair
    (`JPEGImages/x.jpg SegmentationClassAug/x.png`); the id is the stem of the first field.
  - otherwise a seeded random sample of the pool: `config.data.num_labeled` images, or
    ceil(`labeled_fraction` x pool), the rounding the published splits use (VOC 1/16 of 1,464 = 92,
    1/16 of 10,582 = 662; COCO 1/512 of 118,287 = 232).
  - neither: the whole pool.
The unlabeled pool is the unlabeled split minus the labeled ids, unless
`config.data.unlabeled_includes_labeled` (the original's VOC setting keeps them).
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Optional, Sequence

import numpy as np
import tensorflow as tf


def id_from_line(line: str) -> str:
  """'JPEGImages/a.jpg SegmentationClassAug/a.png' -> 'a'; 'train2017/000000177254' -> '000000177254'."""
  first_field = line.split()[0]
  return os.path.splitext(os.path.basename(first_field))[0]


def read_id_list(path: str) -> list[str]:
  """Ids of a split file, in file order; blank lines skipped. Raises on a missing, empty or repeating file."""
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"Split list {path} does not exist.")
  with tf.io.gfile.GFile(path) as f:
    ids = [id_from_line(line) for line in f if line.strip()]
  if not ids:
    raise ValueError(f"Split list {path} is empty: it must hold one image id per line.")
  repeated = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
  if repeated:
    raise ValueError(f"Split list {path} lists {len(repeated)} id(s) more than once: "
                     f"{_some(repeated)}.")
  return ids


def fraction_size(pool_size: int, fraction: float) -> int:
  """ceil(pool_size x fraction), computed so that 1/16 of 1,464 is 92 and 1/8 of 1,464 is 183."""
  # round() first: 1464 * (1 / 8) is 183.00000000000003 in floating point.
  return math.ceil(round(pool_size * fraction, 6))


def sample_ids(pool_ids: Sequence[str], count: int, seed: int) -> list[str]:
  """`count` ids drawn without replacement; depends only on the SET of pool ids, the count and seed."""
  ordered = sorted(pool_ids)
  if not 0 < count <= len(ordered):
    raise ValueError(f"Cannot draw {count} labeled images from a pool of {len(ordered)}.")
  chosen = np.random.default_rng(seed).choice(len(ordered), size=count, replace=False)
  return sorted(ordered[i] for i in chosen)


def check_ids_exist(ids: Iterable[str], pool_ids: Iterable[str], *, what: str, where: str) -> None:
  """Raises naming the ids of `what` that are not in `where`."""
  missing = sorted(set(ids) - set(pool_ids))
  if missing:
    raise ValueError(f"{len(missing)} id(s) of {what} are not in {where}: {_some(missing)}.")


def select_labeled_ids(pool_ids: Sequence[str], *, labeled_list: str = "", num_labeled: int = 0,
                       labeled_fraction: float = 0.0, seed: int = 0, pool_name: str) -> list[str]:
  """The labeled ids by the rule of the module docstring; every listed id is checked to exist."""
  if labeled_list and (num_labeled or labeled_fraction):
    raise ValueError("config.data.labeled_list is set together with config.data.num_labeled or "
                     "config.data.labeled_fraction: choose one way to pick the labeled images.")
  if num_labeled and labeled_fraction:
    raise ValueError("config.data.num_labeled and config.data.labeled_fraction are both set: "
                     "choose one.")
  if not pool_ids:
    raise ValueError(f"The labeled pool {pool_name} is empty.")
  if labeled_list:
    ids = read_id_list(labeled_list)
    check_ids_exist(ids, pool_ids, what=f"split list {labeled_list}", where=pool_name)
    return ids
  if labeled_fraction:
    if not 0 < labeled_fraction <= 1:
      raise ValueError(
          f"config.data.labeled_fraction must be in (0, 1], got {labeled_fraction}.")
    num_labeled = fraction_size(len(pool_ids), labeled_fraction)
  if num_labeled > len(pool_ids):
    raise ValueError(f"config.data.num_labeled={num_labeled} exceeds the {len(pool_ids)} images "
                     f"of {pool_name}.")
  if not num_labeled:
    return sorted(pool_ids)
  return sample_ids(pool_ids, num_labeled, seed)


def labeled_ids_from_config(data, pool_ids: Sequence[str], *, pool_name: str) -> list[str]:
  """select_labeled_ids with the choice config.data makes (labeled_list, num_labeled,
  labeled_fraction, split_seed)."""
  return select_labeled_ids(pool_ids, labeled_list=data.labeled_list, num_labeled=data.num_labeled,
                            labeled_fraction=data.labeled_fraction, seed=data.split_seed,
                            pool_name=pool_name)


def subset_or_all(ids: Sequence[str], pool_ids: Sequence[str]) -> Optional[Sequence[str]]:
  """None (read the whole split, no filter) when `ids` is the whole pool, else `ids`."""
  return None if len(ids) == len(pool_ids) else ids


def unlabeled_ids(pool_ids: Sequence[str], labeled_ids: Sequence[str], *,
                  include_labeled: bool) -> list[str]:
  """The unlabeled pool: every pool id, minus the labeled ones unless `include_labeled`."""
  if include_labeled:
    return sorted(pool_ids)
  labeled = set(labeled_ids)
  return sorted(i for i in pool_ids if i not in labeled)


def keep_ids(dataset: tf.data.Dataset, ids: Sequence[str]) -> tf.data.Dataset:
  """The examples of `dataset` (dicts with a string 'id') whose id is in `ids`, in dataset order."""
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(list(ids), tf.string),
                                          tf.ones([len(ids)], tf.int32)),
      default_value=0)
  return dataset.filter(lambda example: table.lookup(example["id"]) > 0)


def keep_ids_cached(encoded: tf.data.Dataset, ids: Sequence[str], *, split_size: int,
                    max_cached_share: float) -> tf.data.Dataset:
  """keep_ids on still-encoded records; a subset up to `max_cached_share` of its split is cached
  in memory (a labeled subset), so that later epochs do not rescan the whole split for it."""
  kept = keep_ids(encoded, ids)
  return kept.cache() if len(ids) <= max_cached_share * split_size else kept


def _some(ids: Sequence[str], limit: int = 5) -> str:
  shown = ", ".join(ids[:limit])
  return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")
