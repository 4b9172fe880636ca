"""Reading and checking image and label files on disk, once, with errors that name the file.

Masks hold class indices. A VOC-style palette PNG ('P' mode) stores them as palette indices and a
grayscale PNG ('L' mode) as values; both are read as they are, never through RGB (decoding a palette
PNG to colours and back would depend on the palette). An RGB mask is refused: its colours are not
class indices.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
from PIL import Image

from pseudoseg_jax import paths
from pseudoseg_jax.writers import log

# PIL modes whose pixel values are the stored integers.
INDEX_MODES = ("P", "L", "I", "I;16")
# What PIL raises for a file it cannot use. DecompressionBombError (a few KB of PNG declaring
# billions of pixels) is no OSError: without it such a file would escape unnamed.
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

T = TypeVar("T")
R = TypeVar("R")


class BadExampleError(ValueError):
  """An image or mask that cannot be used; the message names the file."""


def read_index_mask(path: str) -> np.ndarray:
  """uint8 or int32 [H, W] class indices of a 'P' or 'L' (or 16-bit) PNG."""
  try:
    with Image.open(paths.readable(path)) as mask:
      mode = mask.mode
      if mode not in INDEX_MODES:
        raise BadExampleError(
            f"Mask {path} is a {mode!r} image: masks must be single-channel class indices "
            f"(palette 'P' or grayscale 'L' PNG), not colours.")
      values = np.asarray(mask)
  except BadExampleError:
    raise
  except READ_ERRORS as error:
    raise BadExampleError(f"Mask {path} cannot be read: {error}") from error
  return values if values.dtype == np.uint8 else values.astype(np.int32)


def read_image_size(path: str) -> tuple[int, int]:
  """(height, width) of an image file, decoding it fully so that a truncated file is caught here."""
  try:
    with Image.open(paths.readable(path)) as image:
      image.load()
      width, height = image.size
  except READ_ERRORS as error:
    raise BadExampleError(f"Image {path} cannot be decoded: {error}") from error
  return height, width


def check_mask_values(mask: np.ndarray, *, num_classes: int, ignore_label: int, path: str) -> None:
  """Every value is a class index in [0, num_classes) or the ignore label."""
  values = np.unique(mask)
  bad = values[(values >= num_classes) & (values != ignore_label)]
  if bad.size:
    raise BadExampleError(
        f"Mask {path} holds values {bad.tolist()[:10]} outside the classes [0, {num_classes}) "
        f"and not the ignore label {ignore_label} (config.data.num_classes, "
        f"config.data.ignore_label).")


def check_same_size(image_size: tuple[int, int], mask_shape: tuple[int, ...], *, image_path: str,
                    mask_path: str) -> None:
  if tuple(image_size) != tuple(mask_shape[:2]):
    raise BadExampleError(
        f"Mask {mask_path} is {mask_shape[0]}x{mask_shape[1]} but image {image_path} is "
        f"{image_size[0]}x{image_size[1]} (height x width): they must match.")


def read_checked_mask(mask_path: str, image_path: str, *, num_classes: int,
                      ignore_label: int) -> np.ndarray:
  """The mask of an image, checked for readability, size and values."""
  mask = read_index_mask(mask_path)
  check_same_size(read_image_size(image_path), mask.shape, image_path=image_path,
                  mask_path=mask_path)
  check_mask_values(mask, num_classes=num_classes, ignore_label=ignore_label, path=mask_path)
  return mask


def read_good(items: Iterable[T], read: Callable[[T], R], *, skip_bad: bool,
              what: str) -> Iterator[tuple[T, R]]:
  """(item, read(item)) for each item, lazily. A BadExampleError stops everything unless
  `skip_bad`, in which case the item is logged, skipped and counted."""
  skipped = 0
  for item in items:
    try:
      value = read(item)
    except BadExampleError as error:
      if not skip_bad:
        raise
      skipped += 1
      log.warning("Skipping a bad example of %s: %s", what, error)
      continue
    yield item, value
  if skipped:
    log.warning("Skipped %d bad example(s) of %s (config.data.skip_bad_examples=True).", skipped,
                what)


def keep_good(items: Iterable[T], check: Callable[[T], object], *, skip_bad: bool,
              what: str) -> list[T]:
  """The items whose `check(item)` passes, with read_good's rule for the others."""
  return [item for item, _ in read_good(items, check, skip_bad=skip_bad, what=what)]
