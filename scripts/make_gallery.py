"""The README gallery from a trained demo workdir: pseudo labels as trained on, and predictions.

    python scripts/make_gallery.py --workdir=workdirs/demo --out=docs/gallery

Writes OUT/pseudo_labels.png (the last TensorBoard pseudo-label grid of the run: per unlabeled image
weak view, strong view, CAM, SGC, pseudo label, strong-view prediction, ground truth) and
OUT/predictions.png (validation images of synthetic_shapes: input | `python -m pseudoseg_jax.predict`
mask | ground truth), running predict on them into a scratch folder.
"""

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pseudoseg_jax import visualize, workdirs, writers  # noqa: E402
from pseudoseg_jax.data.datasets import synthetic_shapes  # noqa: E402

UPSCALE = 2  # 96-px images are small on a README page.


def validation_examples(indices, class_colours: bool):
  return [synthetic_shapes.render_example(synthetic_shapes.example_rng("validation", index),
                                          class_colours)
          for index in indices]


def predicted_masks(workdir: str, images) -> list:
  """The masks predict writes for `images`, run as a user would, through the CLI."""
  with tempfile.TemporaryDirectory() as scratch:
    inputs, outputs = os.path.join(scratch, "in"), os.path.join(scratch, "out")
    os.makedirs(inputs)
    for number, image in enumerate(images):
      Image.fromarray(image).save(os.path.join(inputs, f"val_{number}.png"))
    subprocess.run([sys.executable, "-m", "pseudoseg_jax.predict", f"--workdir={workdir}",
                    f"--input={inputs}", f"--output={outputs}"], check=True)
    return [np.asarray(Image.open(os.path.join(outputs, f"val_{number}.png")))
            for number in range(len(images))]


def enlarged(image: np.ndarray) -> np.ndarray:
  return np.repeat(np.repeat(image, UPSCALE, axis=0), UPSCALE, axis=1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--first", type=int, default=0, help="First validation index.")
  parser.add_argument("--count", type=int, default=4)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)

  grids = writers.read_tensorboard_images(args.workdir, "pseudo_labels")
  if grids:
    step, grid = grids[-1]
    writers.write_png(os.path.join(args.out, "pseudo_labels.png"), enlarged(grid))
    print(f"pseudo_labels.png: the grid of step {step}")

  # The run's own variant of the dataset (the demo's is colour_cue).
  variant = workdirs.read_config(args.workdir).data.name.partition("/")[2] or "default"
  class_colours = synthetic_shapes.SyntheticShapes.builder_configs[variant].class_colours
  examples = validation_examples(range(args.first, args.first + args.count), class_colours)
  masks = predicted_masks(args.workdir, [image for image, _ in examples])
  num_classes = synthetic_shapes.NUM_CLASSES
  rows = visualize.grid([
      np.stack([image for image, _ in examples]),
      np.stack([visualize.colorize(mask, num_classes) for mask in masks]),
      np.stack([visualize.colorize(truth, num_classes) for _, truth in examples]),
  ])
  writers.write_png(os.path.join(args.out, "predictions.png"), enlarged(rows))
  print(f"predictions.png: validation images {args.first}..{args.first + args.count - 1}")


if __name__ == "__main__":
  main()
