"""configs/folder.py preset=cpu: the recommended CPU recipe, and one PseudoSeg step of it (demo
sized) on the pretrained-architecture EfficientNet-Lite0 with its frozen blocks, mean teacher,
CutMix and class-balanced hard labels."""

import functools

import jax
import numpy as np
import pytest

from configs import folder as folder_config
from pseudoseg_jax import config as config_lib
from pseudoseg_jax import steps
from tests.test_folder import CLASSES, generated_pair, write_lines

CROP = 33


@pytest.fixture(scope="module")
def preset_config(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder")
  from PIL import Image
  for index in range(3):
    image, mask = generated_pair(index)
    (root / "images").mkdir(exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{index}.png")
    Image.fromarray(mask).save(root / "masks" / f"{index}.png")
  write_lines(str(root / "splits" / "val.txt"), ["2"])
  write_lines(str(root / "classes.txt"), CLASSES)
  return folder_config.get_config(f"root={root},preset=cpu")


def test_cpu_preset_is_the_pretrained_light_recipe(preset_config):
  config = preset_config
  config_lib.validate(config)
  assert config.model.backbone == "efficientnet_lite0"
  assert config.model.init_from == "efficientnet_lite0_imagenet"
  assert config.model.frozen_backbone_blocks == 8
  assert config.pseudoseg.teacher == "ema"
  assert config.pseudoseg.cutmix_probability > 0 and config.pseudoseg.class_balanced_fraction > 0
  assert config.pseudoseg.batch_stats_from == "labeled"
  assert config.crop_size % 32 == 1  # Where 'SAME' padding equals the model's symmetric padding.
  # The schedule label_scarce.py measured, and a ramp-up over its first fifth whatever steps=N.
  assert (config.total_steps, config.pseudoseg.consistency_rampup_steps) == (500, 100)
  shorter = folder_config.get_config(f"root={config.data.root},preset=cpu,steps=250")
  assert (shorter.total_steps, shorter.pseudoseg.consistency_rampup_steps) == (250, 50)


def test_unknown_preset_is_refused(preset_config):
  with pytest.raises(ValueError, match="preset='laptop'"):
    folder_config.get_config(f"root={preset_config.data.root},preset=laptop")


def demo_sized_batch(seed, size):
  rng = np.random.default_rng(seed)
  image = lambda: rng.uniform(-1, 1, (size, CROP, CROP, 3)).astype(np.float32)  # noqa: E731
  mask = rng.integers(0, len(CLASSES), (size, CROP, CROP)).astype(np.int32)
  valid = np.ones((size, CROP, CROP), np.int32)
  labels = (rng.uniform(size=(size, len(CLASSES) - 1)) < 0.5).astype(np.float32)
  return {"labeled": {"image": image(), "mask": mask, "valid": valid, "image_labels": labels},
          "unlabeled": {"weak_image": image(), "strong_image": image(), "valid": valid,
                        "mask": mask, "image_labels": labels}}


def test_a_pseudoseg_step_of_the_preset_trains_only_the_unfrozen_layers(preset_config):
  config = preset_config.copy_and_resolve_references()
  config.crop_size = config.eval_crop_size = CROP
  config.batch_size = config.pseudoseg.unlabeled_batch_size = 4
  config.model.init_from = ""  # Random weights: the step, not the ImageNet file, is tested here.
  config_lib.validate(config)
  graphdef, _, state = steps.create_train_state(config, 0)
  step = jax.jit(functools.partial(steps.train_step, graphdef=graphdef, config=config))
  new_state, metrics = step(state, demo_sized_batch(0, 4))
  assert bool(metrics["train/all_finite"])
  assert float(metrics["train/consistency_loss"]) >= 0
  frozen = steps.frozen_parameter_mask(8, state.params)
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         state.params, new_state.params)
  pairs = list(zip(jax.tree.leaves(frozen), jax.tree.leaves(changed)))
  assert sum(f for f, _ in pairs) > 0
  assert not any(c for f, c in pairs if f), "a frozen backbone layer moved"
  assert all(c for f, c in pairs if not f), "a trainable layer did not move"
  # The frozen blocks' running statistics stay the pretrained ones (inference-mode batch norm).
  old_stats, new_stats = state.batch_stats["backbone"], new_state.batch_stats["backbone"]
  for name in ("stem_bn",):
    np.testing.assert_array_equal(old_stats[name]["mean"], new_stats[name]["mean"])
  np.testing.assert_array_equal(old_stats["blocks"][7]["project_bn"]["mean"],
                                new_stats["blocks"][7]["project_bn"]["mean"])
  assert np.any(old_stats["blocks"][8]["project_bn"]["mean"]
                != new_stats["blocks"][8]["project_bn"]["mean"])
