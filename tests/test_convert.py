"""Loading backbone weights: all tensors or nothing, named errors, the converter CLI, init_from."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from pseudoseg_jax import config as config_lib
from pseudoseg_jax import convert, steps, train
from pseudoseg_jax.convert import __main__ as convert_cli

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def tiny_config():
  config = config_lib.base_config()
  config.model.backbone = "resnet_tiny"
  config.model.aspp_channels = 8
  config.model.decoder_channels = 8
  config.model.low_level_channels = 8
  config.model.sgc_attention_dim = 8
  return config


@pytest.fixture(scope="module")
def fresh():
  """(config, graphdef, tx, state) of a freshly initialized tiny model."""
  config = tiny_config()
  graphdef, tx, state = steps.create_train_state(config, seed=0)
  return config, graphdef, tx, jax.device_get(state)


def pretrained_like(state, seed=1):
  """Backbone weights that differ from `state`'s: another seed's values, same names and shapes."""
  flat = {**convert.flatten(state.params["backbone"]),
          **convert.flatten(state.batch_stats["backbone"])}
  rng = np.random.default_rng(seed)
  return {name: rng.normal(size=np.shape(value)).astype(np.float32) for name, value in flat.items()}


def test_load_backbone_replaces_exactly_the_backbone(fresh):
  _, _, _, state = fresh
  weights = pretrained_like(state)
  params, stats = convert.load_backbone(state.params, state.batch_stats, weights, source="w")
  np.testing.assert_array_equal(params["backbone"]["layer1"][0]["conv2"]["kernel"],
                                weights["layer1/0/conv2/kernel"])
  np.testing.assert_array_equal(stats["backbone"]["bn1"]["var"], weights["bn1/var"])
  loaded = {**convert.flatten(params["backbone"]), **convert.flatten(stats["backbone"])}
  assert sorted(loaded) == sorted(weights)
  assert all(np.array_equal(loaded[name], weights[name]) for name in weights)
  # The heads are untouched.
  for head in ("aspp", "decoder", "cls_head", "sgc"):
    jax.tree.map(np.testing.assert_array_equal, params[head], state.params[head])


def test_mapping_errors_name_every_offending_tensor(fresh):
  _, _, _, state = fresh
  weights = pretrained_like(state)
  del weights["layer2/0/downsample/bn/mean"]
  weights["fc/weight"] = np.zeros((10, 512), np.float32)
  weights["layer1/0/conv1/kernel"] = np.zeros((1, 1, 3, 3), np.float32)
  with pytest.raises(ValueError) as error:
    convert.load_backbone(state.params, state.batch_stats, weights, source="file.npz")
  message = str(error.value)
  assert "file.npz" in message and "nothing was loaded" in message
  assert "missing (1): layer2/0/downsample/bn/mean" in message
  assert "unexpected (1): fc/weight" in message
  assert "shape mismatch: layer1/0/conv1/kernel: file (1, 1, 3, 3), model (1, 1, 16, 16)" in message


def test_npz_round_trip_and_format_detection(fresh, tmp_path):
  config, _, _, state = fresh
  weights = pretrained_like(state)
  convert.save_npz(str(tmp_path / "w.npz"), weights)
  read = convert.read_weights(str(tmp_path / "w.npz"), config.model)
  assert sorted(read) == sorted(weights)
  assert all(np.array_equal(read[name], weights[name]) for name in weights)
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    convert.read_weights(str(tmp_path / "nope.npz"), config.model)
  (tmp_path / "w.onnx").write_bytes(b"x")
  with pytest.raises(ValueError, match="unknown format"):
    convert.read_weights(str(tmp_path / "w.onnx"), config.model)


def test_init_from_loads_the_backbone_at_step_zero(fresh, tmp_path):
  config, _, tx, state = fresh
  weights = pretrained_like(state)
  convert.save_npz(str(tmp_path / "w.npz"), weights)
  config = tiny_config()
  config.model.init_from = str(tmp_path / "w.npz")
  initialized = train.with_pretrained_backbone(state, tx, config.model)
  np.testing.assert_array_equal(initialized.params["backbone"]["conv1"]["kernel"],
                                weights["conv1/kernel"])
  np.testing.assert_array_equal(initialized.batch_stats["backbone"]["bn1"]["mean"],
                                weights["bn1/mean"])
  assert int(initialized.step) == 0


def test_converter_cli_writes_a_checked_npz_and_keeps_existing_files(fresh, tmp_path):
  _, _, _, state = fresh
  weights = pretrained_like(state)
  convert.save_npz(str(tmp_path / "in.npz"), weights)
  config = tiny_config()
  assert convert_cli.convert_file(config, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")) == (
      len(weights))
  with pytest.raises(ValueError, match="exists; pass --overwrite"):
    convert_cli.convert_file(config, str(tmp_path / "in.npz"), str(tmp_path / "out.npz"))
  del weights["bn1/scale"]
  convert.save_npz(str(tmp_path / "partial.npz"), weights)
  args = [sys.executable, "-m", "pseudoseg_jax.convert", "--config=configs/demo.py",
          f"--input={tmp_path / 'partial.npz'}", f"--output={tmp_path / 'never.npz'}"]
  completed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert completed.returncode == 1
  assert "missing (1): bn1/scale" in completed.stderr and "nothing was written" in completed.stderr
  assert not (tmp_path / "never.npz").exists()
