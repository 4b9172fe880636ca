"""XLA's convolution against models/conv.py's formulations, layer by layer.

For the convolution shapes of a DeepLabv3+ ResNet-50 step (output stride 16, crop 321, 2 images),
times the forward pass, the input gradient and the kernel gradient, each jitted alone, with
lax.conv_general_dilated and with pseudoseg_jax.models.conv.conv_general_dilated, and reports XLA's
FLOP count (useful work: taps on padding are not counted) and GFLOP/s. One JSON line on stdout.

  python benchmarks/conv_kernels.py [--repeats=5] [--layers=aspp12,decoder]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Sequence

import common  # benchmarks/common.py; imported first: it quiets TensorFlow.
import jax
import jax.numpy as jnp
import numpy as np

from pseudoseg_jax.models import conv

# name: (batch, height, width, in channels, kernel, out channels, stride, dilation)
LAYERS = {
    "stem_7x7_s2": (2, 321, 321, 3, 7, 64, 2, 1),
    "stage1_3x3": (2, 81, 81, 64, 3, 64, 1, 1),
    "stage1_1x1": (2, 81, 81, 256, 1, 64, 1, 1),
    "stage2_3x3_s2": (2, 81, 81, 128, 3, 128, 2, 1),
    "stage3_3x3": (2, 21, 21, 256, 3, 256, 1, 1),
    "stage3_1x1": (2, 21, 21, 1024, 1, 256, 1, 1),
    "stage4_3x3_rate2": (2, 21, 21, 512, 3, 512, 1, 2),
    "aspp_rate6": (2, 21, 21, 2048, 3, 256, 1, 6),
    "aspp_rate12": (2, 21, 21, 2048, 3, 256, 1, 12),
    "aspp_rate18": (2, 21, 21, 2048, 3, 256, 1, 18),
    "decoder_3x3": (2, 81, 81, 304, 3, 256, 1, 1),
}
NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", default=",".join(LAYERS), help="comma-separated LAYERS names")
  parser.add_argument("--repeats", type=int, default=5)
  return parser.parse_args(argv)


def timed(fn, args, repeats: int) -> dict:
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  seconds = statistics.median(common.timed_runs(
      lambda: jax.block_until_ready(compiled(*args)), repeats))
  flops = common.cost_entry(compiled, "flops")
  return {"seconds": seconds, "xla_flops": flops,
          "gflops_per_s": flops / seconds / 1e9 if flops else None}


def layer_passes(convolution, stride: int, dilation: int, pad: int):
  """(forward, input gradient, kernel gradient) of one convolution function."""
  def forward(x, kernel):
    numbers = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, NHWC_HWIO)
    return convolution(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                       rhs_dilation=(dilation, dilation), dimension_numbers=numbers)

  def input_gradient(x, kernel, dy):
    return jax.vjp(lambda x: forward(x, kernel), x)[1](dy)[0]

  def kernel_gradient(x, kernel, dy):
    return jax.vjp(lambda kernel: forward(x, kernel), kernel)[1](dy)[0]
  return forward, input_gradient, kernel_gradient


def measure_layer(shape, repeats: int) -> dict:
  batch, height, width, in_channels, kernel_size, out_channels, stride, dilation = shape
  pad = dilation * (kernel_size - 1) // 2
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, height, width, in_channels)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((kernel_size, kernel_size, in_channels, out_channels))
                       * 0.01, jnp.float32)
  result = {}
  for name, convolution in (("xla", jax.lax.conv_general_dilated),
                            ("ours", conv.conv_general_dilated)):
    forward, input_gradient, kernel_gradient = layer_passes(convolution, stride, dilation, pad)
    dy = jnp.ones(jax.eval_shape(forward, x, kernel).shape, jnp.float32)
    result[name] = {"forward": timed(forward, (x, kernel), repeats),
                    "input_gradient": timed(input_gradient, (x, kernel, dy), repeats),
                    "kernel_gradient": timed(kernel_gradient, (x, kernel, dy), repeats)}
  total = {name: sum(part["seconds"] for part in passes.values())
           for name, passes in result.items()}
  result["speedup_of_forward_and_gradients"] = total["xla"] / total["ours"]
  return result


def main(argv: Sequence[str] = ()) -> dict:
  args = parse_args(argv)
  unknown = [name for name in args.layers.split(",") if name not in LAYERS]
  if unknown:
    raise SystemExit(f"--layers: unknown {unknown}; choose from {sorted(LAYERS)}")
  layers = {}
  for name in args.layers.split(","):
    common.note(f"{name} {LAYERS[name]}")
    layers[name] = {"shape": LAYERS[name], **measure_layer(LAYERS[name], args.repeats)}
    common.note(f"  speed-up {layers[name]['speedup_of_forward_and_gradients']:.2f}x")
  return common.emit({"benchmark": "conv_kernels", "repeats": args.repeats, "layers": layers,
                      **common.machine()})


if __name__ == "__main__":
  common.run_as_script(main)
