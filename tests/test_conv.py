"""rf_jax.models.conv: lax's convolution, with XLA:CPU's kernel gradient taken on a relayouted
input; float64, against lax's own gradient."""

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from rf_jax.models import conv

NHWC = ('NHWC', 'HWIO', 'NHWC')


@pytest.fixture
def float64():
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', False)


def _loss(conv_fn, x, kernel, strides, padding):
  # A nonlinear function of the output, so that every gradient entry is distinct.
  y = conv_fn(x, kernel, strides, padding, dimension_numbers=NHWC)
  return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)


@pytest.mark.parametrize('size,cin,cout,k,stride,pad', [
    (16, 3, 8, 7, 2, 3),  # the stem
    (12, 8, 8, 3, 1, 1),
    (12, 8, 16, 3, 2, 1),
    (12, 8, 16, 1, 2, 0),  # a projection shortcut
])
def test_gradients_equal_lax(size, cin, cout, k, stride, pad, float64):
  rng = np.random.default_rng(k * 10 + stride)
  x = jnp.asarray(rng.standard_normal((5, size, size, cin)))
  kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout)))
  args = ((stride, stride), ((pad, pad), (pad, pad)))
  mine = jax.jit(jax.value_and_grad(
      lambda x_, k_: _loss(conv.conv_general_dilated, x_, k_, *args), argnums=(0, 1)))(x, kernel)
  want = jax.value_and_grad(
      lambda x_, k_: _loss(lax.conv_general_dilated, x_, k_, *args), argnums=(0, 1))(x, kernel)
  np.testing.assert_allclose(mine[0], want[0], rtol=1e-12)
  for got, expected in zip(mine[1], want[1]):
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_cpu_kernel_gradient_reads_the_input_through_a_product():
  """On CPU the kernel gradient's input comes from the identity product (a dot in the
  compiled step), where lax's gradient has none."""
  x = jnp.ones((4, 12, 12, 8), jnp.float32)
  kernel = jnp.ones((3, 3, 8, 8), jnp.float32)
  hlo = lambda fn: jax.jit(jax.grad(lambda k: _loss(fn, x, k, (1, 1), ((1, 1), (1, 1))))).lower(
      kernel).compile().as_text()
  assert ' dot(' in hlo(conv.conv_general_dilated)
  assert ' dot(' not in hlo(lax.conv_general_dilated)


def test_other_convolutions_are_lax_as_given():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 9, 9, 4)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 2, 6)), jnp.float32)
  for kwargs in (dict(padding=((1, 1), (1, 1)), feature_group_count=2),
                 dict(padding='SAME', feature_group_count=2),
                 dict(padding=((2, 2), (2, 2)), rhs_dilation=(2, 2), feature_group_count=2)):
    mine = conv.conv_general_dilated(x, kernel, (1, 1), dimension_numbers=NHWC, **kwargs)
    want = lax.conv_general_dilated(x, kernel, (1, 1), dimension_numbers=NHWC, **kwargs)
    np.testing.assert_array_equal(mine, want)
