"""How long preparing and reading the VOC builder takes, on a VOC-layout tree of stand-in images.

  python benchmarks/voc_prepare_speed.py --num_images=600 --out=/tmp/voc_speed

Real VOC cannot be downloaded here, so this writes `num_images` VOC-sized (500x375) JPEGs with
palette masks in the VOC layout (a third in val, the rest in train and in SegmentationClassAug),
then times: preparing the TFDS builder (every file decoded and checked, records written), listing a
split's ids without decoding images, and one pass over train_aug decoded. It prints images/s, from
which the real dataset's preparation of the real dataset can be estimated.
"""

import os
import shutil
import time

from absl import app, flags, logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from pseudoseg_jax.data.datasets import voc

_NUM_IMAGES = flags.DEFINE_integer("num_images", 600, "Stand-in images to write.")
_OUT = flags.DEFINE_string("out", "/tmp/voc_speed", "Scratch folder (emptied first).")


def photo_like(rng, height=375, width=500):
  """Smooth colour fields plus mild noise: JPEG sizes near real photos' (~100 KB at 500x375)."""
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  channels = [np.sin(rng.uniform(2, 12) * x + rng.uniform(2, 12) * y + rng.uniform(0, 6))
              for _ in range(3)]
  image = 127.5 + 100 * np.stack(channels, -1) + rng.normal(0, 12, (height, width, 3))
  return np.clip(image, 0, 255).astype(np.uint8)


def palette_mask(rng, height=375, width=500):
  mask = np.zeros((height, width), np.uint8)
  for _ in range(rng.integers(1, 4)):
    top, left = rng.integers(0, height - 100), rng.integers(0, width - 100)
    mask[top:top + rng.integers(50, 100), left:left + rng.integers(50, 100)] = rng.integers(1, 21)
  image = Image.fromarray(mask, mode="P")
  image.putpalette(list(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8)))
  return image


def write_tree(root, num_images):
  voc_root = os.path.join(root, "VOCdevkit", "VOC2012")
  for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    os.makedirs(os.path.join(voc_root, folder))
  os.makedirs(os.path.join(root, "SegmentationClassAug"))
  rng = np.random.default_rng(0)
  ids = [f"2000_{i:06d}" for i in range(num_images)]
  for example_id in ids:
    Image.fromarray(photo_like(rng)).save(
        os.path.join(voc_root, "JPEGImages", f"{example_id}.jpg"), quality=90)
    palette_mask(rng).save(os.path.join(root, "SegmentationClassAug", f"{example_id}.png"))
  val, train = ids[: num_images // 3], ids[num_images // 3:]
  for example_id in val + train[:len(train) // 4]:  # VOC's own masks for val and part of train.
    shutil.copy(os.path.join(root, "SegmentationClassAug", f"{example_id}.png"),
                os.path.join(voc_root, "SegmentationClass"))
  for name, split_ids in (("val", val), ("train", train[:len(train) // 4])):
    with open(os.path.join(voc_root, "ImageSets", "Segmentation", f"{name}.txt"), "w") as f:
      f.write("\n".join(split_ids) + "\n")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # TFDS logs every file it touches at INFO.
  shutil.rmtree(_OUT.value, ignore_errors=True)
  manual, data_dir = os.path.join(_OUT.value, "manual"), os.path.join(_OUT.value, "tfds")
  write_tree(manual, _NUM_IMAGES.value)
  tfds.display_progress_bar(False)
  start = time.perf_counter()
  builder = voc.VocAug(data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  prepare_s = time.perf_counter() - start
  total = sum(split.num_examples for split in builder.info.splits.values())
  start = time.perf_counter()
  ids = voc.read_split_ids(builder, "train_aug")
  list_s = time.perf_counter() - start
  start = time.perf_counter()
  decoded = sum(1 for _ in voc.examples_with_ids(builder, "train_aug"))
  read_s = time.perf_counter() - start
  # Real VOC + SBD writes 1,464 + 1,449 + 10,582 records (train is also part of train_aug).
  print(f"prepare: {total} examples (all splits) in {prepare_s:.1f} s = {total / prepare_s:.0f}/s; "
        f"estimate for the real 13,495: {13495 / (total / prepare_s) / 60:.1f} min")
  print(f"list ids of train_aug: {len(ids)} in {list_s:.2f} s = {len(ids) / list_s:.0f}/s")
  print(f"decode train_aug: {decoded} in {read_s:.2f} s = {decoded / read_s:.0f}/s")


if __name__ == "__main__":
  app.run(main)
