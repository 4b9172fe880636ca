"""The launchers (launch/): the exact commands their dry runs print, and what they run, with
stand-ins (fake srun, scontrol, training command) where a cluster would be. gcloud never runs."""

import importlib
import json
import os
import shlex
import stat
import subprocess
import sys

import pytest

from pseudoseg_jax import distributed, recipes
from pseudoseg_jax import splits
from test_train import ROOT

LAUNCH = os.path.join(ROOT, "launch")
PYTHON_MAIN = [sys.executable, "-m", "pseudoseg_jax.main"]


def run_tool(args, **kwargs):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=60, **kwargs)


def write_program(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return str(path)


# ------------------------------------------------------------------------------ sweep
def test_sweep_dry_run_prints_five_voc_splits_times_three_seeds():
  completed = run_tool(["launch/sweep.py", "--sweep=voc_classic", "--workdir_root=/data/voc",
                        "--dry_run", "--", "--config.data.manual_dir=/data/manual"])
  assert completed.returncode == 0, completed.stderr
  commands = [shlex.split(line) for line in completed.stdout.splitlines()]
  assert commands[0] == PYTHON_MAIN + [
      "--config=configs/voc_pseudoseg.py:split=92", "--workdir=/data/voc/split-92_seed-0",
      "--config.seed=0", "--config.data.manual_dir=/data/manual"]
  runs = {(command[3], command[5]) for command in commands}
  assert runs == {(f"--config=configs/voc_pseudoseg.py:split={split}", f"--config.seed={seed}")
                  for split in recipes.VOC_CLASSIC_SPLITS for seed in range(3)}
  assert len({command[4] for command in commands}) == len(commands) == 15  # A workdir each.
  # Every config argument is one the config file accepts, and means the split it names.
  voc_pseudoseg = importlib.import_module("configs.voc_pseudoseg")
  for command in commands[::3]:
    split = command[3].rpartition("split=")[2]
    config = voc_pseudoseg.get_config(f"split={split}")
    expected = "" if split == "1464" else splits.published_list("voc", split)
    assert config.data.labeled_list == expected


def test_sweep_of_config_arguments_and_fields_for_another_launcher():
  completed = run_tool(["launch/sweep.py", "--config=configs/demo.py",
                        "--arg=method=supervised,pseudoseg", "--set=data.num_labeled=50,100",
                        "--workdir_root=w", "--launcher=sbatch launch/slurm.sbatch", "--dry_run"])
  assert completed.returncode == 0, completed.stderr
  assert completed.stdout.splitlines() == [
      f"sbatch launch/slurm.sbatch --config=configs/demo.py:method={method} "
      f"--workdir=w/method-{method}_data.num_labeled-{count} --config.data.num_labeled={count}"
      for method in ("supervised", "pseudoseg") for count in (50, 100)]


def test_sweep_runs_one_after_another_goes_on_after_a_failure_and_stops_when_preempted(tmp_path):
  log = tmp_path / "calls.jsonl"
  # Fails (exit 3) for seed 1, is "preempted" (143) for seed 7.
  fake_main = write_program(tmp_path / "fake_main.py", f"""import json, sys
with open({str(log)!r}, "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\\n")
sys.exit(3 if "--config.seed=1" in sys.argv else 143 if "--config.seed=7" in sys.argv else 0)
""")
  launcher = f"{sys.executable} {fake_main}"
  base = ["launch/sweep.py", "--config=configs/demo.py", "--workdir_root=w",
          f"--launcher={launcher}"]
  completed = run_tool(base + ["--seeds=0,1,2"])
  assert completed.returncode == 1
  assert "1 of 3 runs failed: #2 (exit 3)" in completed.stdout
  calls = [json.loads(line) for line in log.read_text().splitlines()]
  assert [call[1] for call in calls] == [f"--workdir=w/seed-{seed}" for seed in range(3)]
  log.unlink()
  completed = run_tool(base + ["--seeds=7,8"])
  assert completed.returncode == 143 and "rerun the sweep to resume" in completed.stdout
  assert len(log.read_text().splitlines()) == 1  # Seed 8 never started.


def test_sweep_refuses_a_malformed_axis():
  completed = run_tool(["launch/sweep.py", "--config=configs/demo.py", "--set=seed",
                        "--workdir_root=w", "--dry_run"])
  assert completed.returncode != 0 and "--set='seed' must be NAME=VALUE" in completed.stderr


# ------------------------------------------------------------------------------ TPU pod
TPU_TRAIN_ARGS = ["--config=configs/voc_pseudoseg.py:split=92", "--workdir=/mnt/data/w/voc 92",
                  "--config.data.manual_dir=/mnt/data/voc"]


def test_tpu_pod_dry_run_sets_up_every_worker_then_runs_main_on_all():
  completed = run_tool(["launch/tpu_pod.py", "--tpu=my-pod", "--zone=us-central2-b",
                        "--project=proj", "--repo_url=https://example.com/pseudoseg-jax.git",
                        "--ref=v1.0", "--setup", "--env=JAX_TRACEBACK_FILTERING=off",
                        "--dry_run", "--", *TPU_TRAIN_ARGS])
  assert completed.returncode == 0, completed.stderr
  setup, train = [shlex.split(line) for line in completed.stdout.splitlines()]
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod", "--zone=us-central2-b",
         "--project=proj", "--worker=all"]
  assert setup[:-1] == ssh and train[:-1] == ssh
  setup_steps = setup[-1].removeprefix("--command=").split(" && ")
  assert setup_steps[1:5] == [
      "if [ ! -d ~/pseudoseg-jax/.git ]; then git clone --quiet "
      "https://example.com/pseudoseg-jax.git ~/pseudoseg-jax; fi",
      "cd ~/pseudoseg-jax", "git fetch --quiet origin v1.0",
      "git checkout --quiet --detach FETCH_HEAD"]
  assert setup_steps[-1] == ".venv/bin/pip install --quiet -U -e . 'jax[tpu]'"
  remote = train[-1].removeprefix("--command=")
  assert remote.startswith("cd ~/pseudoseg-jax && . .venv/bin/activate && env ")
  # What each worker's shell runs: no flags, the pod is detected (pseudoseg_jax/distributed.py).
  assert shlex.split(remote.split(" && ")[-1]) == [
      "env", "JAX_TRACEBACK_FILTERING=off", "python", "-m", "pseudoseg_jax.main",
      *TPU_TRAIN_ARGS]


def test_tpu_pod_detached_run_logs_on_each_worker():
  completed = run_tool(["launch/tpu_pod.py", "--tpu=pod", "--zone=z", "--detach", "--dry_run",
                        "--", *TPU_TRAIN_ARGS])
  assert completed.returncode == 0, completed.stderr
  (train,) = [shlex.split(line) for line in completed.stdout.splitlines()]
  assert train[-1].removeprefix("--command=").split(" && ")[-1] == (
      "nohup python -m pseudoseg_jax.main --config=configs/voc_pseudoseg.py:split=92 "
      "'--workdir=/mnt/data/w/voc 92' --config.data.manual_dir=/mnt/data/voc "
      "> 'logs/voc 92.log' 2>&1 < /dev/null &")


def test_tpu_pod_refuses_a_command_without_workdir():
  completed = run_tool(["launch/tpu_pod.py", "--tpu=pod", "--zone=z", "--dry_run", "--",
                        "--config=configs/demo.py"])
  assert completed.returncode != 0 and "needs --workdir" in completed.stderr


def test_tpu_pod_takes_a_gcs_workdir_and_data_dir():
  train_args = ["--config=configs/demo.py", "--workdir=gs://bucket/workdirs/demo",
                "--config.data.data_dir=gs://bucket/tensorflow_datasets"]
  completed = run_tool(["launch/tpu_pod.py", "--tpu=pod", "--zone=z", "--detach", "--dry_run",
                        "--", *train_args])
  assert completed.returncode == 0, completed.stderr
  (train,) = [shlex.split(line) for line in completed.stdout.splitlines()]
  assert train[-1].removeprefix("--command=").split(" && ")[-1] == (
      "nohup python -m pseudoseg_jax.main " + " ".join(train_args)
      + " > logs/demo.log 2>&1 < /dev/null &")


# ------------------------------------------------------------------------------ SLURM
@pytest.fixture
def fake_slurm(tmp_path):
  """scontrol, srun and the checkout's python, standing in for a 2-node allocation."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  write_program(bin_dir / "scontrol", f"""#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then echo gpu07; echo gpu08
else echo "$@" >> {tmp_path}/scontrol.log; fi
""")
  # srun: drop its own options, then run the task once per node, as SLURM would (in turn here).
  write_program(bin_dir / "srun", """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
status=0
for id in 0 1; do SLURM_PROCID=$id "$@" || status=$?; done
exit $status
""")
  python = write_program(tmp_path / "python", f"""#!{sys.executable}
import json, os, sys
print(json.dumps({{"cwd": os.getcwd(), "argv": sys.argv[1:]}}))
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
""")
  checkout = tmp_path / "checkout"
  checkout.mkdir()
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "1234",
         "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2",
         "SLURM_SUBMIT_DIR": str(checkout), "PSEUDOSEG_PYTHON": python}
  return env, tmp_path


SLURM_TRAIN_ARGS = ["--config=configs/voc_pseudoseg.py:split=92", "--workdir=/data/w/voc_92"]


def run_sbatch_script(env):
  return subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), *SLURM_TRAIN_ARGS],
                        capture_output=True, text=True, env=env, timeout=60)


def test_slurm_dry_run_prints_one_task_per_node_with_the_first_node_as_coordinator(fake_slurm):
  env, tmp_path = fake_slurm
  completed = run_sbatch_script({**env, "DRY_RUN": "1"})
  assert completed.returncode == 0, completed.stderr
  command = shlex.split(completed.stdout)
  assert command[:5] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                         "bash"]
  assert command[7:] == [str(tmp_path / "checkout"), env["PSEUDOSEG_PYTHON"], "gpu07:21234",
                         "2", *SLURM_TRAIN_ARGS]
  assert "--process_id=\"$SLURM_PROCID\"" in command[6]


def test_slurm_script_gives_each_task_its_process_id_and_requeues_when_preempted(fake_slurm):
  env, tmp_path = fake_slurm
  completed = run_sbatch_script(env)
  assert completed.returncode == 0, completed.stderr
  tasks = [json.loads(line) for line in completed.stdout.splitlines()]
  for process_id, task in enumerate(tasks):
    assert task["cwd"] == str(tmp_path / "checkout")
    assert task["argv"] == ["-m", "pseudoseg_jax.main", "--coordinator_address=gpu07:21234",
                            "--num_processes=2", f"--process_id={process_id}",
                            *SLURM_TRAIN_ARGS]
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in task["argv"][2:5])
    job = distributed.plan(flags["coordinator_address"], int(flags["num_processes"]),
                           int(flags["process_id"]), environ={}, on_tpu_vm=False)
    assert (job.num_processes, job.process_id) == (2, process_id) and not job.detect_cluster
  assert not (tmp_path / "scontrol.log").exists()
  completed = run_sbatch_script({**env, "FAKE_EXIT": "143"})
  assert completed.returncode == 143 and "requeueing job 1234" in completed.stdout
  assert (tmp_path / "scontrol.log").read_text() == "requeue 1234\n"
