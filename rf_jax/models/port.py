"""torchvision ResNet-18 weights <-> Flax variables, and loading them into the study models.

Conversion (`torchvision_to_flax`), exact to float32 rounding (see tests/test_port.py):
  conv `*.weight` [O, I, kh, kw] -> `params/.../kernel` [kh, kw, I, O]
  `fc.weight` [out, in]          -> `params/fc/kernel` [in, out]
  BN `weight`/`bias`             -> `params/.../scale`/`bias`
  BN `running_mean`/`running_var` -> `batch_stats/.../mean`/`var`
  `num_batches_tracked`          -> dropped
  names: '.' -> '/', a block index joins its stage (`layer2.0.downsample.1` -> `layer2_0/downsample_1`).

Weights file (`save_weights_file` / `load_weights_file`, written by scripts/port_weights.py):
  a msgpack file (`flax.serialization.msgpack_serialize`) holding
  {'format': 'rf_jax.resnet/1', 'arch': 'resnet18', 'meta': {...}, 'params': ..., 'batch_stats': ...}
  (float32 numpy arrays, the 1000-class ImageNet head included), and beside it `<file>.sha256`
  in `sha256sum` format. Loading recomputes the SHA-256 and refuses a file that does not match.

Loading into a study model (`init_from_pretrained`, big_vision style): the pretrained trunk is merged
into the freshly initialised variables of the study model; the 17-class head always stays the fresh
one; names matching a `dont_load` regex (full match on 'params/layer4_1/conv2/kernel'-style names)
keep their fresh values; any mismatch is ONE `WeightsMismatchError` listing every offending name with
expected and found shapes.

Stems of the IR-aware models (`model_config.ir_stem_init`):
  'he' (default): the new input-channel slice of the 7x7 stem kernel is drawn from N(0, 2 / fan) with
    fan = out_channels * kh * kw = 64 * 7 * 7 = 3136 (std 0.0253), i.e. exactly what torchvision's own
    `kaiming_normal_(mode='fan_out', nonlinearity='relu')` gives every one of its convs, the stem
    included. (fan_in on a 1-channel slice, 49, would give std 0.20, 8x the pretrained kernels' scale.)
  'rgb_mean': the new slice is the mean of the pretrained R, G, B kernel slices (timm adapts a
    1-channel stem with the SUM; the mean keeps the IR response on the scale of one RGB band).
  rgbir: R, G, B slices are the pretrained ones unchanged, the NIR slice (input channel 3) is new.
  dual:  RGB trunk fully pretrained; IR trunk pretrained except its 1-channel stem kernel (new).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util
from flax.core import FrozenDict, unfreeze

from rf_jax.models import registry
from rf_jax.models.resnet import ResNet18

WEIGHTS_FORMAT = 'rf_jax.resnet/1'
IR_STEM_INITS = ('he', 'rgb_mean')
PORT_COMMAND = 'python scripts/port_weights.py --torchvision resnet18 --out {out}'
PORT_COMMAND_SRC = 'python scripts/port_weights.py --src resnet18-f37072fd.pth --out {out}'


class WeightsMismatchError(ValueError):
  """A state dict / weights file / study model pair whose names or shapes do not match."""


class WeightsFileError(ValueError):
  """A weights file that cannot be trusted (no or wrong SHA-256, unknown format)."""


class UnsafeCheckpointError(ValueError):
  """A .pth file holding more than tensors (a pickle that would run code)."""


# ----------------------------------------------------------------------------- names


def _torch_to_flax_key(key: str) -> Optional[tuple[str, ...]]:
  """'layer2.0.downsample.1.running_var' -> ('batch_stats', 'layer2_0', 'downsample_1', 'var').

  Returns None for keys that are dropped (num_batches_tracked); the leaf 'weight' is resolved to
  'kernel' or 'scale' by the caller (it depends on the array's rank).
  """
  parts = key.split('.')
  leaf, mods = parts[-1], parts[:-1]
  path: list[str] = []
  for p in mods:
    if p.isdigit() and path:
      path[-1] = f'{path[-1]}_{p}'
    else:
      path.append(p)
  if leaf == 'num_batches_tracked':
    return None
  if leaf == 'running_mean':
    return ('batch_stats', *path, 'mean')
  if leaf == 'running_var':
    return ('batch_stats', *path, 'var')
  if leaf in ('weight', 'bias'):
    return ('params', *path, leaf)
  return ('?', *path, leaf)


def flax_name_to_torch(path: Sequence[str]) -> str:
  """('params', 'layer2_0', 'downsample_1', 'scale') -> 'layer2.0.downsample.1.weight'."""
  col, *mods, leaf = path
  out = []
  for m in mods:
    mm = re.fullmatch(r'(.*)_(\d+)', m)
    out.extend([mm.group(1), mm.group(2)] if mm else [m])
  leaf = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
          ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
          ('batch_stats', 'var'): 'running_var'}.get((col, leaf), leaf)
  return '.'.join(out + [leaf])


def _name(path: Sequence[str]) -> str:
  return '/'.join(path)


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor; torch is not imported here
    value = value.detach().cpu()
    value = (value.float() if value.is_floating_point() else value).numpy()
  arr = np.asarray(value)
  if np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == 'bfloat16':
    arr = arr.astype(np.float32)
  return arr


def _shape(x) -> tuple[int, ...]:
  return tuple(int(d) for d in np.shape(x))


# ----------------------------------------------------------------------------- checks


class _Problems:
  """Collects mismatches and raises them as one listing error."""

  def __init__(self):
    self.rows: list[tuple[str, str, str, str]] = []

  def add(self, kind: str, path: Sequence[str], expected, found, torch_name: bool = True):
    name = _name(path)
    if torch_name and path and path[0] in ('params', 'batch_stats'):
      name += f'  [torch {flax_name_to_torch(path)}]'
    fmt = lambda s: 'none' if s is None else (s if isinstance(s, str) else str(tuple(s)))
    row = (kind, name, fmt(expected), fmt(found))
    if row not in self.rows:
      self.rows.append(row)

  def raise_if_any(self, what: str):
    if not self.rows:
      return
    width = max(len(r[1]) for r in self.rows)
    lines = [f'{kind:<10} {name:<{width}}  expected {exp}, found {found}'
             for kind, name, exp, found in self.rows]
    counts = ', '.join(f'{sum(r[0] == k for r in self.rows)} {k}'
                       for k in dict.fromkeys(r[0] for r in self.rows))
    raise WeightsMismatchError(
        f'{what}: {len(self.rows)} mismatch(es) ({counts}):\n  ' + '\n  '.join(lines))


_EXPECTED_CACHE: dict[tuple[int, int], dict] = {}


def resnet18_shapes(num_classes: int = 1000, in_channels: int = 3) -> dict[tuple[str, ...], tuple]:
  """Flattened {('params', 'conv1', 'kernel'): (7, 7, 3, 64), ...} of a Flax ResNet-18."""
  key = (num_classes, in_channels)
  if key not in _EXPECTED_CACHE:
    model = ResNet18(num_classes=num_classes)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, in_channels))))
    flat = traverse_util.flatten_dict(unfreeze(shapes))
    _EXPECTED_CACHE[key] = {k: tuple(v.shape) for k, v in flat.items()}
  return _EXPECTED_CACHE[key]


def check_resnet18(variables: Mapping[str, Any], what: str = 'weights') -> None:
  """Raises one WeightsMismatchError listing every name/shape that is not a ResNet-18's.

  The head size and the stem's input channels are taken from the variables themselves (a
  ResNet-18 fine-tuned to 10 classes is still a ResNet-18); everything else must match.
  """
  flat = traverse_util.flatten_dict(unfreeze(dict(variables)))
  fc = flat.get(('params', 'fc', 'kernel'))
  stem = flat.get(('params', 'conv1', 'kernel'))
  num_classes = _shape(fc)[-1] if fc is not None and len(_shape(fc)) == 2 else 1000
  in_channels = _shape(stem)[2] if stem is not None and len(_shape(stem)) == 4 else 3
  expected = resnet18_shapes(num_classes, in_channels)
  problems = _Problems()
  for k, shape in expected.items():
    if k not in flat:
      problems.add('missing', k, shape, None)
    elif _shape(flat[k]) != shape:
      problems.add('shape', k, shape, _shape(flat[k]))
  for k in flat:
    if k not in expected:
      problems.add('unexpected', k, None, _shape(flat[k]))
  problems.raise_if_any(f'{what}: not a torchvision ResNet-18')


# ----------------------------------------------------------------------------- conversion


def torchvision_to_flax(state_dict: Mapping[str, Any], *, check: bool = True) -> dict:
  """A torchvision ResNet-18 `state_dict()` (numpy arrays or torch tensors) -> Flax variables.

  Returns {'params': ..., 'batch_stats': ...} of float32 numpy arrays for
  `ResNet18(num_classes=<rows of fc.weight>)`. With `check` (default) anything that is not a
  ResNet-18 (a ResNet-34, a truncated dict, a wrong shape) raises one WeightsMismatchError
  listing every offending name.
  """
  flat: dict[tuple[str, ...], np.ndarray] = {}
  problems = _Problems()
  for key, value in state_dict.items():
    path = _torch_to_flax_key(key)
    if path is None:
      continue
    arr = _to_numpy(value)
    if path[0] == '?':
      problems.add('unknown', (key,), None, _shape(arr), torch_name=False)
      continue
    if path[-1] == 'weight':
      if arr.ndim == 4:  # conv OIHW -> HWIO
        path, arr = path[:-1] + ('kernel',), arr.transpose(2, 3, 1, 0)
      elif arr.ndim == 2:  # linear [out, in] -> [in, out]
        path, arr = path[:-1] + ('kernel',), arr.T
      else:  # BatchNorm gamma
        path = path[:-1] + ('scale',)
    flat[path] = np.ascontiguousarray(arr)
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
  for path, arr in traverse_util.flatten_dict(unfreeze(dict(variables))).items():
    arr = np.asarray(arr)
    if path[-1] == 'kernel':
      arr = arr.transpose(3, 2, 0, 1) if arr.ndim == 4 else arr.T
    out[flax_name_to_torch(path)] = np.ascontiguousarray(arr)
  return out


# ----------------------------------------------------------------------------- source files


def read_state_dict(path: os.PathLike | str) -> dict[str, np.ndarray]:
  """Reads a torch state dict from a .pth/.pt (weights_only pickle) or a .safetensors file.

  .pth files are read with `torch.load(..., weights_only=True)` and nothing else: a pickle that
  holds anything but tensors and containers raises UnsafeCheckpointError. .safetensors files are
  read without torch. A {'state_dict': ...} / {'model': ...} wrapper and a DataParallel 'module.'
  prefix are unwrapped.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'no such weights source file: {path}')
  if path.suffix == '.safetensors':
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    sd = load_file(str(path))
  else:
    import torch  # pylint: disable=g-import-not-at-top
    try:
      sd = torch.load(str(path), map_location='cpu', weights_only=True)
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
  for wrapper in ('state_dict', 'model'):
    if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
      sd = sd[wrapper]
  if not isinstance(sd, Mapping):
    raise WeightsMismatchError(f'{path} holds a {type(sd).__name__}, not a state dict')
  out = {}
  for k, v in sd.items():
    k = k[len('module.'):] if k.startswith('module.') else k
    out[k] = _to_numpy(v)
  return out


# ----------------------------------------------------------------------------- weights file


def sha256_of(path: os.PathLike | str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


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


def load_weights_file(path: os.PathLike | str) -> dict:
  """Loads a weights file written by scripts/port_weights.py -> {'params', 'batch_stats'}.

  The SHA-256 recorded beside it (`<path>.sha256`) must match the file's.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(
        f'pretrained weights file {str(path)!r} not found (config.model.weights). Port the '
        f'torchvision ImageNet ResNet-18 weights with\n  {PORT_COMMAND.format(out=path)}\n'
        f'(downloads through torchvision), or from an already downloaded checkpoint with\n'
        f'  {PORT_COMMAND_SRC.format(out=path)}\n'
        f"or set config.model.weights='' to train from scratch.")
  sha_file = _sha_path(path)
  if not sha_file.is_file():
    raise WeightsFileError(
        f'{path} has no SHA-256 recorded beside it ({sha_file.name}); re-create it with\n'
        f'  {PORT_COMMAND.format(out=path)}')
  recorded = sha_file.read_text().split()[0].strip().lower() if sha_file.read_text().split() else ''
  actual = sha256_of(path)
  if recorded != actual:
    raise WeightsFileError(
        f'{path}: SHA-256 {actual} does not match the one recorded in {sha_file.name} '
        f'({recorded or "empty"}); the file is corrupt or was changed. Re-create it with\n'
        f'  {PORT_COMMAND.format(out=path)}')
  payload = serialization.msgpack_restore(path.read_bytes())
  if not isinstance(payload, dict) or payload.get('format') != WEIGHTS_FORMAT:
    fmt = payload.get('format') if isinstance(payload, dict) else type(payload).__name__
    raise WeightsFileError(f'{path}: unknown weights format {fmt!r} (expected {WEIGHTS_FORMAT!r})')
  variables = {'params': payload['params'], 'batch_stats': payload['batch_stats']}
  check_resnet18(variables, what=f'weights in {path}')
  logging.info('Loaded %s (sha256 %s, %s)', path, actual[:12], payload.get('meta', {}))
  return variables


# ----------------------------------------------------------------------------- study models


def _field(config: Any, key: str, default: Any = None) -> Any:
  if isinstance(config, Mapping):
    return config.get(key, default)
  return getattr(config, key, default) if hasattr(config, key) else default


def _new_stem_slice(rng, pretrained_kernel: np.ndarray, n: int, how: str) -> np.ndarray:
  kh, kw, _, out = pretrained_kernel.shape
  if how == 'he':
    std = np.sqrt(2.0 / (out * kh * kw))  # torchvision: kaiming_normal_, mode='fan_out'
    return np.asarray(jax.random.normal(rng, (kh, kw, n, out), jnp.float32)) * std
  if how == 'rgb_mean':
    mean = pretrained_kernel.mean(axis=2, keepdims=True)
    return np.repeat(mean, n, axis=2)
  raise ValueError(f'config.model.ir_stem_init={how!r} is not known; valid: {", ".join(IR_STEM_INITS)}')


def init_from_pretrained(variables: Mapping[str, Any], pretrained: Mapping[str, Any],
                         model_config: Any, rng: jax.Array,
                         dont_load: Iterable[str] = ()) -> dict:
  """Merges a ported ResNet-18 (`pretrained`) into a study model's fresh `variables`.

  Args:
    variables: {'params', 'batch_stats'} of `fusion.create_model(model_config)` freshly initialised.
    pretrained: ported ResNet-18 variables (load_weights_file / torchvision_to_flax); its head is
      ignored.
    model_config: `config.model` (name: rgb | rgbir | dual, ir_stem_init: he | rgb_mean, and an
      optional `dont_load` list of regexes).
    rng: PRNG key for the He-initialised stem slices.
    dont_load: more regexes (full match on names like 'params/layer4_1/conv2/kernel' or, for dual,
      'params/ir_trunk/conv1/kernel') whose fresh values are kept.

  Returns:
    The variables with the pretrained trunk(s) in, the stem widened, the head from `variables`.

  Raises:
    WeightsMismatchError: one error listing every missing/unexpected/misshapen name.
  """
  name = _field(model_config, 'name')
  if name not in registry.MODEL_NAMES:
    raise ValueError(f'config.model.name={name!r} is not a known model; valid names: '
                     f'{", ".join(registry.MODEL_NAMES)}')
  stem_init = _field(model_config, 'ir_stem_init', 'he') or 'he'
  if stem_init not in IR_STEM_INITS:
    raise ValueError(f'config.model.ir_stem_init={stem_init!r} is not known; valid: '
                     f'{", ".join(IR_STEM_INITS)}')
  patterns = list(_field(model_config, 'dont_load', ()) or ()) + list(dont_load)

  if name == 'dual':
    prefixes = (('rgb_trunk',), ('ir_trunk',))
    new_stems = {('params', 'ir_trunk', 'conv1', 'kernel'): False}  # all input channels new
  else:
    prefixes = ((),)
    new_stems = {('params', 'conv1', 'kernel'): True} if name == 'rgbir' else {}
  is_head = lambda path: path[1] == 'fc'  # the study head (dual: params/fc), always fresh

  frozen = isinstance(variables, FrozenDict)
  target = traverse_util.flatten_dict(unfreeze(dict(variables)))
  source = {k: np.asarray(v) for k, v in
            traverse_util.flatten_dict(unfreeze(dict(pretrained))).items() if not is_head(k)}

  def skipped(path) -> bool:
    return any(re.fullmatch(p, _name(path)) for p in patterns)

  used_patterns = {p for p in patterns if any(re.fullmatch(p, _name(k)) for k in target)}
  problems = _Problems()
  for p in patterns:
    if p not in used_patterns:
      problems.add('dont_load', (f'pattern {p!r} matches no name of the {name} model',), None,
                   None, torch_name=False)

  merged = dict(target)
  trunk_keys = set()
  for prefix in prefixes:
    for tk, tval in target.items():
      if is_head(tk) or tuple(tk[1:1 + len(prefix)]) != prefix:
        continue
      trunk_keys.add(tk)
      if skipped(tk):
        continue
      sk = (tk[0],) + tuple(tk[1 + len(prefix):])
      tshape = _shape(tval)
      if sk not in source:
        problems.add('missing', sk, tshape, None)
        continue
      sval = source[sk]
      if tk in new_stems:
        keep_rgb = new_stems[tk]
        ok = (sval.ndim == 4 and len(tshape) == 4 and sval.shape[2] == 3
              and sval.shape[:2] == tshape[:2] and sval.shape[3] == tshape[3]
              and (tshape[2] > 3 if keep_rgb else True))
        if not ok:
          problems.add('stem', tk, tshape, f'{_shape(sval)} (a [kh, kw, 3, out] RGB stem is '
                       f'widened to the model\'s input channels)', torch_name=False)
          continue
        key = jax.random.fold_in(rng, len(trunk_keys))
        n_new = tshape[2] - 3 if keep_rgb else tshape[2]
        new = _new_stem_slice(key, sval, n_new, stem_init)
        value = np.concatenate([sval, new], axis=2) if keep_rgb else new
      else:
        if _shape(sval) != tshape:
          problems.add('shape', sk, tshape, _shape(sval))
          continue
        value = sval
      merged[tk] = jnp.asarray(value, dtype=jnp.asarray(tval).dtype)
  for sk, sval in source.items():
    if not any((sk[0],) + prefix + tuple(sk[1:]) in trunk_keys for prefix in prefixes):
      problems.add('unexpected', sk, None, _shape(sval))
  problems.raise_if_any(f'pretrained weights do not fit the {name!r} model\'s trunk')

  out = traverse_util.unflatten_dict(merged)
  logging.info('init_from_pretrained(%s): loaded %d arrays, kept %d fresh (head, dont_load%s)',
               name, sum(1 for k in trunk_keys if not skipped(k)),
               len(target) - sum(1 for k in trunk_keys if not skipped(k)),
               ', new stem slices' if new_stems else '')
  return FrozenDict(out) if frozen else out


def load_pretrained(variables: Mapping[str, Any], model_config: Any, rng: jax.Array) -> Any:
  """`variables` unchanged when `model_config.weights` is '' (train from scratch), else the
  weights file loaded and merged with init_from_pretrained."""
  weights = _field(model_config, 'weights', '')
  if not weights:
    return variables
  return init_from_pretrained(variables, load_weights_file(weights), model_config, rng)
