"""The study's three models, built from `config.model` by one factory.

| name    | input bands        | model                                                          |
|---------|--------------------|----------------------------------------------------------------|
| `rgb`   | R, G, B            | ResNet-18, head 17                                             |
| `rgbir` | R, G, B, NIR       | ResNet-18 with a 4-channel stem, head 17                       |
| `dual`  | R, G, B, NIR       | RGB trunk on [..., :3] + IR trunk on [..., 3:] (1-channel      |
|         |                    | stem), pooled 512 + 512 concatenated -> Dense(1024 -> 17)      |

`rgb` and `rgbir` are the same module: the stem's input width follows the input at `init`.
How the ImageNet weights get in (stem widening, `ir_stem_init` he | rgb_mean, the head kept fresh)
is models/port.py's job: `port.init_from_pretrained(variables, pretrained, config.model, rng)`.
With `config.model.weights == ''` the fresh torchvision-style init is trained from scratch.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import jax.numpy as jnp
from flax import linen as nn

from rf_jax.models import resnet

MODEL_NAMES = ('rgb', 'rgbir', 'dual')
_BANDS = {'rgb': (0, 1, 2), 'rgbir': (0, 1, 2, 3), 'dual': (0, 1, 2, 3)}


def _check_name(name: Any) -> str:
  if name not in MODEL_NAMES:
    raise ValueError(f'config.model.name={name!r} is not a known model; valid names: '
                     f'{", ".join(MODEL_NAMES)}')
  return name


def input_bands(name: str) -> tuple[int, ...]:
  """Band indices (0..3 = R, G, B, NIR) the model `name` takes, in input-channel order."""
  return _BANDS[_check_name(name)]


class DualResNet(nn.Module):
  """Two ResNet-18 trunks: RGB on x[..., :3], IR on x[..., 3:]; concatenated pooled features."""
  num_classes: int = 17
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.shape[-1] != 4:
      raise ValueError(f'the dual model takes [..., 4] inputs (R, G, B, NIR), got {x.shape}')
    trunk = functools.partial(resnet.ResNet18, num_classes=None, dtype=self.dtype,
                              param_dtype=self.param_dtype, axis_name=self.axis_name)
    rgb = trunk(name='rgb_trunk')(x[..., :3], train=train)
    ir = trunk(name='ir_trunk')(x[..., 3:], train=train)
    features = jnp.concatenate([rgb, ir], axis=-1)
    self.sow('intermediates', 'pooled', features)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=resnet.dense_kernel_init,
                      bias_init=resnet.dense_bias_init(features.shape[-1]), name='fc')(features)
    return jnp.asarray(logits, jnp.promote_types(self.dtype, jnp.float32))


def _field(config: Any, key: str, default: Any = None) -> Any:
  if isinstance(config, Mapping):
    return config.get(key, default)
  return getattr(config, key) if hasattr(config, key) else default


def create_model(model_config: Any, num_classes: int = 17, dtype: Any = jnp.float32,
                 axis_name: Optional[str] = None) -> nn.Module:
  """The study model named by `model_config.name` (rgb | rgbir | dual).

  Apply with `model.apply(variables, images, train=False)` or, training,
  `model.apply(variables, images, train=True, mutable=['batch_stats'])`; images are
  [B, H, W, len(input_bands(name))] and the logits [B, num_classes] float32. `dtype` is the
  compute dtype (parameters stay float32); `axis_name` synchronises BatchNorm under pmap.
  """
  name = _check_name(_field(model_config, 'name'))
  if name == 'dual':
    return DualResNet(num_classes=num_classes, dtype=dtype, axis_name=axis_name)
  return resnet.ResNet18(num_classes=num_classes, dtype=dtype, axis_name=axis_name)
