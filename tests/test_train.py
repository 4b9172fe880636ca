"""End to end: the CLI trains, evaluates, writes the workdir contract, and resumes, also after a
preemption (SIGTERM) or a kill (SIGKILL), to exactly the results of the uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import demo
from pseudoseg_jax import checkpointing, train, workdirs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny demo that other modules train in-process too (tiny_config).
TINY_OVERRIDES = {
    "total_steps": 4, "batch_size": 4, "eval_batch_size": 8, "crop_size": 33,
    "eval_crop_size": 97, "log_every": 2, "eval_every": 4, "checkpoint_every": 2,
    "data.name": "synthetic_shapes/tiny", "data.num_labeled": 8, "data.shuffle_buffer": 8,
    "model.aspp_channels": 16, "model.decoder_channels": 16, "model.low_level_channels": 8,
    "model.sgc_attention_dim": 8, "pseudoseg.unlabeled_batch_size": 4, "pseudoseg.cutout_size": 8,
    "image_summary_every": 2,
}
# This module's CLI run (PseudoSeg, both training streams and the step's own randomness): the
# workdir-contract tests read it and it is the uninterrupted reference of the preemption test,
# one launch for both. Every step logged (the preemption test watches the log to choose its
# moment), a checkpoint every 3 steps, evaluation at the end.
RUN_STEPS = 12
# The paper's fused pseudo labels (the demo's unlabeled setting has the decoder's alone), so that the
# run goes through every head.
RUN_OVERRIDES = {**TINY_OVERRIDES, "total_steps": RUN_STEPS, "log_every": 1, "eval_every": 1_000,
                 "checkpoint_every": 3, "image_summary_every": 6,
                 "pseudoseg.pseudo_label_source": "fusion"}


def tiny_config(data_dir, **overrides):
  """demo.py plus TINY_OVERRIDES, then `overrides`."""
  config = demo.get_config("steps=4")
  config.data.data_dir = str(data_dir)
  for name, value in {**TINY_OVERRIDES, **overrides}.items():
    parent, _, leaf = name.rpartition(".")
    (config[parent] if parent else config)[leaf] = value
  return config


def run_config(data_dir, **overrides):
  """The config the CLI run below resolves to."""
  return tiny_config(data_dir, **{**RUN_OVERRIDES, **overrides})


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_command(data_dir, workdir):
  args = [sys.executable, "-m", "pseudoseg_jax.main", f"--config=configs/demo.py:steps={RUN_STEPS}",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"]
  return args + [f"--config.{name}={value}" for name, value in RUN_OVERRIDES.items()
                 if name != "total_steps"]


@pytest.fixture(scope="module")
def subprocess_env():
  """The runs keep every program, however small, in the test run's compilation cache (conftest):
  only the first launch compiles (the executables are the same, so are the numbers)."""
  return {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def run_to_completion(args, env):
  completed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
  return completed.stdout


def final_checkpoint(workdir):
  """The saved state at the last step, as a flat {path: numpy array}."""
  manager = checkpointing.make_manager(workdir, keep=3, read_only=True)
  saved = manager.restore(RUN_STEPS)
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}


def training_records(workdir):
  """Each step's logged training metrics, minus the wall-clock rate."""
  return [{k: v for k, v in m.items() if k != "train/steps_per_second"}
          for m in read_metrics(workdir) if "train/loss" in m]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, subprocess_env):
  """(data dir, workdir, stdout, uninterrupted) of one CLI run, shared by the tests below;
  `uninterrupted` is what it ended with (results, final checkpoint, training records), read before
  any test resumes the workdir."""
  data_dir = tmp_path_factory.mktemp("tfds")
  workdir = str(tmp_path_factory.mktemp("work") / "run")
  stdout = run_to_completion(train_command(data_dir, workdir), subprocess_env)
  with open(os.path.join(workdir, workdirs.RESULTS_FILE)) as f:
    uninterrupted = json.load(f), final_checkpoint(workdir), training_records(workdir)
  return data_dir, workdir, stdout, uninterrupted


def test_cli_writes_the_workdir_contract(cli_run):
  _, workdir, stdout, _ = cli_run
  assert "val/miou =" in stdout and "steps/s" in stdout and "ETA" in stdout
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["step"] == RUN_STEPS
  assert 0.0 <= results["val/miou"] <= 1.0
  assert len(results["val/iou_per_class"]) == 8
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["data"]["name"] == "synthetic_shapes/tiny"
  metrics = read_metrics(workdir)
  assert [m["step"] for m in metrics if "train/loss" in m] == list(range(1, RUN_STEPS + 1))
  assert [m["step"] for m in metrics if "val/miou" in m] == [RUN_STEPS]
  for name in ("train/consistency_loss", "train/sgc_loss", "pseudo/accuracy"):
    assert 0 <= metrics[0][name] < 100, name
  for name in ("pseudo/recall_per_class", "pseudo/precision_per_class"):  # None: no such pixel.
    assert len(metrics[0][name]) == 8 and all(v is None or 0 <= v <= 1 for v in metrics[0][name])
  # Every 3 steps, the last 3 kept (keep_checkpoints).
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["6", "9", "12"]
  assert tensorboard_image_steps(os.path.join(workdir, "tensorboard")) == [1, 6, 12]
  assert tensorboard_image_steps(os.path.join(workdir, "tensorboard"),
                                 "confusion_matrix") == [RUN_STEPS]
  assert learning_curves_size(workdir) == (1200, 450)


def tensorboard_image_steps(logdir, tag="pseudo_labels"):
  """Steps at which an image (by default the pseudo-label grid) was written."""
  from tensorboard.backend.event_processing import event_accumulator
  accumulator = event_accumulator.EventAccumulator(logdir, size_guidance={"tensors": 0})
  accumulator.Reload()
  if tag not in accumulator.Tags()["tensors"]:
    return []
  return [event.step for event in accumulator.Tensors(tag)]


def learning_curves_size(workdir):
  from PIL import Image
  with Image.open(os.path.join(workdir, workdirs.LEARNING_CURVES_FILE)) as image:
    return image.size


def run_until_step_then_signal(args, env, step, signal_number):
  """Starts the command, sends the signal once it logs `step`; returns (exit code, output,
  seconds from the signal to the exit). A run still going 120 s after the signal fails the test."""
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


def assert_same_as_uninterrupted(workdir, uninterrupted):
  results, checkpoint, records = uninterrupted
  with open(os.path.join(workdir, workdirs.RESULTS_FILE)) as f:
    assert json.load(f) == results
  resumed = final_checkpoint(workdir)
  assert resumed.keys() == checkpoint.keys()
  for path, array in checkpoint.items():
    np.testing.assert_array_equal(resumed[path], array, err_msg=path)  # Bit for bit.
  # Every step once, each with the uninterrupted run's loss, accuracies and learning rate.
  assert training_records(workdir) == records
  assert [m["step"] for m in records] == list(range(1, RUN_STEPS + 1))


def test_a_run_stopped_by_sigterm_then_killed_resumes_to_the_uninterrupted_results(
    cli_run, subprocess_env, tmp_path):
  """One workdir through both kinds of preemption (one launch fewer than a run for each)."""
  data_dir, _, _, uninterrupted = cli_run
  workdir = str(tmp_path / "run")
  args = train_command(data_dir, workdir)
  # SIGTERM: the step in flight is checkpointed and its pending metrics are written.
  exit_code, output, _ = run_until_step_then_signal(args, subprocess_env, 1, signal.SIGTERM)
  # No bound on the seconds to exit (a cold compile of the step in flight can take half a minute
  # on a loaded machine): communicate's timeout catches a hang; speed is not a test's business.
  assert exit_code == 128 + signal.SIGTERM, output[-3000:]
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


def test_rerunning_a_finished_run_resumes_instead_of_retraining(cli_run):
  data_dir, workdir, _, _ = cli_run
  before = read_metrics(workdir)
  os.remove(os.path.join(workdir, workdirs.LEARNING_CURVES_FILE))  # As a run from before the curves.
  results = train.run(run_config(data_dir), workdir)
  assert results["step"] == RUN_STEPS
  assert read_metrics(workdir) == before  # Nothing retrained, nothing logged twice.
  assert learning_curves_size(workdir) == (1200, 450)  # Drawn again.


def test_raising_total_steps_continues_from_the_checkpoint(cli_run, tmp_path):
  data_dir, workdir, _, _ = cli_run
  # No image summaries here: they would compile one more function and test nothing new.
  results = train.run(run_config(data_dir, total_steps=RUN_STEPS + 2, image_summary_every=0),
                      workdir)
  assert results["step"] == RUN_STEPS + 2
  steps = [m["step"] for m in read_metrics(workdir) if "train/loss" in m]
  assert steps == list(range(1, RUN_STEPS + 3))
  assert tensorboard_image_steps(os.path.join(workdir, "tensorboard"), "confusion_matrix") == [
      RUN_STEPS, RUN_STEPS + 2]


def test_a_workdir_of_another_model_is_refused_and_kept(cli_run):
  data_dir, workdir, _, _ = cli_run
  checkpoints = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(ValueError, match=r"config.json holds a run with model.decoder_channels=16"):
    train.run(run_config(data_dir, **{"model.decoder_channels": 32}), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == checkpoints
  with pytest.raises(ValueError, match=r"optimizer.name='adam'.*'sgd'"):
    train.run(run_config(data_dir, **{"optimizer.name": "sgd"}), workdir)


def test_a_workdir_of_another_dataset_is_refused_and_kept(cli_run):
  data_dir, workdir, _, _ = cli_run
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(ValueError, match=r"holds a run with data.num_labeled=8, but the config asks "
                                       r"for 16. Use a new --workdir for a different dataset"):
    train.run(run_config(data_dir, **{"data.num_labeled": 16}), workdir)
  with pytest.raises(ValueError, match=r"data.name='synthetic_shapes/tiny'.*'synthetic_shapes'"):
    train.run(run_config(data_dir, **{"data.name": "synthetic_shapes"}), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_unknown_config_field_on_the_command_line_is_named(tmp_path):
  completed = subprocess.run(
      [sys.executable, "-m", "pseudoseg_jax.main", "--config=configs/demo.py",
       f"--workdir={tmp_path}", "--config.model.output_strid=8"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert completed.returncode != 0
  assert "output_strid" in completed.stderr
