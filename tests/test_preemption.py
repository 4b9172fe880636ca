"""Stopping well: a preempted run checkpoints the step it was on and resumes; a diverged run stops
without saving the bad state, or skips such steps when asked to."""

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

# Many short steps, each logged (the test waits for the first log line), no eval or checkpoint of
# their own before the end: the checkpoint the test finds is the one preemption wrote.
PREEMPTION_STEPS = 12
PREEMPTION_OVERRIDES = {**TINY_OVERRIDES, "method": "supervised", "log_every": 1,
                        "eval_every": 1_000, "checkpoint_every": 1_000, "image_summary_every": 0}
SIGNAL_TO_EXIT_LIMIT_S = 30


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def train_command(data_dir, workdir):
  args = [sys.executable, "-m", "pseudoseg_jax.main",
          f"--config=configs/demo.py:steps={PREEMPTION_STEPS}", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}"]
  return args + [f"--config.{name}={value}" for name, value in PREEMPTION_OVERRIDES.items()
                 if name != "total_steps"]


def run_until_first_step_then_terminate(args):
  """Starts the command, sends SIGTERM once it logs a step; returns (exit code, output, seconds
  from the signal to the exit)."""
  process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
  lines = []
  for line in process.stdout:
    lines.append(line)
    if " step 1/" in line and "steps/s" in line:
      break
  else:
    process.wait()
    pytest.fail("The run ended before logging a step:\n" + "".join(lines)[-3000:])
  signalled_at = time.monotonic()
  process.send_signal(signal.SIGTERM)
  rest, _ = process.communicate(timeout=120)
  return process.returncode, "".join(lines) + rest, time.monotonic() - signalled_at


def test_sigterm_checkpoints_the_current_step_and_a_rerun_finishes(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  args = train_command(data_dir, workdir)
  exit_code, output, seconds = run_until_first_step_then_terminate(args)
  assert exit_code == 128 + signal.SIGTERM, output[-3000:]
  assert seconds < SIGNAL_TO_EXIT_LIMIT_S
  stopped_at = int(output.split("Preempted at step ")[1].split(";")[0])
  assert 1 <= stopped_at < PREEMPTION_STEPS
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(stopped_at)]
  assert read_metrics(workdir)[-1]["step"] == stopped_at  # Its pending metrics were written.

  completed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert f"Resumed from {os.path.join(os.path.abspath(workdir), 'checkpoints')} at step " \
      f"{stopped_at}" in completed.stdout
  with open(os.path.join(workdir, train.RESULTS_FILE)) as f:
    assert json.load(f)["step"] == PREEMPTION_STEPS
  logged = [m["step"] for m in read_metrics(workdir) if "train/loss" in m]
  assert logged == list(range(1, PREEMPTION_STEPS + 1))  # No step lost, none logged twice.


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

  def train_step(state, batch, **kwargs):
    poisoned = state.step + 1 == step_to_poison
    batch = jax.tree.map(
        lambda x: jnp.where(poisoned, jnp.nan, x) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        batch)
    return original(state, batch, **kwargs)
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
