"""The models' 2-D convolution: XLA's, with faster formulations of some passes on CPUs.

Measured on this project's 2-core CPU (benchmarks/conv_kernels.py), XLA:CPU runs a plain
convolution's forward and input gradient at 60-95 GFLOP/s but its weight gradient, a convolution
that contracts over batch and space, at 20-28 GFLOP/s: a third of a train step's FLOPs ran at a
third of the speed; and its dilated convolutions compute the padding, so the ASPP's rates 12 and 18
on a 21x21 map ran at 12 and 5 GFLOP/s of useful work.

The weight gradient is a sum over kernel taps of plain matrix products,

    dW[i, j] = x_tap(i, j)^T @ dy,   x_tap(i, j)[n, h, w] = x[n, h*s + i*d - pad, w*s + j*d - pad]

(s stride, d dilation), which XLA:CPU runs at its matmul speed. Each tap's product only covers the
output rows and columns whose input sample is inside the image, so no FLOP is spent on padding
(the ASPP's rate-12/18 taps on a 21x21 map mostly fall outside it) and XLA's FLOP count of the step
stays the useful work. (1x1 kernels always; kxk kernels when both channel counts reach
MIN_CHANNELS_FOR_TAPS, below which XLA's own gradient is faster.) Dilated convolutions run forward
the same way (a sum of per-tap products over their valid outputs), so their input gradient, XLA's
transpose of that, does too, when they are that wide or at least MIN_PADDING_SHARE_FOR_TAP_FORWARD
of their dense work is padding; 1x1 convolutions run forward as one matrix product. Depthwise
convolutions (EfficientNet-Lite's) run as a sum of per-tap elementwise products
(`depthwise_tap_sum`), forward and backward.

GPUs and TPUs keep XLA's own convolution kernels (cuDNN's and the TPU's are already fast). The
choice is made when the step is traced, from the platform of the devices the program runs on:
sharding.make_mesh records its devices' (`set_mesh_platform`); without a mesh, JAX's default
backend. `jax.lax.platform_dependent` would defer it to lowering, but it traces both formulations,
and the tiny demo's train step then took 25 s to trace and 58 s to compile, against 10 s and 28 s.
Everything else (grouped convolutions other than depthwise, input dilation, other layouts) goes to
lax.conv_general_dilated.

The CPU formulations have custom VJPs, which JAX cannot differentiate in forward mode: trace
`jax.jvp` or `jax.jacfwd` inside `with xla_convolutions():`, which also runs the accelerators'
path on a CPU (tests/test_conv.py checks both paths agree).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

# nnx.Conv's layout for 2-D inputs: NHWC activations, HWIO kernels.
_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")

# The platform the program's devices are ('cpu', 'gpu', 'tpu', ...), set by sharding.make_mesh;
# None follows jax.default_backend(). 'xla' forces XLA's own kernels (xla_convolutions).
_platform: str | None = None


def set_mesh_platform(platform: str | None) -> None:
  """Trace convolutions for `platform` from now on (None: JAX's default backend)."""
  global _platform
  _platform = platform


@contextlib.contextmanager
def xla_convolutions():
  """Within it, convolutions are traced as XLA's own on every platform (module docstring)."""
  global _platform
  saved, _platform = _platform, "xla"
  try:
    yield
  finally:
    _platform = saved


def uses_cpu_formulations() -> bool:
  return (_platform or jax.default_backend()) == "cpu"


def _lax_conv(x, kernel, strides, padding, dilation):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation,
                                      dimension_numbers=_NHWC_HWIO)


def _output_size(size: int, kernel: int, stride: int, dilation: int, pad: tuple[int, int]) -> int:
  return (size + pad[0] + pad[1] - dilation * (kernel - 1) - 1) // stride + 1


def _valid_outputs(size: int, out_size: int, tap: int, stride: int, dilation: int,
                   pad_before: int) -> tuple[int, int]:
  """[first, last) outputs along one axis whose input sample for kernel tap `tap` is in the image:
  0 <= o * stride + tap * dilation - pad_before < size."""
  offset = tap * dilation - pad_before
  first = max(0, -(offset // stride))  # ceil(-offset / stride)
  last = min(out_size, (size - 1 - offset) // stride + 1)
  return first, max(first, last)


def _input_tap(x, i, j, rows, cols, strides, padding, dilation) -> jax.Array:
  """The inputs kernel tap (i, j) multiplies for outputs rows[0]:rows[1], cols[0]:cols[1]."""
  start = (rows[0] * strides[0] + i * dilation[0] - padding[0][0],
           cols[0] * strides[1] + j * dilation[1] - padding[1][0])
  limit = (start[0] + (rows[1] - rows[0] - 1) * strides[0] + 1,
           start[1] + (cols[1] - cols[0] - 1) * strides[1] + 1)
  return jax.lax.slice(x, (0, *start, 0), (x.shape[0], *limit, x.shape[3]),
                       (1, strides[0], strides[1], 1))


def tap_weight_gradient(x: jax.Array, dy: jax.Array, kernel_shape: tuple[int, ...],
                        strides: tuple[int, int], padding, dilation: tuple[int, int]) -> jax.Array:
  """dL/dkernel [kh, kw, C_in, C_out] of an NHWC/HWIO convolution, one matrix product per tap.

  `padding` is ((top, bottom), (left, right)); `dy` is dL/doutput [N, OH, OW, C_out].
  """
  kernel_h, kernel_w, in_channels, out_channels = kernel_shape
  height, width = x.shape[1:3]
  out_h, out_w = dy.shape[1:3]
  taps = []
  for i in range(kernel_h):
    rows = _valid_outputs(height, out_h, i, strides[0], dilation[0], padding[0][0])
    for j in range(kernel_w):
      cols = _valid_outputs(width, out_w, j, strides[1], dilation[1], padding[1][0])
      if rows[0] == rows[1] or cols[0] == cols[1]:
        taps.append(jnp.zeros((out_channels, in_channels), dy.dtype))
        continue
      x_tap = _input_tap(x, i, j, rows, cols, strides, padding, dilation)
      dy_tap = dy[:, rows[0]:rows[1], cols[0]:cols[1], :]
      # [C_out, C_in] = dy^T x: this operand order ran 1.2-1.8x faster on XLA:CPU than x^T dy.
      taps.append(jnp.einsum("ko,kc->oc", dy_tap.reshape(-1, out_channels),
                             x_tap.reshape(-1, in_channels)))
  weight_gradient = jnp.stack(taps).reshape(kernel_h, kernel_w, out_channels, in_channels)
  return jnp.swapaxes(weight_gradient, 2, 3).astype(x.dtype)


def _tap_sum_forward(x, kernel, strides, padding, dilation):
  """The convolution as a sum over kernel taps of x_tap @ kernel[i, j], each product over only the
  outputs whose input sample is in the image, padded back to the output size."""
  kernel_h, kernel_w = kernel.shape[:2]
  height, width = x.shape[1:3]
  out_h = _output_size(height, kernel_h, strides[0], dilation[0], padding[0])
  out_w = _output_size(width, kernel_w, strides[1], dilation[1], padding[1])
  y = None
  for i in range(kernel_h):
    rows = _valid_outputs(height, out_h, i, strides[0], dilation[0], padding[0][0])
    for j in range(kernel_w):
      cols = _valid_outputs(width, out_w, j, strides[1], dilation[1], padding[1][0])
      if rows[0] == rows[1] or cols[0] == cols[1]:
        continue
      x_tap = _input_tap(x, i, j, rows, cols, strides, padding, dilation)
      part = jnp.einsum("nhwc,co->nhwo", x_tap, kernel[i, j])
      part = jnp.pad(part, ((0, 0), (rows[0], out_h - rows[1]), (cols[0], out_w - cols[1]),
                            (0, 0)))
      y = part if y is None else y + part
  if y is None:  # Every tap falls on padding.
    y = jnp.zeros((x.shape[0], out_h, out_w, kernel.shape[3]), x.dtype)
  return y


# Below this many input or output channels a kxk kernel's per-tap products are too thin to beat
# XLA's kernels: its kernel gradient (the 7x7 stem on 3 channels: 8x slower by taps; 64 -> 64 3x3:
# 1.4x slower) and, unless much of the work is padding, its dilated forward (the demo's ASPP rate 2,
# 512 -> 64 channels on a 13x13 map, batch 16: forward and input gradient 2.7x slower by taps).
MIN_CHANNELS_FOR_TAPS = 128
# A thin dilated convolution still runs tap by tap when at least this share of its dense work falls
# on padding (the demo's ASPP rates 4 and 6 on 13x13: 37% and 52%, 1.7x and 2x faster by taps; rate
# 2: 19%, slower).
MIN_PADDING_SHARE_FOR_TAP_FORWARD = 0.25


def _wide(kernel_shape) -> bool:
  return min(kernel_shape[2], kernel_shape[3]) >= MIN_CHANNELS_FOR_TAPS


def _padding_share(x_shape, kernel_shape, strides, padding, dilation) -> float:
  """The fraction of a dense convolution's tap products whose input sample is padding."""
  valid = 1.0
  for axis in range(2):
    size, kernel = x_shape[1 + axis], kernel_shape[axis]
    out = _output_size(size, kernel, strides[axis], dilation[axis], padding[axis])
    inside = sum(last - first for first, last in (
        _valid_outputs(size, out, tap, strides[axis], dilation[axis], padding[axis][0])
        for tap in range(kernel)))
    valid *= inside / (kernel * out)
  return 1.0 - valid


def _forward(x, kernel, strides, padding, dilation):
  """The forward pass, by the fastest of three formulations measured on XLA:CPU."""
  if kernel.shape[:2] == (1, 1) and padding == ((0, 0), (0, 0)):
    # A 1x1 convolution is a matrix product over channels (after subsampling for a stride).
    x = x[:, ::strides[0], ::strides[1], :]
    return jnp.einsum("nhwc,co->nhwo", x, kernel[0, 0])
  if dilation != (1, 1) and (_wide(kernel.shape) or _padding_share(
      x.shape, kernel.shape, strides, padding, dilation) >= MIN_PADDING_SHARE_FOR_TAP_FORWARD):
    # Dilated: XLA:CPU's kernel ran the ASPP's rate 6/12/18 convolutions of a 21x21 map at 40, 12
    # and 5 GFLOP/s of useful work (it computes the padding too); per-tap products ran 1.3-12x
    # faster, and stage 4's rate-2 convolutions (512 channels) 1.1x faster.
    return _tap_sum_forward(x, kernel, strides, padding, dilation)
  return _lax_conv(x, kernel, strides, padding, dilation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_with_tap_gradient(x, kernel, strides, padding, dilation):
  return _forward(x, kernel, strides, padding, dilation)


def _conv_fwd(x, kernel, strides, padding, dilation):
  return _forward(x, kernel, strides, padding, dilation), (x, kernel)


def _weight_gradient(x, dy, kernel_shape, strides, padding, dilation):
  if kernel_shape[:2] == (1, 1) or _wide(kernel_shape):
    return tap_weight_gradient(x, dy, kernel_shape, strides, padding, dilation)
  _, kernel_vjp = jax.vjp(
      lambda kernel: _lax_conv(x, kernel, strides, padding, dilation),
      jnp.zeros(kernel_shape, x.dtype))
  return kernel_vjp(dy)[0]


def _conv_bwd(strides, padding, dilation, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _forward(x, kernel, strides, padding, dilation), x)
  weight_gradient = _weight_gradient(x, dy, kernel.shape, strides, padding, dilation)
  return input_vjp(dy)[0], weight_gradient.astype(kernel.dtype)


_conv_with_tap_gradient.defvjp(_conv_fwd, _conv_bwd)


def _depthwise_taps(padded, kernel, strides, dilation, out_size) -> jax.Array:
  """sum over taps (i, j) of the strided window of `padded` tap (i, j) samples, times kernel[i, j]."""
  kernel_h, kernel_w = kernel.shape[:2]
  y = None
  for i in range(kernel_h):
    for j in range(kernel_w):
      start = (0, i * dilation[0], j * dilation[1], 0)
      limit = (padded.shape[0], start[1] + (out_size[0] - 1) * strides[0] + 1,
               start[2] + (out_size[1] - 1) * strides[1] + 1, padded.shape[3])
      part = jax.lax.slice(padded, start, limit, (1, strides[0], strides[1], 1)) * kernel[i, j, 0]
      y = part if y is None else y + part
  return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def depthwise_tap_sum(x, kernel, strides, padding, dilation):
  """A depthwise convolution (kernel [kh, kw, 1, C]) as a sum over taps of strided slices of the
  padded input times each tap's per-channel weights: elementwise work XLA:CPU fuses, where its
  grouped-convolution kernel ran EfficientNet-Lite's depthwise layers (batch 16, 15-113 px maps)
  7-40x slower forward and 6-14x slower forward + backward."""
  out_size = (_output_size(x.shape[1], kernel.shape[0], strides[0], dilation[0], padding[0]),
              _output_size(x.shape[2], kernel.shape[1], strides[1], dilation[1], padding[1]))
  padded = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  return _depthwise_taps(padded, kernel, strides, dilation, out_size)


def _depthwise_fwd(x, kernel, strides, padding, dilation):
  return depthwise_tap_sum(x, kernel, strides, padding, dilation), (x, kernel)


def _depthwise_bwd(strides, padding, dilation, residuals, dy):
  """The input gradient is the transposed convolution, itself a tap sum: dy with stride - 1 zeros
  between samples, padded, times the flipped kernel. The kernel gradient is one reduction per tap
  of input window times dy, over a padded input materialized once (the barrier keeps XLA from
  fusing the pad into every tap's reduction). Autodiff of the forward ran 1.2-3.3x slower."""
  x, kernel = residuals
  kernel_h, kernel_w = kernel.shape[:2]
  dy_padding = []
  for axis, kernel_size in ((1, kernel_h), (2, kernel_w)):
    reach = (kernel_size - 1) * dilation[axis - 1]
    before = reach - padding[axis - 1][0]
    spread = (dy.shape[axis] - 1) * strides[axis - 1] + 1
    dy_padding.append((before, x.shape[axis] + reach - before - spread, strides[axis - 1] - 1))
  spread_dy = jax.lax.pad(dy, jnp.zeros((), dy.dtype), ((0, 0, 0), *dy_padding, (0, 0, 0)))
  dx = _depthwise_taps(spread_dy, kernel[::-1, ::-1], (1, 1), dilation, x.shape[1:3])
  padded = jax.lax.optimization_barrier(jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0))))
  taps = []
  for i in range(kernel_h):
    for j in range(kernel_w):
      start = (0, i * dilation[0], j * dilation[1], 0)
      limit = (x.shape[0], start[1] + (dy.shape[1] - 1) * strides[0] + 1,
               start[2] + (dy.shape[2] - 1) * strides[1] + 1, x.shape[3])
      window = jax.lax.slice(padded, start, limit, (1, strides[0], strides[1], 1))
      taps.append(jnp.sum(window * dy, axis=(0, 1, 2)))
  return dx, jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)


depthwise_tap_sum.defvjp(_depthwise_fwd, _depthwise_bwd)


def _is_nhwc_hwio(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  expected = jax.lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC_HWIO)
  given = jax.lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), dimension_numbers)
  return given == expected


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None, out_sharding=None):
  """lax.conv_general_dilated's signature (what nnx.Conv calls), with the CPU fast path above for
  plain NHWC/HWIO 2-D convolutions with explicit padding."""
  def lax_conv(*operands):
    return jax.lax.conv_general_dilated(
        *operands, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type, out_sharding=out_sharding)

  explicit_padding = not isinstance(padding, str) and len(padding) == 2
  plain = (lhs.ndim == 4 and explicit_padding
           and batch_group_count == 1 and not any(d != 1 for d in (lhs_dilation or ()))
           and precision is None and preferred_element_type is None and out_sharding is None
           and lhs.dtype == rhs.dtype and _is_nhwc_hwio(dimension_numbers))
  depthwise = (plain and feature_group_count == lhs.shape[3] == rhs.shape[3] > 1
               and rhs.shape[2] == 1)
  if not plain or (feature_group_count != 1 and not depthwise) or not uses_cpu_formulations():
    return lax_conv(lhs, rhs)
  strides = tuple(int(s) for s in window_strides)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
  if depthwise:
    return depthwise_tap_sum(lhs, rhs, strides, pads, dilation)
  return _conv_with_tap_gradient(lhs, rhs, strides, pads, dilation)
