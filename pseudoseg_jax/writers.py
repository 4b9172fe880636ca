"""Where metrics go: WORKDIR/metrics.jsonl, TensorBoard scalars and images, PNG files, and a
progress line on the console; and how to read them back (a notebook, the learning curves).

Only process 0 writes; other processes get a writer that does nothing, so the train loop needs no
`if jax.process_index() == 0` of its own.

The one logging convention: the project's modules report progress and warnings through `log`
(the 'pseudoseg_jax' logger, timestamped lines on stdout); a command-line tool prints only its
final answer (a table, a path, a count) with print(), so that its output can be piped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

import numpy as np

from pseudoseg_jax import paths

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def get_logger() -> logging.Logger:
  """The project's console logger: plain lines on stdout, separate from absl's log, which the
  entry point turns down to warnings because orbax and TFDS log every file they touch at INFO."""
  logger = logging.getLogger("pseudoseg_jax")
  if not logger.handlers:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
  return logger


log = get_logger()


def _jsonable(value):
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  value = np.asarray(value)
  if value.ndim:
    return [_jsonable(v) for v in value]
  value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None if math.isnan(value) else str(value)
  return value


def _metric_records(path: str) -> list[tuple[str, dict]]:
  """(line, record) of each line of metrics.jsonl. A last line that is not JSON is the torn
  append of a process killed while writing it: dropped. Any other bad line is an error naming
  the file and line, since dropping it would lose history silently."""
  with paths.open(path) as f:
    lines = [line for line in f if line.strip()]
  records = []
  for number, line in enumerate(lines, start=1):
    try:
      record = json.loads(line)
      if not isinstance(record, dict) or "step" not in record:
        raise ValueError("not a JSON object with a 'step'")
    except ValueError as error:
      if number == len(lines) and not line.endswith("\n"):
        break
      raise ValueError(f"{path}, line {number}, is not a metrics record ({error}): "
                       f"{line[:80]!r}. Fix or remove that line to resume.") from error
    records.append((line if line.endswith("\n") else line + "\n", record))
  return records


def truncate_metrics(workdir: str, last_step: int) -> None:
  """Drops lines logged after `last_step` (the restored checkpoint) so a resumed run's curves have
  no duplicate steps, and a torn last line. Written to a temporary file and renamed: the file is
  never half-written (on gs://, uploaded whole)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not paths.exists(path):
    return
  kept = [line for line, record in _metric_records(path) if record["step"] <= last_step]
  paths.replace_file(path, lambda f: f.writelines(kept))


def read_metrics(workdir: str) -> list[dict]:
  """metrics.jsonl's records in file order; [] before the first one is written."""
  path = os.path.join(workdir, METRICS_FILE)
  if not paths.exists(path):
    return []
  return [record for _, record in _metric_records(path)]


def write_png(path: str, image: np.ndarray) -> None:
  """uint8 [H, W, 3] to a PNG that a reader never sees half-written (paths.replace_file)."""
  from PIL import Image
  picture = Image.fromarray(np.asarray(image, np.uint8))
  paths.replace_file(path, lambda f: picture.save(f, format="PNG"), binary=True)


def read_tensorboard_images(workdir: str, name: str) -> list[tuple[int, np.ndarray]]:
  """(step, uint8 [H, W, 3]) of every image MetricWriter.write_images logged under `name` (the
  first image of each step), oldest first: for notebooks and tests, without a TensorBoard server."""
  import io

  from PIL import Image
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  accumulator = event_accumulator.EventAccumulator(os.path.join(workdir, TENSORBOARD_DIR),
                                                   size_guidance={"tensors": 0})
  accumulator.Reload()
  if name not in accumulator.Tags()["tensors"]:
    return []
  images = []
  for event in accumulator.Tensors(name):
    # tf.summary.image stores [width, height, png, png, ...] as strings.
    encoded = tensor_util.make_ndarray(event.tensor_proto)[2]
    images.append((event.step, np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))))
  return images


class MetricWriter:
  """Appends one JSON object per call to metrics.jsonl and the scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._path = os.path.join(workdir, METRICS_FILE)
    self._summary_writer = None
    if enabled:
      import tensorflow as tf  # Imported lazily: only the writing process needs it.
      self._tf = tf
      logdir = os.path.join(workdir, TENSORBOARD_DIR)
      self._summary_writer = tf.summary.create_file_writer(logdir)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    paths.append_text(self._path, json.dumps(record) + "\n")
    with self._summary_writer.as_default(step=int(step)):
      for name, value in record.items():
        if name != "step" and isinstance(value, (int, float)):
          self._tf.summary.scalar(name, value)
    self._summary_writer.flush()

  def write_images(self, step: int, images: dict) -> None:
    """TensorBoard images: name -> uint8 [H, W, 3] or [N, H, W, 3]."""
    if not self.enabled:
      return
    with self._summary_writer.as_default(step=int(step)):
      for name, image in images.items():
        image = np.asarray(image, np.uint8)
        self._tf.summary.image(name, image[None] if image.ndim == 3 else image,
                               max_outputs=len(image) if image.ndim == 4 else 1)
    self._summary_writer.flush()

  def close(self) -> None:
    if self._summary_writer is not None:
      self._summary_writer.close()


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
  """Steps/s and ETA over the interval since the last report (compile time excluded after the
  first report, since the first interval is measured from the first completed step)."""

  def __init__(self, start_step: int, total_steps: int):
    self.total_steps = total_steps
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def restart_clock(self, step: int) -> None:
    self._last_step, self._last_time = step, time.perf_counter()

  def report(self, step: int, metrics: dict) -> float:
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
    shown = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items()
                     if isinstance(v, float))
    log.info("step %d/%d (%.0f%%) %s | %.2f steps/s | ETA %s", step, self.total_steps,
             100 * step / self.total_steps, shown, rate,
             format_duration(eta) if math.isfinite(eta) else "?")
    return rate
