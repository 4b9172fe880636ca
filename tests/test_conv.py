"""models/conv.py: the CPU formulations of convolution and its gradients equal XLA's convolution."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pseudoseg_jax.models import conv
from pseudoseg_jax.models.resnet import conv2d
from flax import nnx

NHWC_HWIO = ("NHWC", "HWIO", "NHWC")

# (kernel, stride, dilation, padding ((top, bottom), (left, right)), input [N, H, W])
CASES = [
    (1, 1, 1, ((0, 0), (0, 0)), (2, 7, 6)),     # bottleneck 1x1: a matrix product
    (1, 2, 1, ((0, 0), (0, 0)), (2, 9, 8)),     # strided projection shortcut
    (3, 1, 1, ((1, 1), (1, 1)), (2, 9, 9)),     # plain 3x3: XLA's kernel forward
    (3, 2, 1, ((1, 1), (1, 1)), (2, 10, 11)),   # strided 3x3, odd output
    (7, 2, 1, ((3, 3), (3, 3)), (1, 17, 13)),   # the 7x7/2 stem
    (3, 1, 2, ((2, 2), (2, 2)), (2, 8, 7)),     # stage 4 at output stride 16
    (3, 1, 2, ((2, 2), (2, 2)), (1, 13, 13)),   # the demo's ASPP rate 2: thin forwards go to XLA
    (3, 1, 6, ((6, 6), (6, 6)), (1, 7, 8)),     # ASPP rate 6: many taps on padding
    (3, 1, 18, ((18, 18), (18, 18)), (1, 5, 5)),  # every off-centre tap on padding
    (3, 2, 2, ((2, 1), (1, 2)), (1, 12, 9)),    # asymmetric padding, stride and dilation
    (3, 1, 1, ((0, 2), (2, 0)), (1, 6, 6)),
]


def lax_conv(x, kernel, stride, dilation, padding):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      rhs_dilation=(dilation, dilation),
                                      dimension_numbers=NHWC_HWIO)


def our_conv(x, kernel, stride, dilation, padding):
  numbers = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, NHWC_HWIO)
  return conv.conv_general_dilated(x, kernel, (stride, stride), padding,
                                   rhs_dilation=(dilation, dilation), dimension_numbers=numbers)


def normal(shape, dtype=jnp.float32, seed=0):
  # NumPy: eager jax.random compiles its ops one by one, seconds per test on a CPU.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def random_operands(kernel_size, shape, in_channels=4, out_channels=5, dtype=jnp.float32):
  return (normal((*shape, in_channels), dtype, seed=0),
          normal((kernel_size, kernel_size, in_channels, out_channels), dtype, seed=1))


def value_and_grads(fn, x, kernel, cotangent):
  y, vjp = jax.vjp(fn, x, kernel)
  return (y, *vjp(cotangent))


@pytest.mark.parametrize("taps_from_channels", [1, conv.MIN_CHANNELS_FOR_TAPS])
@pytest.mark.parametrize("kernel_size,stride,dilation,padding,shape", CASES)
def test_forward_and_both_gradients_equal_xla_convolution(kernel_size, stride, dilation, padding,
                                                          shape, taps_from_channels, monkeypatch):
  # 1: every kernel gradient and dilated forward by per-tap products; the default: XLA's for these
  # thin kernels, except dilated forwards with much padding.
  monkeypatch.setattr(conv, "MIN_CHANNELS_FOR_TAPS", taps_from_channels)
  x, kernel = random_operands(kernel_size, shape)
  reference = lambda x, k: lax_conv(x, k, stride, dilation, padding)
  ours = lambda x, k: our_conv(x, k, stride, dilation, padding)
  cotangent = normal(jax.eval_shape(reference, x, kernel).shape, seed=2)
  expected = jax.jit(lambda x, k, c: value_and_grads(reference, x, k, c))(x, kernel, cotangent)
  got = jax.jit(lambda x, k, c: value_and_grads(ours, x, k, c))(x, kernel, cotangent)
  for name, want, have in zip(("output", "input gradient", "kernel gradient"), expected, got):
    assert have.shape == want.shape and have.dtype == want.dtype, name
    np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-4, err_msg=name)


def test_bfloat16_keeps_xla_dtypes_and_values():
  x, kernel = random_operands(3, (2, 9, 9), 8, 8, jnp.bfloat16)
  padding = ((2, 2), (2, 2))
  reference = lambda x, k: lax_conv(x, k, 1, 2, padding)
  ours = lambda x, k: our_conv(x, k, 1, 2, padding)
  cotangent = jnp.ones(jax.eval_shape(reference, x, kernel).shape, jnp.bfloat16)
  expected = jax.jit(lambda x, k, c: value_and_grads(reference, x, k, c))(x, kernel, cotangent)
  got = jax.jit(lambda x, k, c: value_and_grads(ours, x, k, c))(x, kernel, cotangent)
  for want, have in zip(expected, got):
    assert have.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(have), np.float32(want), rtol=0.05, atol=0.5)


def test_convolutions_it_does_not_handle_go_to_xla():
  x, _ = random_operands(3, (1, 6, 6), 4)
  depthwise = normal((3, 3, 1, 4), seed=3)
  grouped = normal((3, 3, 2, 4), seed=4)  # Two groups of two channels: not depthwise.
  numbers = jax.lax.conv_dimension_numbers(x.shape, depthwise.shape, NHWC_HWIO)
  for kernel, kwargs in ((grouped, {"padding": ((1, 1), (1, 1)), "feature_group_count": 2}),
                         (depthwise, {"padding": "SAME", "feature_group_count": 4})):
    want = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), dimension_numbers=numbers, **kwargs))(x, kernel)
    have = jax.jit(lambda x, k: conv.conv_general_dilated(
        x, k, (1, 1), dimension_numbers=numbers, **kwargs))(x, kernel)
    np.testing.assert_array_equal(have, want)  # The same XLA program: bit for bit.


def test_cpu_runs_dilated_convolutions_and_weight_gradients_as_matrix_products():
  """The reason the module exists: on a CPU no XLA convolution is left in a dilated conv's training
  step, and the weight gradient's FLOPs are the useful ones (taps on padding are skipped)."""
  wide = conv.MIN_CHANNELS_FOR_TAPS
  x, kernel = random_operands(3, (2, 21, 21), wide, wide)
  padding = ((12, 12), (12, 12))
  loss = lambda x, k: jnp.sum(our_conv(x, k, 1, 12, padding) ** 2)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).compile()
  assert jax.default_backend() == "cpu"
  assert " convolution(" not in compiled.as_text()

  dy = jnp.ones((2, 21, 21, wide))
  weight_grad = jax.jit(lambda x, dy: conv.tap_weight_gradient(
      x, dy, kernel.shape, (1, 1), padding, (12, 12))).lower(x, dy).compile()
  # Rate 12 on 21 rows: the centre tap sees all 21 output rows, an off-centre one 21 - 12 = 9.
  valid_positions = sum(rows * cols for rows in (9, 21, 9) for cols in (9, 21, 9))
  useful_flops = 2 * 2 * valid_positions * wide * wide
  flops = weight_grad.cost_analysis()["flops"]
  assert useful_flops <= flops <= 1.05 * useful_flops


def test_padding_share_counts_the_taps_that_fall_outside_the_image():
  def share(size, dilation, kernel=3):
    pad = dilation * (kernel - 1) // 2
    return conv._padding_share((1, size, size, 1), (kernel, kernel, 1, 1), (1, 1),
                               ((pad, pad), (pad, pad)), (dilation, dilation))
  # Per axis, an off-centre tap sees size - dilation of the size outputs.
  assert share(13, 2) == pytest.approx(1 - ((11 + 13 + 11) / 39) ** 2)
  assert share(21, 12) == pytest.approx(1 - ((9 + 21 + 9) / 63) ** 2)
  assert share(5, 18) == pytest.approx(1 - (5 / 15) ** 2)  # only the centre tap is inside
  assert share(9, 1, kernel=1) == 0.0


def test_thin_dilated_convolutions_run_tap_by_tap_only_with_much_padding():
  thin = conv.MIN_CHANNELS_FOR_TAPS // 2
  def forward_hlo(dilation):
    x, kernel = random_operands(3, (1, 13, 13), thin, thin)
    padding = ((dilation, dilation), (dilation, dilation))
    return jax.jit(lambda x, k: our_conv(x, k, 1, dilation, padding)).lower(
        x, kernel).compile().as_text()
  assert " convolution(" in forward_hlo(2)  # 19% of the work on padding: XLA's kernel
  assert " convolution(" not in forward_hlo(4)  # 37%: per-tap products


def test_model_convolutions_use_it():
  layer = conv2d(4, 4, 3, dilation=2, rngs=nnx.Rngs(0))
  assert layer.conv_general_dilated is conv.conv_general_dilated


@pytest.mark.parametrize("kernel_size, stride, dilation", [(3, 1, 1), (3, 2, 1), (5, 2, 1),
                                                            (5, 1, 2), (3, 1, 4)])
def test_depthwise_cpu_form_equals_xla_forward_and_gradients(kernel_size, stride, dilation):
  rng = np.random.default_rng(kernel_size * 10 + stride + dilation)
  x = jnp.asarray(rng.normal(size=(2, 11, 10, 6)), jnp.float32)  # An odd and an even side.
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 1, 6)), jnp.float32)
  pad = dilation * (kernel_size - 1) // 2
  args = ((stride, stride), ((pad, pad), (pad, pad)))
  numbers = ("NHWC", "HWIO", "NHWC")

  def loss(conv_fn, x, kernel):
    y = conv_fn(x, kernel, *args, rhs_dilation=(dilation, dilation), dimension_numbers=numbers,
                feature_group_count=6)
    return jnp.sum(jnp.sin(y))

  ours = jax.value_and_grad(functools.partial(loss, conv.conv_general_dilated), (0, 1))(x, kernel)
  xla = jax.value_and_grad(functools.partial(loss, jax.lax.conv_general_dilated), (0, 1))(x,
                                                                                         kernel)
  np.testing.assert_allclose(ours[0], xla[0], rtol=1e-4)
  for got, want in zip(ours[1], xla[1]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def gradient_jaxpr(x, kernel, padding, dilation) -> str:
  """A new function each call: JAX caches traces by function, and the platform is read when
  tracing, so a function traced once keeps its formulation (set the platform before tracing)."""
  loss = lambda x, k: jnp.sum(our_conv(x, k, 1, dilation, padding) ** 2)
  return str(jax.make_jaxpr(jax.grad(loss, argnums=1))(x, kernel))


def test_the_mesh_platform_decides_the_formulation_not_the_default_backend():
  wide = conv.MIN_CHANNELS_FOR_TAPS
  x, kernel = random_operands(3, (1, 9, 9), wide, wide)
  padding = ((4, 4), (4, 4))
  try:
    conv.set_mesh_platform("tpu")  # Faked: the accelerators' path, traced on this CPU.
    accelerator = gradient_jaxpr(x, kernel, padding, 4)
    conv.set_mesh_platform("cpu")
    cpu = gradient_jaxpr(x, kernel, padding, 4)
  finally:
    conv.set_mesh_platform(None)
  # XLA's weight gradient is a convolution; the CPU's is a matrix product per tap.
  assert accelerator.count("conv_general_dilated") == 2 and "dot_general" not in accelerator
  assert "conv_general_dilated" not in cpu and cpu.count("dot_general") >= 9
  # sharding.make_mesh records its devices' platform.
  from pseudoseg_jax import sharding
  try:
    sharding.make_mesh()
    assert conv._platform == jax.devices()[0].platform
  finally:
    conv.set_mesh_platform(None)


@pytest.mark.parametrize("depthwise", [False, True])
def test_xlas_own_path_equals_the_cpu_path_and_allows_forward_mode(depthwise):
  channels = 6 if depthwise else conv.MIN_CHANNELS_FOR_TAPS
  x = normal((2, 9, 9, channels), seed=5)
  kernel = normal((3, 3, 1 if depthwise else channels, channels), seed=6)
  numbers = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, NHWC_HWIO)
  def new_conv():  # A new function per path: see gradient_jaxpr.
    return lambda x, k: conv.conv_general_dilated(
        x, k, (1, 1), ((2, 2), (2, 2)), rhs_dilation=(2, 2), dimension_numbers=numbers,
        feature_group_count=channels if depthwise else 1)
  cpu_conv = new_conv()
  cpu_path = cpu_conv(x, kernel)
  with conv.xla_convolutions():
    xla_conv = new_conv()
    xla_path = xla_conv(x, kernel)
    _, tangent = jax.jvp(xla_conv, (x, kernel), (jnp.ones_like(x), jnp.zeros_like(kernel)))
  assert "conv_general_dilated" not in str(jax.make_jaxpr(cpu_conv)(x, kernel))
  np.testing.assert_allclose(cpu_path, xla_path, rtol=1e-5, atol=1e-4)
  # A convolution is linear in x: its directional derivative along ones is the conv of ones.
  np.testing.assert_allclose(tangent, xla_conv(jnp.ones_like(x), kernel), rtol=1e-5, atol=1e-4)
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(new_conv(), (x, kernel), (jnp.ones_like(x), jnp.zeros_like(kernel)))
