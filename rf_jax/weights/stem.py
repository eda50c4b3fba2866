"""Widening ImageNet's 3-channel 7x7 stem kernel to a study model's input channels.

The new input-channel slice is drawn as `ir_stem_init` says (names in registry.IR_STEM_INITS).
Fans are those torch computes for the slice as a torch tensor [out, n_new, kh, kw]:
fan_in = n_new * kh * kw (49 for one channel), fan_out = out * kh * kw (64 * 49 = 3136).

  he_fan_in           N(0, 2 / fan_in): `kaiming_normal_` with its defaults (std 0.202 for one
                      channel).
  he_fan_out          N(0, 2 / fan_out): torchvision's convention for its own convs,
                      `kaiming_normal_(mode='fan_out', nonlinearity='relu')` (std 0.0253).
  torch_conv_default  U(-1/sqrt(fan_in), 1/sqrt(fan_in)): a fresh `nn.Conv2d`'s
                      `kaiming_uniform_(a=sqrt(5))` (U(-1/7, 1/7) for one channel).
  rgb_mean            the mean of the pretrained R, G, B slices (timm adapts a 1-channel stem
                      with the SUM; the mean keeps the IR response on the scale of one RGB band).
  study               what the study's code did for each model: its `NewStem.study_init` in
                      models/registry.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rf_jax.models import registry


def _he_fan_in(rng, shape, kernel):
  del kernel
  kh, kw, n, _ = shape
  return jax.random.normal(rng, shape, jnp.float32) * np.sqrt(2.0 / (n * kh * kw))


def _he_fan_out(rng, shape, kernel):
  del kernel
  kh, kw, _, out = shape
  return jax.random.normal(rng, shape, jnp.float32) * np.sqrt(2.0 / (out * kh * kw))


def _torch_conv_default(rng, shape, kernel):
  del kernel
  kh, kw, n, _ = shape
  bound = 1.0 / np.sqrt(n * kh * kw)
  return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


def _rgb_mean(rng, shape, kernel):
  del rng
  return np.broadcast_to(kernel.mean(axis=2, keepdims=True), shape)


_DRAW = {'he_fan_in': _he_fan_in, 'he_fan_out': _he_fan_out,
         'torch_conv_default': _torch_conv_default, 'rgb_mean': _rgb_mean}


def new_stem_slice(rng: jax.Array, pretrained_kernel_hwio: np.ndarray, num_new: int,
                   how: str) -> np.ndarray:
  """The [kh, kw, num_new, out] float32 kernel slice for `num_new` new input channels.

  Args:
    rng: PRNG key for the drawn initialisations.
    pretrained_kernel_hwio: the pretrained [kh, kw, 3, out] RGB stem kernel.
    num_new: how many input channels are new.
    how: an IR_STEM_INITS name other than 'study' (see the module docstring).
  """
  if how not in _DRAW:
    raise ValueError(f'ir_stem_init={how!r} is not one of {", ".join(_DRAW)}')
  kernel = np.asarray(pretrained_kernel_hwio, np.float32)
  kh, kw, _, out = kernel.shape
  return np.array(_DRAW[how](rng, (kh, kw, num_new, out), kernel), np.float32)


def widen_stem(rng: jax.Array, pretrained_kernel_hwio: np.ndarray, in_channels: int,
               rule: registry.NewStem, how: str) -> np.ndarray:
  """The [kh, kw, in_channels, out] stem kernel of a trunk whose stem follows `rule`.

  `rule.keep_rgb`: the pretrained R, G, B slices are input channels 0-2 and the rest are new;
  otherwise all `in_channels` are new. `how` is an IR_STEM_INITS name ('study': the rule's own).
  """
  how = rule.study_init if how == 'study' else how
  if not rule.keep_rgb:
    return new_stem_slice(rng, pretrained_kernel_hwio, in_channels, how)
  kernel = np.asarray(pretrained_kernel_hwio, np.float32)
  new = new_stem_slice(rng, kernel, in_channels - kernel.shape[2], how)
  return np.concatenate([kernel, new], axis=2)
