"""Acceptance of issue 23: the paper's command as a user types it,

  python -m pseudoseg_jax.main --config=configs/voc_pseudoseg.py:split=92 --workdir=W

on a VOC tree, with DeepLab's Xception-65 ImageNet weights served by name from 127.0.0.1, starts
training with every backbone tensor loaded and the paper's own 92 labeled ids. The run is killed
once it says training starts (about 45 s in on 2 CPU cores): its first step, an Xception-65
PseudoSeg step to compile, takes 105 s more there even at these sizes, and what is checked here is
all decided before it.
"""

import json
import os
import pathlib
import sys

import numpy as np
from PIL import Image

from pseudoseg_jax import workdirs
from pseudoseg_jax.convert import named_weights
from pseudoseg_jax.data import datasets

from test_folder import run_watching_for
from test_named_weights import Server, make_xception_archive
from test_xception import deeplab_backbone_shapes

ROOT = pathlib.Path(__file__).resolve().parent.parent
LISTS = ROOT / "pseudoseg_jax" / "splits" / "pascal_voc"
# The paper's first 1/16 draw of the 1,464 VOC train images, as the original's README trains it
# (googleinterns/wss; pseudoseg_jax/splits/SOURCES.md): read here as a file, not through the code
# that picks it.
PAPER_92 = LISTS / "pseudoseg" / "16_clean_3.txt"
STARTS = "Training pseudoseg from step 0 to "
# Everything small but the backbone, which must stay DeepLab's Xception-65 to take its weights.
SMALL = {"batch_size": 2, "pseudoseg.unlabeled_batch_size": 2, "pseudoseg.fusion_group_size": 2,
         "crop_size": 33, "eval_crop_size": 33, "eval_batch_size": 2, "pseudoseg.cutout_size": 8,
         "model.aspp_channels": 16, "model.decoder_channels": 16, "model.low_level_channels": 8,
         "model.sgc_attention_dim": 8, "data.shuffle_buffer": 4, "image_summary_every": 0}


def read_ids(path: pathlib.Path) -> list[str]:
  return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def write_example(voc_root: pathlib.Path, mask_dir: pathlib.Path, example_id: str, seed: int):
  """A 24 x 32 JPEG and its mask (background, one class, a void band)."""
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(
      voc_root / "JPEGImages" / f"{example_id}.jpg")
  mask = np.zeros((24, 32), np.uint8)
  mask[6:18, 8:24] = 1 + seed % 20
  mask[5, :] = 255
  Image.fromarray(mask, mode="L").save(mask_dir / f"{example_id}.png")


def make_voc_tree(root: pathlib.Path) -> dict[str, list[str]]:
  """VOCdevkit/VOC2012 whose train list is the paper's 92 ids and 4 more, 2 val ids, and a
  SegmentationClassAug folder with 2 SBD-only ids; returns the ids of each part."""
  paper = read_ids(PAPER_92)
  train_1464 = read_ids(LISTS / "classic" / "1464.txt")
  ids = {"paper": paper,
         "more_train": [i for i in train_1464 if i not in paper][:4],
         "val": read_ids(LISTS / "val.txt")[:2],
         "sbd_only": [i for i in read_ids(LISTS / "train_aug.txt") if i not in train_1464][:2]}
  voc_root = root / "VOCdevkit" / "VOC2012"
  masks, aug_masks = voc_root / "SegmentationClass", root / "SegmentationClassAug"
  lists = voc_root / "ImageSets" / "Segmentation"
  for folder in (voc_root / "JPEGImages", masks, aug_masks, lists):
    folder.mkdir(parents=True)
  train = ids["paper"] + ids["more_train"]
  for seed, example_id in enumerate(train + ids["val"] + ids["sbd_only"]):
    write_example(voc_root, aug_masks if example_id in ids["sbd_only"] else masks, example_id, seed)
  for split, split_ids in (("train", train), ("val", ids["val"])):
    (lists / f"{split}.txt").write_text(
        "".join(f"{i}\n" for i in split_ids))
  return ids


def test_the_paper_command_starts_training_on_the_published_92_with_every_backbone_tensor(
    tmp_path):
  ids = make_voc_tree(tmp_path / "manual")
  assert len(ids["paper"]) == 92 and len(set(ids["paper"])) == 92
  server = Server()
  try:
    server.files[named_weights.NAMED["xception65_imagenet"].file_name] = make_xception_archive(
        tmp_path / "archive")
    workdir = tmp_path / "W"
    args = [sys.executable, "-m", "pseudoseg_jax.main",
            "--config=configs/voc_pseudoseg.py:split=92", f"--workdir={workdir}",
            f"--config.data.manual_dir={tmp_path / 'manual'}",
            f"--config.data.data_dir={tmp_path / 'tfds'}"]
    args += [f"--config.{name}={value}" for name, value in SMALL.items()]
    env = {**os.environ, named_weights.CACHE_ENV: str(tmp_path / "cache"),
           named_weights.MIRROR_ENV: server.url}
    _, output, seen = run_watching_for(args, STARTS, timeout=240, stop_there=True, env=env)
    started = seen is not None
  finally:
    server.close()
  assert started, output[-4000:]
  assert server.requests == 1
  # Every tensor of DeepLab's xception_65 (its logits and the heads' variables in the archive left
  # out): load_backbone maps all or nothing, and this count is what it mapped.
  assert (f"Backbone initialized from xception65_imagenet ({len(deeplab_backbone_shapes())} "
          f"tensors)") in output, output[-4000:]
  assert len(deeplab_backbone_shapes()) == 660
  # The unlabeled pool is all of train_aug (the classic protocol keeps the labeled images in it).
  train_aug = len(ids["paper"]) + len(ids["more_train"]) + len(ids["sbd_only"])
  assert f"(pool of {train_aug})" in output

  # The labeled images: the run's config names the paper's list, and it labels exactly its ids.
  saved = json.loads((workdir / workdirs.CONFIG_FILE).read_text())
  assert saved["model"]["init_from"] == "xception65_imagenet"
  assert saved["model"]["backbone"] == "xception65"
  data = saved["data"]
  assert (data["num_labeled"], data["labeled_fraction"]) == (0, 0.0)  # No draw.
  assert read_ids(pathlib.Path(data["labeled_list"])) == ids["paper"]
  source = datasets.load_source(workdirs.config_from_dict(saved))
  labeled = [example["id"].decode() for example in source.labeled.as_numpy_iterator()]
  assert source.num_labeled == 92 and sorted(labeled) == sorted(ids["paper"])
