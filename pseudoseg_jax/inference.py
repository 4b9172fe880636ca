"""A trained model back from its workdir, and the ways predict.py and evaluate.py run it.

  model = inference.restore(workdir)            # config.json + the latest checkpoint
  scores_fn = inference.make_scores_fn(model, scales=(1.0,), flip=False, batch_size=8)
  for key, scores in inference.predict_tiled(items, scores_fn, ...): ...

How an image of any size is predicted:
  - Canvas: the image is normalized as in training ([-1, 1]) and padded bottom/right with 0 (the
    mean pixel) to the eval crop, exactly as the training evaluation pads it; the scores are
    cropped back to the image. An image that fits the crop is therefore predicted from the same
    input the training-time mIoU was measured on (the image-pooling branch of ASPP averages over
    the whole canvas, so the padding size does change the prediction: keeping the eval crop keeps
    the two consistent).
  - Sliding window: an image larger than the eval crop on a side is cut into crop-sized windows
    (padded first where a side is shorter than the crop), `stride` apart with the last one flush
    with the edge; softmax probabilities are averaged where windows overlap. Windows of all
    images share one compiled shape and are batched together.
  - Multi-scale and flip (DeepLab's): each window is resized (bilinear, align corners) to
    int((size - 1) * scale + 1) per side, which keeps 4k + 1 sizes aligned, predicted, its logits
    resized back to the window, and the softmax probabilities averaged over scales and, with
    `flip`, over the horizontally mirrored window too. Probabilities rather than logits are
    averaged, as DeepLab does: every scale then has the same say whatever its logits' magnitude.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pseudoseg_jax import checkpointing, paths, sharding, steps, workdirs
from pseudoseg_jax import config as config_lib
from pseudoseg_jax.data import datasets
from pseudoseg_jax.models.resize import resize_bilinear
from pseudoseg_jax.writers import log

DEFAULT_WINDOW_STRIDE = 2 / 3  # Of the window side: each pixel is seen by one to four windows.


# ---------------------------------------------------------------- the config of a workdir
def class_names_of(config: ml_collections.ConfigDict, workdir: str) -> tuple:
  """The names the run was trained with: results.json's, else the config's, else the dataset's,
  else 'class_0', 'class_1', ... (never loads the dataset itself)."""
  num_classes = config.data.num_classes
  results = workdirs.read_results(workdir) or {}
  candidates = [results.get("class_names"), config.data.class_names, datasets.class_names(config)]
  for names in candidates:
    if names and len(names) == num_classes:
      return tuple(str(name) for name in names)
  return tuple(f"class_{index}" for index in range(num_classes))


# ---------------------------------------------------------------- which checkpoint
def resolve_checkpoint(workdir: str, checkpoint: str | None) -> tuple[str, int | None]:
  """(the workdir whose checkpoints/ holds it, its step or None for the latest).

  `checkpoint` is empty (the latest), a step number, or a path .../checkpoints/STEP (of this or
  another run of the same model).
  """
  checkpoint = (checkpoint or "").strip()
  if not checkpoint:
    return workdir, None
  if checkpoint.isdigit():
    return workdir, int(checkpoint)
  path = paths.absolute(checkpoint.rstrip("/"))
  step, parent = os.path.basename(path), os.path.dirname(path)
  if not (paths.isdir(path) and step.isdigit() and os.path.basename(parent) == "checkpoints"):
    raise ValueError(f"--checkpoint={checkpoint} must be a step number or an existing folder "
                     ".../checkpoints/STEP written by the trainer.")
  return os.path.dirname(parent), int(step)


# ---------------------------------------------------------------- restoring
@dataclasses.dataclass(frozen=True)
class TrainedModel:
  config: ml_collections.ConfigDict
  graphdef: Any
  params: dict
  batch_stats: dict
  step: int
  checkpoint: str  # The folder it was read from.
  class_names: tuple
  mesh: Any  # Batches are split over its devices; params are replicated on it.


def zeros_like_train_state(config: ml_collections.ConfigDict, placement) -> tuple:
  """(graphdef, a TrainState of zeros on `placement`): the restore target. Shapes come from
  tracing the initializer, so nothing is compiled: initializing for real would compile the whole
  model once more only to be overwritten."""
  graphdefs = []

  def initial_state():
    graphdef, _, state = steps.create_train_state(config, config.seed)
    graphdefs.append(graphdef)
    return state

  shapes = jax.eval_shape(initial_state)
  state = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), placement), shapes)
  return graphdefs[0], state


def restore(workdir: str, checkpoint: str | None = None, mesh=None) -> TrainedModel:
  """The model of `workdir` (its config.json) with the weights of `checkpoint` (default: latest)."""
  config = workdirs.read_config(workdir)
  checkpoints_workdir, step = resolve_checkpoint(workdir, checkpoint)
  folder = checkpointing.checkpoint_dir(checkpoints_workdir)
  if not paths.isdir(folder):
    raise FileNotFoundError(f"{folder} does not exist: this workdir has no checkpoint yet.")
  mesh = mesh or sharding.make_mesh()
  graphdef, state = zeros_like_train_state(config, sharding.replicated(mesh))
  # Read-only: a trainer may be writing to this workdir; nothing here is created or deleted.
  manager = checkpointing.make_manager(checkpoints_workdir, config.keep_checkpoints,
                                       read_only=True)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{folder} holds no checkpoint.")
    # FileNotFoundError naming the kept steps if `step` is not one; CheckpointCorrupt if damaged.
    state = checkpointing.restore_latest(manager, state, step=step)
  finally:
    manager.close()
  log.info("Restored step %d from %s.", int(state.step), os.path.join(folder, str(step)))
  return TrainedModel(config=config, graphdef=graphdef, params=state.params,
                      batch_stats=state.batch_stats, step=int(state.step),
                      checkpoint=os.path.join(folder, str(step)),
                      class_names=class_names_of(config, workdir), mesh=mesh)


# ---------------------------------------------------------------- pure, jitted scoring
def parse_scales(text: str) -> tuple[float, ...]:
  """--scales=0.75,1.0,1.25 -> (0.75, 1.0, 1.25)."""
  try:
    scales = tuple(float(part) for part in text.split(",") if part.strip())
  except ValueError as error:
    raise ValueError(f"--scales={text!r} must be comma-separated numbers, e.g. 0.75,1.0,1.25.") \
        from error
  if not scales or min(scales) <= 0:
    raise ValueError(f"--scales={text!r} must be positive factors, e.g. 1.0 or 0.5,1.0,1.5.")
  return scales


def scaled_size(size: int, scale: float, minimum: int) -> int:
  """DeepLab's scale_dimension: 4k + 1 sizes stay 4k + 1 for scales in quarters (513 -> 257, 769),
  so the scaled feature grid lines up with the window's corners. Never below `minimum`."""
  return max(int((size - 1) * scale + 1), minimum)


def window_probabilities(params: dict, batch_stats: dict, windows: jax.Array, *, graphdef,
                         scales: Sequence[float], flip: bool, min_size: int) -> jax.Array:
  """float32 [B, h, w, C]: softmax probabilities averaged over `scales` (and the mirrored windows
  with `flip`) for NHWC `windows`, each scale's logits resized back to (h, w)."""
  size = windows.shape[1:3]
  views = [(windows, False)] + ([(windows[:, :, ::-1], True)] if flip else [])
  total = 0.0
  for view, mirrored in views:
    for scale in scales:
      scaled = resize_bilinear(view, tuple(scaled_size(s, scale, min_size) for s in size))
      logits = resize_bilinear(
          steps.predict_logits(params, batch_stats, scaled, graphdef=graphdef), size)
      if mirrored:
        logits = logits[:, :, ::-1]
      total = total + jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return total / (len(views) * len(scales))


def padded_batch_size(batch_size: int, mesh) -> int:
  """Rounded up to a multiple of the device count: a batch is split evenly over the devices."""
  devices = mesh.devices.size
  return max(1, -(-batch_size // devices)) * devices


def make_scores_fn(model: TrainedModel, *, scales: Sequence[float], flip: bool,
                   batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
  """numpy windows [N <= batch, h, w, 3] -> numpy probabilities [N, h, w, C]. Batches are padded
  to one fixed size (zeros), so the function compiles once; its `.batch_size` is that size.
  Windows are split over the mesh's devices and the probabilities stay split until the host
  gathers them (no all-gather onto every device)."""
  batch_size = padded_batch_size(batch_size, model.mesh)
  scores = jax.jit(functools.partial(
      window_probabilities, graphdef=model.graphdef, scales=tuple(scales), flip=flip,
      min_size=config_lib.min_crop_size(model.config.model.output_stride)))
  batch_sharding = sharding.batch_sharding(model.mesh)

  def scores_fn(windows: np.ndarray) -> np.ndarray:
    count = len(windows)
    if count > batch_size:
      raise ValueError(f"{count} windows in one call; at most {batch_size}.")
    padded = np.zeros((batch_size,) + windows.shape[1:], np.float32)
    padded[:count] = windows
    result = scores(model.params, model.batch_stats, jax.device_put(padded, batch_sharding))
    return np.asarray(result)[:count]

  scores_fn.batch_size = batch_size
  return scores_fn


# ---------------------------------------------------------------- canvas and sliding windows
def normalize_image(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 in [-1, 1], the same float32 operations as
  augment.normalize_image, so the bits match the training pipeline's."""
  return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def window_starts(length: int, window: int, stride: int) -> list[int]:
  """Top (or left) edges of the windows along one side: `stride` apart, the last flush with the
  end; one window at 0 for a side that fits."""
  if length <= window:
    return [0]
  return list(range(0, length - window, stride)) + [length - window]


def stride_of(window: Sequence[int], fraction: float) -> tuple[int, int]:
  if not 0 < fraction <= 1:
    raise ValueError(f"The window stride must be a fraction of the window in (0, 1], got "
                     f"{fraction}.")
  return tuple(max(1, int(round(side * fraction))) for side in window)


def tile(image: np.ndarray, window: Sequence[int],
         stride: Sequence[int]) -> tuple[np.ndarray, list, tuple]:
  """(windows [N, h, w, 3], their (top, left) origins, the canvas size) of a normalized image
  padded bottom/right with 0 to at least the window."""
  height, width = image.shape[:2]
  canvas = (max(height, window[0]), max(width, window[1]))
  padded = np.zeros(canvas + image.shape[2:], np.float32)
  padded[:height, :width] = image
  origins = [(top, left) for top in window_starts(canvas[0], window[0], stride[0])
             for left in window_starts(canvas[1], window[1], stride[1])]
  windows = np.stack([padded[top:top + window[0], left:left + window[1]]
                      for top, left in origins])
  return windows, origins, canvas


def stitch(window_scores: np.ndarray, origins: Sequence, canvas: Sequence[int],
           image_size: Sequence[int]) -> np.ndarray:
  """[H, W, C]: window scores averaged where windows overlap, cropped to the image."""
  height, width = image_size
  if len(origins) == 1:
    return window_scores[0, :height, :width]
  window = window_scores.shape[1:3]
  total = np.zeros(tuple(canvas) + window_scores.shape[3:], np.float32)
  count = np.zeros(tuple(canvas) + (1,), np.float32)
  for scores, (top, left) in zip(window_scores, origins):
    total[top:top + window[0], left:left + window[1]] += scores
    count[top:top + window[0], left:left + window[1]] += 1
  return (total / count)[:height, :width]


def predict_tiled(items: Iterable[tuple[Any, np.ndarray]], scores_fn: Callable, *,
                  window: Sequence[int], stride: Sequence[int],
                  batch_size: int) -> Iterator[tuple[Any, np.ndarray]]:
  """(key, scores [H, W, C]) for each (key, normalized image [H, W, 3]) of `items`, in order.

  Windows of consecutive images fill the same batches, so small images are predicted
  `batch_size` at a time and a large one's windows too.
  """
  pending = collections.deque()  # (key, image size, origins, canvas) awaiting their scores.
  windows, scores = [], []

  def run_batches(final: bool):
    while len(windows) >= batch_size or (final and windows):
      chunk = np.stack(windows[:batch_size])
      del windows[:batch_size]
      scores.extend(scores_fn(chunk))

  def finished():
    while pending and len(scores) >= len(pending[0][2]):
      key, size, origins, canvas = pending.popleft()
      done = np.stack(scores[:len(origins)])
      del scores[:len(origins)]
      yield key, stitch(done, origins, canvas, size)

  for key, image in items:
    image_windows, origins, canvas = tile(image, window, stride)
    pending.append((key, image.shape[:2], origins, canvas))
    windows.extend(image_windows)
    run_batches(final=False)
    yield from finished()
  run_batches(final=True)
  yield from finished()


def define_shared_flags() -> None:
  """The flags predict and evaluate share; called only when one of them runs as a program (main.py
  defines flags of the same names, and a test session imports all three modules)."""
  from absl import flags
  flags.DEFINE_string("workdir", None, "A training workdir (config.json, checkpoints/).")
  flags.DEFINE_string("checkpoint", "", "A step number or .../checkpoints/STEP; default latest.")
  flags.DEFINE_string("scales", "1.0", "Comma-separated input scales, e.g. 0.75,1.0,1.25.")
  flags.DEFINE_bool("flip", False, "Also average over horizontally mirrored inputs.")
  flags.DEFINE_float("window_stride", DEFAULT_WINDOW_STRIDE,
                     "Sliding-window stride as a fraction of the eval crop.")


def program_flags(argv):
  """The parsed flags of predict/evaluate run as programs, after refusing stray arguments and
  keeping TensorFlow (imported by the data code) off the accelerators JAX uses."""
  from absl import app, flags
  import tensorflow as tf
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  tf.config.set_visible_devices([], "GPU")
  return flags.FLAGS
