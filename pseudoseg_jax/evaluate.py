"""Evaluate any checkpoint of a workdir, on its eval split or another split of the same dataset.

  python -m pseudoseg_jax.evaluate --workdir=W [--split=NAME] [--scales=1.0[,0.75,1.25,...]]
      [--flip] [--checkpoint=STEP|.../checkpoints/STEP] [--batch_size=N] [--window_stride=0.667]

Prints a per-class IoU table (class, IoU, ground-truth pixels) and writes W/eval_SPLIT.json:
{"split", "step", "scales", "flip", "miou", "iou_per_class", "class_names", "pixel_accuracy",
"pixels_per_class", "checkpoint", "inference"}. results.json is never touched. A later run on
the same split replaces eval_SPLIT.json (its "scales" and "flip" say which evaluation it holds).
SPLIT must be a plain name (letters, digits, '_', '.', '-'): a path such as '../x' is refused, so
the file always lands in W.

Single scale without flip (the default) evaluates exactly as training does: the same eval stream
(whole images padded bottom/right to config.eval_crop_size), the same jitted steps.eval_step, the
same global batch and device mesh. On the eval split it therefore reproduces the val/miou that
training reported for that checkpoint, to the last bit.
Multi-scale and flip (softmax probabilities averaged over scales and mirrored inputs, see
inference.py), and splits holding images larger than the eval crop (sliding windows of the eval
crop, probabilities averaged where they overlap), go through inference.py's windows instead.
"""

from __future__ import annotations

import functools
import os
import re
import time
from typing import Sequence

# TensorFlow only reads data here: keep its start-up chatter off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from pseudoseg_jax import evaluation, inference, sharding, steps, workdirs  # noqa: E402
from pseudoseg_jax.data import augment, datasets, pipeline  # noqa: E402
from pseudoseg_jax.writers import log  # noqa: E402

LARGER_THAN_CROP = "larger than the eval crop"  # pipeline.pad_eval_example's message.
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def eval_config(config: ml_collections.ConfigDict, split: str | None) -> ml_collections.ConfigDict:
  """The run's config with `split` as its eval split, and only the labeled and eval data read."""
  config = ml_collections.ConfigDict(config.to_dict())
  if split and split != config.data.eval_split:
    if config.data.name == "folder":
      raise ValueError("The folder dataset evaluates ROOT/splits/val.txt; --split does not apply "
                       "to it.")
    config.data.eval_split = split
  # PseudoSeg's unlabeled pool is not evaluated on; a supervised source does not read it.
  config.method = "supervised"
  return config


def check_split_name(split: str, where: str = "--split") -> str:
  """`split` if it is a plain split name; it becomes part of a file name in the workdir, so a
  path ('../x', '/tmp/x') is refused rather than quietly rewritten."""
  if not SPLIT_NAME.fullmatch(split):
    raise ValueError(f"{where}={split!r} is not a split name: use letters, digits, '_', '.' and "
                     f"'-', starting with a letter or digit (e.g. 'validation', 'train_aug').")
  return split


def results_path(workdir: str, split: str) -> str:
  return os.path.join(workdir, f"eval_{check_split_name(split, 'split')}.json")


# ---------------------------------------------------------------- the training's evaluation
def confusion_as_training(model: inference.TrainedModel, source: datasets.Source,
                          config: ml_collections.ConfigDict) -> np.ndarray:
  """train.run's evaluation, step for step: eval stream, eval_step, summed confusion matrices.

  Raises tf.errors.InvalidArgumentError when an image is larger than the eval crop.
  """
  mesh = model.mesh
  eval_fn = jax.jit(
      functools.partial(steps.eval_step, graphdef=model.graphdef,
                        num_classes=config.data.num_classes, ignore_label=config.data.ignore_label),
      out_shardings=sharding.replicated(mesh))
  batches = pipeline.as_numpy_batches(pipeline.eval_stream(
      source.eval, crop_size=config.eval_crop_size, ignore_label=config.data.ignore_label,
      batch_size=sharding.per_process_batch_size(config.eval_batch_size, mesh, "eval_batch_size"),
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_examples=source.num_eval))
  confusion = np.zeros((config.data.num_classes,) * 2, np.int64)
  for local_batch in batches:
    confusion += np.asarray(eval_fn(model.params, model.batch_stats,
                                    sharding.to_global(local_batch, mesh)), np.int64)
  return confusion


def larger_than_crop_by_shape(dataset: tf.data.Dataset, config: ml_collections.ConfigDict) -> bool:
  """True when the source's static image shape already exceeds the eval crop (a fixed-size
  dataset): the eval stream would not even build. Variable sizes are only known when read."""
  height, width = dataset.element_spec["image"].shape[:2]
  crop_height, crop_width = augment.as_height_width(config.eval_crop_size)
  return bool((height is not None and height > crop_height)
              or (width is not None and width > crop_width))


# ---------------------------------------------------------------- windows: scales, flip, any size
def labeled_images(dataset: tf.data.Dataset):
  """(mask [H, W], normalized image [H, W, 3]) for each raw example of a source."""
  scan = dataset.prefetch(tf.data.AUTOTUNE).with_options(pipeline.stream_options())
  for example in scan.as_numpy_iterator():
    mask = np.asarray(example["mask"]).reshape(example["image"].shape[:2])
    yield mask, inference.normalize_image(example["image"])


def confusion_by_windows(model: inference.TrainedModel, source: datasets.Source,
                         config: ml_collections.ConfigDict, *, scales: Sequence[float],
                         flip: bool, batch_size: int, window_stride: float) -> np.ndarray:
  window = augment.as_height_width(config.eval_crop_size)
  scores_fn = inference.make_scores_fn(model, scales=scales, flip=flip, batch_size=batch_size)
  confusion = np.zeros((config.data.num_classes,) * 2, np.int64)
  predictions = inference.predict_tiled(
      labeled_images(source.eval), scores_fn, window=window,
      stride=inference.stride_of(window, window_stride), batch_size=scores_fn.batch_size)
  for mask, scores in predictions:
    confusion += evaluation.confusion_matrix_numpy(
        np.argmax(scores, axis=-1), mask, config.data.num_classes, config.data.ignore_label)
  return confusion


# ---------------------------------------------------------------- the whole evaluation
def run(workdir: str, *, split: str | None = None, scales: Sequence[float] = (1.0,),
        flip: bool = False, checkpoint: str | None = None, batch_size: int = 0,
        window_stride: float = inference.DEFAULT_WINDOW_STRIDE) -> dict:
  """Evaluates, prints the table, writes eval_SPLIT.json into `workdir`, returns its contents."""
  started = time.perf_counter()
  if split:
    check_split_name(split)  # Before the restore: a bad flag costs nothing.
  scales = tuple(float(s) for s in scales)
  model = inference.restore(workdir, checkpoint)
  config = eval_config(model.config, split)
  split = check_split_name(config.data.eval_split, "config.data.eval_split")
  source = datasets.load_source(config)
  log.info("Evaluating step %d on %s split '%s' (%d images), scales %s%s.", model.step,
           config.data.name, split, source.num_eval, list(scales), " + flip" if flip else "")
  confusion, how = None, "as training: padded to the eval crop"
  if scales == (1.0,) and not flip and not larger_than_crop_by_shape(source.eval, config):
    try:
      confusion = confusion_as_training(model, source, config)
    except tf.errors.InvalidArgumentError as error:
      if LARGER_THAN_CROP not in str(error):
        raise
  if confusion is None:
    if scales == (1.0,) and not flip:
      log.info("Images of '%s' are larger than the eval crop %s: evaluating with sliding windows "
               "(not the training's evaluation, which pads whole images).", split,
               config.eval_crop_size)
    confusion = confusion_by_windows(model, source, config, scales=scales, flip=flip,
                                     batch_size=batch_size or config.eval_batch_size,
                                     window_stride=window_stride)
    how = (f"sliding windows of the eval crop {config.eval_crop_size}, stride "
           f"{window_stride:.3g} of the window; softmax averaged over scales and flips")
  summary = evaluation.summarize(confusion, prefix="eval")
  results = {
      "split": split, "step": model.step, "scales": list(scales), "flip": bool(flip),
      "miou": summary["eval/miou"], "iou_per_class": summary["eval/iou_per_class"],
      "class_names": list(source.class_names),
      "pixel_accuracy": summary["eval/pixel_accuracy"],
      "pixels_per_class": [int(n) for n in confusion.sum(axis=1)],
      "checkpoint": model.checkpoint, "inference": how,
  }
  print(evaluation.iou_table(confusion, source.class_names))
  path = results_path(workdir, split)
  workdirs.write_json(path, results)
  log.info("mIoU %.4f on '%s' at step %d in %.0f s (%s).", results["miou"], split, model.step,
           time.perf_counter() - started, path)
  return results


def main(argv):
  values = inference.program_flags(argv)
  run(values.workdir, split=values.split or None, scales=inference.parse_scales(values.scales),
      flip=values.flip, checkpoint=values.checkpoint or None, batch_size=values.batch_size,
      window_stride=values.window_stride)


def define_flags():
  from absl import flags
  inference.define_shared_flags()
  flags.DEFINE_string("split", "", "Split of the run's dataset; default: its eval split.")
  flags.DEFINE_integer("batch_size", 0, "Windows per batch for multi-scale / flip / sliding "
                       "windows; default config.eval_batch_size.")
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  from absl import app, logging
  logging.set_verbosity(logging.WARNING)
  define_flags()
  app.run(main)
