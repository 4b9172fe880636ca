"""Pictures for people: coloured class maps and image grids (numpy), and the two charts, the
confusion matrix and the learning curves (matplotlib, imported only when a chart is drawn).

Class c gets the PASCAL VOC colour of c (0 = black background); pixels that carry no class (the
ignore label, or -1 for pseudo labels that do not count) are drawn in VOC's light "void" colour.
Every function returns a uint8 [H, W, 3] array, ready for TensorBoard or a PNG file, but
write_learning_curves, which draws a workdir's metrics.jsonl into its learning_curves.png.
"""

from __future__ import annotations

import os
from typing import Sequence

import ml_collections
import numpy as np

from pseudoseg_jax import paths, workdirs, writers

VOID_COLOR = (224, 224, 192)


def voc_palette(num_colors: int = 256) -> np.ndarray:
  """uint8 [num_colors, 3]: the bit-interleaved PASCAL VOC colour map."""
  palette = np.zeros((num_colors, 3), np.uint8)
  for index in range(num_colors):
    value, color = index, [0, 0, 0]
    for shift in range(7, -1, -1):
      for channel in range(3):
        color[channel] |= ((value >> channel) & 1) << shift
      value >>= 3
    palette[index] = color
  return palette


_PALETTE = voc_palette()


def colorize(class_map: np.ndarray, num_classes: int) -> np.ndarray:
  """int [..., H, W] -> uint8 [..., H, W, 3]; values outside [0, num_classes) are void."""
  class_map = np.asarray(class_map)
  known = (class_map >= 0) & (class_map < num_classes)
  colors = _PALETTE[np.where(known, class_map, 0)]
  colors[~known] = VOID_COLOR
  return colors


def image_to_uint8(image: np.ndarray) -> np.ndarray:
  """A network input in [-1, 1] back to uint8 [0, 255]."""
  return np.clip(np.round((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def resize_nearest_to(x: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """[N, h, w, ...] -> [N, H, W, ...] by align-corners nearest sampling (stride-4 maps onto the
  crop they were computed from: DeepLab's 4k + 1 sizes line up exactly)."""
  height, width = x.shape[1:3]
  rows = np.round(np.arange(size[0]) * (height - 1) / max(size[0] - 1, 1)).astype(int)
  cols = np.round(np.arange(size[1]) * (width - 1) / max(size[1] - 1, 1)).astype(int)
  return x[:, rows][:, :, cols]


def grid(columns: Sequence[np.ndarray], gap: int = 2) -> np.ndarray:
  """Columns of uint8 [N, H, W, 3] (one panel per example) -> one uint8 [N*(H+gap), K*(W+gap), 3]
  image: a row per example, a column per panel, separated by white gaps."""
  n, height, width = columns[0].shape[:3]
  canvas = np.full((n * (height + gap) - gap, len(columns) * (width + gap) - gap, 3), 255,
                   np.uint8)
  for k, column in enumerate(columns):
    for i in range(n):
      top, left = i * (height + gap), k * (width + gap)
      canvas[top:top + height, left:left + width] = column[i]
  return canvas


# --------------------------------------------------------------------------------------------------
# Charts. Drawn on a bare Agg canvas, never through pyplot: no display needed, no global figure
# state left behind in a long training process.
# --------------------------------------------------------------------------------------------------

CHART_DPI = 100
# Loss terms drawn in the learning curves, in this order, when the run logged them.
LOSS_CURVES = (("train/loss", "total"), ("train/supervised_loss", "supervised"),
               ("train/consistency_loss", "consistency"), ("train/sgc_loss", "SGC"),
               ("train/classification_loss", "classification"))
MIOU_CURVE = "val/miou"
# Up to this many classes the confusion matrix has room to print each cell's percentage.
MAX_CLASSES_WITH_NUMBERS = 25


def _new_figure(width_inches: float, height_inches: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  figure = Figure(figsize=(width_inches, height_inches), dpi=CHART_DPI, layout="constrained")
  FigureCanvasAgg(figure)
  return figure


def _figure_to_array(figure) -> np.ndarray:
  figure.canvas.draw()
  return np.array(figure.canvas.buffer_rgba())[..., :3]


def row_normalized(confusion: np.ndarray) -> np.ndarray:
  """Each row (true class) as fractions of its pixels; NaN for a class absent from the ground
  truth, so that "never seen" is not drawn as "never right"."""
  confusion = np.asarray(confusion, np.float64)
  totals = confusion.sum(axis=1, keepdims=True)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(totals > 0, confusion / totals, np.nan)


def confusion_matrix_image(confusion: np.ndarray, class_names: Sequence[str],
                           title: str = "") -> np.ndarray:
  """The row-normalized confusion matrix as a heat map: rows = true class, columns = predicted,
  class names on both axes, each cell's percentage written in when there is room (up to
  MAX_CLASSES_WITH_NUMBERS classes); grey rows are classes absent from the ground truth."""
  import matplotlib
  import matplotlib.colors
  fractions = row_normalized(confusion)
  num_classes = len(fractions)
  if len(class_names) != num_classes:
    raise ValueError(f"{len(class_names)} class names for a {num_classes}-class confusion matrix.")
  # Cells shrink with the class count down to what a 6 pt label still fits (81 classes: ~11 in).
  cell_inches = min(0.5, max(0.14, 7.0 / num_classes))
  font_size = 9 if num_classes <= MAX_CLASSES_WITH_NUMBERS else 6
  label_inches = max(len(name) for name in class_names) * font_size * 0.6 / 72 + 0.6
  side = num_classes * cell_inches
  figure = _new_figure(side + label_inches + 1.2, side + label_inches + 0.5)
  axes = figure.add_subplot()
  colormap = matplotlib.colormaps["Blues"].with_extremes(bad=(0.85, 0.85, 0.85))
  # A square-root scale: a 5% confusion is visible next to a 90% diagonal, also among 81 classes.
  norm = matplotlib.colors.PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
  heat_map = axes.imshow(np.ma.masked_invalid(fractions), cmap=colormap, norm=norm,
                         interpolation="nearest")
  ticks = np.arange(num_classes)
  axes.set_xticks(ticks, labels=class_names, rotation=90, fontsize=font_size)
  axes.set_yticks(ticks, labels=class_names, fontsize=font_size)
  absent = np.isnan(fractions[:, 0])
  axes.set_xlabel("predicted class" + ("\n(grey rows: classes absent from the ground truth)"
                                       if absent.any() else ""))
  axes.set_ylabel("true class")
  if title:
    axes.set_title(title)
  figure.colorbar(heat_map, ax=axes, shrink=0.6, ticks=[0, 0.05, 0.2, 0.5, 1],
                  label="fraction of the true class's pixels")
  if num_classes <= MAX_CLASSES_WITH_NUMBERS:
    for row, col in zip(*np.nonzero(np.nan_to_num(fractions) >= 0.005)):
      value = fractions[row, col]
      axes.text(col, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=font_size - 1,
                color="white" if norm(value) > 0.7 else "black")
  return _figure_to_array(figure)


def _finite_series(records: Sequence[dict], name: str) -> tuple[list, list]:
  """(steps, values) of the records that logged `name` as a finite number (metrics.jsonl writes
  NaN as null and infinities as strings)."""
  steps, values = [], []
  for record in records:
    value = record.get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
      steps.append(record["step"])
      values.append(value)
  return steps, values


def learning_curves_image(records: Sequence[dict], title: str = "") -> np.ndarray:
  """Two panels against step: the training loss with its terms (those the run logged), and the
  validation mIoU. `records` are metrics.jsonl's lines as dicts."""
  figure = _new_figure(12, 4.5)
  loss_axes, miou_axes = figure.subplots(1, 2)
  loss_curves = [(label, *_finite_series(records, name)) for name, label in LOSS_CURVES]
  loss_curves = [curve for curve in loss_curves if curve[1]]
  if len(loss_curves) == 2:
    loss_curves = loss_curves[:1]  # A supervised run: its one term is the total.
  for label, steps, values in loss_curves:
    loss_axes.plot(steps, values, label=label, linewidth=2.0 if label == "total" else 1.2,
                   marker="." if len(steps) < 30 else None)
  _label_panel(loss_axes, "training loss", "loss (mean over the logging interval)",
               has_data=bool(loss_curves))
  steps, values = _finite_series(records, MIOU_CURVE)
  if values:
    miou_axes.plot(steps, values, marker="o", color="tab:green", label="val mIoU")
    miou_axes.annotate(f"{values[-1]:.3f}", (steps[-1], values[-1]), textcoords="offset points",
                       xytext=(0, 8), ha="center")
    miou_axes.set_ylim(0.0, max(0.05, 1.15 * max(values)))
  _label_panel(miou_axes, "validation mIoU", "mIoU", has_data=bool(values))
  logged_steps = [record["step"] for record in records]
  if logged_steps and max(logged_steps) - min(logged_steps) < 2:
    # A run of a step or two: widen the axis so that its ticks can be whole steps.
    for axes in (loss_axes, miou_axes):
      axes.set_xlim(min(logged_steps) - 1, max(logged_steps) + 1)
  if title:
    figure.suptitle(title)
  return _figure_to_array(figure)


def _label_panel(axes, title: str, y_label: str, has_data: bool) -> None:
  from matplotlib.ticker import MaxNLocator
  axes.set_title(title)
  axes.set_xlabel("step")
  axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # Never "step 1.975" on a short run.
  axes.set_ylabel(y_label)
  axes.grid(True, alpha=0.3)
  if has_data:
    axes.legend(loc="best")
  else:
    axes.set_xticks([])
    axes.set_yticks([])
    axes.text(0.5, 0.5, "not logged yet", transform=axes.transAxes, ha="center", va="center",
              color="grey")


def pseudo_label_grid(maps: dict, unlabeled: dict, num_classes: int,
                      max_images: int = 4) -> np.ndarray:
  """One uint8 image: a row per unlabeled image; columns weak view, strong view, CAM, SGC, pseudo
  label (void where it does not count), prediction on the strong view, ground truth."""
  weak = image_to_uint8(unlabeled["weak_image"][:max_images])
  size = weak.shape[1:3]
  columns = [weak, image_to_uint8(maps["strong_image"][:max_images])]
  for name in ("cam", "sgc", "pseudo_label", "strong_prediction", "ground_truth"):
    if name in maps:
      class_map = resize_nearest_to(np.asarray(maps[name][:max_images]), size)
      columns.append(colorize(class_map, num_classes))
  return grid(columns)


def write_learning_curves(workdir: str, config: ml_collections.ConfigDict) -> str:
  """WORKDIR/learning_curves.png from metrics.jsonl, which holds the whole history after a
  resume too. Returns its path."""
  path = workdirs.learning_curves_path(workdir)
  title = f"{config.method} on {config.data.name}: {os.path.basename(paths.absolute(workdir))}"
  writers.write_png(path, learning_curves_image(writers.read_metrics(workdir), title))
  return path
