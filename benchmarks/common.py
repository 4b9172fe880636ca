"""What the speed benchmarks (train_step.py, input_pipeline.py) share: the benchmark config, the
trainer's jitted step built as train.py builds it, an in-memory source of VOC-sized images, XLA's
cost and memory figures, a matmul peak, the machine's description and the one JSON line each
benchmark prints.

Single process: a benchmark measures one host and its local devices.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import math
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable, Sequence

# TensorFlow only feeds data here: keep it quiet (before anything imports it).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from pseudoseg_jax import config as config_lib  # noqa: E402
from pseudoseg_jax import sharding, steps  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The DeepLabv3+ head of SPEC 7 (and of the PyTorch peers): what a ResNet-50/101 benchmark means.
STANDARD_HEAD_FIELDS = ("aspp_channels", "decoder_channels", "low_level_channels",
                        "sgc_attention_dim")
# Vendor datasheet peaks (dense, no sparsity), for MFU against the spec rather than the measured
# matmul. Matched against jax's device_kind, most specific first.
SPEC_PEAK_FLOPS = (
    ("H100 PCIe", "bfloat16", 756e12),
    ("H100", "bfloat16", 989.4e12),
    ("H200", "bfloat16", 989.4e12),
    ("A100", "bfloat16", 312e12),
)


def note(message: str) -> None:
  """Progress on stderr: stdout carries only the result line."""
  print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def run_as_script(main: Callable[[Sequence[str]], dict]) -> None:
  """Runs `main(sys.argv[1:])` with the project's console log moved to stderr."""
  logging.getLogger("absl").setLevel(logging.WARNING)
  from pseudoseg_jax import writers
  for handler in writers.log.handlers:
    if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
      handler.setStream(sys.stderr)
  main(sys.argv[1:])


def emit(result: dict) -> dict:
  print(json.dumps(result), flush=True)
  return result


# ---------------------------------------------------------------- configs
def load_config(spec: str) -> ml_collections.ConfigDict:
  """configs/NAME.py[:ARGS] -> get_config(ARGS), as the trainer's --config reads it; a relative
  path is tried from the current directory, then from the repository."""
  path, _, arg = spec.partition(":")
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(REPO, path)
  module_spec = importlib.util.spec_from_file_location("benchmark_config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """'model.aspp_channels=16' style FIELD=VALUE strings; values are Python literals or text."""
  for item in overrides:
    name, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"Override {item!r} must look like FIELD=VALUE.")
    try:
      value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
      value = text.strip()
    parent, _, leaf = name.strip().rpartition(".")
    section = config
    for part in filter(None, parent.split(".")):
      section = section[part]
    section[leaf] = value


def benchmark_config(base: ml_collections.ConfigDict, *, backbone: str, crop: int, labeled: int,
                     unlabeled: int, dtype: str = "float32", output_stride: int = 16,
                     method: str = "pseudoseg", num_classes: int = 21, head: str = "standard",
                     optimizer: str = "sgd",
                     overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`base` (a config file's) with the model, crop and batch of the benchmark, validated.

  head='standard' takes SPEC 7's DeepLabv3+ head (ASPP and decoder 256, low-level 48, SGC 128,
  ASPP rates 6/12/18 at output stride 16, doubled at 8); head='config' keeps the file's.
  optimizer: 'sgd' (SPEC 7's recipe, and the PyTorch peers'), 'adam', or 'config' (the file's).
  Global batches: `labeled` + `unlabeled` images per step. No pretrained weights are read: they do
  not change the step's cost.
  """
  config = base.copy_and_resolve_references()
  config.method = method
  config.batch_size = labeled
  config.crop_size = config.eval_crop_size = crop
  config.data.num_classes = num_classes
  model = config.model
  model.backbone, model.output_stride, model.dtype = backbone, output_stride, dtype
  model.init_from = ""
  if head == "standard":
    defaults = config_lib.base_config().model
    for field in STANDARD_HEAD_FIELDS:
      model[field] = defaults[field]
    model.aspp_rates = tuple(rate * 16 // output_stride for rate in defaults.aspp_rates)
  elif head != "config":
    raise ValueError(f"head must be 'standard' or 'config', got {head!r}.")
  if optimizer != "config":
    config.optimizer.name = optimizer
  config.pseudoseg.unlabeled_batch_size = unlabeled
  # The original's 4 images per calibration scalar, or what divides a smaller batch.
  config.pseudoseg.fusion_group_size = math.gcd(config.pseudoseg.fusion_group_size, unlabeled)
  config.pseudoseg.cutout_size = round(crop * 100 / 513)  # SPEC: 100 px at crop 513.
  apply_overrides(config, overrides)
  config_lib.validate(config)
  return config


def model_summary(config: ml_collections.ConfigDict) -> dict:
  model = config.model
  return {"backbone": model.backbone, "output_stride": model.output_stride, "dtype": model.dtype,
          "aspp_channels": model.aspp_channels, "decoder_channels": model.decoder_channels,
          "aspp_rates": list(model.aspp_rates), "method": config.method,
          "crop": config.crop_size, "labeled": config.batch_size,
          "unlabeled": config.pseudoseg.unlabeled_batch_size if config.method == "pseudoseg" else 0,
          "num_classes": config.data.num_classes, "optimizer": config.optimizer.name,
          "pseudo_label_source": config.pseudoseg.pseudo_label_source}


# ---------------------------------------------------------------- the trainer's pieces
def make_mesh(num_devices: int = 0):
  """train.py's mesh: all local devices, or the first `num_devices`."""
  devices = jax.local_devices()
  return sharding.make_mesh(devices[:num_devices] if num_devices else devices)


def initial_state(config: ml_collections.ConfigDict, mesh):
  """(graphdef, state replicated on the mesh), as train.run makes them for a fresh run."""
  graphdef, _, state = steps.create_train_state(config, config.seed)
  return graphdef, jax.device_put(state, sharding.replicated(mesh))


def jitted_train_step(config: ml_collections.ConfigDict, graphdef, state, mesh):
  """train.run's own jitted step (replicated state donated, batch split on 'data'), as
  (fn, schedule length): train.run calls fn(state, batch, schedule length)."""
  from pseudoseg_jax import train
  return (train.make_train_fn(config, graphdef, state, mesh),
          train.schedule_length(config, mesh))


def in_memory_source(num_classes: int, *, num_images: int = 4, height: int = 375,
                     width: int = 500, seed: int = 0):
  """A datasets.Source of VOC-sized random images and masks held in memory, for the trainer's own
  streams (streams.training_batches) without a disk or a download. Pixel values do not change the
  cost of the jitted step: nothing in it branches on data."""
  import tensorflow as tf
  from pseudoseg_jax.data import datasets

  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (num_images, height, width, 3), dtype=np.uint8)
  masks = rng.integers(0, num_classes, (num_images, height, width, 1), dtype=np.uint8)
  masks[:, :, :8] = 255  # A void band, as VOC's object borders.
  dataset = tf.data.Dataset.from_tensor_slices({"image": images, "mask": masks})
  return datasets.Source(labeled=dataset, eval=dataset, num_labeled=num_images,
                         num_eval=num_images,
                         class_names=tuple(f"class_{i}" for i in range(num_classes)),
                         unlabeled=dataset, num_unlabeled=num_images)


def shapes_of(tree) -> dict:
  """{'labeled/image': 'float32[2,321,321,3]', ...} of a (nested) batch."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(getattr(entry, "key", entry)) for entry in path)
    flat[name] = f"{np.dtype(leaf.dtype).name}[{','.join(map(str, leaf.shape))}]"
  return flat


# ---------------------------------------------------------------- XLA's figures
def cost_entry(compiled, key: str):
  """One figure of compiled.cost_analysis() ('flops', 'bytes accessed', ...), or None.

  JAX returned a list with one dict per computation up to 0.4.x and a dict since: both are read;
  a list is summed.
  """
  try:
    analysis = compiled.cost_analysis()
  except NotImplementedError:
    return None
  if analysis is None:
    return None
  entries = analysis if isinstance(analysis, (list, tuple)) else [analysis]
  values = [entry[key] for entry in entries if entry and key in entry]
  return float(sum(values)) if values else None


def memory_figures(compiled) -> dict:
  """XLA's static memory plan of the executable (bytes), where the backend reports one."""
  try:
    stats = compiled.memory_analysis()
  except NotImplementedError:
    stats = None
  if stats is None:
    return {}
  figures = {name: int(getattr(stats, f"{name}_size_in_bytes", 0) or 0)
             for name in ("argument", "output", "alias", "temp", "generated_code")}
  # Donated arguments alias outputs: they are counted once.
  figures["total"] = (figures["argument"] + figures["output"] - figures["alias"]
                      + figures["temp"])
  return {f"xla_{name}_bytes": value for name, value in figures.items()}


def device_memory_peak(device) -> int | None:
  """The allocator's high-water mark (GPU, TPU); None where the device keeps none (CPU)."""
  try:
    stats = device.memory_stats()
  except (AttributeError, NotImplementedError, RuntimeError):
    return None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def max_rss_bytes() -> int:
  usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(usage if sys.platform == "darwin" else usage * 1024)  # Linux reports KiB.


def process_cpu_seconds() -> float:
  """User + system CPU time of this process and all its threads."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def timed_runs(fn: Callable[[], object], count: int) -> list[float]:
  """Wall seconds of `count` calls, each waited for (`fn` blocks until its result is ready)."""
  times = []
  for _ in range(count):
    started = time.perf_counter()
    fn()
    times.append(time.perf_counter() - started)
  return times


def matmul_peak(dtype: str, sizes: Sequence[int], repeats: int = 5, device=None) -> dict:
  """The best FLOP/s of a jitted n x n @ n x n matmul (2 n^3 FLOPs) over `sizes`: the median of
  `repeats` runs after one warm-up, per size. What the machine's compiler and BLAS reach on its
  best-shaped work, measured in the same process as the step it is compared with."""
  device = device or jax.local_devices()[0]
  per_size = []
  for n in sizes:
    keys = jax.random.split(jax.random.key(n), 2)
    a, b = (jax.device_put(jax.random.normal(key, (n, n), jnp.dtype(dtype)), device)
            for key in keys)
    compiled = jax.jit(jnp.matmul).lower(a, b).compile()
    compiled(a, b).block_until_ready()
    seconds = statistics.median(timed_runs(lambda: compiled(a, b).block_until_ready(), repeats))
    per_size.append({"n": n, "seconds": seconds, "flops": 2 * n**3,
                     "xla_flops": cost_entry(compiled, "flops"),
                     "flops_per_s": 2 * n**3 / seconds})
  best = max(per_size, key=lambda entry: entry["flops_per_s"])
  return {"matmul_peak_flops_per_s": best["flops_per_s"], "matmul_peak_n": best["n"],
          "matmul_dtype": dtype, "matmul_runs": per_size}


def default_matmul_sizes(platform_name: str) -> tuple:
  # A CPU saturates by 2-4k (a 4096 fp32 matmul is ~1 s on 2 cores); accelerators need more.
  return (1024, 2048, 4096) if platform_name == "cpu" else (4096, 8192, 16384)


def spec_peak_flops(device_kind: str, dtype: str) -> float | None:
  for kind, peak_dtype, peak in SPEC_PEAK_FLOPS:
    if kind in device_kind and peak_dtype == dtype:
      return peak
  return None


# ---------------------------------------------------------------- the machine
def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict:
  devices = jax.local_devices()
  try:
    usable_cores = len(os.sched_getaffinity(0))
  except AttributeError:  # Not Linux.
    usable_cores = os.cpu_count()
  return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "num_local_devices": len(devices), "cpu_model": cpu_model(),
          "cpu_count": os.cpu_count(), "usable_cpu_cores": usable_cores,
          "jax_version": jax.__version__, "python_version": platform.python_version(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          # glibc.malloc.hugetlb=1 unless opted out (pseudoseg_jax/hugepages.py).
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
          "default_matmul_precision": str(jax.config.jax_default_matmul_precision)}


def sample_photos_dir() -> str:
  """Genuine sample photos: $PSEUDOSEG_SAMPLE_PHOTOS, else the repository's own tests/data (the
  3 VOC photos the tests use; sources in tests/data/SOURCES.md)."""
  return os.environ.get("PSEUDOSEG_SAMPLE_PHOTOS", os.path.join(REPO, "tests", "data"))
