"""Weights on disk: torch state dicts (.pth/.pt, .safetensors) in, the rf_jax weights file out.

The weights file (written by scripts/port_weights.py): a msgpack file
(`flax.serialization.msgpack_serialize`) holding
  {'format': 'rf_jax.resnet/1', 'arch': 'resnet18', 'meta': {...},
   'params': ..., 'batch_stats': ...}
(float32 numpy arrays, the 1000-class ImageNet head included), and beside it `<file>.sha256` in
`sha256sum` format. Loading recomputes the SHA-256 and refuses a file that does not match.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
import pickle
from typing import Any, Mapping, Optional

import numpy as np
from flax import serialization, traverse_util
from flax.core import unfreeze

from rf_jax.weights.errors import MissingPackageError
from rf_jax.weights.errors import UnsafeCheckpointError
from rf_jax.weights.errors import WeightsFileError
from rf_jax.weights.errors import WeightsFileNotFoundError
from rf_jax.weights.errors import WeightsMismatchError
from rf_jax.weights.torchvision_resnet import check_resnet18, to_numpy

WEIGHTS_FORMAT = 'rf_jax.resnet/1'
PORT_COMMAND = 'python scripts/port_weights.py --torchvision resnet18 --out {out}'
PORT_COMMAND_SRC = 'python scripts/port_weights.py --src resnet18-f37072fd.pth --out {out}'


def _torch_load(path: Path) -> Any:
  """torch.load(weights_only=True): tensors and containers only, never code."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise MissingPackageError(
        f'reading {path} (a torch checkpoint) needs torch: pip install torch, or give the '
        f'weights as a .safetensors file (no torch needed)') from None
  try:
    return torch.load(str(path), map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    raise UnsafeCheckpointError(
        f'refusing to load {path}: it is not a plain tensor checkpoint. It was read with '
        f'torch.load(weights_only=True), which only allows tensors and containers, and the '
        f'pickle asks for more (it could run code when unpickled). Re-save the weights as a '
        f'plain state_dict or as .safetensors. torch said: {str(e).splitlines()[0]}') from None
  except (RuntimeError, EOFError) as e:  # a truncated or damaged zip archive
    raise WeightsFileError(
        f'{path} is not a readable torch checkpoint (truncated or damaged download?): '
        f'download it again. torch said: {str(e).splitlines()[0]}') from None


def read_state_dict(path: os.PathLike | str) -> dict[str, np.ndarray]:
  """Reads a torch state dict from a .pth/.pt (weights_only pickle) or a .safetensors file.

  .pth files are read with `torch.load(..., weights_only=True)` and nothing else: a pickle that
  holds anything but tensors and containers raises UnsafeCheckpointError. .safetensors files are
  read without torch. A {'state_dict': ...} / {'model': ...} wrapper and a DataParallel 'module.'
  prefix are unwrapped.
  """
  path = Path(path)
  if not path.is_file():
    raise WeightsFileNotFoundError(f'no such weights source file: {path}')
  if path.suffix == '.safetensors':
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise MissingPackageError(
          f'reading {path} needs safetensors: pip install safetensors') from None
    state_dict = load_file(str(path))
  else:
    state_dict = _torch_load(path)
  for wrapper in ('state_dict', 'model'):
    if isinstance(state_dict, Mapping) and isinstance(state_dict.get(wrapper), Mapping):
      state_dict = state_dict[wrapper]
  if not isinstance(state_dict, Mapping):
    raise WeightsMismatchError(f'{path} holds a {type(state_dict).__name__}, not a state dict')
  return {k.removeprefix('module.'): to_numpy(v) for k, v in state_dict.items()}


def sha256_of(path: os.PathLike | str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _sha_path(path: Path) -> Path:
  return path.with_name(path.name + '.sha256')


def save_weights_file(variables: Mapping[str, Any], path: os.PathLike | str,
                      meta: Optional[Mapping[str, Any]] = None) -> str:
  """Writes ported ResNet-18 variables as msgpack + `<path>.sha256`; returns the SHA-256."""
  path = Path(path)
  check_resnet18(variables, what='variables to save')
  tree = traverse_util.unflatten_dict({
      k: np.asarray(v, np.float32)
      for k, v in traverse_util.flatten_dict(unfreeze(dict(variables))).items()})
  payload = {'format': WEIGHTS_FORMAT, 'arch': 'resnet18',
             'meta': {k: str(v) for k, v in (meta or {}).items()},
             'params': tree['params'], 'batch_stats': tree['batch_stats']}
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_bytes(serialization.msgpack_serialize(payload))
  os.replace(tmp, path)
  digest = sha256_of(path)
  _sha_path(path).write_text(f'{digest}  {path.name}\n')
  return digest


def _checked_sha256(path: Path) -> str:
  """The file's SHA-256, after checking it against the one recorded beside it."""
  sha_file = _sha_path(path)
  if not sha_file.is_file():
    raise WeightsFileError(
        f'{path} has no SHA-256 recorded beside it ({sha_file.name}); re-create it with\n'
        f'  {PORT_COMMAND.format(out=path)}')
  fields = sha_file.read_text().split()
  recorded = fields[0].lower() if fields else ''
  actual = sha256_of(path)
  if recorded != actual:
    raise WeightsFileError(
        f'{path}: SHA-256 {actual} does not match the one recorded in {sha_file.name} '
        f'({recorded or "empty"}); the file is corrupt or was changed. Re-create it with\n'
        f'  {PORT_COMMAND.format(out=path)}')
  return actual


def load_weights_file(path: os.PathLike | str) -> dict:
  """Loads a weights file written by scripts/port_weights.py -> {'params', 'batch_stats'}.

  The SHA-256 recorded beside it (`<path>.sha256`) must match the file's.
  """
  path = Path(path)
  if not path.is_file():
    raise WeightsFileNotFoundError(
        f'pretrained weights file {str(path)!r} not found (config.model.weights). Port the '
        f'torchvision ImageNet ResNet-18 weights with\n  {PORT_COMMAND.format(out=path)}\n'
        f'(downloads through torchvision), or from an already downloaded checkpoint with\n'
        f'  {PORT_COMMAND_SRC.format(out=path)}\n'
        f"or set config.model.weights='' to train from scratch.")
  digest = _checked_sha256(path)
  payload = serialization.msgpack_restore(path.read_bytes())
  if not isinstance(payload, dict) or payload.get('format') != WEIGHTS_FORMAT:
    found = payload.get('format') if isinstance(payload, dict) else type(payload).__name__
    raise WeightsFileError(
        f'{path}: unknown weights format {found!r} (expected {WEIGHTS_FORMAT!r})')
  variables = {'params': payload['params'], 'batch_stats': payload['batch_stats']}
  check_resnet18(variables, what=f'weights in {path}')
  logging.info('Loaded %s (sha256 %s, %s)', path, digest[:12], payload.get('meta', {}))
  return variables
