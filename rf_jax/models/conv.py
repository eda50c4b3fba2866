"""The ResNets' convolution on XLA:CPU (`nn.Conv(conv_general_dilated=...)`): lax's, with a
kernel gradient that XLA:CPU computes without its slow relayout of the layer's input.

A convolution's kernel gradient contracts over the batch, so XLA:CPU's Eigen kernel wants the
layer's input laid out [C, H, W, N]. XLA makes that layout by fusing the input's producers
(BatchNorm, the residual add, ReLU) into a strided transpose loop: 56 such loops took ~0.5 s of
a ~2.9 s rgb train step (`scripts/benchmark.py --profile`). Here the backward pass instead
relayouts the stored input with a matrix product by the identity (exact; XLA fuses nothing into
a product, though for some layers it still recomputes the producers into a copy of the
product's operand) into [H, W, C, N], and takes JAX's own kernel gradient of the same
convolution stated on that layout.

A CPU tuning: registry.tuned_ops hands it to the models only where JAX's backend is CPU (other
platforms have kernel-gradient kernels of their own, and keep lax's convolution, which also
supports forward-mode differentiation; this custom_vjp does not).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp

NHWC = ('NHWC', 'HWIO', 'NHWC')
_INPUT_HWCN = ('HWCN', 'HWIO', 'NHWC')  # the same convolution, its input relayouted


def _conv(x, kernel, strides, padding, dimension_numbers=NHWC):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=dimension_numbers)


def _hwcn(x: jax.Array) -> jax.Array:
  """[N, H, W, C] -> [H, W, C, N], by a product with the identity (exact)."""
  eye = jnp.eye(x.shape[0], dtype=x.dtype)
  return lax.dot_general(x, eye, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _plain_conv(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding)


def _forward(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _backward(strides, padding, residuals, g):
  x, kernel = residuals
  input_grad = jax.vjp(lambda x_: _conv(x_, kernel, strides, padding), x)[1](g)[0]
  kernel_grad = jax.vjp(lambda k: _conv(_hwcn(x), k, strides, padding, _INPUT_HWCN),
                        kernel)[1](g)[0]
  return input_grad, kernel_grad


_plain_conv.defvjp(_forward, _backward)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None):
  """`lax.conv_general_dilated` as nn.Conv calls it; an undilated, ungrouped NHWC / HWIO
  convolution with explicit padding gets the kernel gradient above."""
  plain = (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
           and feature_group_count == 1 and precision is None and not isinstance(padding, str)
           and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))))
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision)
  return _plain_conv(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))
