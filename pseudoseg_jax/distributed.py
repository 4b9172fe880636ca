"""One training job over several processes: when and how to start jax.distributed.

Every process of a multi-host job runs the same command. `jax.distributed.initialize` connects
them (process 0 hosts the coordinator) so that `jax.devices()` lists the devices of all processes
and each jitted step runs over all of them. It must run before anything touches a JAX backend,
which is why main.py calls it first. A process alone does none of this.

Which case applies (`plan`), first match wins:
- `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`: exactly that, nothing
  guessed from the environment (any cluster, several processes on one machine, tests).
- SLURM, inside `srun` with more than one task: JAX reads the job from SLURM's variables and
  gives each task one GPU; a task per node keeps all of its node's GPUs.
- A Cloud TPU VM (libtpu and TPU chips present): JAX asks the TPU metadata (or GKE's
  TPU_WORKER_HOSTNAMES) for the workers; a single-host TPU VM becomes a one-process job.
- Anything else: a single process, nothing to do.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
from typing import Callable, Mapping, TypeVar

from pseudoseg_jax.writers import log

Result = TypeVar("Result")

# The flags that name a job explicitly, as main.py spells them (for error messages).
FLAG_NAMES = ("--coordinator_address", "--num_processes", "--process_id")
# How long the other processes wait for process 0 to prepare a dataset (COCO: tens of minutes).
PREPARE_TIMEOUT_S = 4 * 3600


@dataclasses.dataclass(frozen=True)
class Plan:
  """The arguments for jax.distributed.initialize; None leaves a value for JAX to detect."""
  reason: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple | None = None
  # False when the flags name the whole job: under srun, JAX's own detection would otherwise
  # still hand each process the single GPU numbered SLURM_LOCALID.
  detect_cluster: bool = True


def plan(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, environ: Mapping[str, str] | None = None,
         on_tpu_vm: bool | None = None) -> Plan | None:
  """How this process joins a multi-process job, or None when it runs alone."""
  environ = os.environ if environ is None else environ
  if (coordinator_address, num_processes, process_id) != (None, None, None):
    return plan_from_flags(coordinator_address, num_processes, process_id)
  return plan_from_environment(environ, on_tpu_vm=running_on_tpu_vm() if on_tpu_vm is None
                               else on_tpu_vm)


def plan_from_flags(coordinator_address: str | None, num_processes: int | None,
                    process_id: int | None) -> Plan | None:
  given = (coordinator_address, num_processes, process_id)
  missing = [name for name, value in zip(FLAG_NAMES, given) if value is None]
  if missing:
    raise ValueError(f"{', '.join(FLAG_NAMES)} go together: {', '.join(missing)} missing. Give "
                     "all three for a multi-process job (or none on a TPU pod or under srun, "
                     "where the job is detected).")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                     f"{num_processes}).")
  if not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", coordinator_address):
    raise ValueError(f"--coordinator_address={coordinator_address!r} must be HOST:PORT, the "
                     "address of process 0 as the other processes reach it.")
  if num_processes == 1:
    return None
  return Plan(reason=f"{FLAG_NAMES[0]}={coordinator_address}",
              coordinator_address=coordinator_address, num_processes=num_processes,
              process_id=process_id, detect_cluster=False)


def plan_from_environment(environ: Mapping[str, str], on_tpu_vm: bool) -> Plan | None:
  # srun's tasks, not the batch script (one process, even in a job of many tasks): SLURM_STEP_*
  # are srun's. JAX reads the coordinator from SLURM_STEP_NODELIST.
  step_tasks = int(environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
  if step_tasks > 1 and "SLURM_PROCID" in environ and "SLURM_STEP_NODELIST" in environ:
    return Plan(reason=f"srun, {step_tasks} tasks",
                local_device_ids=slurm_local_device_ids(environ))
  if on_tpu_vm:
    return Plan(reason="Cloud TPU VM")
  return None


def slurm_local_device_ids(environ: Mapping[str, str]) -> tuple | None:
  """JAX gives each SLURM task the one GPU numbered SLURM_LOCALID (one task per GPU). With one
  task per node, the task must keep all the node's GPUs instead: their ids, else None."""
  tasks_per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get(
      "SLURM_TASKS_PER_NODE", "")
  counts = [int(count) for count in re.findall(r"(\d+)(?:\(x\d+\))?", tasks_per_node)]
  gpus = int(environ.get("SLURM_GPUS_ON_NODE", "0") or 0)
  if counts and all(count == 1 for count in counts) and gpus > 1:
    return tuple(range(gpus))
  return None


def running_on_tpu_vm() -> bool:
  """libtpu installed and TPU chips attached (/dev/accel* up to v4, VFIO devices from v5)."""
  return (importlib.util.find_spec("libtpu") is not None
          and bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")))


def initialize(job: Plan | None) -> None:
  """jax.distributed.initialize as `job` says; nothing for a single process (None)."""
  if job is None:
    return
  import jax
  # Cross-process collectives of the CPU backend (tests, a CPU cluster); accelerators have their
  # own. Recent JAX defaults to gloo; older versions have none unless asked.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  arguments = {"coordinator_address": job.coordinator_address,
               "num_processes": job.num_processes, "process_id": job.process_id,
               "local_device_ids": list(job.local_device_ids) if job.local_device_ids else None}
  if not job.detect_cluster:
    arguments["cluster_detection_method"] = "deactivate"
  jax.distributed.initialize(**arguments)
  log.info("Process %d of %d (%s).", jax.process_index(), jax.process_count(), job.reason)


def process_0_first(prepare: Callable[[], Result],
                    timeout_s: int = PREPARE_TIMEOUT_S) -> Result:
  """prepare() on process 0, then on the others once it is done.

  For preparing a dataset (TFDS builders, VOC's extraction): several processes preparing one
  shared data_dir at once collide (TFDS: FileExistsError on its final rename). The others then
  find it prepared, or prepare their own copy on a host-local disk.
  The wait is a barrier of the coordination service, not a device collective: preparing takes
  minutes, longer than collectives wait (gloo gives up after 30 s).
  """
  import jax
  if jax.process_count() == 1:
    return prepare()
  import orbax.checkpoint as ocp  # Its public barrier on the coordination service's client.
  result = prepare() if jax.process_index() == 0 else None
  barrier = ocp.multihost.get_barrier_sync_fn()
  barrier(key="pseudoseg_jax_process_0_prepared", timeout_ms=timeout_s * 1000)
  return result if jax.process_index() == 0 else prepare()
