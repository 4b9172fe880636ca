"""Input speed: weak+strong unlabeled pairs/s and labeled samples/s from JPEG files, per CPU core
and with all cores, and the fraction of a training loop's time spent waiting on input.

  python benchmarks/input_pipeline.py [--crop=513] [--labeled=8] [--unlabeled=8] [--batches=30]
      [--warmup=5] [--threads=1,0] [--root=FOLDER | --photos=auto|voc|generated]
      [--num_images=32] [--stand_in=sleep --step_seconds=S | --stand_in=train_step
      --backbone=resnet50 ...] [--wait_steps=20] [--wait_warmup=3]

Images go through the trainer's own code: a folder dataset (pseudoseg_jax/data/datasets/folder.py:
JPEG decoded by tf.io.decode_image, palette masks read as indices) under the trainer's streams
(pipeline.labeled_stream / unlabeled_stream with SPEC's scales 0.5-2, colour jitter and cutout).
Without --root the folder is written to a temporary directory: --num_images copies of the genuine
VOC sample photos ($PSEUDOSEG_SAMPLE_PHOTOS or the repository's tests/data; see the
repository), or of generated 500x375 JPEGs where those are missing (--photos=generated forces it).

Rates: each stream alone, consumed as fast as it comes, after --warmup batches, with tf.data's
work confined to N threads for each N of --threads (0 = the trainer's defaults, all cores);
CPU seconds per item come from the process's own CPU time over the same window.

Waiting: streams.training_batches (the trainer's zipped, prefetched streams) consumed by a loop of
train.run's shape: next(), sharding.to_global, then a stand-in step, waited for each time, so
that time in next() is time the device would sit idle. --stand_in=sleep holds the host for
--step_seconds without using a core (an accelerator's step); --stand_in=train_step runs the real
jitted step (flags as benchmarks/train_step.py), which competes with tf.data for the CPU as on a
CPU-only machine.

Prints one JSON line on stdout (progress on stderr); BENCHMARKS.md explains every field.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import tempfile
import time
from typing import Sequence

from pseudoseg_jax import hugepages

if __name__ == "__main__":
  # Measure the step as the trainer's command runs it (before JAX and TensorFlow load).
  hugepages.reexec_with_hugepages()

import common  # benchmarks/common.py; imported first: it quiets TensorFlow.
import jax
import numpy as np
import tensorflow as tf
from PIL import Image

from pseudoseg_jax import config as config_lib
from pseudoseg_jax import sharding
from pseudoseg_jax.data import datasets, pipeline, streams
from pseudoseg_jax.data.datasets import folder

VOC_SAMPLE = os.path.join("voc2012_mini", "VOCdevkit", "VOC2012")
NUM_CLASSES = 21


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--crop", type=int, default=513)
  parser.add_argument("--labeled", type=int, default=8, help="Labeled batch (per process).")
  parser.add_argument("--unlabeled", type=int, default=8, help="Unlabeled batch (per process).")
  parser.add_argument("--batches", type=int, default=30, help="Timed batches per rate.")
  parser.add_argument("--warmup", type=int, default=5, help="Untimed batches first.")
  parser.add_argument("--threads", default="1,0",
                      help="tf.data thread counts to measure; 0 = the trainer's defaults.")
  parser.add_argument("--root", default="", help="An existing folder dataset (ROOT/images, "
                      "masks, splits/val.txt) instead of the temporary copies.")
  parser.add_argument("--photos", default="auto", choices=("auto", "voc", "generated"))
  parser.add_argument("--num_images", type=int, default=32,
                      help="Training files in the temporary folder (copies of the photos).")
  parser.add_argument("--stand_in", default="sleep", choices=("sleep", "train_step", "none"))
  parser.add_argument("--step_seconds", type=float, default=1.0,
                      help="--stand_in=sleep: the step time to stand in for (pass the one "
                           "benchmarks/train_step.py measured).")
  parser.add_argument("--wait_steps", type=int, default=20)
  parser.add_argument("--wait_warmup", type=int, default=3,
                      help="Loop steps left out of the wait fraction (stream start-up, compile).")
  # --stand_in=train_step: the step of benchmarks/train_step.py.
  parser.add_argument("--backbone", default="resnet50")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--output_stride", type=int, default=16, choices=(8, 16))
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--head", default="standard", choices=("standard", "config"))
  parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adam", "config"))
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="FIELD=VALUE")
  parser.add_argument("--devices", type=int, default=0)
  return parser.parse_args(argv)


# ---------------------------------------------------------------- the JPEG folder
def voc_photos(photos_dir: str) -> list[tuple[str, str]]:
  """(JPEG, palette mask) pairs of the genuine VOC sample, or [] where it is missing."""
  root = os.path.join(photos_dir, VOC_SAMPLE)
  pairs = []
  for image_path in sorted(glob.glob(os.path.join(root, "JPEGImages", "*.jpg"))):
    stem = os.path.splitext(os.path.basename(image_path))[0]
    mask_path = os.path.join(root, "SegmentationClass", f"{stem}.png")
    if os.path.exists(mask_path):
      pairs.append((image_path, mask_path))
  return pairs


def generated_photos(directory: str, count: int = 3) -> list[tuple[str, str]]:
  """VOC-sized JPEGs (smooth colour fields with texture, quality 90: photo-like to the decoder)
  and palette masks of a few classes with a void band."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  pairs = []
  for index in range(count):
    coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((500, 375), Image.BICUBIC), np.float32)
    image = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((375, 500), np.uint8)
    mask[100:300, 120:380] = 1 + index
    mask[96:100, 116:384] = 255
    image_path = os.path.join(directory, f"generated_{index}.jpg")
    mask_path = os.path.join(directory, f"generated_{index}.png")
    Image.fromarray(image).save(image_path, quality=90)
    palette_mask = Image.fromarray(mask, mode="L").convert("P")
    palette_mask.putpalette([(37 * i) % 256 for i in range(768)])
    palette_mask.putdata(mask.ravel().tolist())
    palette_mask.save(mask_path)
    pairs.append((image_path, mask_path))
  return pairs


def write_folder(root: str, photos: list[tuple[str, str]], num_images: int) -> None:
  """ROOT/images, masks: `num_images` training copies of the photos (cycled) plus one val image;
  splits/val.txt. Copies, not links: every file is read and decoded as a distinct image."""
  for sub in ("images", "masks", "splits"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  ids = [f"train_{index:05d}" for index in range(num_images)] + ["val_00000"]
  for index, example_id in enumerate(ids):
    image_path, mask_path = photos[index % len(photos)]
    shutil.copyfile(image_path, os.path.join(root, "images", f"{example_id}.jpg"))
    shutil.copyfile(mask_path, os.path.join(root, "masks", f"{example_id}.png"))
  with open(os.path.join(root, "splits", "val.txt"), "w") as f:
    f.write("val_00000\n")


def prepare_root(args, scratch: str) -> tuple[str, str]:
  """(folder dataset root, what its images are)."""
  if args.root:
    return args.root, f"folder {args.root}"
  photos = [] if args.photos == "generated" else voc_photos(common.sample_photos_dir())
  if not photos and args.photos == "voc":
    raise FileNotFoundError(f"No VOC sample under {common.sample_photos_dir()}/{VOC_SAMPLE}; set "
                            "PSEUDOSEG_SAMPLE_PHOTOS or use --photos=generated.")
  what = "genuine VOC 2012 photos"
  if not photos:
    photos, what = generated_photos(os.path.join(scratch, "photos")), "generated JPEGs"
  root = os.path.join(scratch, "folder")
  write_folder(root, photos, args.num_images)
  sizes = sorted({Image.open(path).size for path, _ in photos})
  return root, (f"{args.num_images} copies of {len(photos)} {what} "
                f"({', '.join(f'{w}x{h}' for w, h in sizes)})")


def folder_config(args, root: str):
  config = config_lib.base_config()
  config.method = "pseudoseg"
  config.data.name = "folder"
  config.data.root = root
  config.data.num_classes = NUM_CLASSES
  config.data.unlabeled_includes_labeled = True  # Both pools: every training image.
  config.crop_size = args.crop
  config.eval_crop_size = max(args.crop, folder.next_deeplab_size(folder.largest_val_side(root)))
  config.batch_size = args.labeled
  config.pseudoseg.unlabeled_batch_size = args.unlabeled
  config.pseudoseg.fusion_group_size = 1
  config.pseudoseg.cutout_size = round(args.crop * 100 / 513)  # SPEC: 100 px at crop 513.
  config_lib.validate(config)
  return config


# ---------------------------------------------------------------- rates
def threading_options(threads: int) -> tf.data.Options:
  """tf.data confined to `threads` threads (intra-op too); 0 leaves the trainer's defaults."""
  options = tf.data.Options()
  if threads:
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
  return options


def stream_rate(stream: tf.data.Dataset, batch_size: int, *, threads: int, warmup: int,
                batches: int) -> dict:
  """Items/s of `stream` consumed as fast as it yields, and the CPU time it took per item."""
  iterator = pipeline.as_numpy_batches(stream.with_options(threading_options(threads)))
  for _ in range(warmup):
    next(iterator)
  cpu_started, started = common.process_cpu_seconds(), time.perf_counter()
  for _ in range(batches):
    next(iterator)
  wall = time.perf_counter() - started
  cpu = common.process_cpu_seconds() - cpu_started
  items = batches * batch_size
  return {"items_per_s": items / wall, "cpu_seconds_per_item": cpu / items,
          "items_per_cpu_second": items / cpu if cpu > 0 else None,
          "cores_busy": cpu / wall, "seconds": wall}


def measure_rates(config, source, args) -> dict:
  common_args = dict(crop_size=config.crop_size, scales=tuple(config.scales),
                     ignore_label=config.data.ignore_label, num_classes=NUM_CLASSES, seed=0,
                     shuffle_buffer=config.data.shuffle_buffer)
  # name -> (stream, items per batch, batches timed, batches of warm-up).
  streams = {
      "unlabeled": (lambda: pipeline.unlabeled_stream(
          source.unlabeled, batch_size=args.unlabeled, num_examples=source.num_unlabeled,
          strong_augment=True, cutout_size=config.pseudoseg.cutout_size, **common_args),
          args.unlabeled, args.batches, args.warmup),
      "labeled": (lambda: pipeline.labeled_stream(
          source.labeled, batch_size=args.labeled, num_examples=source.num_labeled,
          **common_args), args.labeled, args.batches, args.warmup),
      # Reading alone (JPEG and mask decoding, one example at a time): its share of the streams'
      # CPU time says how much augmentation costs.
      "decode": (lambda: source.unlabeled.repeat().batch(1), 1,
                 args.batches * args.unlabeled, args.warmup * args.unlabeled),
  }
  rates = {}
  for threads in (int(t) for t in args.threads.split(",")):
    label = f"threads_{threads}" if threads else "threads_default"
    for name, (make_stream, batch_size, batches, warmup) in streams.items():
      rate = stream_rate(make_stream(), batch_size, threads=threads, warmup=warmup,
                         batches=batches)
      common.note(f"{name}, {label}: {rate['items_per_s']:.1f}/s, "
                  f"{1e3 * rate['cpu_seconds_per_item']:.1f} CPU ms each, "
                  f"{rate['cores_busy']:.2f} cores busy")
      rates[f"{name}_{label}"] = rate
  return rates


# ---------------------------------------------------------------- waiting
def stand_in_step(args, mesh):
  """(step(batch) that returns when done, description)."""
  if args.stand_in == "sleep":
    return (lambda batch: time.sleep(args.step_seconds)), f"sleep {args.step_seconds} s"
  config = common.benchmark_config(
      common.load_config(args.config), backbone=args.backbone, crop=args.crop,
      labeled=args.labeled, unlabeled=args.unlabeled, dtype=args.dtype,
      output_stride=args.output_stride, num_classes=NUM_CLASSES, head=args.head,
      optimizer=args.optimizer, overrides=args.overrides)
  graphdef, state = common.initial_state(config, mesh)
  train_fn, total_steps = common.jitted_train_step(config, graphdef, state, mesh)
  holder = {"state": state}

  def step(batch):
    holder["state"], metrics = train_fn(holder["state"], batch, total_steps)
    jax.block_until_ready((holder["state"], metrics))

  return step, f"train_step {args.backbone} {args.dtype} ({args.config}, head {args.head})"


def wait_fraction(args, config, source, mesh) -> dict:
  """train.run's loop (next, to_global, step) with a stand-in step, each step waited for."""
  step, description = stand_in_step(args, mesh)
  batches = streams.training_batches(config, source, mesh, start_step=0)
  waits, transfers, walls = [], [], []
  for index in range(args.wait_warmup + args.wait_steps):
    started = time.perf_counter()
    local_batch = next(batches)
    fetched = time.perf_counter()
    global_batch = sharding.to_global(local_batch, mesh)
    jax.block_until_ready(global_batch)
    transferred = time.perf_counter()
    step(global_batch)
    if index >= args.wait_warmup:
      waits.append(fetched - started)
      transfers.append(transferred - fetched)
      walls.append(time.perf_counter() - started)
  wall = sum(walls)
  return {"stand_in": description, "wait_steps": args.wait_steps,
          "input_wait_fraction": sum(waits) / wall, "transfer_fraction": sum(transfers) / wall,
          "max_input_wait_seconds": max(waits), "median_input_wait_seconds":
              statistics.median(waits), "median_loop_step_seconds": statistics.median(walls)}


def main(argv: Sequence[str] = ()) -> dict:
  args = parse_args(argv)
  pipeline.hide_tensorflow_from_accelerators()
  with tempfile.TemporaryDirectory(prefix="input_benchmark_") as scratch:
    root, images = prepare_root(args, scratch)
    config = folder_config(args, root)
    source = datasets.load_source(config)
    common.note(f"Folder dataset: {images}; {source.num_labeled} labeled, "
                f"{source.num_unlabeled} unlabeled.")
    rates = measure_rates(config, source, args)
    mesh = common.make_mesh(args.devices)
    waiting = (wait_fraction(args, config, source, mesh) if args.stand_in != "none" else {})

  per_core = rates.get("unlabeled_threads_1"), rates.get("labeled_threads_1")
  result = {
      "benchmark": "input_pipeline", "crop": args.crop, "images": images,
      "labeled_batch": args.labeled, "unlabeled_batch": args.unlabeled,
      "scales": list(config.scales), "cutout_size": config.pseudoseg.cutout_size,
      "timed_batches": args.batches, "warmup_batches": args.warmup,
      "unlabeled_pairs_per_s_per_core": per_core[0]["items_per_s"] if per_core[0] else None,
      "labeled_samples_per_s_per_core": per_core[1]["items_per_s"] if per_core[1] else None,
      **{f"{name}_{field}": value for name, rate in rates.items()
         for field, value in rate.items()},
      **waiting,
      "tensorflow_version": tf.__version__,
      "max_rss_bytes": common.max_rss_bytes(),
      **common.machine(),
  }
  return common.emit(result)


if __name__ == "__main__":
  common.run_as_script(main)
