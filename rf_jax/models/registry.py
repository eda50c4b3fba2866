"""The study models, declared once: name -> input bands, network, where the ImageNet trunk goes.

Config validation (`config.model.name`, `config.model.ir_stem_init`), the model factory and the
pretrained-weight merge (rf_jax/weights) all read this table; a new model is one entry here.

| name    | input bands        | network                                                        |
|---------|--------------------|----------------------------------------------------------------|
| `rgb`   | R, G, B            | ResNet-18, head 17                                             |
| `rgbir` | R, G, B, NIR       | ResNet-18 with a 4-channel stem, head 17                       |
| `dual`  | R, G, B, NIR       | RGB trunk on [..., :3] + IR trunk on [..., 3:] (1-channel      |
|         |                    | stem), pooled 512 + 512 concatenated -> Dense(1024 -> 17)      |
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from rf_jax.models import conv
from rf_jax.models import fusion
from rf_jax.models import resnet


@dataclasses.dataclass(frozen=True)
class NewStem:
  """A trunk's 7x7 stem whose input channels differ from ImageNet's three.

  `keep_rgb`: the pretrained R, G, B kernel slices stay as input channels 0-2 and only the
  channels after them are new (rgbir); otherwise every input channel is new (dual's IR trunk).
  `study_init`: how the study's code drew the new slice (an `IR_STEM_INITS` name).
  """
  keep_rgb: bool
  study_init: str


@dataclasses.dataclass(frozen=True)
class StudyModel:
  name: str
  bands: tuple[int, ...]  # indices into R, G, B, NIR, in input-channel order
  # (num_classes, dtype, axis_name, width, **tuned_ops(...)) -> module
  build: Callable[..., nn.Module]
  # Parameter-path prefixes that each receive one pretrained ResNet-18 trunk (the head excluded).
  trunks: tuple[tuple[str, ...], ...]
  # Trunk prefix -> the rule for its stem, where the stem is not ImageNet's 3-channel one.
  new_stems: dict[tuple[str, ...], NewStem]


# How a new stem slice is drawn (rf_jax/weights/stem.py): `study` = each model's `study_init`.
IR_STEM_INITS = ('study', 'he_fan_in', 'he_fan_out', 'torch_conv_default', 'rgb_mean')


def _resnet(num_classes, dtype, axis_name, width, **ops):
  return resnet.ResNet18(num_classes=num_classes, dtype=dtype, axis_name=axis_name,
                         num_filters=width, **ops)


def _dual(num_classes, dtype, axis_name, width, **ops):
  return fusion.DualResNet(num_classes=num_classes, dtype=dtype, axis_name=axis_name,
                           num_filters=width, **ops)


STUDY_MODELS: dict[str, StudyModel] = {m.name: m for m in (
    StudyModel('rgb', (0, 1, 2), _resnet, trunks=((),), new_stems={}),
    # The study's code: `kaiming_normal_` defaults on the new 1x64x7x7 slice (fan_in 49).
    StudyModel('rgbir', (0, 1, 2, 3), _resnet, trunks=((),),
               new_stems={(): NewStem(keep_rgb=True, study_init='he_fan_in')}),
    # The study's code: a fresh `nn.Conv2d(1, 64, 7)` (torch's default conv init) for the IR trunk.
    StudyModel('dual', (0, 1, 2, 3), _dual, trunks=(('rgb_trunk',), ('ir_trunk',)),
               new_stems={('ir_trunk',): NewStem(keep_rgb=False, study_init='torch_conv_default')}),
)}
MODEL_NAMES = tuple(STUDY_MODELS)


def get(name: Any) -> StudyModel:
  if name not in STUDY_MODELS:
    raise ValueError(f'config.model.name={name!r} is not a known model; valid names: '
                     f'{", ".join(MODEL_NAMES)}')
  return STUDY_MODELS[name]


def input_bands(name: str) -> tuple[int, ...]:
  """Band indices (0..3 = R, G, B, NIR) the model `name` takes, in input-channel order."""
  return get(name).bands


# ResNet-18's first-stage width, the one the ImageNet weights have (config.model.width).
RESNET18_WIDTH = 64


def tuned_ops(cpu_tuning: bool) -> dict[str, Callable]:
  """The networks' convolution and max-pool fields: where `cpu_tuning` (config.cpu_tuning) and
  JAX's backend is CPU, XLA:CPU's faster forms (models/conv.py's kernel gradient, the max-pool
  over its window taps; docs/performance.md); otherwise none, and the networks keep plain
  lax's, which every backend and forward-mode differentiation (jax.jvp) support. The one place
  the model's CPU tuning is chosen (rf_jax/xla_cpu.py chooses the compiler's flags)."""
  if not (cpu_tuning and jax.default_backend() == 'cpu'):
    return {}
  return {'conv_general_dilated': conv.conv_general_dilated,
          'max_pool': resnet.max_pool_3x3_stride2_taps}


def create_model(name: str, *, num_classes: int, dtype: Any = jnp.float32,
                 axis_name: str | None = None, width: int = RESNET18_WIDTH,
                 cpu_tuning: bool = True) -> nn.Module:
  """The study model `name`.

  Apply with `model.apply(variables, images, train=False)` or, training,
  `model.apply(variables, images, train=True, mutable=['batch_stats'])`; images are
  [B, H, W, len(input_bands(name))] and the logits [B, num_classes] float32. `dtype` is the
  compute dtype (parameters stay float32); `axis_name` synchronises BatchNorm under pmap;
  `width` is every trunk's first-stage width (doubling per stage): narrower than ResNet-18's
  64 only for tests of logic, where the network's size does not matter; `cpu_tuning`
  (config.cpu_tuning): see tuned_ops.
  """
  return get(name).build(num_classes, dtype, axis_name, width, **tuned_ops(cpu_tuning))
