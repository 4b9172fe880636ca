"""A user's own images as a dataset (config.data.name='folder'), laid out as

  ROOT/images/ID.jpg|.jpeg|.png   any case; grayscale, palette and RGBA images are read as RGB.
  ROOT/masks/ID.png               class indices: palette ('P') or grayscale ('L') PNG, never RGB.
  ROOT/splits/val.txt             required: the evaluation images (one id per line; with masks).
  ROOT/splits/labeled.txt         optional: the labeled pool (all with masks).
  ROOT/splits/unlabeled.txt       optional: PseudoSeg's unlabeled pool (masks not needed).
  ROOT/classes.txt                optional: one class name per line, background first.

Split lines are read by subsets.read_id_list: a bare id, or a path whose stem is the id. Files of
other extensions, dot files ('._a.jpg') and subfolders in images/ and masks/ are ignored.

Which images go where:
  - val: splits/val.txt. It is required: a silently drawn holdout would make a run's numbers
    depend on a rule the user never saw.
  - labeled pool: splits/labeled.txt, else every image that has a mask and is not in val.
  - labeled: config.data.labeled_list if set (it overrides splits/labeled.txt; any image not in
    val), else config.data.num_labeled or labeled_fraction sampled from the pool with
    config.data.split_seed, else the whole pool (subsets.select_labeled_ids).
  - unlabeled: splits/unlabeled.txt, else every image not in val; minus the labeled images unless
    config.data.unlabeled_includes_labeled. Only read for method='pseudoseg'.
  - A labeled or unlabeled image that is also in val is an error (training on evaluation images).
  - If every unlabeled image has a mask, the masks come along (image-level labels for
    pseudoseg.weak_labels=True, pseudo-label accuracy); otherwise none do
    (unlabeled_has_masks=False) and weak_labels=True is refused.
Classes: config.data.class_names if set, else ROOT/classes.txt, else 'class_0', 'class_1', ...;
config.data.num_classes must equal their number. The ignore label is config.data.ignore_label.

Every file used is checked once before training, in a thread pool (the decoders release the GIL):
images decode fully, masks read as indices, have the image's size and hold only class indices or
the ignore label. A bad file stops the run naming it, or with config.data.skip_bad_examples=True is
skipped, logged and counted (label_files.keep_good). A val image larger than
config.eval_crop_size is refused then too, not at the first evaluation hours later.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import Callable, Optional, Sequence

import ml_collections
import numpy as np
import tensorflow as tf
from PIL import Image

from pseudoseg_jax import paths
from pseudoseg_jax.data.datasets import label_files, subsets
from pseudoseg_jax.data.datasets.source import Source
from pseudoseg_jax.writers import log

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MASK_EXTENSIONS = (".png",)
SPLIT_NAMES = ("labeled", "unlabeled", "val")


@dataclasses.dataclass(frozen=True)
class FolderExample:
  example_id: str
  image_path: str
  mask_path: str = ""  # Empty: an unlabeled image without a mask.


@dataclasses.dataclass(frozen=True)
class FolderIds:
  """The ids of each role, after the rules of the module docstring."""
  labeled: list
  unlabeled: list
  val: list


# ---------------------------------------------------------------- files on disk
def require_root(root: str) -> str:
  if not root:
    raise ValueError("config.data.root is empty: set it to the folder that holds images/, masks/ "
                     "and splits/.")
  if not tf.io.gfile.isdir(root):
    raise FileNotFoundError(f"config.data.root={root} is not a folder.")
  return root


def files_by_stem(folder: str, extensions: Sequence[str], what: str) -> dict[str, str]:
  """{stem: path} of the files in `folder` with one of `extensions` (any case).

  Two files with one stem (a.jpg and a.png) would make the id ambiguous: an error naming both.
  """
  found = {}
  for name in sorted(tf.io.gfile.listdir(folder)):
    stem, extension = os.path.splitext(name.rstrip("/"))
    # Dot files are not images even when named like one: macOS writes '._a.jpg' next to 'a.jpg'.
    if extension.lower() not in extensions or name.startswith("."):
      continue
    path = os.path.join(folder, name)
    if stem in found:
      raise ValueError(f"Two {what} files have the id {stem!r}: {found[stem]} and {path}. Keep "
                       "one, or rename the other: ids (file stems) must be unique.")
    found[stem] = path
  return found


def list_images(root: str) -> dict[str, str]:
  folder = os.path.join(root, "images")
  if not tf.io.gfile.isdir(folder):
    raise FileNotFoundError(f"{folder} does not exist: the folder dataset keeps its images there.")
  images = files_by_stem(folder, IMAGE_EXTENSIONS, "image")
  if not images:
    raise ValueError(f"{folder} holds no {'/'.join(IMAGE_EXTENSIONS)} images.")
  return images


def list_masks(root: str) -> dict[str, str]:
  folder = os.path.join(root, "masks")
  return files_by_stem(folder, MASK_EXTENSIONS, "mask") if tf.io.gfile.isdir(folder) else {}


def read_split(root: str, name: str) -> Optional[list[str]]:
  """The ids of ROOT/splits/NAME.txt, or None when there is no such file."""
  path = split_path(root, name)
  return subsets.read_id_list(path) if tf.io.gfile.exists(path) else None


def split_path(root: str, name: str) -> str:
  return os.path.join(root, "splits", f"{name}.txt")


# ---------------------------------------------------------------- classes
def read_class_names_file(root: str) -> Optional[tuple]:
  """The names of ROOT/classes.txt (blank lines skipped), or None when there is no such file."""
  path = os.path.join(root, "classes.txt")
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    names = tuple(line.strip() for line in f if line.strip())
  if len(names) < 2:
    raise ValueError(f"{path} must name at least two classes (background first), one per line.")
  return names


def class_names_in_root(config: ml_collections.ConfigDict) -> Optional[tuple]:
  """ROOT/classes.txt's names where config.data.root is a folder, else None: a trained model's
  classes are named from here, and its data may have moved since."""
  root = config.data.root
  return read_class_names_file(root) if root and paths.isdir(root) else None


def resolve_class_names(data: ml_collections.ConfigDict) -> tuple:
  """config.data.class_names, else ROOT/classes.txt, else numbers; num_classes must agree."""
  if data.class_names:
    names, origin = tuple(data.class_names), "config.data.class_names"
  else:
    names = read_class_names_file(data.root)
    origin = os.path.join(data.root, "classes.txt")
  if names is None:
    return tuple(f"class_{index}" for index in range(data.num_classes))
  if len(names) != data.num_classes:
    raise ValueError(f"config.data.num_classes={data.num_classes} but {origin} names "
                     f"{len(names)} classes ({', '.join(names)}): make them agree.")
  return names


# ---------------------------------------------------------------- which image plays which role
def require_masks(ids: Sequence[str], masks: dict, *, what: str, root: str) -> None:
  missing = [i for i in ids if i not in masks]
  if missing:
    raise ValueError(
        f"{len(missing)} image(s) of {what} have no mask {os.path.join(root, 'masks', 'ID.png')}: "
        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}.")


def require_not_in_val(ids: Sequence[str], val_ids: Sequence[str], *, what: str) -> None:
  overlap = sorted(set(ids) & set(val_ids))
  if overlap:
    raise ValueError(f"{len(overlap)} image(s) of {what} are also in splits/val.txt: "
                     f"{', '.join(overlap[:5])}. Evaluation images must not be trained on.")


def choose_ids(data: ml_collections.ConfigDict, images: dict, masks: dict) -> FolderIds:
  """Labeled, unlabeled and val ids by the rules of the module docstring; errors name the ids."""
  root = data.root
  val_ids = read_split(root, "val")
  if val_ids is None:
    raise FileNotFoundError(f"{split_path(root, 'val')} does not exist: list the evaluation "
                            "images there, one id per line (they need masks).")
  subsets.check_ids_exist(val_ids, images, what=split_path(root, "val"),
                          where=f"{root}/images")
  require_masks(val_ids, masks, what=split_path(root, "val"), root=root)

  listed_pool = read_split(root, "labeled")
  if listed_pool is not None:
    subsets.check_ids_exist(listed_pool, images, what=split_path(root, "labeled"),
                            where=f"{root}/images")
  not_val = sorted(set(images) - set(val_ids))
  if data.labeled_list:
    pool, pool_name = not_val, f"the images of {root} not in splits/val.txt"
  elif listed_pool is not None:
    pool, pool_name = listed_pool, split_path(root, "labeled")
  else:
    pool = [i for i in not_val if i in masks]
    pool_name = f"the images of {root} with a mask and not in splits/val.txt"
  labeled = subsets.labeled_ids_from_config(data, pool, pool_name=pool_name)
  labeled_origin = data.labeled_list or pool_name
  require_not_in_val(labeled, val_ids, what=labeled_origin)
  require_masks(labeled, masks, what=labeled_origin, root=root)

  unlabeled_pool = read_split(root, "unlabeled")
  if unlabeled_pool is None:
    unlabeled_pool = not_val
  else:
    subsets.check_ids_exist(unlabeled_pool, images, what=split_path(root, "unlabeled"),
                            where=f"{root}/images")
    require_not_in_val(unlabeled_pool, val_ids, what=split_path(root, "unlabeled"))
  unlabeled = subsets.unlabeled_ids(unlabeled_pool, labeled,
                                    include_labeled=data.unlabeled_includes_labeled)
  return FolderIds(labeled=list(labeled), unlabeled=unlabeled, val=list(val_ids))


def examples_of(ids: Sequence[str], images: dict, masks: dict, *,
                with_masks: bool) -> list[FolderExample]:
  return [FolderExample(i, images[i], masks[i] if with_masks else "") for i in ids]


# ---------------------------------------------------------------- checking every file once
def check_example(example: FolderExample, *, num_classes: int, ignore_label: int) -> None:
  """Raises label_files.BadExampleError naming the file if the example cannot be trained on."""
  if example.mask_path:
    label_files.read_checked_mask(example.mask_path, example.image_path,
                                  num_classes=num_classes, ignore_label=ignore_label)
  else:
    label_files.read_image_size(example.image_path)


def check_all(examples: Sequence[FolderExample], check: Callable[[FolderExample], None], *,
              skip_bad: bool, what: str) -> list[FolderExample]:
  """The examples that pass `check`, checked in a thread pool; keep_good's rule for the others.

  Every example is checked before the first error is raised, so the error reported is always the
  first bad example in list order, whatever the threads' timing.
  """
  started = time.perf_counter()

  def error_of(example):
    try:
      check(example)
    except label_files.BadExampleError as error:
      return error
    return None

  with concurrent.futures.ThreadPoolExecutor() as pool:
    errors = list(pool.map(error_of, examples))

  def raise_stored(pair):
    if pair[1] is not None:
      raise pair[1]

  kept = label_files.keep_good(zip(examples, errors), raise_stored, skip_bad=skip_bad, what=what)
  log.info("Checked %d image(s)%s of %s in %.1f s.", len(examples),
           " and masks" if any(e.mask_path for e in examples) else "", what,
           time.perf_counter() - started)
  if not kept:
    raise ValueError(f"No usable example is left in {what}.")
  return [example for example, _ in kept]


# ---------------------------------------------------------------- tf.data
def read_mask_indices(path: bytes) -> np.ndarray:
  """uint8 [H, W] class indices, through PIL: tf.io.decode_png expands a palette PNG to its
  colours (and channels=1 turns those to gray), so TF alone cannot give a 'P' mask's indices."""
  return label_files.read_index_mask(path.decode()).astype(np.uint8)


def decode_example(example_id, image_path, mask_path=None) -> dict:
  image = tf.io.decode_image(tf.io.read_file(image_path), channels=3, dtype=tf.uint8,
                             expand_animations=False)
  decoded = {"id": example_id, "image": tf.ensure_shape(image, [None, None, 3])}
  if mask_path is not None:
    mask = tf.numpy_function(read_mask_indices, [mask_path], tf.uint8, stateful=False)
    decoded["mask"] = tf.ensure_shape(mask, [None, None])[..., None]
  return decoded


def examples_dataset(examples: Sequence[FolderExample]) -> tf.data.Dataset:
  """{'id', 'image', 'mask' (when the examples have masks)} in list order."""
  columns = [[e.example_id for e in examples], [e.image_path for e in examples]]
  if all(e.mask_path for e in examples):
    columns.append([e.mask_path for e in examples])
  dataset = tf.data.Dataset.from_tensor_slices(tuple(tf.constant(c, tf.string) for c in columns))
  return dataset.map(decode_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# ---------------------------------------------------------------- the source
def load_folder(config: ml_collections.ConfigDict) -> Source:
  """The Source of the folder config.data.root (see the module docstring)."""
  data = config.data
  root = require_root(data.root)
  if not 0 <= data.ignore_label <= 255 or data.num_classes > 256:
    raise ValueError(f"config.data.ignore_label={data.ignore_label} and num_classes="
                     f"{data.num_classes} must fit the uint8 masks (0-255).")
  class_names = resolve_class_names(data)
  images, masks = list_images(root), list_masks(root)
  ids = choose_ids(data, images, masks)

  def check(example):
    check_example(example, num_classes=data.num_classes, ignore_label=data.ignore_label)

  def checked(role_ids, what, with_masks=True):
    return check_all(examples_of(role_ids, images, masks, with_masks=with_masks), check,
                     skip_bad=data.skip_bad_examples, what=f"{what} of {root}")

  labeled = checked(ids.labeled, "the labeled images")
  val = checked(ids.val, "splits/val.txt")
  require_val_fits(val, config.eval_crop_size)
  unlabeled, unlabeled_has_masks = None, True
  if config.method == "pseudoseg":
    if not ids.unlabeled:
      raise ValueError(f"The unlabeled pool of {root} is empty: every image is labeled or in val "
                       "(list some in splits/unlabeled.txt, or set "
                       "config.data.unlabeled_includes_labeled=True to reuse the labeled ones).")
    unlabeled_has_masks = all(i in masks for i in ids.unlabeled)
    if not unlabeled_has_masks:
      if config.pseudoseg.weak_labels:
        raise ValueError(
            f"config.pseudoseg.weak_labels=True needs image-level labels, read off masks, but "
            f"{sum(i not in masks for i in ids.unlabeled)} of the {len(ids.unlabeled)} unlabeled "
            f"images of {root} have no mask in masks/.")
      log.info("Not every unlabeled image has a mask: none are read (no pseudo-label accuracy).")
    unlabeled = checked(ids.unlabeled, "the unlabeled images", with_masks=unlabeled_has_masks)
  log.info("Folder %s: %d labeled, %d unlabeled, %d val images; %d classes (%s).", root,
           len(labeled), len(unlabeled or ()), len(val), len(class_names), ", ".join(class_names))
  return Source(
      labeled=examples_dataset(labeled), eval=examples_dataset(val), num_labeled=len(labeled),
      num_eval=len(val), class_names=class_names,
      unlabeled=examples_dataset(unlabeled) if unlabeled else None,
      num_unlabeled=len(unlabeled or ()), unlabeled_has_masks=unlabeled_has_masks)


# ---------------------------------------------------------------- for configs, before training
def next_deeplab_size(side: int) -> int:
  """The smallest 4k + 1 >= side: DeepLab's crop sizes, whose feature maps align with the input."""
  return 4 * -(-(side - 1) // 4) + 1


def largest_side(image_paths: Sequence[str]) -> tuple[int, str]:
  """(the largest height or width, the image that has it), from the headers (no decoding)."""
  largest = (0, "")
  for path in image_paths:
    try:
      with Image.open(paths.readable(path)) as image:
        side = max(image.size)
    except label_files.READ_ERRORS:
      continue  # Reported, naming the file, by the check before training.
    if side > largest[0]:
      largest = (side, path)
  return largest


def largest_val_side(root: str) -> int:
  """The largest height or width among the images of ROOT/splits/val.txt."""
  images = list_images(root)
  val_ids = read_split(root, "val")
  if val_ids is None:
    raise FileNotFoundError(f"{split_path(root, 'val')} does not exist.")
  subsets.check_ids_exist(val_ids, images, what=split_path(root, "val"), where=f"{root}/images")
  return largest_side([images[i] for i in val_ids])[0]


def require_val_fits(val: Sequence[FolderExample], eval_crop_size: int) -> None:
  """Now rather than at the first evaluation, maybe hours in: images are padded, never cropped."""
  side, path = largest_side([example.image_path for example in val])
  if side > eval_crop_size:
    raise ValueError(f"Val image {path} has a side of {side} px, larger than "
                     f"config.eval_crop_size={eval_crop_size}: evaluation pads images, never crops "
                     f"them. Raise it to {next_deeplab_size(side)} or resize the val images.")
