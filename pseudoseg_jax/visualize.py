"""Colour class maps and lay out image grids (numpy only): TensorBoard summaries and predictions.

Class c gets the PASCAL VOC colour of c (0 = black background); pixels that carry no class (the
ignore label, or -1 for pseudo labels that do not count) are drawn in VOC's light "void" colour.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

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
