"""torchvision ResNet-18 state dicts <-> Flax ResNet-18 variables: names, layouts, shape checks.

Exact to float32 rounding (tests/test_port.py, tests/test_resnet.py):
  conv `*.weight` [O, I, kh, kw]  -> `params/.../kernel` [kh, kw, I, O]
  `fc.weight` [out, in]           -> `params/fc/kernel` [in, out]
  BN `weight`/`bias`              -> `params/.../scale`/`bias`
  BN `running_mean`/`running_var` -> `batch_stats/.../mean`/`var`
  `num_batches_tracked`           -> dropped
  names: '.' -> '/', a block index joins its stage
         (`layer2.0.downsample.1` -> `layer2_0/downsample_1`).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from rf_jax.models.resnet import ResNet18
from rf_jax.weights.errors import Mismatches

_LEAF_TO_TORCH = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
                  ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
                  ('batch_stats', 'var'): 'running_var'}
_TORCH_STATS = {'running_mean': 'mean', 'running_var': 'var'}


def _torch_to_flax_key(key: str) -> Optional[tuple[str, ...]]:
  """'layer2.0.downsample.1.running_var' -> ('batch_stats', 'layer2_0', 'downsample_1', 'var').

  Returns None for keys that are dropped (num_batches_tracked); the leaf 'weight' is resolved to
  'kernel' or 'scale' by the caller (it depends on the array's rank).
  """
  *modules, leaf = key.split('.')
  path: list[str] = []
  for part in modules:
    if part.isdigit() and path:
      path[-1] = f'{path[-1]}_{part}'
    else:
      path.append(part)
  if leaf == 'num_batches_tracked':
    return None
  if leaf in _TORCH_STATS:
    return ('batch_stats', *path, _TORCH_STATS[leaf])
  if leaf in ('weight', 'bias'):
    return ('params', *path, leaf)
  return ('?', *path, leaf)


def flax_name_to_torch(path: Sequence[str]) -> str:
  """('params', 'layer2_0', 'downsample_1', 'scale') -> 'layer2.0.downsample.1.weight'."""
  collection, *modules, leaf = path
  out = []
  for module in modules:
    match = re.fullmatch(r'(.*)_(\d+)', module)
    out.extend(match.groups() if match else [module])
  return '.'.join(out + [_LEAF_TO_TORCH.get((collection, leaf), leaf)])


def _listed_name(path: Sequence[str]) -> str:
  """'params/layer4_1/conv2/kernel  [torch layer4.1.conv2.weight]': both names a user may know."""
  return f'{"/".join(path)}  [torch {flax_name_to_torch(path)}]'


def to_numpy(value: Any) -> np.ndarray:
  """A torch tensor or array -> numpy; floating point (bfloat16 included) -> float32."""
  if hasattr(value, 'detach'):  # a torch tensor; torch is not imported here
    value = value.detach().cpu()
    value = (value.float() if value.is_floating_point() else value).numpy()
  array = np.asarray(value)
  if np.issubdtype(array.dtype, np.floating) or array.dtype.name == 'bfloat16':
    array = array.astype(np.float32)
  return array


def _shape(value: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in np.shape(value))


@functools.lru_cache(maxsize=None)
def resnet18_shapes(num_classes: int = 1000, in_channels: int = 3,
                    width: int = 64) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flattened {('params', 'conv1', 'kernel'): (7, 7, 3, 64), ...} of a Flax ResNet-18
  (`width`: its first-stage width, 64 in torchvision's)."""
  model = ResNet18(num_classes=num_classes, num_filters=width)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, in_channels))))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(unfreeze(shapes)).items()}


def check_resnet18(variables: Mapping[str, Any], what: str = 'weights') -> None:
  """Raises one WeightsMismatchError listing every name/shape that is not a ResNet-18's.

  The head size, the stem's input channels and the width are taken from the variables
  themselves (a ResNet-18 fine-tuned to 10 classes, or narrowed for tests, is still a
  ResNet-18); everything else must match.
  """
  flat = traverse_util.flatten_dict(unfreeze(dict(variables)))
  fc = _shape(flat.get(('params', 'fc', 'kernel')))  # () when absent
  stem = _shape(flat.get(('params', 'conv1', 'kernel')))
  expected = resnet18_shapes(fc[-1] if len(fc) == 2 else 1000,
                             stem[2] if len(stem) == 4 else 3,
                             stem[3] if len(stem) == 4 else 64)
  problems = Mismatches()
  for path, shape in expected.items():
    if path not in flat:
      problems.add('missing', _listed_name(path), shape, None)
    elif _shape(flat[path]) != shape:
      problems.add('shape', _listed_name(path), shape, _shape(flat[path]))
  for path in flat:
    if path not in expected:
      problems.add('unexpected', _listed_name(path), None, _shape(flat[path]))
  problems.raise_if_any(f'{what}: not a torchvision ResNet-18')


def _to_flax_layout(path: tuple[str, ...], array: np.ndarray):
  """A torch `weight` -> (its Flax path, the array in Flax layout)."""
  if array.ndim == 4:  # conv OIHW -> HWIO
    return path[:-1] + ('kernel',), array.transpose(2, 3, 1, 0)
  if array.ndim == 2:  # linear [out, in] -> [in, out]
    return path[:-1] + ('kernel',), array.T
  return path[:-1] + ('scale',), array  # BatchNorm gamma


def torchvision_to_flax(state_dict: Mapping[str, Any], *, check: bool = True) -> dict:
  """A torchvision ResNet-18 `state_dict()` (numpy arrays or torch tensors) -> Flax variables.

  Returns {'params': ..., 'batch_stats': ...} of float32 numpy arrays for
  `ResNet18(num_classes=<rows of fc.weight>)`. With `check` (default) anything that is not a
  ResNet-18 (a ResNet-34, a truncated dict, a wrong shape) raises one WeightsMismatchError
  listing every offending name.
  """
  flat: dict[tuple[str, ...], np.ndarray] = {}
  problems = Mismatches()
  for key, value in state_dict.items():
    path = _torch_to_flax_key(key)
    if path is None:
      continue
    array = to_numpy(value)
    if path[0] == '?':
      problems.add('unknown', key, None, _shape(array))
      continue
    if path[-1] == 'weight':
      path, array = _to_flax_layout(path, array)
    flat[path] = np.ascontiguousarray(array)
  problems.raise_if_any('state dict keys that are not torchvision ResNet parameters')
  variables = traverse_util.unflatten_dict(flat)
  variables.setdefault('params', {})
  variables.setdefault('batch_stats', {})
  if check:
    check_resnet18(variables, what='state dict')
  return variables


def flax_to_torchvision(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of torchvision_to_flax (num_batches_tracked not restored)."""
  out = {}
  for path, array in traverse_util.flatten_dict(unfreeze(dict(variables))).items():
    array = np.asarray(array)
    if path[-1] == 'kernel':
      array = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
    out[flax_name_to_torch(path)] = np.ascontiguousarray(array)
  return out
