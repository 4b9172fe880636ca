"""The speed benchmarks (benchmarks/train_step.py, input_pipeline.py) run end to end at tiny sizes
and report sane figures; XLA's FLOP count, which their FLOP/s rest on, meets known answers; the
label-scarce benchmark's ablations name real config fields and values the config accepts."""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pseudoseg_jax import config as config_lib

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks")
sys.path.insert(0, BENCHMARKS)  # The scripts import their shared helpers as `common`.
import common  # noqa: E402
import conv_kernels  # noqa: E402
import input_pipeline  # noqa: E402
import label_scarce  # noqa: E402
import pseudoseg_vs_supervised  # noqa: E402
import train_step  # noqa: E402

sys.path.remove(BENCHMARKS)

TINY_MODEL = ["--backbone=resnet_tiny", "--head=config", "--set", "model.aspp_channels=16",
              "--set", "model.decoder_channels=16", "--set", "model.low_level_channels=8",
              "--set", "model.sgc_attention_dim=8", "--devices=1"]


def printed_line(capsys) -> dict:
  lines = capsys.readouterr().out.strip().splitlines()
  return json.loads(lines[-1])


# ---------------------------------------------------------------- XLA's FLOP count
def test_a_matmul_counts_2n3_flops_and_its_peak_is_measured():
  peak = common.matmul_peak("float32", (128, 256), repeats=2)
  assert [run["xla_flops"] for run in peak["matmul_runs"]] == [2 * 128**3, 2 * 256**3]
  assert peak["matmul_peak_flops_per_s"] == max(run["flops_per_s"] for run in peak["matmul_runs"])
  assert peak["matmul_peak_flops_per_s"] > 1e8


@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 3)])
def test_a_convolution_counts_its_multiply_adds_twice(stride, dilation):
  """2 N Ho Wo Cout Cin Kh Kw, strided and dilated (ASPP) alike: the step's FLOPs are mostly
  convolutions, so a backend that hid them (a custom call counted as 0) would fail here."""
  images = jnp.ones((2, 17, 17, 8), jnp.float32)
  kernel = jnp.ones((3, 3, 8, 16), jnp.float32)

  def conv(x, w, padding="VALID"):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                        rhs_dilation=(dilation, dilation),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  compiled = jax.jit(conv).lower(images, kernel).compile()
  out_side = (17 - 2 * dilation - 1) // stride + 1
  nominal = 2 * 2 * out_side**2 * 16 * 8 * 9
  assert common.cost_entry(compiled, "flops") == nominal
  # With padding, XLA counts only the taps that land on the image, not those on the zeros.
  padded = jax.jit(lambda x, w: conv(x, w, "SAME")).lower(images, kernel).compile()
  padded_side = -(-17 // stride)
  assert common.cost_entry(padded, "flops") < 2 * 2 * padded_side**2 * 16 * 8 * 9


def test_cost_entry_reads_a_dict_or_a_list_of_dicts():
  class Compiled:
    def __init__(self, analysis):
      self.analysis = analysis

    def cost_analysis(self):
      return self.analysis

  assert common.cost_entry(Compiled({"flops": 5.0}), "flops") == 5.0
  assert common.cost_entry(Compiled([{"flops": 5.0}, {"flops": 2.0}]), "flops") == 7.0
  assert common.cost_entry(Compiled(None), "flops") is None
  assert common.cost_entry(Compiled({"bytes accessed": 1.0}), "flops") is None


# ---------------------------------------------------------------- train_step.py
def test_train_step_benchmark_reports_the_step_against_the_peak(capsys):
  # The supervised step: PseudoSeg's compiles for a minute on 2 cores even at this size (the
  # batch it gets is checked below; the benchmark code is the same for both).
  result = train_step.main(TINY_MODEL + ["--method=supervised", "--crop=33", "--labeled=2",
                                         "--steps=2", "--warmup=1", "--matmul_sizes=128",
                                         "--matmul_repeats=2"])
  assert printed_line(capsys) == json.loads(json.dumps(result))
  assert result["method"] == "supervised" and result["backbone"] == "resnet_tiny"
  assert result["batch"]["image"] == "float32[2,33,33,3]"
  assert result["batch"]["mask"] == "int32[2,33,33]"
  assert len(result["step_seconds"]) == 2
  assert 0 < result["min_step_seconds"] <= result["median_step_seconds"]
  # Known answers, not the benchmark's own arithmetic again: XLA's count for a 128^3 matmul, and
  # the derived rates present and positive.
  assert result["xla_flops_per_step"] > 1e7
  assert result["matmul_runs"][0]["xla_flops"] == 2 * 128**3
  for derived in ("images_per_s", "achieved_flops_per_s", "fraction_of_matmul_peak"):
    assert result[derived] > 0, derived
  assert result["compile_seconds"] > 0 and result["lower_seconds"] > 0
  assert result["max_rss_bytes"] > 1e8 and result["xla_total_bytes"] > 0
  assert np.isfinite(result["final_loss"])
  assert "speedup_vs_peer" not in result  # Only in the peer's own setting.
  assert result["platform"] == "cpu" and result["usable_cpu_cores"] >= 1


def test_the_pseudoseg_step_gets_the_trainers_batch():
  config = common.benchmark_config(common.load_config("configs/demo.py"), backbone="resnet_tiny",
                                   crop=33, labeled=2, unlabeled=2, head="config")
  batch = train_step.one_batch(config, common.make_mesh(1))
  assert common.shapes_of(batch) == {
      "labeled/image": "float32[2,33,33,3]", "labeled/image_labels": "float32[2,20]",
      "labeled/mask": "int32[2,33,33]", "labeled/valid": "int32[2,33,33]",
      "unlabeled/image_labels": "float32[2,20]", "unlabeled/mask": "int32[2,33,33]",
      "unlabeled/strong_image": "float32[2,33,33,3]", "unlabeled/valid": "int32[2,33,33]",
      "unlabeled/weak_image": "float32[2,33,33,3]"}


def test_the_benchmark_config_is_the_standard_deeplab_at_the_requested_size():
  base = common.load_config("configs/demo.py")
  config = common.benchmark_config(base, backbone="resnet101", crop=513, labeled=8, unlabeled=6,
                                   dtype="bfloat16", output_stride=8)
  model = config.model
  assert (model.backbone, model.output_stride, model.dtype) == ("resnet101", 8, "bfloat16")
  assert (model.aspp_channels, model.decoder_channels, model.low_level_channels) == (256, 256, 48)
  assert tuple(model.aspp_rates) == (12, 24, 36)  # 6/12/18 at output stride 16, doubled at 8.
  assert (config.batch_size, config.pseudoseg.unlabeled_batch_size) == (8, 6)
  assert config.pseudoseg.fusion_group_size == 2  # The demo's 4 does not divide 6.
  assert config.crop_size == 513 and config.pseudoseg.cutout_size == 100
  kept = common.benchmark_config(base, backbone="resnet_tiny", crop=97, labeled=2, unlabeled=2,
                                 head="config", optimizer="adam",
                                 overrides=["model.aspp_channels=32", "optimizer.name=sgd"])
  assert kept.model.aspp_channels == 32 and kept.model.decoder_channels == 64  # The demo's.
  assert kept.optimizer.name == "sgd"
  assert common.benchmark_config(base, backbone="resnet50", crop=321, labeled=2, unlabeled=2,
                                 optimizer="config").optimizer.name == "adam"  # The demo's.
  assert config.optimizer.name == "sgd"  # By default SPEC 7's, and the peer's.
  with pytest.raises(ValueError, match="model.backbone"):
    common.benchmark_config(base, backbone="resnet18", crop=321, labeled=2, unlabeled=2)


def test_the_peer_is_compared_only_in_its_own_setting():
  args = train_step.parse_args([])
  assert args.backbone == "resnet50" and (args.crop, args.labeled, args.unlabeled) == (321, 2, 2)
  compared = train_step.peer_comparison(args, "cpu", 7.6)
  assert compared["peer_seconds_per_step"] == 15.2 and compared["speedup_vs_peer"] == 2.0
  assert compared["peer_timed_on"] == "the issue's machine"
  timed_here = train_step.peer_comparison(train_step.parse_args(["--peer_seconds=8.1"]), "cpu", 5.4)
  assert timed_here["speedup_vs_peer"] == pytest.approx(1.5)
  assert timed_here["peer_timed_on"] == "this machine (--peer_seconds)"
  assert train_step.peer_comparison(args, "gpu", 7.6) == {}
  assert train_step.peer_comparison(train_step.parse_args(["--crop=513"]), "cpu", 7.6) == {}
  assert train_step.peer_comparison(train_step.parse_args(["--optimizer=adam"]), "cpu", 7.6) == {}
  assert train_step.peer_comparison(argparse.Namespace(**{**vars(args), "overrides": ["x=1"]}),
                                    "cpu", 7.6) == {}


# ---------------------------------------------------------------- input_pipeline.py
def test_input_pipeline_benchmark_reports_rates_and_the_wait(capsys, monkeypatch, sample_data_dir):
  # The benchmark's own knob for where its VOC photos are: here the copies under tests/data.
  monkeypatch.delenv("PSEUDOSEG_SAMPLE_PHOTOS", raising=False)  # The default: tests/data.
  result = input_pipeline.main(["--crop=65", "--labeled=2", "--unlabeled=2", "--batches=2",
                                "--warmup=1", "--num_images=4", "--threads=1,0",
                                "--step_seconds=0.05", "--wait_steps=3", "--wait_warmup=1",
                                "--devices=1"])
  assert printed_line(capsys) == json.loads(json.dumps(result))
  assert result["images"].startswith("4 copies of 3 genuine VOC 2012 photos")
  for stream in ("unlabeled", "labeled", "decode"):
    for threads in ("threads_1", "threads_default"):
      assert result[f"{stream}_{threads}_items_per_s"] > 0
      assert result[f"{stream}_{threads}_cpu_seconds_per_item"] > 0
  assert result["unlabeled_pairs_per_s_per_core"] == result["unlabeled_threads_1_items_per_s"]
  assert result["labeled_samples_per_s_per_core"] == result["labeled_threads_1_items_per_s"]
  assert 0 <= result["input_wait_fraction"] <= 1 and 0 <= result["transfer_fraction"] <= 1
  assert result["median_loop_step_seconds"] >= 0.05
  assert result["cutout_size"] == round(65 * 100 / 513)


def test_generated_photos_stand_in_when_the_sample_is_missing(tmp_path):
  photos = input_pipeline.generated_photos(str(tmp_path / "photos"), count=2)
  input_pipeline.write_folder(str(tmp_path / "folder"), photos, num_images=3)
  images = sorted(os.listdir(tmp_path / "folder" / "images"))
  assert images == ["train_00000.jpg", "train_00001.jpg", "train_00002.jpg", "val_00000.jpg"]
  assert (tmp_path / "folder" / "splits" / "val.txt").read_text() == "val_00000\n"
  from pseudoseg_jax.data.datasets import label_files
  mask = label_files.read_index_mask(str(tmp_path / "folder" / "masks" / "train_00001.png"))
  assert set(np.unique(mask)) == {0, 2, 255}  # Indices, not palette colours.


def test_conv_kernels_benchmark_times_both_formulations_of_a_layer(capsys):
  result = conv_kernels.main(["--layers=stage3_1x1", "--repeats=1"])
  assert printed_line(capsys) == json.loads(json.dumps(result))
  layer = result["layers"]["stage3_1x1"]
  for formulation in ("xla", "ours"):
    for part in ("forward", "input_gradient", "kernel_gradient"):
      assert layer[formulation][part]["seconds"] > 0
  # The same useful work either way: a 1x1 convolution's 2 * N*H*W * C_in * C_out per pass.
  assert layer["ours"]["forward"]["xla_flops"] == layer["xla"]["forward"]["xla_flops"] \
      == 2 * 2 * 21 * 21 * 1024 * 256
  assert layer["speedup_of_forward_and_gradients"] > 0
  with pytest.raises(SystemExit, match="unknown"):
    conv_kernels.main(["--layers=nope"])


@pytest.mark.parametrize("ablation", sorted(label_scarce.ABLATIONS))
def test_label_scarce_ablations_are_valid_configs(ablation):
  config = config_lib.base_config()
  config.method = "pseudoseg"
  for field, value in label_scarce.ABLATIONS[ablation].items():
    section, name = field.split(".")
    assert name in config[section], f"{ablation}: {field} is not a config field"
    config[section][name] = value
  config_lib.validate(config)


def test_label_scarce_refuses_an_unknown_row_by_name(monkeypatch, tmp_path, capsys):
  monkeypatch.setattr(sys, "argv", ["label_scarce.py", f"--out={tmp_path}", f"--root={tmp_path}",
                                    "--runs=supervised,semi"])
  with pytest.raises(SystemExit):
    label_scarce.main()
  assert "--runs: unknown semi" in capsys.readouterr().err
  assert not os.listdir(tmp_path)  # Refused before anything ran.


def test_demo_benchmark_refuses_an_unknown_row_by_name(monkeypatch, tmp_path, capsys):
  out = tmp_path / "out"
  monkeypatch.setattr(sys, "argv", ["pseudoseg_vs_supervised.py", f"--out={out}",
                                    "--runs=pseudoseg,weak"])
  with pytest.raises(SystemExit):
    pseudoseg_vs_supervised.main()
  assert "--runs: unknown weak; known: supervised, pseudoseg, image_labels" in capsys.readouterr().err
  assert not out.exists()  # Refused before anything ran.


def write_finished_run(out, name: str, seed: int, miou: float) -> None:
  """The workdir a finished demo-benchmark run leaves under `out`, as --report_only reads it."""
  workdir = out / pseudoseg_vs_supervised.run_name(name, seed)
  workdir.mkdir()
  (workdir / "results.json").write_text(json.dumps({"step": 10, "val/miou": miou}))
  (workdir / "metrics.jsonl").write_text(json.dumps({"step": 10}) + "\n")


def test_demo_benchmark_reports_only_the_chosen_rows(monkeypatch, tmp_path, capsys):
  """--runs with --report_only tabulates the finished runs of the chosen rows and no others."""
  for name in ("supervised", "pseudoseg (image-level labels)"):
    write_finished_run(tmp_path, name, 0, 0.5)
  monkeypatch.setattr(sys, "argv", ["pseudoseg_vs_supervised.py", f"--out={tmp_path}",
                                    "--seeds=0", "--only=main", "--runs=image_labels",
                                    "--report_only"])
  pseudoseg_vs_supervised.main()
  table = capsys.readouterr().out
  assert "| pseudoseg (image-level labels) | 1 | 50.0 | - |" in table  # No supervised run chosen.
  assert "| supervised |" not in table


def test_demo_benchmark_reports_the_reference_row_alone(monkeypatch, tmp_path, capsys):
  write_finished_run(tmp_path, "supervised, every train image labeled", 0, 0.6)
  monkeypatch.setattr(sys, "argv", ["pseudoseg_vs_supervised.py", f"--out={tmp_path}",
                                    "--seeds=0", "--only=reference", "--report_only"])
  pseudoseg_vs_supervised.main()
  assert "| supervised, every train image labeled | 1 | 60.0 | - |" in capsys.readouterr().out


def test_demo_benchmark_gain_is_paired_per_seed(monkeypatch, tmp_path, capsys):
  mious = {("supervised", 0): 0.40, ("supervised", 1): 0.50,
           ("pseudoseg (image-level labels)", 0): 0.46, ("pseudoseg (image-level labels)", 1): 0.54}
  for (name, seed), miou in mious.items():
    write_finished_run(tmp_path, name, seed, miou)
  monkeypatch.setattr(sys, "argv", ["pseudoseg_vs_supervised.py", f"--out={tmp_path}",
                                    "--seeds=0,1", "--only=main", "--report_only"])
  pseudoseg_vs_supervised.main()
  table = capsys.readouterr().out
  # Gains 6 and 4 points: mean 5.0, sample std 1.4; the unlabeled row has no runs, so no line.
  assert "| pseudoseg (image-level labels) | 2 | 50.0 ± 5.7 (46.0, 54.0) | 5.0 ± 1.4 (6.0, 4.0) |" in table
  assert "| supervised | 2 | 45.0 ± 7.1 (40.0, 50.0) | - |" in table
  assert "unlabeled" not in table.split("\n", 1)[1]


def test_demo_benchmark_rows_are_the_users_commands(monkeypatch, tmp_path):
  """Each main row trains the config a user gets from the same config arguments, so a config
  that picks its recipe by them (configs/demo.py by weak_labels) is measured as users run it."""
  commands = {}
  monkeypatch.setattr(pseudoseg_vs_supervised, "train_run",
                      lambda workdir, name, config_arg, fields, **_:
                      commands.setdefault(name, (config_arg, fields)))
  args = argparse.Namespace(config="configs/demo.py", num_labeled=20, steps=1000,
                            report_only=False)
  for name, config_args in pseudoseg_vs_supervised.MAIN_RUNS.items():
    pseudoseg_vs_supervised.train(str(tmp_path), name, config_args, 1, args)
  config_arg, fields = commands["pseudoseg (image-level labels)"]
  assert fields == {"seed": 1}
  assert (common.load_config(config_arg).to_dict() ==
          common.load_config("configs/demo.py:weak_labels=true").to_dict())  # README command 1.
  unlabeled = common.load_config(commands["pseudoseg (unlabeled)"][0])
  assert unlabeled.to_dict() == common.load_config("configs/demo.py").to_dict()
  assert common.load_config(commands["supervised"][0]).method == "supervised"


@pytest.mark.parametrize("ablation", sorted(pseudoseg_vs_supervised.ABLATIONS))
def test_demo_benchmark_ablations_are_valid_configs(ablation):
  config = common.load_config("configs/demo.py:weak_labels=false")
  common.apply_overrides(config, [f"{field}={value}" for field, value in
                                  pseudoseg_vs_supervised.ABLATIONS[ablation].items()])
  config_lib.validate(config)  # Refuses a field the config does not have, by name.
