"""Stopping well: the stop signals' handlers, and a diverged run that stops without saving the bad
state, or skips such steps when asked to. (A preempted or killed CLI run resuming to the
uninterrupted results: tests/test_train.py, which shares its training run.)"""

import os
import signal
import time

import jax
import numpy as np
import pytest

from pseudoseg_jax import checkpointing, preemption, steps, train
from pseudoseg_jax.data import streams
from test_train import read_metrics, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def test_stop_signals_only_record_the_signal_and_restore_the_previous_handlers():
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.StopSignals() as stop_signals:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread.
    assert stop_signals.received == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is previous


def test_one_process_stops_on_its_own_signal_without_asking_the_manager():
  class NoManager:
    def reached_preemption(self, step):
      raise AssertionError("a single process must not wait on the preemption sync point")

  with preemption.StopSignals() as stop_signals:
    assert not preemption.should_stop(NoManager(), 1, stop_signals)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)
    assert preemption.should_stop(NoManager(), 2, stop_signals)


def test_several_processes_leave_sigterm_to_jaxs_preemption_service(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  previous = signal.getsignal(signal.SIGTERM)
  asked = []

  class Manager:
    def reached_preemption(self, step):
      asked.append(step)
      return step == 3

  with preemption.StopSignals() as stop_signals:
    assert signal.getsignal(signal.SIGTERM) is previous  # Not replaced: JAX's stays.
    assert [preemption.should_stop(Manager(), s, stop_signals) for s in (1, 2, 3)] == [
        False, False, True]
  assert asked == [1, 2, 3]


def poisoned_at(step_to_poison):
  """streams.training_batches with NaN images in one step's batch (1-based): that step's loss and
  gradients are NaN. A bad batch, as real divergences often start; the step's program is the
  plain one (the test run's compilation cache may already hold it)."""
  original = streams.training_batches

  def training_batches(config, source, mesh, start_step):
    for step, batch in enumerate(original(config, source, mesh, start_step), start_step + 1):
      if step == step_to_poison:
        batch = jax.tree.map(
            lambda x: np.full_like(x, np.nan) if np.issubdtype(x.dtype, np.floating) else x,
            batch)
      yield batch
  return training_batches


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
  monkeypatch.setattr(streams, "training_batches", poisoned_at(3))
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
  monkeypatch.setattr(streams, "training_batches", poisoned_at(3))
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
