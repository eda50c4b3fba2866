"""A torchvision-exact ResNet-18 in Flax linen (NHWC).

Written in the style of Flax's `examples/imagenet/models.py` (blocks receive
`conv`, `norm` and `act` partials; sizes are partials of `ResNet`), but every
detail that changes the numbers follows torchvision's `resnet18()` so that
ported ImageNet weights give the same logits (see rf_jax/weights/torchvision_resnet.py):

* explicit torch padding: stem 7x7/2 ((3,3),(3,3)), every 3x3 conv ((1,1),(1,1)),
  max-pool 3x3/2 ((1,1),(1,1)); Flax's 'SAME' pads (0,1) on strided layers and
  would NOT match;
* BatchNorm momentum 0.9 (torch's momentum=0.1), epsilon 1e-5, no conv biases;
* projection shortcut (1x1 conv + BN) only where the shape changes;
* global average pool, then the linear head.

Parameter names mirror torchvision's state-dict keys with '.' -> '/' and the
block index joined to its stage: `conv1`, `bn1`, `layer1_0/conv1`, ...,
`layer2_0/downsample_0` (the 1x1 conv), `layer2_0/downsample_1` (its BN), `fc`.

Initialisers are torchvision's own, so training from scratch behaves like
torch: convs kaiming-normal (fan_out, ReLU gain: variance 2 / (out * kh * kw)),
BN scale 1 / bias 0, the linear head torch's default (uniform +-1/sqrt(fan_in)
for kernel and bias).

The convolution and the max-pool are fields (`conv_general_dilated`, `max_pool`): plain lax by
default, on every backend; registry.tuned_ops gives XLA:CPU's faster forms (models/conv.py,
`max_pool_3x3_stride2_taps`) where the backend is CPU.

Intermediate features are sown into the 'intermediates' collection:
`stem` (after the max-pool), `layer1` .. `layer4` and `pooled` (512-d):

    logits, state = model.apply(variables, x, mutable=['intermediates'])
    state['intermediates']['layer3']  # a 1-tuple holding the [B, H/16, W/16, 256] map
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
from jax import lax
import jax.numpy as jnp
from flax import linen as nn

ModuleDef = Any

# torchvision: nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu').
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# torch nn.Linear default: kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def dense_bias_init(fan_in: int) -> Callable[..., jax.Array]:
  """torch nn.Linear's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


TORCH_PAD_3x3 = ((1, 1), (1, 1))
TORCH_PAD_STEM = ((3, 3), (3, 3))
TORCH_PAD_1x1 = ((0, 0), (0, 0))


def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
  """torch's MaxPool2d(3, stride=2, padding=1) on NHWC (padding never wins: it is -inf)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=TORCH_PAD_3x3)


def max_pool_3x3_stride2_taps(x: jax.Array) -> jax.Array:
  """`max_pool_3x3_stride2` as a chain over the 9 window taps (a CPU tuning).

  The values equal reduce-window's, and each window's gradient goes to its first maximum
  in (row, column) order, like torch's and reduce-window's; but XLA:CPU runs this
  backward pass ~4x faster than reduce-window's select-and-scatter (docs/performance.md).
  """
  n, h, w, c = x.shape
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  out = None
  for i in range(3):
    for j in range(3):
      tap = lax.slice(padded, (0, i, j, 0), (n, i + 2 * ho - 1, j + 2 * wo - 1, c),
                      (1, 2, 2, 1))
      out = tap if out is None else jnp.where(tap > out, tap, out)  # ties keep the first
  return out


class BasicBlock(nn.Module):
  """torchvision's BasicBlock (expansion 1)."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides, padding=TORCH_PAD_3x3,
                  name='conv1')(x)
    y = self.norm(name='bn1')(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3), 1, padding=TORCH_PAD_3x3, name='conv2')(y)
    y = self.norm(name='bn2')(y)
    if self.strides != 1 or x.shape[-1] != self.filters:
      residual = self.conv(self.filters, (1, 1), self.strides, padding=TORCH_PAD_1x1,
                           name='downsample_0')(x)
      residual = self.norm(name='downsample_1')(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  """ResNet (BasicBlock) with torchvision's layout and numerics.

  Attributes:
    stage_sizes: blocks per stage, (2, 2, 2, 2) for ResNet-18.
    num_classes: size of the linear head; None returns the pooled features
      (512-d for ResNet-18) instead of logits.
    num_filters: width of the first stage (64); doubles every stage.
    dtype: computation dtype (e.g. jnp.bfloat16); logits are returned float32.
    param_dtype: parameter dtype.
    axis_name: BatchNorm axis name for cross-device statistics under pmap.
    act: activation (ReLU).
    conv_general_dilated: every convolution's (nn.Conv's) lax.conv_general_dilated.
    max_pool: the stem's 3x3/2 max-pool.
  """
  stage_sizes: Sequence[int]
  num_classes: Optional[int] = 1000
  num_filters: int = 64
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  axis_name: Optional[str] = None
  block_cls: ModuleDef = BasicBlock
  act: Callable = nn.relu
  conv_general_dilated: Callable = lax.conv_general_dilated
  max_pool: Callable = max_pool_3x3_stride2

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype, kernel_init=conv_kernel_init,
                             conv_general_dilated=self.conv_general_dilated)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5, use_fast_variance=False, dtype=self.dtype,
                             param_dtype=self.param_dtype, axis_name=self.axis_name)

    x = jnp.asarray(x, self.dtype)
    x = conv(self.num_filters, (7, 7), 2, padding=TORCH_PAD_STEM, name='conv1')(x)
    x = norm(name='bn1')(x)
    x = self.act(x)
    x = self.max_pool(x)
    self.sow('intermediates', 'stem', x)
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(self.num_filters * 2**i, conv=conv, norm=norm, act=self.act,
                           strides=strides, name=f'layer{i + 1}_{j}')(x)
      self.sow('intermediates', f'layer{i + 1}', x)
    x = jnp.mean(x, axis=(1, 2))
    self.sow('intermediates', 'pooled', x)
    if self.num_classes is None:
      return x
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=dense_kernel_init, bias_init=dense_bias_init(x.shape[-1]),
                 name='fc')(x)
    return jnp.asarray(x, jnp.promote_types(self.dtype, jnp.float32))  # bf16 -> f32, f64 stays


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
