"""evaluate.py: any checkpoint, any split; at single scale, the training's mIoU exactly."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from configs import demo
from pseudoseg_jax import evaluate, inference, train, workdirs
from pseudoseg_jax.data import datasets

OVERRIDES = {
    "total_steps": 1, "batch_size": 4, "eval_batch_size": 8, "crop_size": 33,
    "eval_crop_size": 97, "log_every": 1, "eval_every": 1, "checkpoint_every": 1,
    "image_summary_every": 0, "data.name": "synthetic_shapes/tiny", "data.num_labeled": 8,
    "data.shuffle_buffer": 8, "model.aspp_channels": 16, "model.decoder_channels": 16,
    "model.low_level_channels": 8, "model.sgc_attention_dim": 8,
}
RESULT_KEYS = {"split", "step", "scales", "flip", "miou", "iou_per_class", "class_names",
               "pixel_accuracy", "pixels_per_class", "checkpoint", "inference"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir trained by train.run for one step: results.json holds its val/miou."""
  config = demo.get_config("method=supervised")
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  for name, value in OVERRIDES.items():
    parent, _, leaf = name.rpartition(".")
    (config[parent] if parent else config)[leaf] = value
  workdir = str(tmp_path_factory.mktemp("run"))
  train.run(config, workdir)
  return workdir


def read_json(path):
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def single_scale(trained):
  """evaluate.run with every default, and results.json's bytes from before it."""
  results_path = os.path.join(trained, workdirs.RESULTS_FILE)
  with open(results_path, "rb") as f:
    before = f.read()
  return evaluate.run(trained), before


def test_single_scale_reproduces_the_training_miou_exactly(trained, single_scale):
  evaluated, results_before = single_scale
  training = read_json(os.path.join(trained, workdirs.RESULTS_FILE))
  assert evaluated["miou"] == training["val/miou"]
  assert evaluated["iou_per_class"] == training["val/iou_per_class"]
  assert evaluated["pixel_accuracy"] == training["val/pixel_accuracy"]
  assert evaluated["step"] == training["step"] == 1
  assert evaluated["class_names"] == training["class_names"]
  with open(os.path.join(trained, workdirs.RESULTS_FILE), "rb") as f:
    assert f.read() == results_before  # results.json is never rewritten.
  written = read_json(os.path.join(trained, "eval_validation.json"))
  assert written == evaluated and set(written) == RESULT_KEYS
  assert (written["split"], written["scales"], written["flip"]) == ("validation", [1.0], False)
  assert written["inference"].startswith("as training")


def test_windows_at_single_scale_score_like_the_training_evaluation(trained):
  """The sliding-window path (softmax, host-side confusion) agrees with eval_step's argmax."""
  model = inference.restore(trained)
  config = evaluate.eval_config(model.config, None)
  source = datasets.load_source(config)
  np.testing.assert_array_equal(
      evaluate.confusion_by_windows(model, source, config, scales=(1.0,), flip=False,
                                    batch_size=config.eval_batch_size, window_stride=2 / 3),
      evaluate.confusion_as_training(model, source, config))


def labeled_pixels(workdir, split):
  """Pixels of `split` that carry a class: each must be scored exactly once."""
  config = evaluate.eval_config(workdirs.read_config(workdir), split)
  source = datasets.load_source(config)
  return sum(int(np.sum(example["mask"] != 255))
             for example in source.eval.as_numpy_iterator())


def test_multi_scale_and_flip_on_another_split_write_their_own_file(trained):
  evaluated = evaluate.run(trained, split="train", scales=(0.75,), flip=True)
  written = read_json(os.path.join(trained, "eval_train.json"))
  assert written == evaluated
  assert (written["split"], written["scales"], written["flip"]) == ("train", [0.75], True)
  assert written["inference"].startswith("sliding windows")
  assert 0.0 <= written["miou"] <= 1.0
  assert sum(written["pixels_per_class"]) == labeled_pixels(trained, "train")


def with_unknown_image_sizes(source):
  """The source with its eval images' static shape erased, as VOC's or COCO's variable sizes are:
  the eval stream then only finds an image too large when it reads it."""
  examples = list(source.eval.as_numpy_iterator())
  signature = {"id": tf.TensorSpec([], tf.string),
               "image": tf.TensorSpec([None, None, 3], tf.uint8),
               "mask": tf.TensorSpec([None, None, 1], tf.uint8)}
  dataset = tf.data.Dataset.from_generator(
      lambda: ({key: example[key] for key in signature} for example in examples),
      output_signature=signature)
  return dataclasses.replace(source, eval=dataset)


def test_images_larger_than_the_eval_crop_are_evaluated_in_windows(trained, single_scale,
                                                                   tmp_path, monkeypatch):
  """96 px images, a 65 px eval crop: the training's evaluation would refuse them."""
  workdir = str(tmp_path / "small_crop")
  shutil.copytree(trained, workdir)
  config = read_json(os.path.join(workdir, workdirs.CONFIG_FILE))
  config["eval_crop_size"] = 65
  workdirs.write_json(os.path.join(workdir, workdirs.CONFIG_FILE), config)
  small_crop_config = workdirs.read_config(workdir)
  static = datasets.load_source(small_crop_config)
  assert evaluate.larger_than_crop_by_shape(static.eval, small_crop_config)

  load_source = datasets.load_source
  monkeypatch.setattr(datasets, "load_source",
                      lambda config: with_unknown_image_sizes(load_source(config)))
  evaluated = evaluate.run(workdir, window_stride=0.5)
  assert evaluated["inference"].startswith("sliding windows of the eval crop 65")
  assert evaluated["pixels_per_class"] == single_scale[0]["pixels_per_class"]


@pytest.fixture
def evaluate_flags():
  """evaluate's flags, defined for one test: predict.py and main.py define the same names."""
  before = set(flags.FLAGS)
  evaluate.define_flags()
  yield flags.FLAGS
  for name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()


def test_command_line_prints_the_table_for_an_older_checkpoint(trained, evaluate_flags, capsys,
                                                               tmp_path):
  other = str(tmp_path / "copy")
  shutil.copytree(trained, other)
  evaluate_flags(["evaluate", f"--workdir={other}",
                  f"--checkpoint={os.path.join(trained, 'checkpoints', '1')}"])
  evaluate.main(["evaluate"])
  table = capsys.readouterr().out
  assert "background" in table and "mIoU" in table and "pixels" in table
  written = read_json(os.path.join(other, "eval_validation.json"))
  assert written["checkpoint"] == os.path.join(trained, "checkpoints", "1")
  with pytest.raises(ValueError, match="comma-separated"):
    inference.parse_scales("1.0,big")
