"""resize_bilinear: align_corners=True known answers, and agreement with TF1's resize_bilinear."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from pseudoseg_jax.models.resize import interpolation_matrix, resize_bilinear


def _random(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _as_nhwc(grid):
  return jnp.asarray(grid, jnp.float32)[None, :, :, None]


def test_two_samples_to_three_gives_midpoint():
  out = resize_bilinear(_as_nhwc([[0.0, 1.0]]), (1, 3))
  np.testing.assert_allclose(out[0, 0, :, 0], [0.0, 0.5, 1.0])


def test_2x2_to_3x3_written_out():
  out = resize_bilinear(_as_nhwc([[0.0, 1.0], [2.0, 3.0]]), (3, 3))
  expected = [[0.0, 0.5, 1.0],
              [1.0, 1.5, 2.0],
              [2.0, 2.5, 3.0]]
  np.testing.assert_allclose(out[0, :, :, 0], expected)


def test_3_to_5_quarter_steps():
  # Output i samples i * 2 / 4 = 0, .5, 1, 1.5, 2.
  out = resize_bilinear(_as_nhwc([[10.0, 20.0, 40.0]]), (1, 5))
  np.testing.assert_allclose(out[0, 0, :, 0], [10.0, 15.0, 20.0, 30.0, 40.0])


def test_129_to_513_hits_input_samples_every_4th_output():
  x = _random((1, 129, 129, 2), seed=0)
  out = resize_bilinear(x, (513, 513))
  np.testing.assert_array_equal(out[:, ::4, ::4], x)
  # Between samples the weights are exact quarters.
  np.testing.assert_allclose(out[:, 1::4, ::4], 0.75 * x[:, :-1] + 0.25 * x[:, 1:], rtol=1e-6,
                             atol=1e-6)


def test_downsample_513_to_129_takes_every_4th_sample():
  x = _random((1, 513, 5, 1), seed=1)
  np.testing.assert_array_equal(resize_bilinear(x, (129, 5)), x[:, ::4])


def test_same_size_is_identity():
  x = _random((2, 7, 9, 3), seed=2)
  np.testing.assert_array_equal(resize_bilinear(x, (7, 9)), x)


def test_single_output_pixel_samples_the_first_input_pixel():
  x = _random((2, 6, 4, 3), seed=3)
  np.testing.assert_array_equal(resize_bilinear(x, (1, 1)), x[:, :1, :1])


def test_single_input_pixel_broadcasts():
  x = jnp.arange(6.0).reshape(2, 1, 1, 3)
  np.testing.assert_array_equal(resize_bilinear(x, (4, 5)), jnp.broadcast_to(x, (2, 4, 5, 3)))


def test_interpolation_rows_sum_to_one():
  for in_size, out_size in [(1, 5), (2, 7), (33, 129), (129, 33), (10, 3), (5, 1)]:
    np.testing.assert_allclose(interpolation_matrix(in_size, out_size).sum(axis=1), 1.0)


def test_dtypes():
  x = jnp.ones((1, 3, 3, 1))
  assert resize_bilinear(x.astype(jnp.bfloat16), (5, 5)).dtype == jnp.bfloat16
  assert resize_bilinear(x.astype(jnp.int32), (5, 5)).dtype == jnp.float32
  assert resize_bilinear(x.astype(jnp.int32), (3, 3)).dtype == jnp.float32


def test_gradient_is_the_transposed_interpolation():
  x = jnp.zeros((1, 3, 1, 1))
  grad = jax.grad(lambda v: resize_bilinear(v, (5, 1)).sum())(x)
  # Column sums of the 3 -> 5 matrix: [1 + .5, .5 + 1 + .5, .5 + 1].
  np.testing.assert_allclose(grad[0, :, 0, 0], [1.5, 2.0, 1.5])


def test_rejects_non_nhwc():
  with pytest.raises(ValueError, match="NHWC"):
    resize_bilinear(jnp.ones((3, 3)), (5, 5))


@pytest.mark.parametrize("in_hw,out_hw", [
    ((7, 9), (13, 5)),
    ((33, 33), (129, 129)),
    ((65, 40), (17, 21)),
    ((2, 3), (11, 1)),
    ((25, 25), (97, 97)),
])
def test_matches_tf1_resize_bilinear_align_corners(in_hw, out_hw):
  x = np.random.default_rng(0).normal(size=(2, *in_hw, 3)).astype(np.float32)
  expected = tf.compat.v1.image.resize_bilinear(x, out_hw, align_corners=True).numpy()
  out = jax.jit(resize_bilinear, static_argnums=1)(jnp.asarray(x), out_hw)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
