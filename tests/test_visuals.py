"""The pictures a person looks at: confusion-matrix image, learning curves, and reading them back."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import demo
from pseudoseg_jax import visualize, workdirs, writers
from pseudoseg_jax.data.datasets import coco, synthetic_shapes, voc


def test_row_normalized_gives_fractions_of_each_true_class_and_nan_for_absent_ones():
  confusion = np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
  np.testing.assert_allclose(visualize.row_normalized(confusion),
                             [[0.75, 0.25, 0.0], [np.nan] * 3, [0.25, 0.25, 0.5]])


@pytest.mark.parametrize("class_names", [voc.CLASS_NAMES, coco.CLASS_NAMES], ids=["21", "81"])
def test_confusion_matrix_image_fits_the_class_count(class_names):
  num_classes = len(class_names)
  confusion = np.eye(num_classes, dtype=np.int64) * 90 + 1
  confusion[2] = 0  # A class absent from the ground truth.
  image = visualize.confusion_matrix_image(confusion, class_names, title="step 5")
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  # Large enough for a 6 pt name per row (>= 10 px per class), small enough for TensorBoard.
  assert num_classes * 10 <= image.shape[0] <= 1600
  assert num_classes * 10 <= image.shape[1] <= 1600
  assert len(np.unique(image.reshape(-1, 3), axis=0)) > 10  # Not a blank canvas.


def test_confusion_matrix_image_refuses_names_that_do_not_match():
  with pytest.raises(ValueError, match="7 class names for a 8-class"):
    visualize.confusion_matrix_image(np.eye(8), synthetic_shapes.CLASS_NAMES[:7])


def test_only_a_dominant_cell_is_drawn_in_the_darkest_blue():
  names = synthetic_shapes.CLASS_NAMES

  def dark_blue_pixels(confusion):
    image = visualize.confusion_matrix_image(confusion, names).astype(int)
    red, blue = image[..., 0], image[..., 2]
    return np.sum((blue - red > 60) & (image.sum(axis=-1) < 250))

  # The colour bar's top is dark blue in both; the 100% diagonal adds eight cells of ~50x50 px,
  # where 12.5% everywhere adds none.
  uniform = dark_blue_pixels(np.ones((len(names), len(names))))
  assert dark_blue_pixels(np.eye(len(names)) * 100) > uniform + 8 * 1000


def pseudoseg_records(num_steps=6):
  records = []
  for step in range(2, num_steps + 1, 2):
    records.append({"step": step, "train/loss": 5.0 / step, "train/supervised_loss": 2.0 / step,
                    "train/consistency_loss": 1.0, "train/sgc_loss": 1.5 / step,
                    "train/classification_loss": 0.5})
    if step % 4 == 0:
      records.append({"step": step, "val/miou": 0.01 * step, "val/iou_per_class": [0.1, None]})
  return records


def test_finite_series_skips_steps_that_did_not_log_the_metric_or_logged_nan_or_inf():
  records = [{"step": 1, "train/loss": 2.0}, {"step": 2, "val/miou": 0.1},
             {"step": 3, "train/loss": None}, {"step": 4, "train/loss": "inf"},
             {"step": 5, "train/loss": 1}]
  assert visualize._finite_series(records, "train/loss") == ([1, 5], [2.0, 1])


def pixels_of_colour(image: np.ndarray, rgb: tuple[int, int, int]) -> int:
  return int(np.sum(np.abs(image.astype(int) - np.array(rgb)).max(axis=-1) <= 12))


# matplotlib's first line colour (tab:blue, the total loss) and the mIoU curve's (tab:green).
TAB_BLUE, TAB_GREEN = (31, 119, 180), (44, 160, 44)


@pytest.mark.parametrize("records, loss_drawn, miou_drawn", [
    (pseudoseg_records(), True, True), ([{"step": 1, "train/loss": 2.0}], True, False),
    ([], False, False)], ids=["pseudoseg", "no_eval_yet", "empty"])
def test_learning_curves_image_draws_whatever_was_logged(records, loss_drawn, miou_drawn):
  image = visualize.learning_curves_image(records, title="demo")
  assert image.dtype == np.uint8 and image.shape == (450, 1200, 3)
  loss_panel, miou_panel = image[:, :600], image[:, 600:]
  # The total loss is drawn in the left panel, the mIoU curve in the right one, which holds no loss.
  assert (pixels_of_colour(loss_panel, TAB_BLUE) > 50) == loss_drawn
  assert (pixels_of_colour(miou_panel, TAB_GREEN) > 50) == miou_drawn
  assert pixels_of_colour(miou_panel, TAB_BLUE) == 0


def test_metrics_and_png_round_trip(tmp_path):
  assert writers.read_metrics(str(tmp_path)) == []
  records = pseudoseg_records()
  with open(tmp_path / writers.METRICS_FILE, "w") as f:
    f.writelines(json.dumps(record) + "\n" for record in records)
  assert writers.read_metrics(str(tmp_path)) == records
  image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  writers.write_png(str(tmp_path / "x.png"), image)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "x.png")), image)
  assert sorted(os.listdir(tmp_path)) == [writers.METRICS_FILE, "x.png"]  # No .tmp left.


def test_a_torn_last_metrics_line_is_dropped_and_a_bad_middle_line_is_named(tmp_path):
  # A process killed while appending leaves half a line without its newline.
  path = tmp_path / writers.METRICS_FILE
  whole = [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5}]
  path.write_text("".join(json.dumps(r) + "\n" for r in whole) + '{"step": 3, "train/lo')
  assert writers.read_metrics(str(tmp_path)) == whole
  writers.truncate_metrics(str(tmp_path), last_step=2)
  assert path.read_text() == "".join(json.dumps(r) + "\n" for r in whole)
  path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl, line 2, is not a metrics record"):
    writers.truncate_metrics(str(tmp_path), last_step=2)
  assert path.read_text() == '{"step": 1}\nnot json\n{"step": 2}\n'  # Left as it was.


def test_images_written_to_tensorboard_read_back_exactly(tmp_path):
  writer = writers.MetricWriter(str(tmp_path))
  first = np.full((4, 6, 3), 10, np.uint8)
  second = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
  writer.write_images(1, {"grid": first})
  writer.write_images(3, {"grid": second, "other": first})
  writer.close()
  images = writers.read_tensorboard_images(str(tmp_path), "grid")
  assert [step for step, _ in images] == [1, 3]
  np.testing.assert_array_equal(images[1][1], second)
  assert writers.read_tensorboard_images(str(tmp_path), "missing") == []


def test_learning_curves_file_is_drawn_from_metrics_jsonl(tmp_path):
  with open(tmp_path / writers.METRICS_FILE, "w") as f:
    f.writelines(json.dumps(record) + "\n" for record in pseudoseg_records())
  path = visualize.write_learning_curves(str(tmp_path), demo.get_config())
  assert path == str(tmp_path / workdirs.LEARNING_CURVES_FILE)
  with Image.open(path) as image:
    assert image.size == (1200, 450)
