"""predict.py and inference.py: masks for real photos of any size, and what padding, sliding
windows, multi-scale and flip guarantee.

The model is a tiny DeepLab with random weights (its logits layer scaled up so that pixels disagree)
saved as a workdir: the tests are about geometry, files and names, not accuracy.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageOps

from configs import demo
from pseudoseg_jax import checkpointing, inference, predict, steps, visualize, workdirs
from pseudoseg_jax.data.datasets import coco, synthetic_shapes, voc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW = 97  # demo's eval crop: 4k + 1.


def tiny_config():
  config = demo.get_config("method=supervised")
  config.model.aspp_channels = 16
  config.model.decoder_channels = 16
  config.model.low_level_channels = 8
  config.model.sgc_attention_dim = 8
  return config


def save_checkpoint(workdir, step, state):
  manager = checkpointing.make_manager(str(workdir), 3)
  checkpointing.save(manager, step, state.replace(step=jnp.asarray(step, jnp.int32)))
  manager.wait_until_finished()
  manager.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """config.json and checkpoints 0 and 1 (different logits layers), as the trainer leaves them."""
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_config()
  _, _, state = steps.create_train_state(config, 0)
  logits = state.params["decoder"]["logits"]
  for step, factor in ((0, 300.0), (1, -300.0)):
    decoder = {**state.params["decoder"], "logits": {**logits, "kernel": logits["kernel"] * factor}}
    params = {**state.params, "decoder": decoder}
    save_checkpoint(workdir, step, state.replace(params=params))
  workdirs.write_json(str(workdir / "config.json"), config.to_dict())
  return str(workdir)


@pytest.fixture(scope="module")
def model(workdir):
  return inference.restore(workdir)


@pytest.fixture(scope="module")
def scores_fn(model):
  return inference.make_scores_fn(model, scales=(1.0,), flip=False, batch_size=4)


def sample_photo(sample_data_dir, name):
  for folder in ("voc2012_mini/VOCdevkit/VOC2012/JPEGImages", "coco_panoptic_sample/input_images"):
    path = sample_data_dir / folder / name
    if path.exists():
      return Image.open(path).convert("RGB")
  raise FileNotFoundError(name)


@pytest.fixture(scope="module")
def photos(sample_data_dir, tmp_path_factory):
  """Real photos at odd sizes and modes: fitting the eval crop, exactly it, larger, gray, RGBA."""
  folder = tmp_path_factory.mktemp("photos")
  voc = [sample_photo(sample_data_dir, f"2011_0000{i}.jpg") for i in ("03", "06", "25")]
  coco = [sample_photo(sample_data_dir, f"000000{i}.jpg") for i in ("142238", "439180")]
  voc[0].resize((83, 61)).save(folder / "small.jpg", quality=95)
  voc[1].crop((100, 50, 100 + WINDOW, 50 + WINDOW)).save(folder / "exact.png")
  coco[0].resize((203, 150)).save(folder / "larger.jpg", quality=95)
  coco[1].resize((50, 90)).convert("L").save(folder / "gray.png")
  voc[2].resize((70, 64)).convert("RGBA").save(folder / "alpha.png")
  shutil.copy(sample_data_dir / "voc2012_mini/VOCdevkit/VOC2012/JPEGImages/2011_000006.jpg",
              folder / "full_size.jpg")
  return folder


@pytest.fixture(scope="module")
def prediction(model, scores_fn, photos, tmp_path_factory):
  output = tmp_path_factory.mktemp("masks")
  paths = predict.expand_inputs([str(photos)])
  return predict.predict_files(model, scores_fn, paths, str(output)), output


def displayed_size(path):
  with Image.open(path) as image:
    return ImageOps.exif_transpose(image).size


def test_every_photo_gets_a_palette_mask_an_overlay_and_class_fractions(prediction, photos):
  report, output = prediction
  assert report.failed == []
  assert sorted(stem for _, stem in report.written) == sorted(
      os.path.splitext(name)[0] for name in os.listdir(photos))
  for path, stem in report.written:
    mask_image = Image.open(output / f"{stem}.png")
    assert mask_image.mode == "P"
    assert mask_image.size == displayed_size(path)
    assert mask_image.getpalette()[:3 * 8] == visualize.voc_palette(8).reshape(-1).tolist()
    mask = np.asarray(mask_image)
    assert mask.max() < 8
    assert Image.open(output / f"{stem}_overlay.jpg").size == mask_image.size
    with open(output / f"{stem}.json") as f:
      summary = json.load(f)
    assert (summary["height"], summary["width"]) == mask.shape
    assert summary["image"] == path
    counts = np.bincount(mask.reshape(-1), minlength=8)
    assert [c["index"] for c in summary["classes"]] == list(np.flatnonzero(counts))
    assert sum(c["fraction"] for c in summary["classes"]) == pytest.approx(1.0, abs=1e-12)
    for entry in summary["classes"]:
      assert entry["fraction"] == counts[entry["index"]] / mask.size
      assert entry["name"] == model_class_names()[entry["index"]]


def model_class_names():
  return synthetic_shapes.CLASS_NAMES


def test_class_names_fall_back_on_the_dataset_table_without_loading_it(tmp_path):
  config = tiny_config()  # No results.json in tmp_path, no config.data.class_names.
  for name, num_classes, expected in (("synthetic_shapes", 8, synthetic_shapes.CLASS_NAMES),
                                      ("voc", 21, voc.CLASS_NAMES), ("coco", 81, coco.CLASS_NAMES),
                                      ("coco_voc", 21, voc.CLASS_NAMES)):
    config.data.name, config.data.num_classes = name, num_classes
    assert inference.class_names_of(config, str(tmp_path)) == expected
  (tmp_path / "classes.txt").write_text("sky\nsea\nsand\n")
  config.data.name, config.data.root, config.data.num_classes = "folder", str(tmp_path), 3
  assert inference.class_names_of(config, str(tmp_path)) == ("sky", "sea", "sand")
  config.data.root = str(tmp_path / "moved")  # The data may be gone since training.
  assert inference.class_names_of(config, str(tmp_path)) == ("class_0", "class_1", "class_2")


def test_masks_differ_between_pixels(prediction):
  """Guards the tests above against a model that paints one class everywhere."""
  _, output = prediction
  assert len(np.unique(np.asarray(Image.open(output / "full_size.png")))) > 1


def test_mask_is_the_argmax_over_the_eval_crop_canvas_cropped_back(model, scores_fn, photos,
                                                                  tmp_path):
  path = str(photos / "small.jpg")
  predict.predict_files(model, scores_fn, [path], str(tmp_path))
  mask = np.asarray(Image.open(tmp_path / "small.png"))
  image = inference.normalize_image(predict.read_image(path))
  height, width = image.shape[:2]
  canvas = np.zeros((WINDOW, WINDOW, 3), np.float32)  # The training evaluation's padding: 0.
  canvas[:height, :width] = image
  probabilities = scores_fn(canvas[None])[0]
  np.testing.assert_array_equal(mask, np.argmax(probabilities, axis=-1)[:height, :width])
  # The model itself, outside the compiled scoring function: same probabilities up to rounding
  # (two programs, 4-way sharded against one device; up to 2.5e-5 apart at XLA:CPU's level 0).
  logits = steps.predict_logits(model.params, model.batch_stats, jnp.asarray(canvas[None]),
                                graphdef=model.graphdef)
  np.testing.assert_allclose(np.asarray(jax.nn.softmax(logits, axis=-1))[0], probabilities,
                             atol=1e-4)


def test_exif_rotated_jpeg_gives_the_mask_of_the_displayed_image(model, scores_fn, sample_data_dir,
                                                                tmp_path):
  stored = sample_photo(sample_data_dir, "2011_000025.jpg").resize((90, 60))
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: shown rotated 90 degrees clockwise.
  stored.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
  shown = predict.read_image(str(tmp_path / "phone.jpg"))
  assert shown.shape == (90, 60, 3)
  Image.fromarray(shown).save(tmp_path / "upright.png")  # Same pixels, no EXIF.
  for name in ("phone.jpg", "upright.png"):
    predict.predict_files(model, scores_fn, [str(tmp_path / name)], str(tmp_path / "out"))
  rotated = np.asarray(Image.open(tmp_path / "out" / "phone.png"))
  assert rotated.shape == (90, 60)
  np.testing.assert_array_equal(rotated, np.asarray(Image.open(tmp_path / "out" / "upright.png")))


def test_unreadable_images_are_reported_by_name_and_the_rest_predicted(model, scores_fn, photos,
                                                                      tmp_path):
  inputs = tmp_path / "in"
  inputs.mkdir()
  shutil.copy(photos / "small.jpg", inputs / "good.jpg")
  (inputs / "garbage.jpg").write_bytes(b"not an image at all")
  data = (photos / "larger.jpg").read_bytes()
  (inputs / "truncated.jpg").write_bytes(data[:len(data) // 2])
  report = predict.predict_files(model, scores_fn, predict.expand_inputs([str(inputs)]),
                                 str(tmp_path / "out"))
  assert [stem for _, stem in report.written] == ["good"]
  assert sorted(os.path.basename(path) for path, _ in report.failed) == ["garbage.jpg",
                                                                        "truncated.jpg"]
  assert sorted(os.listdir(tmp_path / "out")) == ["good.json", "good.png", "good_overlay.jpg"]


def tree(folder):
  return sorted(os.path.relpath(os.path.join(parent, name), folder)
                for parent, _, names in os.walk(folder) for name in names)


def test_outputs_stay_inside_the_output_folder_and_never_replace_inputs(model, scores_fn, photos,
                                                                      tmp_path):
  for folder in ("a", "b"):
    (tmp_path / folder).mkdir()
  shutil.copy(photos / "small.jpg", tmp_path / "a" / "same.jpg")
  shutil.copy(photos / "gray.png", tmp_path / "b" / "same.png")
  shutil.copy(photos / "small.jpg", tmp_path / "a" / "we ird$(name).jpg")
  shutil.copy(photos / "small.jpg", tmp_path / "a" / "...jpg")
  outside = tmp_path / "outside.png"
  outside.write_bytes(b"keep me")
  output = tmp_path / "out"
  output.mkdir()
  os.symlink(outside, output / "same.png")  # A trap: writing through it would leave the folder.
  before = tree(tmp_path)

  # A folder skips dot files; named explicitly, '...jpg' is read (as 'jpg': no leading dots).
  paths = predict.expand_inputs([str(tmp_path / "a"), str(tmp_path / "b" / "*.png"),
                                 str(tmp_path / "a" / "...jpg")])
  report = predict.predict_files(model, scores_fn, paths, str(output))

  assert [stem for _, stem in report.written] == ["same", "we_ird_name_", "same_2", "jpg"]
  assert outside.read_bytes() == b"keep me"
  assert not os.path.islink(output / "same.png")
  created = sorted(set(tree(tmp_path)) - set(before))
  assert created and all(path.startswith("out" + os.sep) for path in created)
  assert not any(os.path.basename(path).startswith(".tmp-") for path in tree(tmp_path))
  with pytest.raises(ValueError, match="holds the input"):
    predict.predict_files(model, scores_fn, paths, str(tmp_path / "a"))


def test_stems_are_safe_and_unique():
  assert predict.safe_stem("/x/../a b/c$d.e.jpg") == "c_d.e"
  assert predict.safe_stem("/x/.hidden.png") == "hidden"
  assert predict.safe_stem("/x/...jpg") == "jpg"
  assert predict.safe_stem("/x/....") == "image"
  assert predict.unique_stems(["a/x.jpg", "b/x.png", "c/X.jpg", "d/x_2.jpg"]) == [
      "x", "x_2", "X_3", "x_2_2"]


def test_windows_tile_the_canvas_with_the_last_one_flush():
  assert inference.window_starts(90, 97, 65) == [0]
  assert inference.window_starts(97, 97, 65) == [0]
  assert inference.window_starts(194, 97, 97) == [0, 97]
  assert inference.window_starts(203, 97, 65) == [0, 65, 106]
  assert inference.stride_of((97, 97), 2 / 3) == (65, 65)


def test_stitching_puts_every_window_back_where_it_came_from():
  """With scores = the window itself, any tiling must give back the image, across batches."""
  rng = np.random.default_rng(0)
  images = [rng.uniform(-1, 1, size + (3,)).astype(np.float32)
            for size in ((40, 30), (130, 70), (97, 203), (10, 250))]
  outputs = dict(inference.predict_tiled(
      enumerate(images), lambda windows: windows.copy(), window=(50, 60), stride=(33, 40),
      batch_size=3))
  for index, image in enumerate(images):
    np.testing.assert_allclose(outputs[index], image, rtol=1e-6)


def test_sliding_window_equals_the_window_predictions_stitched(model, scores_fn, photos):
  image = inference.normalize_image(np.asarray(
      Image.open(photos / "full_size.jpg").convert("RGB"))[:2 * WINDOW, :2 * WINDOW])
  [(_, stitched)] = inference.predict_tiled(
      [("key", image)], scores_fn, window=(WINDOW, WINDOW), stride=(WINDOW, WINDOW),
      batch_size=scores_fn.batch_size)
  windows = [image[top:top + WINDOW, left:left + WINDOW]
             for top in (0, WINDOW) for left in (0, WINDOW)]
  each = scores_fn(np.stack(windows))  # The same batch the tiling makes: bit-for-bit comparable.
  expected = np.concatenate([np.concatenate(each[:2], axis=1), np.concatenate(each[2:], axis=1)])
  np.testing.assert_array_equal(stitched, expected)


def test_multi_scale_and_flip_average_what_they_should(model, photos):
  """Scales (1, 1) average two identical softmaxes: exactly single scale. With flip, mirroring the
  input mirrors the prediction (up to rounding: the two passes run as different computations)."""
  image = inference.normalize_image(np.asarray(
      Image.open(photos / "exact.png").convert("RGB")))
  batch = np.stack([image, image[:, ::-1]])
  single = inference.make_scores_fn(model, scales=(1.0,), flip=False, batch_size=2)(batch)
  twice = inference.make_scores_fn(model, scales=(1.0, 1.0), flip=False, batch_size=2)(batch)
  np.testing.assert_array_equal(twice, single)
  flipped = inference.make_scores_fn(model, scales=(0.75, 1.0), flip=True, batch_size=2)(batch)
  np.testing.assert_allclose(flipped[1][:, ::-1], flipped[0], atol=1e-5)
  assert inference.scaled_size(97, 0.75, 9) == 73 and inference.scaled_size(97, 0.05, 9) == 9


def test_checkpoint_is_the_latest_unless_named(workdir, model):
  assert model.step == 1
  earlier = inference.restore(workdir, "0")
  assert earlier.step == 0
  kernel = np.asarray(earlier.params["decoder"]["logits"]["kernel"])
  np.testing.assert_array_equal(-kernel, np.asarray(model.params["decoder"]["logits"]["kernel"]))
  assert inference.restore(workdir, os.path.join(workdir, "checkpoints", "0")).step == 0
  with pytest.raises(FileNotFoundError, match="kept steps: 0, 1"):
    inference.restore(workdir, "5")
  with pytest.raises(ValueError, match="step number or an existing folder"):
    inference.restore(workdir, "/nonexistent/7")


def test_command_line_reports_an_unreadable_image_and_exits_nonzero(workdir, photos, tmp_path):
  inputs = tmp_path / "in"
  inputs.mkdir()
  shutil.copy(photos / "small.jpg", inputs / "good.jpg")
  (inputs / "broken.png").write_bytes(b"\x89PNG but not really")
  completed = subprocess.run(
      [sys.executable, "-m", "pseudoseg_jax.predict", f"--workdir={workdir}",
       f"--input={inputs}", f"--input={photos / 'gray.png'}", f"--output={tmp_path / 'out'}",
       "--checkpoint=0", "--batch_size=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert completed.returncode == 1, completed.stderr[-2000:]
  assert "broken.png" in completed.stderr and "1 of 3 image(s)" in completed.stderr
  assert sorted(os.listdir(tmp_path / "out")) == [
      "good.json", "good.png", "good_overlay.jpg", "gray.json", "gray.png", "gray_overlay.jpg"]
  with open(tmp_path / "out" / "good.json") as f:
    assert json.load(f)["step"] == 0
