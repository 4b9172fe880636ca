"""Stopping well: a preempted (SIGTERM) or killed (SIGKILL) run resumes to exactly the results and
parameters of an uninterrupted one; a diverged run stops without saving the bad state, or skips
such steps when asked to."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pseudoseg_jax import checkpointing, preemption, steps, train
from test_train import ROOT, TINY_OVERRIDES, read_metrics, tiny_config

# PseudoSeg (both training streams and the step's own randomness), every step logged (the test
# watches the log to choose its moment), a checkpoint every 3 steps and none of the extras.
PREEMPTION_STEPS = 12
PREEMPTION_OVERRIDES = {**TINY_OVERRIDES, "log_every": 1, "eval_every": 1_000,
                        "checkpoint_every": 3, "image_summary_every": 0}
SIGNAL_TO_EXIT_LIMIT_S = 30


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def subprocess_env():
  """The runs keep every program, however small, in the test run's compilation cache (conftest):
  only the first one compiles (the executable is the same, so are the numbers). Their train and
  eval steps are test_train's (same model and batch shapes; the step's program does not depend on
  total_steps), which conftest schedules first."""
  return {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def train_command(data_dir, workdir):
  args = [sys.executable, "-m", "pseudoseg_jax.main",
          f"--config=configs/demo.py:steps={PREEMPTION_STEPS}", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}"]
  return args + [f"--config.{name}={value}" for name, value in PREEMPTION_OVERRIDES.items()
                 if name != "total_steps"]


def run_to_completion(args, env):
  completed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
  return completed.stdout


def run_until_step_then_signal(args, env, step, signal_number):
  """Starts the command, sends the signal once it logs `step`; returns (exit code, output,
  seconds from the signal to the exit)."""
  process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env)
  lines = []
  for line in process.stdout:
    lines.append(line)
    if f" step {step}/" in line and "steps/s" in line:
      break
  else:
    process.wait()
    pytest.fail(f"The run ended before logging step {step}:\n" + "".join(lines)[-3000:])
  signalled_at = time.monotonic()
  process.send_signal(signal_number)
  rest, _ = process.communicate(timeout=120)
  return process.returncode, "".join(lines) + rest, time.monotonic() - signalled_at


def final_checkpoint(workdir):
  """The saved state at the last step, as a flat {path: numpy array}."""
  manager = checkpointing.make_manager(workdir, keep=3, read_only=True)
  saved = manager.restore(PREEMPTION_STEPS)
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}


def training_records(workdir):
  """Each step's logged training metrics, minus the wall-clock rate."""
  return [{k: v for k, v in m.items() if k != "train/steps_per_second"}
          for m in read_metrics(workdir) if "train/loss" in m]


@pytest.fixture(scope="module")
def uninterrupted(data_dir, subprocess_env, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
  run_to_completion(train_command(data_dir, workdir), subprocess_env)
  with open(os.path.join(workdir, train.RESULTS_FILE)) as f:
    return json.load(f), final_checkpoint(workdir), training_records(workdir)


def assert_same_as_uninterrupted(workdir, uninterrupted):
  results, checkpoint, records = uninterrupted
  with open(os.path.join(workdir, train.RESULTS_FILE)) as f:
    assert json.load(f) == results
  resumed = final_checkpoint(workdir)
  assert resumed.keys() == checkpoint.keys()
  for path, array in checkpoint.items():
    np.testing.assert_array_equal(resumed[path], array, err_msg=path)  # Bit for bit.
  # Every step once, each with the uninterrupted run's loss, accuracies and learning rate.
  assert training_records(workdir) == records
  assert [m["step"] for m in records] == list(range(1, PREEMPTION_STEPS + 1))


def test_a_run_stopped_by_sigterm_then_killed_resumes_to_the_uninterrupted_results(
    data_dir, subprocess_env, uninterrupted, tmp_path):
  """One workdir through both kinds of preemption (one launch fewer than a run for each)."""
  workdir = str(tmp_path / "run")
  args = train_command(data_dir, workdir)
  # SIGTERM: the step in flight is checkpointed and its pending metrics are written.
  exit_code, output, seconds = run_until_step_then_signal(args, subprocess_env, 1,
                                                          signal.SIGTERM)
  assert exit_code == 128 + signal.SIGTERM, output[-3000:]
  assert seconds < SIGNAL_TO_EXIT_LIMIT_S
  stopped_at = int(output.split("Preempted at step ")[1].split(";")[0])
  assert 1 <= stopped_at < 7  # Before the step the kill below waits for.
  saved = sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")))
  assert saved[-1] == stopped_at  # The step in flight, whatever the checkpoint interval.
  assert read_metrics(workdir)[-1]["step"] == stopped_at

  # SIGKILL at step 7 of the resumed run: just after the step-6 checkpoint began saving in the
  # background; steps 7+ are lost.
  exit_code, output, _ = run_until_step_then_signal(args, subprocess_env, 7, signal.SIGKILL)
  assert exit_code == -signal.SIGKILL, output[-3000:]
  assert f"Resumed from {os.path.join(os.path.abspath(workdir), 'checkpoints')} at step " \
      f"{stopped_at}" in output

  stdout = run_to_completion(args, subprocess_env)
  resumed_at = int(stdout.split("Resumed from ")[1].split(" at step ")[1].split(".")[0])
  assert resumed_at in (3, 6)  # 6 unless the kill caught its save unfinished.
  assert_same_as_uninterrupted(workdir, uninterrupted)


def test_stop_signals_only_record_the_signal_and_restore_the_previous_handlers():
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.StopSignals() as stop_signals:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread.
    assert stop_signals.received == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is previous
  assert preemption.agreed_across_processes(True) and not preemption.agreed_across_processes(False)


def poisoned_at(step_to_poison):
  """steps.train_step with NaN images at one step (1-based): its loss and gradients are NaN."""
  original = steps.train_step

  def train_step(state, batch, *args, **kwargs):
    poisoned = state.step + 1 == step_to_poison
    batch = jax.tree.map(
        lambda x: jnp.where(poisoned, jnp.nan, x) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        batch)
    return original(state, batch, *args, **kwargs)
  return train_step


def divergence_config(data_dir, **overrides):
  return tiny_config(data_dir, method="supervised", eval_every=1_000, image_summary_every=0,
                     **overrides)


def restored_latest(config, workdir):
  _, _, state = steps.create_train_state(config, config.seed)
  manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
  return checkpointing.restore_latest(manager, state)


def all_finite(tree):
  return all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(jax.device_get(tree)))


def test_a_nonfinite_step_stops_the_run_and_keeps_the_last_good_checkpoint(
    data_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(steps, "train_step", poisoned_at(3))
  config = divergence_config(data_dir)
  workdir = str(tmp_path / "run")
  with pytest.raises(train.TrainingDiverged,
                     match=r"diverged at step 3: train/loss=nan, train/grad_norm=nan.*"
                           r"last checkpoint \(step 2"):
    train.run(config, workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
  restored = restored_latest(config, workdir)
  assert int(restored.step) == 2
  assert all_finite((restored.params, restored.batch_stats, restored.opt_state))
  assert [m["step"] for m in read_metrics(workdir)] == [2]


def test_skipping_nonfinite_steps_finishes_and_counts_them(data_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(steps, "train_step", poisoned_at(3))
  config = divergence_config(data_dir, skip_nonfinite_steps=True)
  workdir = str(tmp_path / "run")
  results = train.run(config, workdir)
  assert results["step"] == 4
  logged = {m["step"]: m for m in read_metrics(workdir) if "train/loss" in m}
  assert logged[2]["train/skipped_steps"] == 0 and logged[4]["train/skipped_steps"] == 1
  assert np.isfinite(logged[4]["train/loss"])  # The mean leaves the skipped step out.
  restored = restored_latest(config, workdir)
  assert int(restored.step) == 4
  assert all_finite((restored.params, restored.batch_stats, restored.opt_state))
