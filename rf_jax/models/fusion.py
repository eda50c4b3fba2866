"""The `dual` study model: one ResNet-18 trunk per modality, pooled features concatenated.

The three study models and their input bands are declared in models/registry.py; how the ImageNet
weights get in (stem widening, the head kept fresh) is rf_jax/weights' job.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from jax import lax
import jax.numpy as jnp
from flax import linen as nn

from rf_jax.models import resnet


class DualResNet(nn.Module):
  """Two ResNet-18 trunks: RGB on x[..., :3], IR on x[..., 3:]; concatenated pooled features."""
  num_classes: int = 17
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  axis_name: Optional[str] = None
  num_filters: int = 64  # each trunk's first-stage width (ResNet.num_filters)
  # Both trunks' convolution and max-pool (ResNet's fields of the same names).
  conv_general_dilated: Callable = lax.conv_general_dilated
  max_pool: Callable = resnet.max_pool_3x3_stride2

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.shape[-1] != 4:
      raise ValueError(f'the dual model takes [..., 4] inputs (R, G, B, NIR), got {x.shape}')
    trunk = functools.partial(resnet.ResNet18, num_classes=None, dtype=self.dtype,
                              param_dtype=self.param_dtype, axis_name=self.axis_name,
                              num_filters=self.num_filters,
                              conv_general_dilated=self.conv_general_dilated,
                              max_pool=self.max_pool)
    rgb = trunk(name='rgb_trunk')(x[..., :3], train=train)
    ir = trunk(name='ir_trunk')(x[..., 3:], train=train)
    features = jnp.concatenate([rgb, ir], axis=-1)
    self.sow('intermediates', 'pooled', features)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=resnet.dense_kernel_init,
                      bias_init=resnet.dense_bias_init(features.shape[-1]), name='fc')(features)
    return jnp.asarray(logits, jnp.promote_types(self.dtype, jnp.float32))
