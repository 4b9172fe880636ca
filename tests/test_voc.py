"""The VOC + SBD builder on VOC-layout trees made from the genuine samples in tests/data."""

import os
import shutil
import tarfile

import numpy as np
import pytest
import scipy.io
import tensorflow_datasets as tfds
from PIL import Image

from pseudoseg_jax import config as config_lib
from pseudoseg_jax.data import datasets
from pseudoseg_jax.data.datasets import label_files, voc

REAL_TRAIN_IDS = ("2011_000003", "2011_000006", "2011_000025")
# Ids of the SegmentationClassAug sample: VOC ids (with the void band) and SBD-only ones.
EXTRA_TRAIN_IDS = ("2007_000032", "2007_000033")
VAL_IDS = ("2007_000733", "2007_001960")
SBD_ONLY_IDS = ("2008_000002", "2008_000003", "2008_000007")
AUG_IDS = EXTRA_TRAIN_IDS + VAL_IDS + SBD_ONLY_IDS + ("2007_002142", "2007_002234")


def _photo_like(height, width, seed):
  """A JPEG-able stand-in photo for masks whose real photo is not in the samples."""
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _write_lines(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("".join(f"{line}\n" for line in lines))


def make_voc_tree(samples, root, *, mask_mode="P", augmented="folder"):
  """VOCdevkit/VOC2012 (3 real photos and masks + stand-ins) and the augmented masks."""
  voc_root = root / "VOCdevkit" / "VOC2012"
  sample_root = samples / "voc2012_mini" / "VOCdevkit" / "VOC2012"
  aug_sample = samples / "voc_segclassaug_masks" / "SegmentationClassAug"
  for folder in ("JPEGImages", "SegmentationClass"):
    os.makedirs(voc_root / folder)
  for example_id in REAL_TRAIN_IDS:
    shutil.copy(sample_root / "JPEGImages" / f"{example_id}.jpg", voc_root / "JPEGImages")
    shutil.copy(sample_root / "SegmentationClass" / f"{example_id}.png",
                voc_root / "SegmentationClass")
  for seed, example_id in enumerate(AUG_IDS):
    mask = Image.open(aug_sample / f"{example_id}.png")
    _photo_like(mask.height, mask.width, seed).save(voc_root / "JPEGImages" / f"{example_id}.jpg")
    if example_id in EXTRA_TRAIN_IDS + VAL_IDS:  # VOC has its own masks for train and val.
      shutil.copy(aug_sample / f"{example_id}.png", voc_root / "SegmentationClass")
  _write_lines(voc_root / "ImageSets" / "Segmentation" / "train.txt",
               REAL_TRAIN_IDS + EXTRA_TRAIN_IDS)
  _write_lines(voc_root / "ImageSets" / "Segmentation" / "val.txt", VAL_IDS)
  if augmented == "folder":
    aug_dir = root / "SegmentationClassAug"
    os.makedirs(aug_dir)
    for example_id in AUG_IDS:
      mask = Image.open(aug_sample / f"{example_id}.png")
      (mask if mask_mode == "P" else Image.fromarray(np.asarray(mask), mode="L")).save(
          aug_dir / f"{example_id}.png")
  elif augmented == "sbd":
    sbd = root / "benchmark_RELEASE" / "dataset"
    os.makedirs(sbd / "cls")
    sbd_ids = SBD_ONLY_IDS + ("2007_002142", "2007_002234")
    for example_id in sbd_ids:
      # SBD has no void band: its masks hold class indices only.
      mask = np.asarray(Image.open(aug_sample / f"{example_id}.png")).copy()
      mask[mask == 255] = 0
      write_sbd_mat(sbd / "cls" / f"{example_id}.mat", mask)
    _write_lines(sbd / "train.txt", sbd_ids[:3])
    _write_lines(sbd / "val.txt", sbd_ids[3:])
  return voc_root


def write_sbd_mat(path, mask):
  """The SBD cls/*.mat layout: struct GTcls with Boundaries, Segmentation, CategoriesPresent."""
  present = np.unique(mask[(mask > 0) & (mask < 255)]).astype(np.uint8)
  boundaries = np.empty((20, 1), dtype=object)  # A cell array of per-class edge maps.
  boundaries[:, 0] = [np.zeros((0, 0), np.uint8)] * 20
  scipy.io.savemat(path, {"GTcls": {"Boundaries": boundaries,
                                    "Segmentation": mask.astype(np.uint8),
                                    "CategoriesPresent": present}})


def prepare(root, data_dir, **kwargs):
  builder = voc.VocAug(data_dir=str(data_dir), **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  return builder


def read_split(builder, split):
  return {example["id"].decode(): example
          for example in builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator()}


@pytest.fixture(scope="module")
def voc_builder(sample_data_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("manual")
  make_voc_tree(sample_data_dir, root)
  return prepare(root, tmp_path_factory.mktemp("tfds"))


def test_split_ids_follow_voc_lists_and_augmented_masks(voc_builder):
  assert sorted(read_split(voc_builder, "train")) == sorted(REAL_TRAIN_IDS + EXTRA_TRAIN_IDS)
  assert sorted(read_split(voc_builder, "val")) == sorted(VAL_IDS)
  # train_aug: every augmented id and every VOC train id, minus VOC val.
  expected = set(AUG_IDS) | set(REAL_TRAIN_IDS) | set(EXTRA_TRAIN_IDS)
  assert sorted(read_split(voc_builder, "train_aug")) == sorted(expected - set(VAL_IDS))


def test_masks_are_palette_indices_with_known_classes(voc_builder, sample_data_dir):
  train = read_split(voc_builder, "train")
  # Known classes of the genuine VOC masks: 5 bottle + 15 person; 9 chair, 15, 18 sofa; 6 bus, 7 car.
  expected_classes = {"2011_000003": {0, 5, 15, 255}, "2011_000006": {0, 9, 15, 18, 255},
                      "2011_000025": {0, 6, 7, 255}}
  for example_id, classes in expected_classes.items():
    mask = train[example_id]["mask"][..., 0]
    assert set(np.unique(mask)) == classes
    source = sample_data_dir / "voc2012_mini" / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    np.testing.assert_array_equal(mask, np.asarray(Image.open(source / f"{example_id}.png")))
    assert train[example_id]["image"].shape[:2] == mask.shape
  assert train["2011_000003"]["image"].shape == (338, 500, 3)
  sbd_only = read_split(voc_builder, "train_aug")["2008_000002"]["mask"]
  assert set(np.unique(sbd_only)) == {0, 20}  # tvmonitor, no void band (SBD).


def test_grayscale_masks_give_the_same_dataset(voc_builder, sample_data_dir, tmp_path):
  make_voc_tree(sample_data_dir, tmp_path / "manual", mask_mode="L")
  gray = read_split(prepare(tmp_path / "manual", tmp_path / "tfds"), "train_aug")
  palette = read_split(voc_builder, "train_aug")
  assert sorted(gray) == sorted(palette)
  for example_id in palette:
    np.testing.assert_array_equal(gray[example_id]["mask"], palette[example_id]["mask"])


def test_sbd_mat_structure_is_parsed(sample_data_dir, tmp_path):
  genuine = voc.read_sbd_mask(str(sample_data_dir / "sbd_format_synthetic" / "cls" / "000001.mat"))
  assert genuine.shape == (375, 500) and genuine.dtype == np.uint8
  known = np.zeros((4, 6), np.uint8)
  known[1:3, 2:5] = 12
  write_sbd_mat(tmp_path / "x.mat", known)
  np.testing.assert_array_equal(voc.read_sbd_mask(str(tmp_path / "x.mat")), known)
  (tmp_path / "bad.mat").write_bytes(b"not a mat file")
  with pytest.raises(label_files.BadExampleError, match="bad.mat"):
    voc.read_sbd_mask(str(tmp_path / "bad.mat"))


def test_builds_from_sbd_archives(sample_data_dir, tmp_path):
  staging = tmp_path / "staging"
  make_voc_tree(sample_data_dir, staging, augmented="sbd")
  manual = tmp_path / "manual"
  os.makedirs(manual)
  with tarfile.open(manual / voc.VOC_ARCHIVE, "w") as tar:
    tar.add(staging / "VOCdevkit", arcname="VOCdevkit")
  with tarfile.open(manual / voc.SBD_ARCHIVE, "w:gz") as tar:
    tar.add(staging / "benchmark_RELEASE", arcname="benchmark_RELEASE")
  builder = prepare(manual, tmp_path / "tfds")
  train_aug = read_split(builder, "train_aug")
  sbd_ids = set(SBD_ONLY_IDS) | {"2007_002142", "2007_002234"}
  assert set(train_aug) == (sbd_ids | set(REAL_TRAIN_IDS) | set(EXTRA_TRAIN_IDS))
  source = sample_data_dir / "voc_segclassaug_masks" / "SegmentationClassAug"
  expected = np.asarray(Image.open(source / "2007_002142.png")).copy()
  expected[expected == 255] = 0
  np.testing.assert_array_equal(train_aug["2007_002142"]["mask"][..., 0], expected)
  # VOC ids keep VOC's own mask (void band included), not SBD's.
  assert 255 in train_aug["2007_000032"]["mask"]


def test_missing_manual_files_name_what_to_download(tmp_path):
  os.makedirs(tmp_path / "manual")
  (tmp_path / "manual" / "README").write_text("nothing here")
  with pytest.raises(FileNotFoundError, match="VOCtrainval_11-May-2012.tar"):
    prepare(tmp_path / "manual", tmp_path / "tfds")


@pytest.mark.parametrize("damage, message", [
    ("corrupt_jpeg", "2007_000032.jpg"),
    ("mask_size", "2007_000033.png"),
    ("mask_value", "values \\[21\\]"),
    ("rgb_mask", "'RGB' image"),
])
def test_bad_files_stop_preparation_naming_the_file(sample_data_dir, tmp_path, damage, message):
  root = tmp_path / "manual"
  voc_root = make_voc_tree(sample_data_dir, root)
  masks = voc_root / "SegmentationClass"
  if damage == "corrupt_jpeg":
    path = voc_root / "JPEGImages" / "2007_000032.jpg"
    path.write_bytes(path.read_bytes()[:2000])
  elif damage == "mask_size":
    Image.open(masks / "2007_000033.png").crop((0, 0, 100, 100)).save(masks / "2007_000033.png")
  elif damage == "mask_value":
    mask = np.asarray(Image.open(masks / "2011_000025.png")).copy()
    mask[0, 0] = 21
    Image.fromarray(mask, mode="L").save(masks / "2011_000025.png")
  elif damage == "rgb_mask":
    Image.open(masks / "2011_000006.png").convert("RGB").save(masks / "2011_000006.png")
  with pytest.raises(label_files.BadExampleError, match=message):
    prepare(root, tmp_path / "tfds")


def test_skip_bad_examples_skips_and_keeps_the_rest(sample_data_dir, tmp_path):
  voc_root = make_voc_tree(sample_data_dir, tmp_path / "manual")
  path = voc_root / "JPEGImages" / "2011_000003.jpg"
  path.write_bytes(path.read_bytes()[:2000])
  builder = prepare(tmp_path / "manual", tmp_path / "tfds", skip_bad_examples=True)
  assert sorted(read_split(builder, "train")) == sorted(
      set(REAL_TRAIN_IDS + EXTRA_TRAIN_IDS) - {"2011_000003"})


def _data_dir(builder):
  return os.path.dirname(os.path.dirname(builder.data_dir))  # DATA_DIR/voc_aug/1.0.0


def _voc_config(data_dir, **data_fields):
  config = config_lib.base_config()
  config.data.name = "voc"
  config.data.num_classes = 21
  config.data.data_dir = str(data_dir)
  config.data.eval_split = "val"
  config.data.update(data_fields)
  return config


def test_source_with_a_split_list_and_the_unlabeled_rest(voc_builder, tmp_path):
  split_list = tmp_path / "labeled.txt"
  # The peers' list format: image and mask paths on one line.
  _write_lines(split_list, ["JPEGImages/2011_000006.jpg SegmentationClass/2011_000006.png",
                            "JPEGImages/2007_000033.jpg SegmentationClass/2007_000033.png"])
  source = datasets.load_source(_voc_config(_data_dir(voc_builder), labeled_list=str(split_list),
                                            unlabeled_split="train_aug"))
  labeled = [e["id"].decode() for e in source.labeled.as_numpy_iterator()]
  unlabeled = [e["id"].decode() for e in source.unlabeled.as_numpy_iterator()]
  assert sorted(labeled) == ["2007_000033", "2011_000006"] and source.num_labeled == 2
  train_aug = set(read_split(voc_builder, "train_aug"))
  assert sorted(unlabeled) == sorted(train_aug - set(labeled))
  assert source.num_unlabeled == len(unlabeled) and source.num_eval == 2
  assert source.class_names[15] == "person"
  # The cached subset reads the same twice.
  assert [e["id"].decode() for e in source.labeled.as_numpy_iterator()] == labeled


def test_split_ids_are_read_without_autotuning(voc_builder):
  # An autotuned iterator's release can wait out its model thread's sleep (pipeline.stream_options).
  assert voc.split_id_dataset(voc_builder, "val").options().autotune.enabled is False
  assert sorted(voc.read_split_ids(voc_builder, "val")) == sorted(VAL_IDS)


def test_source_rejects_unknown_ids_and_wrong_class_count(voc_builder, tmp_path):
  split_list = tmp_path / "labeled.txt"
  _write_lines(split_list, ["2011_000006", "2099_123456"])
  with pytest.raises(ValueError, match="2099_123456"):
    datasets.load_source(_voc_config(_data_dir(voc_builder), labeled_list=str(split_list)))
  with pytest.raises(ValueError, match="num_classes=8"):
    datasets.load_source(_voc_config(_data_dir(voc_builder), num_classes=8))


def test_pseudoseg_trains_on_voc_with_image_level_labels(voc_builder, tmp_path):
  """Two steps of configs/voc_pseudoseg.py, shrunk to a tiny model, on the prepared VOC tree."""
  from configs import voc_pseudoseg
  from pseudoseg_jax import train

  # A seeded draw: the tree holds 5 train images, not the published 92. The paper's heads stay
  # (separable convs, BN decay, bias lr) on a tiny backbone trained from scratch.
  config = voc_pseudoseg.get_config("split=92,split_seed=0,weak_labels=true,steps=2")
  config.data.data_dir = _data_dir(voc_builder)
  config.data.num_labeled = 3
  config.update_from_flattened_dict({
      "model.init_from": "", "batch_size": 4, "pseudoseg.unlabeled_batch_size": 4, "pseudoseg.fusion_group_size": 2,
      "crop_size": 33, "eval_batch_size": 4, "pseudoseg.cutout_size": 8,
      "model.backbone": "resnet_tiny", "model.aspp_channels": 8, "model.decoder_channels": 8,
      "model.low_level_channels": 8, "model.sgc_attention_dim": 8, "data.shuffle_buffer": 4,
      "log_every": 1, "eval_every": 2, "checkpoint_every": 2, "image_summary_every": 0})
  results = train.run(config, str(tmp_path / "work"))
  assert results["step"] == 2 and len(results["val/iou_per_class"]) == 21
  assert results["class_names"][20] == "tvmonitor"


def test_builder_name_does_not_clash_with_tfds_voc(tmp_path):
  # TFDS's detection 'voc' is registered when its object_detection package loads (COCO does that).
  assert voc.VocAug.name == "voc_aug"
  assert tfds.builder("coco/2017_panoptic", data_dir=str(tmp_path)).name == "coco"
