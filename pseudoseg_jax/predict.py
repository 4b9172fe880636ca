"""Masks, overlays and class fractions for your own images, from a trained workdir.

  python -m pseudoseg_jax.predict --workdir=W --input=FILE|DIR|GLOB [--input=...] --output=DIR
      [--checkpoint=STEP|.../checkpoints/STEP] [--batch_size=8] [--scales=1.0[,...]] [--flip]
      [--window_stride=0.667]

For each image, in DIR:
  STEM.png          the predicted classes: a palette ('P') PNG of the image's size whose pixel
                    values are the class indices (0 = background), shown in the PASCAL VOC colours.
  STEM_overlay.jpg  the image with the class colours blended in (background pixels left as is).
  STEM.json         {"image", "height", "width", "mask", "overlay", "step", "checkpoint",
                    "classes": [{"index", "name", "fraction"}, ...]}: the classes present and their
                    share of the pixels (the fractions sum to 1).

Inputs: a file, a folder (its .jpg/.jpeg/.png/.bmp/.gif/.tif/.tiff/.webp files, not subfolders) or a
glob ('photos/**/*.jpg', image extensions only); --input may be repeated. Images are taken as they
are displayed: the EXIF orientation of a JPEG (or PNG) is applied, so a phone's portrait photo gives
a portrait mask that lines up with it; grayscale, palette and CMYK images become RGB, transparent
pixels are laid over mid gray (the model's padding colour).

Any size: an image that fits config.eval_crop_size is padded bottom/right to it, exactly as the
training evaluation pads, so a val image gets the mask its mIoU was measured with; a larger one is
predicted in sliding windows of the eval crop (see inference.py). Small images are batched. Large
photos are not downscaled: a model trained on VOC-sized images sees a 12-megapixel photo's objects
at a far larger scale than it learned, so resize such photos first if the masks look fragmented.

Names and safety: STEM is the file name without its extension, reduced to letters, digits, '.',
'_' and '-' (at most 200 of them); inputs with the same stem (a/x.jpg, b/x.png) get STEM, STEM_2,
... in input order. Nothing is written outside DIR: each file goes to a fresh temporary name in DIR
and is renamed (a symlink at the destination is replaced, never followed), and DIR may not be a
folder holding input images, so no input is ever overwritten. An image that cannot be read is
reported by name and skipped; the others are still predicted, and the command then lists the
failures and exits with status 1.

Paths: --workdir, --input and --output may be gs:// (any URL etils.epath reads, through
pseudoseg_jax/paths.py). A bucket has no rename: each output file is uploaded whole instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tempfile
from typing import Sequence

# TensorFlow comes in with the libraries below; keep its start-up chatter off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from pseudoseg_jax import inference, paths, visualize  # noqa: E402
from pseudoseg_jax.data import augment  # noqa: E402
from pseudoseg_jax.writers import log  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# What PIL raises for a file that is not a readable image (UnidentifiedImageError is an OSError).
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
OVERLAY_ALPHA = 0.5
TRANSPARENT_FILL = (128, 128, 128)
MAX_STEM_LENGTH = 200


# ---------------------------------------------------------------- which files, which names
def is_image_name(path: str) -> bool:
  name = os.path.basename(path)
  return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def expand_inputs(patterns: Sequence[str]) -> list[str]:
  """The image files named by files, folders and globs, in order, each once."""
  images, seen = [], set()
  for pattern in patterns:
    if paths.isdir(pattern):
      found = sorted(os.path.join(pattern, name) for name in paths.listdir(pattern)
                     if is_image_name(name) and paths.isfile(os.path.join(pattern, name)))
    elif paths.isfile(pattern):
      found = [pattern]  # Named explicitly: tried whatever its extension; PIL decides.
    elif any(char in pattern for char in "*?["):
      found = sorted(path for path in paths.glob(pattern)
                     if is_image_name(path) and paths.isfile(path))
    else:
      raise FileNotFoundError(f"--input={pattern}: no such file or folder.")
    if not found:
      raise FileNotFoundError(f"--input={pattern} names no image "
                              f"({'/'.join(IMAGE_EXTENSIONS)}).")
    for path in found:
      if real_path(path) not in seen:
        seen.add(real_path(path))
        images.append(path)
  return images


def real_path(path: str) -> str:
  """os.path.realpath of a local path (links resolved); a URL as it is."""
  return path if paths.is_remote(path) else os.path.realpath(path)


def safe_stem(path: str) -> str:
  """The file name without extension, as a harmless file name (no separators, no leading dot),
  short enough that STEM_overlay.jpg and the _N of a repeat stay under the 255-byte name limit."""
  stem = os.path.splitext(os.path.basename(path))[0]
  return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).lstrip(".")[:MAX_STEM_LENGTH] or "image"


def unique_stems(image_paths: Sequence[str]) -> list[str]:
  """safe_stem of each path; repeats get _2, _3, ... Compared case-insensitively, as macOS and
  Windows file systems compare names."""
  stems, taken = [], set()
  for path in image_paths:
    base = stem = safe_stem(path)
    suffix = 1
    while stem.casefold() in taken:
      suffix += 1
      stem = f"{base}_{suffix}"
    taken.add(stem.casefold())
    stems.append(stem)
  return stems


def check_output_dir(output: str, images: Sequence[str]) -> None:
  """Refuses an --output that holds input images: the masks (PNG) and overlays (JPEG) would sit
  among the photos, could replace one of them, and would be read as inputs next time."""
  if paths.exists(output) and not paths.isdir(output):
    raise NotADirectoryError(f"--output={output} exists and is not a folder.")
  output_real = real_path(paths.absolute(output))
  for path in images:
    folders = {real_path(os.path.dirname(paths.absolute(path))),
               os.path.dirname(real_path(path))}
    if output_real in folders:
      raise ValueError(f"--output={output} holds the input {path}: choose another folder, so that "
                       "no input is overwritten and outputs are not mixed with the images.")


# ---------------------------------------------------------------- reading
def to_rgb(image: Image.Image) -> Image.Image:
  if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, TRANSPARENT_FILL + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")
  if image.mode.startswith("I"):
    # 16-bit grayscale: PIL's convert would clip it to 0-255 instead of scaling it.
    values = np.asarray(image).astype(np.float64)
    if values.max() > 255:
      values = values / 257.0
    gray = np.clip(np.round(values), 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([gray] * 3, axis=-1))
  return image.convert("RGB")


def read_image(path: str) -> np.ndarray:
  """uint8 [H, W, 3] as the image is displayed (EXIF orientation applied). Raises READ_ERRORS."""
  with Image.open(paths.readable(path)) as image:
    image.load()
    upright = ImageOps.exif_transpose(image)
    return np.asarray(to_rgb(upright), np.uint8)


# ---------------------------------------------------------------- writing
def class_fractions(mask: np.ndarray, class_names: Sequence[str]) -> list[dict]:
  """{"index", "name", "fraction"} of each class present, by index; fractions sum to 1."""
  counts = np.bincount(mask.reshape(-1), minlength=len(class_names))
  total = int(counts.sum())
  return [{"index": int(index), "name": str(class_names[index]),
           "fraction": float(counts[index]) / total}
          for index in np.flatnonzero(counts)]


def mask_picture(mask: np.ndarray) -> Image.Image:
  """'P' PNG content: values are the class indices, the palette VOC's."""
  picture = Image.fromarray(mask.astype(np.uint8))  # Mode 'L'; putpalette makes it 'P'.
  picture.putpalette(visualize.voc_palette().reshape(-1).tolist())
  return picture


def overlay(image: np.ndarray, mask: np.ndarray, num_classes: int,
            alpha: float = OVERLAY_ALPHA) -> np.ndarray:
  """uint8 [H, W, 3]: the class colours blended into the image; background (class 0) untouched,
  as its VOC colour is black and would only darken the photo."""
  colors = visualize.colorize(mask, num_classes).astype(np.float32)
  blended = (1 - alpha) * image.astype(np.float32) + alpha * colors
  blended = np.where((mask > 0)[..., None], blended, image)
  return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def write_atomically(folder: str, name: str, write) -> str:
  """write(file) into a temporary file of `folder`, then renamed to `name`: a reader never sees
  half a file, and a symlink already at `name` is replaced rather than written through. (A URL:
  uploaded in one piece, see paths.replace_file.)"""
  path = os.path.join(folder, name)
  if os.path.dirname(paths.absolute(path)) != paths.absolute(folder):
    raise ValueError(f"Refusing to write {name!r} outside {folder}.")
  if paths.is_remote(path):
    paths.replace_file(path, write, binary=True)
    return path
  handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(name)[1])
  try:
    with os.fdopen(handle, "wb") as f:
      write(f)
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise
  return path


def write_prediction(folder: str, stem: str, image_path: str, image: np.ndarray,
                     mask: np.ndarray, model: inference.TrainedModel) -> None:
  num_classes = model.config.data.num_classes
  names = {"mask": f"{stem}.png", "overlay": f"{stem}_overlay.jpg"}
  write_atomically(folder, names["mask"], lambda f: mask_picture(mask).save(f, format="PNG"))
  write_atomically(folder, names["overlay"], lambda f: Image.fromarray(
      overlay(image, mask, num_classes)).save(f, format="JPEG", quality=90))
  summary = {"image": image_path, "height": int(mask.shape[0]), "width": int(mask.shape[1]),
             **names, "step": model.step, "checkpoint": model.checkpoint,
             "classes": class_fractions(mask, model.class_names)}
  write_atomically(folder, f"{stem}.json",
                   lambda f: f.write(json.dumps(summary, indent=2).encode()))


# ---------------------------------------------------------------- the whole job
@dataclasses.dataclass
class Report:
  written: list  # (input path, stem) of each image predicted.
  failed: list  # (input path, reason) of each image that could not be read.


def run(workdir: str, inputs: Sequence[str], output: str, *, checkpoint: str | None = None,
        batch_size: int = 8, scales: Sequence[float] = (1.0,), flip: bool = False,
        window_stride: float = inference.DEFAULT_WINDOW_STRIDE) -> Report:
  """The command: inputs and --output checked before the model is restored."""
  image_paths = expand_inputs(inputs)
  check_output_dir(output, image_paths)
  model = inference.restore(workdir, checkpoint)
  scores_fn = inference.make_scores_fn(model, scales=scales, flip=flip, batch_size=batch_size)
  return predict_files(model, scores_fn, image_paths, output, window_stride=window_stride)


def predict_files(model: inference.TrainedModel, scores_fn, image_paths: Sequence[str],
                  output: str, *,
                  window_stride: float = inference.DEFAULT_WINDOW_STRIDE) -> Report:
  """Predicts `image_paths` into `output` with a compiled inference.make_scores_fn."""
  check_output_dir(output, image_paths)
  if model.config.data.num_classes > 256:
    raise ValueError(f"{model.config.data.num_classes} classes do not fit a palette PNG (256).")
  stems = unique_stems(image_paths)
  paths.makedirs(output)
  window = augment.as_height_width(model.config.eval_crop_size)
  report = Report(written=[], failed=[])

  def readable_images():
    for path, stem in zip(image_paths, stems):
      try:
        image = read_image(path)
      except READ_ERRORS as error:
        reason = f"{type(error).__name__}: {error}"
        log.info("Skipping %s: cannot read it as an image (%s).", path, reason)
        report.failed.append((path, reason))
        continue
      yield (path, stem, image), inference.normalize_image(image)

  log.info("Predicting %d image(s) into %s (windows of %dx%d, %d per batch).", len(image_paths),
           output, window[0], window[1], scores_fn.batch_size)
  predictions = inference.predict_tiled(
      readable_images(), scores_fn, window=window,
      stride=inference.stride_of(window, window_stride), batch_size=scores_fn.batch_size)
  for (path, stem, image), scores in predictions:
    mask = np.argmax(scores, axis=-1).astype(np.uint8)
    write_prediction(output, stem, path, image, mask, model)
    report.written.append((path, stem))
  log.info("Wrote %d prediction(s) to %s%s.", len(report.written), output,
           f"; {len(report.failed)} image(s) failed" if report.failed else "")
  return report


def main(argv):
  values = inference.program_flags(argv)
  report = run(values.workdir, values.input, values.output, checkpoint=values.checkpoint or None,
               batch_size=values.batch_size, scales=inference.parse_scales(values.scales),
               flip=values.flip, window_stride=values.window_stride)
  if report.failed:
    lines = "\n".join(f"  {path}: {reason}" for path, reason in report.failed)
    print(f"{len(report.failed)} of {len(report.failed) + len(report.written)} image(s) could "
          f"not be read:\n{lines}", file=sys.stderr)
    sys.exit(1)


def define_flags():
  from absl import flags
  inference.define_shared_flags()
  flags.DEFINE_multi_string("input", None, "An image, a folder of images or a glob; repeatable.")
  flags.DEFINE_string("output", None, "Folder for STEM.png, STEM_overlay.jpg and STEM.json.")
  flags.DEFINE_integer("batch_size", 8, "Windows (eval-crop-sized) per batch.")
  flags.mark_flags_as_required(["workdir", "input", "output"])


if __name__ == "__main__":
  from absl import app, logging
  logging.set_verbosity(logging.WARNING)
  define_flags()
  app.run(main)
