"""Config schema: unknown fields and impossible values are rejected with the field's name."""

import pytest

from pseudoseg_jax import config as config_lib
from configs import demo


def test_demo_config_is_valid_and_parses_its_arguments():
  config = demo.get_config("method=supervised,num_labeled=50,steps=10")
  config_lib.validate(config)
  assert (config.method, config.data.num_labeled, config.total_steps) == ("supervised", 50, 10)
  default = demo.get_config()
  config_lib.validate(default)
  assert default.method == "pseudoseg" and not default.pseudoseg.weak_labels
  assert demo.get_config("weak_labels=True").pseudoseg.weak_labels


def test_demo_pseudo_labels_come_from_the_decoder_only_without_image_level_labels():
  unlabeled = demo.get_config("steps=400").pseudoseg
  assert (unlabeled.pseudo_label_source, unlabeled.distribution_alignment_target,
          unlabeled.distribution_alignment_strength, unlabeled.consistency_rampup_steps,
          unlabeled.batch_stats_from) == ("decoder", "uniform", 0.5, 200, "labeled")
  assert unlabeled.distribution_alignment
  # With image-level labels the CAM knows the classes: the paper's fusion, the preset's remedies.
  weak = demo.get_config("steps=400,weak_labels=true").pseudoseg
  assert (weak.pseudo_label_source, weak.distribution_alignment, weak.consistency_rampup_steps,
          weak.batch_stats_from) == ("fusion", False, 80, "all")


@pytest.mark.parametrize("arg, message", [
    ("nmu_labeled=3", "Unknown demo.py argument 'nmu_labeled'"),
    ("steps", "must look like name=value"),
    ("weak_labels=maybe", "weak_labels='maybe' must be true or false"),
])
def test_demo_config_rejects_bad_arguments(arg, message):
  with pytest.raises(ValueError, match=message):
    demo.get_config(arg)


def test_unknown_field_is_named_with_a_suggestion():
  config = config_lib.base_config()
  config.optimizer.learning_rte = 0.1
  with pytest.raises(ValueError, match=r"'optimizer.learning_rte'.*'optimizer.learning_rate'"):
    config_lib.validate(config)


@pytest.mark.parametrize("field, value, message", [
    ("model.output_stride", 32, "output_stride must be 8 or 16, got 32"),
    ("crop_size", 16, r"crop_size=16 is too small for output stride 16.*>= 17"),
    ("eval_crop_size", 8, "eval_crop_size=8 is too small"),
    ("method", "fixmatch", "config.method must be one of"),
    ("total_steps", 0, "config.total_steps must be >= 1"),
    ("optimizer.name", "lamb", "config.optimizer.name must be one of"),
    ("pseudoseg.pseudo_label_source", "cam", "pseudo_label_source must be one of"),
    ("pseudoseg.fusion_group_size", 5, r"fusion_group_size=5 must be >= 1 and divide .*=64"),
    ("pseudoseg.gamma", 1.5, "gamma must be in"),
    ("pseudoseg.temperature", 0.0, "temperature must be > 0"),
    ("pseudoseg.confidence_threshold", 1.0, r"confidence_threshold must be in \[0, 1\)"),
    ("pseudoseg.cutout_size", -1, "cutout_size must be >= 0"),
    ("pseudoseg.color_jitter", (0.5, 0.5, 0.5), r"color_jitter must be 4 strengths"),
    ("pseudoseg.color_jitter", (0.5, 0.5, 0.5, 0.6), r"color_jitter: hue must be in \[0, 0.5\], got 0.6"),
    ("pseudoseg.color_jitter", (0.5, -0.1, 0.5, 0.2), r"color_jitter: contrast must be in"),
    ("pseudoseg.consistency_rampup_steps", -5, "consistency_rampup_steps must be >= 0"),
    ("model.sgc_attention_dim", 0, "sgc_attention_dim must be a positive int"),
])
def test_bad_values_are_named(field, value, message):
  config = config_lib.base_config()
  config.method = "pseudoseg"
  parent, _, leaf = field.rpartition(".")
  (config[parent] if parent else config)[leaf] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_crop_limit_follows_the_output_stride():
  config = config_lib.base_config()
  config.model.output_stride = 8
  config.crop_size = config.eval_crop_size = 9
  config_lib.validate(config)  # 9 -> ceil(9 / 8) = 2 positions: allowed at OS 8.
