"""A user's folder dataset: which image plays which role, pixels as written, errors naming the file,
and two PseudoSeg steps through the CLI on genuine photos (tests/data, copied into tmp_path),
whose process exits within seconds of its last log line."""

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from configs import folder as folder_config
from pseudoseg_jax import config as config_lib
from pseudoseg_jax.data import datasets
from pseudoseg_jax.data.datasets import folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("background", "cat", "dog")
VOC_IDS = ("2011_000003", "2011_000006", "2011_000025")
COCO_IDS = ("000000142238", "000000439180")
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")


# ---------------------------------------------------------------- writing folders
def write_lines(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("".join(f"{line}\n" for line in lines))


def generated_pair(index, height=20, width=28):
  """A random photo stand-in and a mask of classes 0-2 with an ignore (255) band."""
  rng = np.random.default_rng(index)
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  mask = rng.integers(0, len(CLASSES), (height, width), dtype=np.uint8)
  mask[:, :2] = 255
  return image, mask


def save_mask(mask, path, mode):
  picture = Image.fromarray(mask, mode="L")
  if mode == "P":  # Indices under a palette whose colours are NOT the indices.
    picture = picture.convert("P")
    picture.putpalette([(7 * i) % 256 for i in range(768)])
    picture.putdata(mask.ravel().tolist())
  picture.save(path)


def make_folder(root, *, labeled=("a", "b", "c", "d"), val=("v1", "v2"), unlabeled=("u1", "u2"),
                unlabeled_masks=False, splits=("val",), classes=CLASSES):
  """ROOT with images (alternately PNG and JPEG), masks (alternately P and L PNGs), splits.

  Returns {id: (image array, mask array)} of what was written.
  """
  written = {}
  os.makedirs(root / "images"), os.makedirs(root / "masks")
  for index, example_id in enumerate(labeled + val + unlabeled):
    image, mask = generated_pair(index, height=20 + index % 3, width=28)
    extension = ".png" if index % 2 == 0 else ".jpg"
    Image.fromarray(image).save(root / "images" / f"{example_id}{extension}")
    if example_id not in unlabeled or unlabeled_masks:
      save_mask(mask, root / "masks" / f"{example_id}.png", "P" if index % 2 == 0 else "L")
    written[example_id] = (image, mask, extension)
  roles = {"labeled": labeled, "val": val, "unlabeled": unlabeled}
  for name in splits:
    write_lines(root / "splits" / f"{name}.txt", roles[name])
  if classes:
    write_lines(root / "classes.txt", classes)
  return written


def folder_config_for(root, **fields):
  config = config_lib.base_config()
  config.method = "pseudoseg"
  config.data.name = "folder"
  config.data.root = str(root)
  config.data.num_classes = len(CLASSES)
  for name, value in fields.items():
    section, _, leaf = name.rpartition("__")
    (config[section] if section else config)[leaf] = value
  return config


def read_all(dataset):
  return {example["id"].decode(): example for example in dataset.as_numpy_iterator()}


# ---------------------------------------------------------------- roles and pixels
def test_roles_pixels_and_classes_are_as_written(tmp_path):
  written = make_folder(tmp_path)
  (tmp_path / "images" / "._a.jpg").write_bytes(b"macOS metadata")  # Ignored: a dot file.
  (tmp_path / "images" / "notes.txt").write_text("not an image")
  source = datasets.load_source(folder_config_for(tmp_path))
  assert source.class_names == CLASSES
  assert (source.num_labeled, source.num_eval, source.num_unlabeled) == (4, 2, 2)
  labeled, val = read_all(source.labeled), read_all(source.eval)
  assert list(labeled) == ["a", "b", "c", "d"] and list(val) == ["v1", "v2"]
  for example_id, example in {**labeled, **val}.items():
    image, mask, extension = written[example_id]
    assert example["mask"].dtype == np.uint8 and example["mask"].shape == mask.shape + (1,)
    np.testing.assert_array_equal(example["mask"][..., 0], mask)  # P and L: indices, not colours.
    if extension == ".png":
      np.testing.assert_array_equal(example["image"], image)
    else:  # JPEG is lossy (and noise its worst case): compare with PIL's decoding.
      decoded = np.asarray(Image.open(tmp_path / "images" / f"{example_id}.jpg"), np.int32)
      assert np.abs(example["image"] - decoded).mean() < 2
  # Without splits/unlabeled.txt: every image not in val, minus the labeled ones; none has a mask.
  assert not source.unlabeled_has_masks and "mask" not in source.unlabeled.element_spec
  assert sorted(read_all(source.unlabeled)) == ["u1", "u2"]


def test_unlabeled_masks_come_along_only_when_every_unlabeled_image_has_one(tmp_path):
  make_folder(tmp_path, unlabeled_masks=True, splits=("val", "labeled", "unlabeled"))
  config = folder_config_for(tmp_path, pseudoseg__weak_labels=True)
  source = datasets.load_source(config)
  assert source.unlabeled_has_masks
  assert {tuple(e["mask"].shape[2:]) for e in read_all(source.unlabeled).values()} == {(1,)}


def test_weak_labels_need_unlabeled_masks(tmp_path):
  make_folder(tmp_path)
  with pytest.raises(ValueError, match=r"weak_labels=True.*2 of the 2 unlabeled images"):
    datasets.load_source(folder_config_for(tmp_path, pseudoseg__weak_labels=True))


def test_labeled_pool_list_and_sampling(tmp_path):
  make_folder(tmp_path, splits=("val", "labeled"))
  other = tmp_path / "mine.txt"
  write_lines(other, ["images/b.jpg", "u1"])  # A path line; an image not in labeled.txt.
  with pytest.raises(ValueError, match=r"1 image\(s\) of .*mine.txt have no mask .*: u1"):
    datasets.load_source(folder_config_for(tmp_path, data__labeled_list=str(other)))
  write_lines(other, ["b", "d"])
  source = datasets.load_source(folder_config_for(tmp_path, data__labeled_list=str(other)))
  assert list(read_all(source.labeled)) == ["b", "d"]
  assert sorted(read_all(source.unlabeled)) == ["a", "c", "u1", "u2"]
  sampled = [datasets.load_source(folder_config_for(tmp_path, data__num_labeled=2))
             for _ in range(2)]
  ids = [list(read_all(source.labeled)) for source in sampled]
  assert ids[0] == ids[1] and len(ids[0]) == 2 and set(ids[0]) <= {"a", "b", "c", "d"}
  both = datasets.load_source(folder_config_for(
      tmp_path, data__num_labeled=2, data__unlabeled_includes_labeled=True))
  assert both.num_unlabeled == 6


def test_supervised_reads_no_unlabeled_images(tmp_path):
  make_folder(tmp_path, unlabeled=())
  source = datasets.load_source(folder_config_for(tmp_path, method="supervised"))
  assert source.unlabeled is None and source.num_labeled == 4
  with pytest.raises(ValueError, match="unlabeled pool .* is empty"):
    datasets.load_source(folder_config_for(tmp_path))


def test_class_names_from_config_win_and_must_match_num_classes(tmp_path):
  make_folder(tmp_path, classes=("background", "x"))
  with pytest.raises(ValueError, match=r"num_classes=3 but .*classes.txt names 2 classes"):
    datasets.load_source(folder_config_for(tmp_path))
  names = ("bg", "p", "q")
  source = datasets.load_source(folder_config_for(tmp_path, data__class_names=names))
  assert source.class_names == names
  os.remove(tmp_path / "classes.txt")
  assert datasets.load_source(folder_config_for(tmp_path)).class_names == ("class_0", "class_1",
                                                                           "class_2")


def test_grayscale_and_rgba_images_become_rgb(tmp_path):
  make_folder(tmp_path)
  image, _ = generated_pair(0, height=20)
  Image.fromarray(image).convert("L").save(tmp_path / "images" / "a.png")
  Image.fromarray(image).convert("RGBA").save(tmp_path / "images" / "b.png")
  os.remove(tmp_path / "images" / "b.jpg")
  shutil.copy(tmp_path / "masks" / "a.png", tmp_path / "masks" / "b.png")  # Same 20x28 size.
  labeled = read_all(datasets.load_source(folder_config_for(tmp_path)).labeled)
  gray = np.asarray(Image.fromarray(image).convert("L"))
  np.testing.assert_array_equal(labeled["a"]["image"], np.repeat(gray[..., None], 3, axis=-1))
  np.testing.assert_array_equal(labeled["b"]["image"], image)


# ---------------------------------------------------------------- bad inputs
def truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def corrupt_jpeg(root):
  truncate(root / "images" / "b.jpg")


def corrupt_png(root):
  truncate(root / "images" / "a.png")


def mask_of_other_size(root):
  save_mask(np.zeros((5, 5), np.uint8), root / "masks" / "c.png", "L")


def mask_value_out_of_range(root):
  save_mask(np.full((22, 28), 7, np.uint8), root / "masks" / "c.png", "P")


def rgb_mask(root):
  Image.new("RGB", (28, 22)).save(root / "masks" / "c.png")


def split_id_without_image(root):
  write_lines(root / "splits" / "val.txt", ["v1", "ghost"])


def labeled_id_without_mask(root):
  write_lines(root / "splits" / "labeled.txt", ["a", "u1"])


def empty_split(root):
  write_lines(root / "splits" / "labeled.txt", [])


def duplicate_stem(root):
  Image.new("RGB", (28, 20)).save(root / "images" / "a.jpg")


def missing_root(root):
  shutil.rmtree(root)


def missing_val_split(root):
  os.remove(root / "splits" / "val.txt")


def labeled_in_val(root):
  write_lines(root / "splits" / "labeled.txt", ["a", "v2"])


@pytest.mark.parametrize("break_folder, message", [
    (corrupt_jpeg, r"Image .*images/b.jpg cannot be decoded"),
    (corrupt_png, r"Image .*images/a.png cannot be decoded"),
    (mask_of_other_size, r"Mask .*masks/c.png is 5x5 but image .*c.png is 22x28"),
    (mask_value_out_of_range, r"Mask .*masks/c.png holds values \[7\]"),
    (rgb_mask, r"Mask .*masks/c.png is a 'RGB' image"),
    (split_id_without_image, r"1 id\(s\) of .*splits/val.txt are not in .*images: ghost"),
    (labeled_id_without_mask, r"of .*splits/labeled.txt have no mask .*: u1"),
    (empty_split, r"Split list .*labeled.txt is empty"),
    (duplicate_stem, r"Two image files have the id 'a': .*a.jpg and .*a.png"),
    (missing_root, r"config.data.root=.* is not a folder"),
    (missing_val_split, r"splits/val.txt does not exist"),
    (labeled_in_val, r"1 image\(s\) of .*labeled.txt are also in splits/val.txt: v2"),
])
def test_bad_inputs_are_named(tmp_path, break_folder, message):
  root = tmp_path / "root"
  make_folder(root, splits=("val", "labeled"))
  break_folder(root)
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    datasets.load_source(folder_config_for(root))


def test_a_val_image_larger_than_the_eval_crop_is_refused_before_training(tmp_path):
  make_folder(tmp_path)
  with pytest.raises(ValueError, match=r"Val image .*v1.png has a side of 28 px.*Raise it to 29"):
    datasets.load_source(folder_config_for(tmp_path, eval_crop_size=25))


@pytest.fixture
def project_log(caplog):
  """The project logger does not propagate to the root logger: hand it caplog's handler."""
  logger = logging.getLogger("pseudoseg_jax")
  logger.addHandler(caplog.handler)
  yield caplog
  logger.removeHandler(caplog.handler)


def test_skip_bad_examples_skips_and_counts(tmp_path, project_log):
  make_folder(tmp_path)
  corrupt_jpeg(tmp_path)
  mask_value_out_of_range(tmp_path)
  truncate(tmp_path / "images" / "u2.jpg")
  source = datasets.load_source(folder_config_for(tmp_path, data__skip_bad_examples=True))
  assert list(read_all(source.labeled)) == ["a", "d"] and source.num_labeled == 2
  assert list(read_all(source.unlabeled)) == ["u1"]
  assert "Skipped 2 bad example(s) of the labeled images" in project_log.text
  assert "Skipped 1 bad example(s) of the unlabeled images" in project_log.text
  assert "Checked 4 image(s) and masks of the labeled images" in project_log.text


# ---------------------------------------------------------------- genuine photos
def copy_genuine_folder(samples, root, *, shrink=1):
  """VOC photos and palette masks (2 labeled, 1 val), COCO photos as mask-less unlabeled images."""
  voc = samples / "voc2012_mini" / "VOCdevkit" / "VOC2012"
  for folder_name in ("images", "masks"):
    os.makedirs(root / folder_name)
  files = [(voc / "JPEGImages" / f"{i}.jpg", root / "images" / f"{i}.jpg") for i in VOC_IDS]
  files += [(voc / "SegmentationClass" / f"{i}.png", root / "masks" / f"{i}.png") for i in VOC_IDS]
  # An upper-case extension, as cameras write them.
  files += [(samples / "coco_panoptic_sample" / "input_images" / f"{i}.jpg",
             root / "images" / f"{i}.JPG") for i in COCO_IDS]
  for source, target in files:
    if shrink == 1:
      shutil.copy(source, target)  # The genuine bytes.
      continue
    picture = Image.open(source)
    # Nearest for masks: interpolated class indices would be other classes.
    resample = Image.NEAREST if source.suffix == ".png" else Image.BILINEAR
    picture.resize((picture.width // shrink, picture.height // shrink), resample).save(target)
  write_lines(root / "splits" / "val.txt", VOC_IDS[2:])
  write_lines(root / "classes.txt", VOC_CLASSES)


def test_genuine_voc_masks_are_read_as_their_indices(tmp_path, sample_data_dir):
  copy_genuine_folder(sample_data_dir, tmp_path)
  config = folder_config_for(tmp_path, data__num_classes=21)
  source = datasets.load_source(config)
  assert source.class_names == VOC_CLASSES and source.num_unlabeled == 2
  assert not source.unlabeled_has_masks
  voc = sample_data_dir / "voc2012_mini" / "VOCdevkit" / "VOC2012"
  examples = {**read_all(source.labeled), **read_all(source.eval)}
  assert sorted(examples) == sorted(VOC_IDS)
  for example_id, example in examples.items():
    expected = np.asarray(Image.open(voc / "SegmentationClass" / f"{example_id}.png"))
    np.testing.assert_array_equal(example["mask"][..., 0], expected)
  assert set(np.unique(examples["2011_000003"]["mask"])) == {0, 5, 15, 255}
  unlabeled = read_all(source.unlabeled)
  assert {example["image"].shape for example in unlabeled.values()} == {(427, 640, 3),
                                                                         (360, 640, 3)}


# ---------------------------------------------------------------- the config file
def test_config_reads_classes_and_the_val_image_sizes(tmp_path, sample_data_dir):
  copy_genuine_folder(sample_data_dir, tmp_path)
  config = folder_config.get_config(f"root={tmp_path},backbone=resnet_tiny,steps=7")
  config_lib.validate(config)
  assert (config.data.num_classes, config.eval_crop_size, config.total_steps) == (21, 501, 7)
  assert config.data.name == "folder" and config.model.backbone == "resnet_tiny"
  os.remove(tmp_path / "classes.txt")
  config = folder_config.get_config(f"root={tmp_path},num_classes=21,eval_crop=513")
  assert (config.data.num_classes, config.eval_crop_size) == (21, 513)
  with pytest.raises(ValueError, match="pass num_classes=N or write .*classes.txt"):
    folder_config.get_config(f"root={tmp_path}")
  with pytest.raises(ValueError, match="folder.py needs root=PATH"):
    folder_config.get_config("method=supervised")
  with pytest.raises(FileNotFoundError, match=r"root=.*nowhere is not a folder"):
    folder_config.get_config(f"root={tmp_path / 'nowhere'}")


def test_next_deeplab_size():
  assert [folder.next_deeplab_size(s) for s in (1, 500, 501, 502, 512, 640)] == [
      1, 501, 501, 505, 513, 641]


# ---------------------------------------------------------------- acceptance: the CLI
def run_watching_for(args, line_text, timeout, *, stop_there=False, env=None):
  """(exit status, stdout and stderr, seconds from the first line holding `line_text` to the
  process's exit, None when no line held it). Killed after `timeout` seconds, or at that line
  with `stop_there` (SIGKILL: nothing after it runs)."""
  process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  watchdog = threading.Timer(timeout, process.kill)
  watchdog.start()
  lines, seen_at = [], None
  try:
    for line in process.stdout:
      lines.append(line)
      if seen_at is None and line_text in line:
        seen_at = time.monotonic()
        if stop_there:
          process.kill()
          break
    process.communicate()
  finally:
    watchdog.cancel()
  linger = None if seen_at is None else time.monotonic() - seen_at
  return process.returncode, "".join(lines), linger


def test_two_pseudoseg_steps_through_the_cli(tmp_path, sample_data_dir):
  root, workdir = tmp_path / "data", tmp_path / "work"
  copy_genuine_folder(sample_data_dir, root, shrink=8)
  overrides = {"model.aspp_channels": 16, "model.decoder_channels": 16,
               "model.low_level_channels": 8, "model.sgc_attention_dim": 8,
               "data.shuffle_buffer": 8, "image_summary_every": 0}
  args = [sys.executable, "-m", "pseudoseg_jax.main",
          f"--config=configs/folder.py:root={root},steps=2,backbone=resnet_tiny,crop=33,batch=2",
          f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  returncode, output, linger = run_watching_for(args, "Final val/miou", timeout=600)
  assert returncode == 0, output[-3000:]
  assert "2 labeled, 2 unlabeled, 1 val images; 21 classes" in output
  # 2-3 s of printing and interpreter teardown; released tf.data iterators used to hold the
  # process 10-50 s longer (pipeline.stream_options).
  assert linger is not None, "No 'Final val/miou' line:\n" + output[-3000:]
  assert linger < 15, f"The process exited {linger:.0f} s after its last log line."
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert results["step"] == 2 and 0.0 <= results["val/miou"] <= 1.0
  assert results["class_names"] == list(VOC_CLASSES) and len(results["val/iou_per_class"]) == 21
  with open(workdir / "metrics.jsonl") as f:
    metrics = [json.loads(line) for line in f]
  train_lines = [m for m in metrics if "train/loss" in m]
  assert [m["step"] for m in train_lines] == [2]
  for name in ("train/loss", "train/consistency_loss"):
    assert np.isfinite(train_lines[0][name]) and train_lines[0][name] >= 0, name
  assert any("val/miou" in m for m in metrics)
  # The unlabeled photos have no masks: nothing to measure pseudo labels against, so no accuracy.
  assert "pseudo/confident_fraction" in train_lines[0]
  assert not [name for name in train_lines[0]
              if name.startswith("pseudo/") and ("accuracy" in name or "per_class" in name)]
  with open(workdir / "config.json") as f:
    saved = json.load(f)
  assert saved["data"]["root"] == str(root) and saved["eval_crop_size"] == 65
