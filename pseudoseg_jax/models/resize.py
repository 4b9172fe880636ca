"""Bilinear resize with align_corners=True, the DeepLab / TF1 convention.

Output pixel i samples input coordinate i * (in - 1) / (out - 1): the first and last pixels of input
and output coincide, so DeepLab's 4k+1 sizes resize exactly (129 -> 513 puts every 4th output pixel
on an input pixel). jax.image.resize uses half-pixel centres and cannot express this.

Each spatial axis is resized by multiplying with a constant [out, in] interpolation matrix (two
non-zeros per row). Sizes are static, so the matrices are built in NumPy at trace time; the two
einsums are exact, differentiable, and run as matmuls on TPU/GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] float64 matrix of align_corners=True linear-interpolation weights."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f"resize sizes must be >= 1, got in={in_size}, out={out_size}.")
  # TF and PyTorch sample coordinate 0 when the output has a single pixel.
  scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
  source = np.arange(out_size, dtype=np.float64) * scale
  # Clamp the left tap so that the last output pixel (source == in - 1) uses weight 1 on the last
  # input pixel instead of indexing one past the end.
  left = np.clip(np.floor(source).astype(np.int64), 0, max(in_size - 2, 0))
  right_weight = source - left
  matrix = np.zeros((out_size, in_size), dtype=np.float64)
  rows = np.arange(out_size)
  matrix[rows, left] += 1.0 - right_weight
  matrix[rows, np.minimum(left + 1, in_size - 1)] += right_weight
  return matrix


def _compute_dtype(dtype) -> jnp.dtype:
  # Weights such as 1/3 are not exact in bfloat16: low-precision inputs are interpolated in float32.
  return jnp.float64 if dtype == jnp.float64 else jnp.float32


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Resizes NHWC `x` to spatial `size` = (height, width), bilinear with align_corners=True.

  Works for up- and downsampling (downsampling does not antialias, as in TF1 / PyTorch). Computes in
  float32 (float64 for float64 input) at HIGHEST matmul precision, so that TPUs do not round the
  operands to bfloat16, and returns the input dtype for floating inputs, float32 for integer inputs.
  """
  if x.ndim != 4:
    raise ValueError(f"resize_bilinear expects an NHWC array, got shape {x.shape}.")
  out_height, out_width = (int(s) for s in size)
  in_height, in_width = x.shape[1], x.shape[2]
  out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  if (in_height, in_width) == (out_height, out_width):
    return x.astype(out_dtype)
  compute_dtype = _compute_dtype(x.dtype)
  rows = jnp.asarray(interpolation_matrix(in_height, out_height), compute_dtype)
  cols = jnp.asarray(interpolation_matrix(in_width, out_width), compute_dtype)
  precision = jax.lax.Precision.HIGHEST
  y = jnp.einsum("oh,nhwc->nowc", rows, x.astype(compute_dtype), precision=precision)
  y = jnp.einsum("pw,nowc->nopc", cols, y, precision=precision)
  return y.astype(out_dtype)
