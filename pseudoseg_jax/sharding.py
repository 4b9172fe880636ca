"""The mesh, the two shardings the trainer uses, and host values -> global jax.Arrays (the
replicated state, the batches each host loads).

Pure data parallelism on one mesh axis, 'data': batches are split along their first dimension over
all devices of all hosts, and the train state is replicated. Under jit, batch statistics and loss
means are therefore global (synchronized BN), whatever the number of devices.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pseudoseg_jax.models import conv

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """All devices on 'data', grouped by process: process p's batch (per_process_batch_size rows)
  is then rows [p * B / P, (p + 1) * B / P) of the global batch, so a host can tell which
  global rows it loaded (its pseudo-label grid shows them next to the replicated outputs)."""
  devices = jax.devices() if devices is None else list(devices)
  devices = sorted(devices, key=lambda device: device.process_index)  # Stable: order within kept.
  # The model's convolutions are traced for the devices they will run on (models/conv.py).
  conv.set_mesh_platform(devices[0].platform)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def replicate(tree, mesh: Mesh):
  """Host values that every process holds alike (a state initialized from the seed, or loaded from
  one file) -> global arrays replicated over the mesh, without cross-process traffic.

  Not jax.device_put: with several processes it first checks that the values agree by
  all-gathering every array from every process onto every device (P copies of the whole train
  state per device, and a compile per array shape), which does not fit on a large pod.
  """
  sharding = replicated(mesh)
  return jax.tree.map(
      lambda value: jax.make_array_from_process_local_data(sharding, np.asarray(value)), tree)


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
