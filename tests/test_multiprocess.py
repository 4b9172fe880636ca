"""Several processes train as one: jax.distributed set-up (pseudoseg_jax/distributed.py), and two
processes on localhost (CPU, gloo collectives) against one process on as many devices.

What must match, and why it can: process p of P reads shard p of P of each training stream, with
that shard's seeds, and the mesh orders devices by process, so a 2-process run's global batch k
is [shard 0's batch k, shard 1's batch k]. A 1-process run with `data.stream_shards=2` reads both
shards and puts their batches side by side: the same global batches. The reference is that run,
on 4 devices against 2 x 2, through the same CLI. Dropout masks depend on a row's position in the
global batch, so the numbers only agree if each host's rows land where the reference puts them.
They agree to float rounding, not bit for bit: the cross-process all-reduce (gloo) sums the
devices' gradients in another order than the in-process one (step 1 is bit-identical).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from unittest import mock

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pseudoseg_jax import checkpointing, distributed, sharding, workdirs
from pseudoseg_jax.data import datasets, streams
from test_train import ROOT, TINY_OVERRIDES, read_metrics, tiny_config

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2  # 2 x 2 devices against the reference's 1 x 4 (conftest's 4 CPU devices).
# The supervised method keeps the test near a minute on 2 cores (PseudoSeg's step compiles ~3x
# longer). SGD, not the demo's Adam: Adam divides by the gradients' scale, so rounding noise in
# near-zero gradients becomes lr-sized steps and the runs drift apart for no fault of the hosts.
# Every step logged, so each step's numbers are compared.
OVERRIDES = {**TINY_OVERRIDES, "method": "supervised", "optimizer.name": "sgd",
             "optimizer.learning_rate": 0.01, "log_every": 1, "image_summary_every": 0}
COMPARED_TOLERANCE = dict(rtol=1e-5, atol=1e-6)
# Validation IoUs count pixels: a pixel whose two top logits tie within rounding may take either
# class in the two runs, which moves a class's IoU by about 1/union (seen: 6e-6, with XLA:CPU's
# loop emitters). A host's missing or doubled images would move them by far more.
IOU_TOLERANCE = dict(rtol=0, atol=1e-3)
PROCESS_TIMEOUT_S = 300


# ------------------------------------------------------------------------------ plan (no JAX)
def test_a_single_process_needs_no_set_up():
  assert distributed.plan(environ={}, on_tpu_vm=False) is None
  assert distributed.plan(environ={"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0",
                                   "SLURM_STEP_NODELIST": "n1"}, on_tpu_vm=False) is None
  # The batch script of a many-task job is one process; only srun's tasks are the job.
  assert distributed.plan(environ={"SLURM_NTASKS": "4", "SLURM_PROCID": "0",
                                   "SLURM_JOB_NODELIST": "n[1-4]"}, on_tpu_vm=False) is None
  assert distributed.plan("localhost:1234", 1, 0, environ={}, on_tpu_vm=False) is None


def test_flags_name_the_job_and_nothing_is_detected():
  slurm = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "3", "SLURM_STEP_NODELIST": "n[1-2]"}
  job = distributed.plan("node1:8476", 2, 1, environ=slurm, on_tpu_vm=True)
  assert (job.coordinator_address, job.num_processes, job.process_id) == ("node1:8476", 2, 1)
  assert not job.detect_cluster and job.local_device_ids is None


@pytest.mark.parametrize("flags, message", [
    (("node1:8476", 2, None), "--process_id missing"),
    ((None, 2, 0), "--coordinator_address missing"),
    (("node1:8476", 2, 2), r"--process_id=2 must be in \[0, --num_processes=2\)"),
    (("node1", 2, 0), "must be HOST:PORT"),
])
def test_incomplete_or_impossible_flags_are_named(flags, message):
  with pytest.raises(ValueError, match=message):
    distributed.plan(*flags, environ={}, on_tpu_vm=False)


def test_srun_tasks_and_tpu_vms_are_detected():
  per_gpu = {"SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "5",
             "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
             "SLURM_GPUS_ON_NODE": "8"}
  job = distributed.plan(environ=per_gpu, on_tpu_vm=False)
  assert job.detect_cluster and job.coordinator_address is None
  assert job.local_device_ids is None  # JAX's rule: the GPU numbered SLURM_LOCALID.
  per_node = {**per_gpu, "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}
  assert distributed.plan(environ=per_node, on_tpu_vm=False).local_device_ids == tuple(range(8))
  tpu = distributed.plan(environ={}, on_tpu_vm=True)
  assert tpu.detect_cluster and tpu.coordinator_address is None and tpu.reason == "Cloud TPU VM"


def test_replicate_gives_every_device_the_whole_value():
  mesh = sharding.make_mesh()
  tree = {"step": np.int32(3), "kernel": np.arange(12, dtype=np.float32).reshape(3, 4)}
  replicated = sharding.replicate(tree, mesh)
  assert replicated["kernel"].sharding == sharding.replicated(mesh)
  assert len(replicated["kernel"].addressable_shards) == len(jax.devices())
  for shard in replicated["kernel"].addressable_shards:
    np.testing.assert_array_equal(shard.data, tree["kernel"])
  assert int(replicated["step"]) == 3


@pytest.mark.parametrize("stream_shards, process_count, process_index, expected", [
    (0, 1, 0, range(0, 1)), (0, 4, 2, range(2, 3)), (4, 2, 1, range(2, 4)), (2, 1, 0, range(0, 2))])
def test_each_process_reads_its_own_stream_shards(stream_shards, process_count, process_index,
                                                   expected):
  config = tiny_config("unused", **{"data.stream_shards": stream_shards})
  with mock.patch.object(jax, "process_count", lambda: process_count), \
       mock.patch.object(jax, "process_index", lambda: process_index):
    assert streams.stream_shards_of(config) == expected


def test_stream_shards_must_split_evenly_over_processes():
  config = tiny_config("unused", **{"data.stream_shards": 3})
  with mock.patch.object(jax, "process_count", lambda: 2), \
       mock.patch.object(jax, "process_index", lambda: 0), \
       pytest.raises(ValueError, match=r"stream_shards=3 must be a multiple of the number of "
                                       r"processes \(2\)"):
    streams.stream_shards_of(config)


def test_batches_of_several_shards_are_put_side_by_side_in_shard_order():
  first = {"labeled": {"image": np.zeros((2, 3)), "mask": np.zeros((2,))}}
  second = {"labeled": {"image": np.ones((1, 3)), "mask": np.ones((1,))}}
  both = streams.concatenate_batches(first, second)
  np.testing.assert_array_equal(both["labeled"]["mask"], [0, 0, 1])
  assert both["labeled"]["image"].shape == (3, 3)


# ------------------------------------------------------------------------------ two processes
def free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


def process_env(num_devices: int) -> dict:
  # XLA_FLAGS (conftest's unoptimized CPU code) is inherited: both sides run the same programs.
  return {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
          "JAX_NUM_CPU_DEVICES": str(num_devices)}


def main_command(workdir, data_dir, *extra) -> list:
  """The CLI, as each host of a cluster would run it."""
  args = [sys.executable, "-m", "pseudoseg_jax.main", "--config=configs/demo.py:steps=4",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *extra]
  return args + [f"--config.{name}={value}" for name, value in OVERRIDES.items()
                 if name != "total_steps"]


def start_two_processes(workdir, data_dir, logs, *extra) -> list:
  port = free_port()
  args = main_command(workdir, data_dir, f"--coordinator_address=localhost:{port}",
                      f"--num_processes={NUM_PROCESSES}", *extra)
  return [start(args + [f"--process_id={i}"], process_env(DEVICES_PER_PROCESS),
                logs / f"process_{i}.log") for i in range(NUM_PROCESSES)]


def start_reference(workdir, data_dir, logs) -> subprocess.Popen:
  """One process on as many devices, reading both hosts' stream shards."""
  args = main_command(workdir, data_dir, f"--config.data.stream_shards={NUM_PROCESSES}")
  return start(args, process_env(NUM_PROCESSES * DEVICES_PER_PROCESS), logs / "reference.log")


def start(args, env, log_path) -> subprocess.Popen:
  # Output to a file, not a pipe: a process blocked on a full pipe that is not being read would
  # stall the other in the next collective.
  with open(log_path, "w") as log:
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log_path) -> str:
  try:
    process.wait(timeout=PROCESS_TIMEOUT_S)
  finally:
    if process.poll() is None:
      process.kill()
  output = log_path.read_text()
  assert process.returncode == 0, f"{log_path.name}:\n{output[-4000:]}"
  return output


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  datasets.load_source(tiny_config(data_dir, **OVERRIDES))  # Once: two writers would race.
  return data_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
  """(2-process workdir, its processes' outputs, reference workdir); the three processes run at
  the same time."""
  multi_workdir = str(tmp_path_factory.mktemp("two_processes"))
  reference_workdir = str(tmp_path_factory.mktemp("one_process"))
  logs = tmp_path_factory.mktemp("logs")
  processes = start_two_processes(multi_workdir, data_dir, logs)
  reference = start_reference(reference_workdir, data_dir, logs)
  try:
    finish(reference, logs / "reference.log")
    outputs = [finish(process, logs / f"process_{i}.log") for i, process in enumerate(processes)]
  finally:
    for process in processes + [reference]:
      if process.poll() is None:
        process.kill()
  return multi_workdir, outputs, reference_workdir


def test_every_process_joins_one_job_over_all_devices(runs):
  _, outputs, _ = runs
  for i, output in enumerate(outputs):
    assert f"Process {i} of {NUM_PROCESSES} (--coordinator_address=localhost:" in output
    assert f"on {NUM_PROCESSES * DEVICES_PER_PROCESS} device(s), global batch 4" in output
  # Every process returns the same results (eval sums the confusion matrix over all hosts).
  finals = [line for output in outputs for line in output.splitlines()
            if line.startswith("val/miou =")]
  assert len(finals) == NUM_PROCESSES and len(set(finals)) == 1, finals


def test_each_step_equals_one_process_fed_the_hosts_batches(runs):
  multi_workdir, _, reference_workdir = runs
  multi, reference = read_metrics(multi_workdir), read_metrics(reference_workdir)
  assert [m["step"] for m in multi] == [m["step"] for m in reference] == [1, 2, 3, 4, 4]
  for got, expected in zip(multi, reference):
    for name in expected:
      if name != "train/steps_per_second":
        tolerance = IOU_TOLERANCE if name.startswith("val/") else COMPARED_TOLERANCE
        np.testing.assert_allclose(got[name], expected[name], err_msg=f"{name} at step "
                                   f"{expected['step']}", **tolerance)


def saved_state(workdir, step):
  """A checkpoint read back whole onto this process's first device, whoever wrote it."""
  manager = checkpointing.make_manager(workdir, None, read_only=True)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          manager.metadata(step).item_metadata)
  return jax.device_get(manager.restore(step, args=ocp.args.StandardRestore(abstract)))


@pytest.mark.parametrize("step", [2, 4])
def test_checkpoints_written_by_both_processes_hold_the_same_state(runs, step):
  multi_workdir, _, reference_workdir = runs
  assert sorted(os.listdir(checkpointing.checkpoint_dir(multi_workdir))) == ["2", "4"]
  got, expected = saved_state(multi_workdir, step), saved_state(reference_workdir, step)
  got_leaves = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  expected_leaves = jax.tree_util.tree_flatten_with_path(expected)[0]
  assert got_leaves.keys() == dict(expected_leaves).keys()
  for path, value in expected_leaves:
    np.testing.assert_allclose(got_leaves[path], value, err_msg=jax.tree_util.keystr(path),
                               **COMPARED_TOLERANCE)


def test_only_process_0_writes_metrics_and_results(runs):
  multi_workdir, _, reference_workdir = runs
  event_files = os.listdir(os.path.join(multi_workdir, "tensorboard"))
  assert len(event_files) == 1, event_files  # One writer: a second would add its own file.
  with open(os.path.join(multi_workdir, workdirs.RESULTS_FILE)) as f:
    results = json.load(f)
  with open(os.path.join(reference_workdir, workdirs.RESULTS_FILE)) as f:
    expected = json.load(f)
  assert results["step"] == 4
  np.testing.assert_allclose(results["val/iou_per_class"], expected["val/iou_per_class"],
                             **IOU_TOLERANCE)
  leftovers = [name for name in os.listdir(multi_workdir) if name.startswith(".tmp")]
  assert not leftovers



def wait_for_line(log_path, text: str, processes, timeout_s: float = PROCESS_TIMEOUT_S) -> None:
  deadline = time.monotonic() + timeout_s
  while text not in (log_path.read_text() if log_path.exists() else ""):
    assert all(p.poll() is None for p in processes), f"a process ended before {text!r}"
    assert time.monotonic() < deadline, f"no {text!r} in {log_path.name}"
    time.sleep(0.05)


def test_sigterm_to_one_process_stops_both_at_one_step_and_the_rerun_resumes_exactly(
    runs, data_dir, tmp_path):
  """JAX's preemption service: the signalled host and the other one checkpoint the same step and
  exit 143; rerunning the command finishes the run with the uninterrupted run's exact state."""
  uninterrupted_workdir = runs[0]
  workdir, logs = str(tmp_path / "preempted"), tmp_path
  # An evaluation after every step slows the loop (not what it learns), so that the signal lands
  # well before the last of the 4 steps.
  processes = start_two_processes(workdir, data_dir, logs, "--config.eval_every=1")
  try:
    wait_for_line(logs / "process_0.log", "Training supervised from step 0", processes)
    processes[1].send_signal(signal.SIGTERM)
    for process in processes:
      process.wait(timeout=PROCESS_TIMEOUT_S)
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  outputs = [(logs / f"process_{i}.log").read_text() for i in range(NUM_PROCESSES)]
  assert [p.returncode for p in processes] == [128 + signal.SIGTERM] * 2, outputs[1][-3000:]
  stopped = [int(re.search(r"Preempted at step (\d+)", output).group(1)) for output in outputs]
  assert stopped[0] == stopped[1] < 4
  kept = sorted(int(name) for name in os.listdir(checkpointing.checkpoint_dir(workdir)))
  assert kept[-1] == stopped[0]

  rerun_logs = tmp_path / "rerun"
  rerun_logs.mkdir()
  for i, process in enumerate(start_two_processes(workdir, data_dir, rerun_logs)):
    assert "Resumed from" in finish(process, rerun_logs / f"process_{i}.log")
  got, expected = saved_state(workdir, 4), saved_state(uninterrupted_workdir, 4)
  got_leaves = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  for path, value in jax.tree_util.tree_flatten_with_path(expected)[0]:
    np.testing.assert_array_equal(got_leaves[path], value, err_msg=jax.tree_util.keystr(path))
