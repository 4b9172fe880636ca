"""This process's training batches: the labeled (and unlabeled) streams of data/pipeline.py, split
into stream shards, the shards of this process read and put side by side."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from pseudoseg_jax import sharding
from pseudoseg_jax.data import datasets, pipeline


def training_batches(config: ml_collections.ConfigDict, source: datasets.Source, mesh,
                     start_step: int):
  """Iterator of this process's batches: {'image', 'mask', ...} for the supervised method,
  {'labeled': ..., 'unlabeled': ...} for PseudoSeg.

  The streams are indexed by step: started at `start_step` (a resumed run) they yield exactly the
  batches an uninterrupted run trains on from there, so the restored step is the data position.
  Each stream is split into `config.data.stream_shards` shards (default: one per process); this
  process reads its own shards and puts their batches side by side (`stream_shards_of`).
  """
  shards = stream_shards_of(config)
  common = dict(crop_size=config.crop_size, scales=tuple(config.scales),
                ignore_label=config.data.ignore_label, num_classes=config.data.num_classes,
                process_count=total_stream_shards(config),
                shuffle_buffer=config.data.shuffle_buffer, seed=config.seed,
                start_batch=start_step)

  def shard_batch_size(global_batch_size, field):
    per_process = sharding.per_process_batch_size(global_batch_size, mesh, field)
    if per_process % len(shards):
      raise ValueError(f"config.{field}={global_batch_size} must be a multiple of "
                       f"config.data.stream_shards ({total_stream_shards(config)}).")
    return per_process // len(shards)

  def side_by_side(make_stream):
    streams = [pipeline.as_numpy_batches(make_stream(shard)) for shard in shards]
    return streams[0] if len(streams) == 1 else map(concatenate_batches, *streams)

  labeled = side_by_side(lambda shard: pipeline.labeled_stream(
      source.labeled, num_examples=source.num_labeled, process_index=shard,
      batch_size=shard_batch_size(config.batch_size, "batch_size"), **common))
  if config.method != "pseudoseg":
    return labeled
  unlabeled = side_by_side(lambda shard: pipeline.unlabeled_stream(
      source.unlabeled, num_examples=source.num_unlabeled, process_index=shard,
      batch_size=shard_batch_size(config.pseudoseg.unlabeled_batch_size,
                                  "pseudoseg.unlabeled_batch_size"),
      strong_augment=config.pseudoseg.strong_augment, cutout_size=config.pseudoseg.cutout_size,
      color_jitter=tuple(config.pseudoseg.color_jitter), **common))
  return ({"labeled": labeled_batch, "unlabeled": unlabeled_batch}
          for labeled_batch, unlabeled_batch in zip(labeled, unlabeled))


def total_stream_shards(config: ml_collections.ConfigDict) -> int:
  return config.data.stream_shards or jax.process_count()


def stream_shards_of(config: ml_collections.ConfigDict) -> range:
  """The training-stream shards this process reads.

  Shard s of S reads every S-th example with its own shuffle and augmentation seeds, and global
  batch k is the shards' batches k side by side, in shard order (the mesh orders devices by
  process). So the batches depend on S, not on how many processes share the S shards: a run on
  fewer processes, or a resume on fewer hosts, trains on exactly the same batches when S is kept.
  """
  count, index = jax.process_count(), jax.process_index()
  shards = total_stream_shards(config)
  if shards % count:
    raise ValueError(f"config.data.stream_shards={shards} must be a multiple of the number of "
                     f"processes ({count}): each process reads the same number of shards.")
  per_process = shards // count
  return range(index * per_process, (index + 1) * per_process)


def concatenate_batches(*batches):
  """One batch from several (nested dicts for PseudoSeg), in the order given."""
  if isinstance(batches[0], dict):
    return {key: concatenate_batches(*(batch[key] for batch in batches)) for key in batches[0]}
  return np.concatenate(batches)
