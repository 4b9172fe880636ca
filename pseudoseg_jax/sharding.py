"""The mesh, the two shardings the trainer uses, and host-local batches -> global jax.Arrays.

Pure data parallelism on one mesh axis, 'data': batches are split along their first dimension over
all devices of all hosts, and the train state is replicated. Under jit, batch statistics and loss
means are therefore global (synchronized BN), whatever the number of devices.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def per_process_batch_size(global_batch_size: int, mesh: Mesh, field: str) -> int:
  """The slice of the global batch each process loads; it must split evenly over devices."""
  num_devices = mesh.devices.size
  if global_batch_size % num_devices:
    raise ValueError(
        f"config.{field}={global_batch_size} must be a multiple of the number of devices "
        f"({num_devices}).")
  return global_batch_size // jax.process_count()


def to_global(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles each process's numpy batch into one global array sharded over 'data'.

  Nested dicts (PseudoSeg's {'labeled': ..., 'unlabeled': ...}) are assembled part by part.
  Non-numeric entries (image ids) stay on the host: they are for logging, not for the step.
  """
  sharding = batch_sharding(mesh)
  global_batch = {}
  for key, value in local_batch.items():
    if isinstance(value, dict):
      global_batch[key] = to_global(value, mesh)
    elif np.asarray(value).dtype.kind in "biuf":
      global_batch[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value))
  return global_batch
