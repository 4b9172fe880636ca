"""The published labeled-image lists (SOURCES.md in this folder), by protocol and split name.

The paper trained on its own lists, and the PyTorch peers on theirs: a named split uses the
published ids by default, so that a run labels exactly the images the reported numbers did.
"""

from __future__ import annotations

import importlib.resources

# (dataset, split name) -> (file in this package, ids it holds).
PUBLISHED = {
    # Classic: N of the 1,464 finely labeled VOC train images. The paper's own lists where it has
    # one (its first 1/16 draw, 16_clean_3, as the original's README trains it).
    ("voc", "92"): ("pascal_voc/pseudoseg/16_clean_3.txt", 92),
    ("voc", "183"): ("pascal_voc/pseudoseg/8_clean.txt", 183),
    ("voc", "366"): ("pascal_voc/pseudoseg/4_clean.txt", 366),
    ("voc", "732"): ("pascal_voc/classic/732.txt", 732),
    ("voc", "1464"): ("pascal_voc/classic/1464.txt", 1464),
    # Blended: a fraction of train_aug, the peers' lists.
    ("voc", "1_16"): ("pascal_voc/blended/1_16.txt", 662),
    ("voc", "1_8"): ("pascal_voc/blended/1_8.txt", 1323),
    ("voc", "1_4"): ("pascal_voc/blended/1_4.txt", 2646),
    ("voc", "1_2"): ("pascal_voc/blended/1_2.txt", 5291),
    ("coco", "1_512"): ("coco/512_all.txt", 232),
    ("coco", "1_256"): ("coco/256_all.txt", 463),
    ("coco", "1_128"): ("coco/128_all.txt", 925),
    ("coco", "1_64"): ("coco/64_all.txt", 1849),
    ("coco", "1_32"): ("coco/32_all.txt", 3697),
}
# Whole pools, for checks: every VOC list lies inside train_aug.
VOC_TRAIN_AUG = ("pascal_voc/train_aug.txt", 10582)
VOC_VAL = ("pascal_voc/val.txt", 1449)


def path_of(file: str) -> str:
  """The filesystem path of a list shipped in this package."""
  return str(importlib.resources.files(__package__) / file)


def published_list(dataset: str, split: str) -> str:
  """The path of the published list for `split` of `dataset` ('voc' or 'coco')."""
  if (dataset, split) not in PUBLISHED:
    known = ", ".join(name for source, name in PUBLISHED if source == dataset)
    raise ValueError(f"No published {dataset} list named {split!r}; known: {known}.")
  return path_of(PUBLISHED[dataset, split][0])
