"""Speed of the full train step against the machine's matmul peak (and the PyTorch peer).

  python benchmarks/train_step.py [--backbone=resnet50] [--crop=321] [--labeled=2] [--unlabeled=2]
      [--dtype=float32|bfloat16] [--output_stride=16] [--method=pseudoseg|supervised]
      [--steps=5] [--warmup=2] [--config=configs/demo.py] [--num_classes=21]
      [--head=standard|config] [--optimizer=sgd|adam|config] [--set FIELD=VALUE ...]
      [--devices=N] [--matmul_sizes=1024,2048] [--breakdown]

The step is the trainer's own: the config file (default the demo's PseudoSeg settings) with the
model, crop, batch and optimizer above, the state from steps.create_train_state, the jit of
train.run (state replicated and donated, batch split over the mesh), fed one batch that the
trainer's own streams (streams.training_batches) made from VOC-sized images in memory. Timed steps reuse that batch on
the device, so input costs nothing here (benchmarks/input_pipeline.py measures it).

Prints one JSON line on stdout (progress on stderr); BENCHMARKS.md explains every field. Expect
initialization and compilation to take a while on a CPU: 8 + 8 + 23 s (init, trace, compile) for
the PseudoSeg step even with the tiny backbone on 2 cores.
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import time
from typing import Sequence

from pseudoseg_jax import hugepages

if __name__ == "__main__":
  # Measure the step as the trainer's command runs it (before JAX and TensorFlow load).
  hugepages.reexec_with_hugepages()

import common  # benchmarks/common.py; imported first: it quiets TensorFlow.
import jax
from flax import nnx

from pseudoseg_jax import sharding, steps
from pseudoseg_jax.data import streams
from pseudoseg_jax.models import conv

# UniMatch's FixMatch step (same DeepLabv3+ ResNet-50, OS 16, crop 321, 2 + 2, fp32), torch 2.13 on
# 2 CPU threads: the figure, measured on the project's first 2-core machine (an Intel Xeon
# at 2.0 GHz). Another machine needs the peer timed there: --peer_seconds. Compared only in that
# setting.
PEER = {"name": "UniMatch FixMatch step, torch 2.13 CPU, 2 threads", "seconds_per_step": 15.2,
        "setting": {"backbone": "resnet50", "crop": 321, "labeled": 2, "unlabeled": 2,
                    "dtype": "float32", "output_stride": 16, "method": "pseudoseg",
                    "optimizer": "sgd", "platform": "cpu"}}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--backbone", default="resnet50")
  parser.add_argument("--crop", type=int, default=321)
  parser.add_argument("--labeled", type=int, default=2, help="Global labeled batch.")
  parser.add_argument("--unlabeled", type=int, default=2, help="Global unlabeled batch.")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="Compute dtype (parameters stay float32).")
  parser.add_argument("--output_stride", type=int, default=16, choices=(8, 16))
  parser.add_argument("--method", default="pseudoseg", choices=("pseudoseg", "supervised"))
  parser.add_argument("--steps", type=int, default=5, help="Timed steps.")
  parser.add_argument("--warmup", type=int, default=2, help="Untimed steps after compiling.")
  parser.add_argument("--config", default="configs/demo.py",
                      help="Config file[:ARGS] for everything the flags above do not set.")
  parser.add_argument("--num_classes", type=int, default=21)
  parser.add_argument("--head", default="standard", choices=("standard", "config"),
                      help="standard: SPEC 7's DeepLabv3+ head; config: the config file's.")
  parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adam", "config"),
                      help="sgd: SPEC 7's recipe and the peer's; config: the config file's.")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="FIELD=VALUE", help="Config override, last; repeatable.")
  parser.add_argument("--devices", type=int, default=0,
                      help="Use the first N local devices (0 = all, as the trainer).")
  parser.add_argument("--matmul_sizes", default="",
                      help="Comma-separated n of the n x n matmul peak (default by platform).")
  parser.add_argument("--matmul_repeats", type=int, default=5)
  parser.add_argument("--peer_seconds", type=float, default=None,
                      help="The peer's median step timed on this machine, in the peer's setting "
                           "(default: the issue's 15.2 s, from another machine).")
  parser.add_argument("--xla_convolutions", action="store_true",
                      help="XLA's own convolutions, as on accelerators, instead of models/conv.py's "
                           "CPU formulations (BENCHMARKS.md: when to delete them).")
  parser.add_argument("--breakdown", action="store_true",
                      help="Also time a training-mode forward and a supervised loss+gradient on "
                           "the labeled batch (two more compiles).")
  return parser.parse_args(argv)


def one_batch(config, mesh) -> dict:
  """The first batch of the trainer's own streams, as global arrays on the mesh."""
  source = common.in_memory_source(config.data.num_classes)
  batches = streams.training_batches(config, source, mesh, start_step=0)
  local_batch = next(batches)
  # Ends the streams' background threads, which would otherwise compete with the timed steps.
  del batches
  gc.collect()
  return sharding.to_global(local_batch, mesh)


def time_part(fn, args, repeats: int) -> dict:
  """Compile `fn` (jitted) for `args` and time it: median seconds and XLA's FLOPs."""
  compiled = fn.lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  seconds = statistics.median(common.timed_runs(
      lambda: jax.block_until_ready(compiled(*args)), repeats))
  return {"seconds": seconds, "xla_flops": common.cost_entry(compiled, "flops")}


def breakdown(config, graphdef, state, batch, repeats: int) -> dict:
  """Where a PseudoSeg step's time goes, coarsely: one training-mode forward on the labeled batch
  (a PseudoSeg step runs three, plus a backbone pass for the CAM), and the loss and gradient of
  the supervised step on it."""
  labeled = batch["labeled"] if "labeled" in batch else batch

  def forward(params, batch_stats, images):
    model = nnx.merge(graphdef, params, batch_stats)
    return model(images, train=True, rngs=nnx.Rngs(dropout=jax.random.key(0)))["logits"]

  loss_and_grad = jax.value_and_grad(
      functools.partial(steps.supervised_loss, graphdef=graphdef, config=config), has_aux=True)
  key = jax.random.key(0)
  parts = {
      "forward_labeled": time_part(jax.jit(forward),
                                   (state.params, state.batch_stats, labeled["image"]), repeats),
      "supervised_loss_and_grad_labeled": time_part(
          jax.jit(loss_and_grad),
          (state.params, state.batch_stats, {"image": labeled["image"], "mask": labeled["mask"]},
           key), repeats),
  }
  return parts


def peer_comparison(args, platform_name: str, median_seconds: float) -> dict:
  setting = {"backbone": args.backbone, "crop": args.crop, "labeled": args.labeled,
             "unlabeled": args.unlabeled, "dtype": args.dtype,
             "output_stride": args.output_stride, "method": args.method,
             "optimizer": args.optimizer, "platform": platform_name}
  if setting != PEER["setting"] or args.head != "standard" or args.overrides:
    return {}
  timed_here = args.peer_seconds is not None
  peer_seconds = args.peer_seconds if timed_here else PEER["seconds_per_step"]
  return {"peer": PEER["name"], "peer_seconds_per_step": peer_seconds,
          "peer_timed_on": "this machine (--peer_seconds)" if timed_here else "the issue's machine",
          "speedup_vs_peer": peer_seconds / median_seconds}


def main(argv: Sequence[str] = ()) -> dict:
  args = parse_args(argv)
  config = common.benchmark_config(
      common.load_config(args.config), backbone=args.backbone, crop=args.crop,
      labeled=args.labeled, unlabeled=args.unlabeled, dtype=args.dtype,
      output_stride=args.output_stride, method=args.method, num_classes=args.num_classes,
      head=args.head, optimizer=args.optimizer, overrides=args.overrides)
  mesh = common.make_mesh(args.devices)
  if args.xla_convolutions:  # After make_mesh, which sets the mesh's platform.
    conv.set_mesh_platform("xla")
  machine = common.machine()
  common.note(f"{args.method} step, {args.backbone} crop {args.crop}, {args.labeled} + "
              f"{args.unlabeled if args.method == 'pseudoseg' else 0} images, {args.dtype}, on "
              f"{mesh.devices.size} {machine['device_kind']} device(s).")

  started = time.perf_counter()
  graphdef, state = common.initial_state(config, mesh)
  jax.block_until_ready(state)
  init_seconds = time.perf_counter() - started
  batch = one_batch(config, mesh)

  train_fn, total_steps = common.jitted_train_step(config, graphdef, state, mesh)
  started = time.perf_counter()
  lowered = train_fn.lower(state, batch, total_steps)
  lower_seconds = time.perf_counter() - started
  started = time.perf_counter()
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - started
  flops = common.cost_entry(compiled, "flops")
  common.note(f"Compiled in {lower_seconds:.1f} + {compile_seconds:.1f} s; XLA counts "
              f"{(flops or 0) / 1e9:.1f} GFLOP per step.")

  parts = breakdown(config, graphdef, state, batch, args.steps) if args.breakdown else None

  times = []
  for index in range(args.warmup + args.steps):
    started = time.perf_counter()
    state, metrics = compiled(state, batch, total_steps)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - started)
    common.note(f"step {index + 1}/{args.warmup + args.steps}: {times[-1]:.3f} s"
                f"{' (warm-up)' if index < args.warmup else ''}")
  timed = times[args.warmup:]
  median = statistics.median(timed)
  loss = float(jax.device_get(metrics["train/loss"]))
  device_peak = common.device_memory_peak(mesh.devices.flat[0])  # Before the matmuls' buffers.

  sizes = (tuple(int(n) for n in args.matmul_sizes.split(",")) if args.matmul_sizes
           else common.default_matmul_sizes(machine["platform"]))
  peak = common.matmul_peak(args.dtype, sizes, repeats=args.matmul_repeats,
                            device=mesh.devices.flat[0])
  # The peak is one device's; the step runs on all of the mesh.
  machine_peak = peak["matmul_peak_flops_per_s"] * mesh.devices.size
  images = args.labeled + (args.unlabeled if args.method == "pseudoseg" else 0)
  achieved = flops / median if flops else None
  spec_peak = common.spec_peak_flops(machine["device_kind"], args.dtype)

  result = {
      "benchmark": "train_step",
      **common.model_summary(config),
      "head": args.head, "overrides": list(args.overrides), "config": args.config,
      "mesh_devices": int(mesh.devices.size),
      "steps_timed": args.steps, "warmup_steps": args.warmup,
      "median_step_seconds": median, "min_step_seconds": min(timed),
      "step_seconds": timed,
      "steps_per_s": 1 / median, "images_per_s": images / median,
      "xla_flops_per_step": flops,
      "xla_bytes_accessed_per_step": common.cost_entry(compiled, "bytes accessed"),
      "achieved_flops_per_s": achieved,
      **peak,
      "machine_matmul_peak_flops_per_s": machine_peak,
      "fraction_of_matmul_peak": achieved / machine_peak if achieved else None,
      "spec_peak_flops_per_s": spec_peak * mesh.devices.size if spec_peak else None,
      "mfu_vs_spec": achieved / (spec_peak * mesh.devices.size) if achieved and spec_peak else None,
      "init_seconds": init_seconds, "lower_seconds": lower_seconds,
      "compile_seconds": compile_seconds,
      **common.memory_figures(compiled),
      "device_peak_bytes": device_peak,
      "max_rss_bytes": common.max_rss_bytes(),
      "final_loss": loss,
      "batch": common.shapes_of(batch),
      **peer_comparison(args, machine["platform"], median),
      **({"breakdown": parts} if parts else {}),
      **machine,
  }
  return common.emit(result)


if __name__ == "__main__":
  common.run_as_script(main)
