"""End to end: the CLI trains, evaluates, writes the workdir contract, and resumes."""

import json
import os
import subprocess
import sys

import pytest

from configs import demo
from pseudoseg_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_OVERRIDES = {
    "total_steps": 4, "batch_size": 4, "eval_batch_size": 8, "crop_size": 33,
    "eval_crop_size": 97, "log_every": 2, "eval_every": 4, "checkpoint_every": 2,
    "data.name": "synthetic_shapes/tiny", "data.num_labeled": 8, "data.shuffle_buffer": 8,
    "model.aspp_channels": 16, "model.decoder_channels": 16, "model.low_level_channels": 8,
    "model.sgc_attention_dim": 8, "pseudoseg.unlabeled_batch_size": 4, "pseudoseg.cutout_size": 8,
    "image_summary_every": 2,
}


def tiny_config(data_dir, **overrides):
  """The config the CLI run below resolves to (demo.py plus TINY_OVERRIDES)."""
  config = demo.get_config("steps=4")
  config.data.data_dir = str(data_dir)
  for name, value in {**TINY_OVERRIDES, **overrides}.items():
    parent, _, leaf = name.rpartition(".")
    (config[parent] if parent else config)[leaf] = value
  return config


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """One CLI run of the demo config (PseudoSeg) shrunk to 4 steps, shared by the tests below."""
  data_dir = tmp_path_factory.mktemp("tfds")
  workdir = str(tmp_path_factory.mktemp("work") / "run")
  args = [sys.executable, "-m", "pseudoseg_jax.main", "--config=configs/demo.py:steps=4",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"]
  args += [f"--config.{name}={value}" for name, value in TINY_OVERRIDES.items()
           if name != "total_steps"]
  completed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert completed.returncode == 0, completed.stderr[-3000:]
  return data_dir, workdir, completed.stdout


def test_cli_writes_the_workdir_contract(cli_run):
  _, workdir, stdout = cli_run
  assert "val/miou =" in stdout and "steps/s" in stdout and "ETA" in stdout
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["step"] == 4
  assert 0.0 <= results["val/miou"] <= 1.0
  assert len(results["val/iou_per_class"]) == 8
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["data"]["name"] == "synthetic_shapes/tiny"
  metrics = read_metrics(workdir)
  assert [m["step"] for m in metrics if "train/loss" in m] == [2, 4]
  assert any("val/miou" in m for m in metrics)
  for name in ("train/consistency_loss", "train/sgc_loss", "pseudo/accuracy"):
    assert 0 <= metrics[0][name] < 100, name
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert tensorboard_image_steps(os.path.join(workdir, "tensorboard")) == [1, 2, 4]
  assert tensorboard_image_steps(os.path.join(workdir, "tensorboard"), "confusion_matrix") == [4]
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
  with Image.open(os.path.join(workdir, train.LEARNING_CURVES_FILE)) as image:
    return image.size


def test_rerunning_a_finished_run_resumes_instead_of_retraining(cli_run):
  data_dir, workdir, _ = cli_run
  before = read_metrics(workdir)
  os.remove(os.path.join(workdir, train.LEARNING_CURVES_FILE))  # As a run from before the curves.
  results = train.run(tiny_config(data_dir), workdir)
  assert results["step"] == 4
  assert read_metrics(workdir) == before  # Nothing retrained, nothing logged twice.
  assert learning_curves_size(workdir) == (1200, 450)  # Drawn again.


def test_raising_total_steps_continues_from_the_checkpoint(cli_run, tmp_path):
  data_dir, workdir, _ = cli_run
  # No image summaries here: they would compile one more function and test nothing new.
  results = train.run(tiny_config(data_dir, total_steps=6, image_summary_every=0), workdir)
  assert results["step"] == 6
  steps = [m["step"] for m in read_metrics(workdir) if "train/loss" in m]
  assert steps == [2, 4, 6]
  assert tensorboard_image_steps(os.path.join(workdir, "tensorboard"), "confusion_matrix") == [4, 6]


def test_a_workdir_of_another_model_is_refused_and_kept(cli_run):
  data_dir, workdir, _ = cli_run
  checkpoints = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(ValueError, match=r"config.json holds a run with model.decoder_channels=16"):
    train.run(tiny_config(data_dir, **{"model.decoder_channels": 32}), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == checkpoints
  with pytest.raises(ValueError, match=r"optimizer.name='adam'.*'sgd'"):
    train.run(tiny_config(data_dir, **{"optimizer.name": "sgd"}), workdir)


def test_a_workdir_of_another_dataset_is_refused_and_kept(cli_run):
  data_dir, workdir, _ = cli_run
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(ValueError, match=r"holds a run with data.num_labeled=8, but the config asks "
                                       r"for 16. Use a new --workdir for a different dataset"):
    train.run(tiny_config(data_dir, **{"data.num_labeled": 16}), workdir)
  with pytest.raises(ValueError, match=r"data.name='synthetic_shapes/tiny'.*'synthetic_shapes'"):
    train.run(tiny_config(data_dir, **{"data.name": "synthetic_shapes"}), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_unknown_config_field_on_the_command_line_is_named(tmp_path):
  completed = subprocess.run(
      [sys.executable, "-m", "pseudoseg_jax.main", "--config=configs/demo.py",
       f"--workdir={tmp_path}", "--config.model.output_strid=8"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert completed.returncode != 0
  assert "output_strid" in completed.stderr
