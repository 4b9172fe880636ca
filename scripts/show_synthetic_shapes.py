"""Writes a PNG grid of synthetic-shapes examples (image | coloured mask) for eyeballing the generator.

    python scripts/show_synthetic_shapes.py --out=/tmp/shapes.png [--split=train --start=0 --rows=8 --cols=4]

Mask colours: black background, one colour per class (legend printed), white = ignore band.
"""

import argparse
import os
import sys

import numpy as np
import tensorflow as tf

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pseudoseg_jax.data.datasets import synthetic_shapes  # noqa: E402

# Background black, ignore white, classes in easily told-apart colours.
PALETTE = np.array([(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
                    (245, 130, 48), (145, 30, 180), (70, 240, 240)], np.uint8)
GAP = 4


def coloured_mask(mask: np.ndarray) -> np.ndarray:
  rgb = PALETTE[np.minimum(mask, len(PALETTE) - 1)]
  rgb[mask == synthetic_shapes.IGNORE_LABEL] = 255
  return rgb


def grid(split: str, start: int, rows: int, cols: int) -> np.ndarray:
  size = synthetic_shapes.IMAGE_SIZE
  tile_width = 2 * size + GAP
  canvas = np.full((rows * (size + GAP), cols * (tile_width + GAP), 3), 128, np.uint8)
  for k in range(rows * cols):
    image, mask = synthetic_shapes.render_example(synthetic_shapes.example_rng(split, start + k))
    top, left = (k // cols) * (size + GAP), (k % cols) * (tile_width + GAP)
    canvas[top:top + size, left:left + size] = image
    canvas[top:top + size, left + size + GAP:left + tile_width] = coloured_mask(mask)
  return canvas


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--split", default="train", choices=sorted(synthetic_shapes.SPLIT_SEED_INDEX))
  parser.add_argument("--start", type=int, default=0)
  parser.add_argument("--rows", type=int, default=8)
  parser.add_argument("--cols", type=int, default=4)
  parser.add_argument("--zoom", type=int, default=2, help="nearest-neighbour upscaling factor")
  args = parser.parse_args()
  canvas = grid(args.split, args.start, args.rows, args.cols)
  canvas = canvas.repeat(args.zoom, axis=0).repeat(args.zoom, axis=1)
  tf.io.write_file(args.out, tf.io.encode_png(canvas))
  for class_id, name in enumerate(synthetic_shapes.CLASS_NAMES):
    print(f"{class_id} {name:<10} rgb{tuple(int(c) for c in PALETTE[class_id])}")


if __name__ == "__main__":
  main()
