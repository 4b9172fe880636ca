"""Dataset-level confusion matrix -> mIoU, as DeepLab evaluates (SPEC section 8).

The confusion matrix is accumulated over the whole split (not averaged per image or per batch), and
pixels labelled `ignore_label` (the void band and the padding to the eval crop) never count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(predictions: jax.Array, labels: jax.Array, num_classes: int,
                     ignore_label: int) -> jax.Array:
  """int32 [C, C] counts with rows = ground truth, columns = prediction.

  Labels outside [0, C) other than the ignore label are also dropped rather than wrapping into
  another class's cell.
  """
  labels = labels.astype(jnp.int32)
  predictions = predictions.astype(jnp.int32)
  valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  cell = jnp.where(valid, labels * num_classes + predictions, 0)
  counts = jnp.bincount(cell.reshape(-1), weights=valid.reshape(-1).astype(jnp.int32),
                        length=num_classes * num_classes)
  return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
  """IoU of each class; NaN for a class that is neither in the ground truth nor predicted."""
  confusion = np.asarray(confusion, dtype=np.float64)
  true_positive = np.diag(confusion)
  union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positive
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, true_positive / union, np.nan)


def summarize(confusion: np.ndarray, prefix: str = "val") -> dict:
  """mIoU (mean over classes with a defined IoU), per-class IoU and pixel accuracy."""
  ious = iou_per_class(confusion)
  total = float(np.sum(confusion))
  return {
      f"{prefix}/miou": float(np.nanmean(ious)) if np.any(~np.isnan(ious)) else float("nan"),
      f"{prefix}/iou_per_class": [None if np.isnan(v) else float(v) for v in ious],
      f"{prefix}/pixel_accuracy": float(np.trace(confusion)) / total if total else float("nan"),
  }


def confusion_matrix_numpy(predictions: np.ndarray, labels: np.ndarray, num_classes: int,
                           ignore_label: int) -> np.ndarray:
  """confusion_matrix on the host, int64, for images of any size (no compile per shape)."""
  labels = np.asarray(labels).astype(np.int64).reshape(-1)
  predictions = np.asarray(predictions).astype(np.int64).reshape(-1)
  valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  cells = labels[valid] * num_classes + predictions[valid]
  return np.bincount(cells, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_table(confusion: np.ndarray, class_names) -> str:
  """A plain-text table: class, IoU (or '-' when undefined), ground-truth pixels; mIoU last."""
  confusion = np.asarray(confusion)
  ious = iou_per_class(confusion)
  pixels = confusion.sum(axis=1)
  width = max([len("class")] + [len(str(name)) for name in class_names])
  lines = [f"{'class':<{width}}  {'IoU':>7}  {'pixels':>12}"]
  for name, iou, count in zip(class_names, ious, pixels):
    shown = "-" if np.isnan(iou) else f"{iou:.4f}"
    lines.append(f"{str(name):<{width}}  {shown:>7}  {int(count):>12,}")
  miou = np.nanmean(ious) if np.any(~np.isnan(ious)) else float("nan")
  lines.append(f"{'mIoU':<{width}}  {miou:>7.4f}  {int(pixels.sum()):>12,}")
  return "\n".join(lines)
