#!/usr/bin/env python
"""Port torchvision ResNet-18 weights to a Flax weights file for rf_jax.

  python scripts/port_weights.py --torchvision resnet18 --out weights/resnet18-imagenet.msgpack
  python scripts/port_weights.py --src resnet18-f37072fd.pth --out weights/resnet18-imagenet.msgpack
  python scripts/port_weights.py --src model.safetensors --out weights/resnet18-imagenet.msgpack
  ... --verify      # also compare Flax and torchvision logits on random inputs

--src .pth/.pt is read with torch.load(weights_only=True) only: a pickle holding code is refused.
--src .safetensors needs no torch. --torchvision downloads IMAGENET1K_V1 through torchvision (network).
The output is a msgpack file (flax.serialization) plus `<out>.sha256`, checked on every load
(rf_jax.weights.load_weights_file). Exit status: 0 ok, 1 verification failed, 2 bad input.
"""

from __future__ import annotations

import datetime
import re
import sys
from pathlib import Path

from absl import app
from absl import flags
import numpy as np

from rf_jax import weights

_SRC = flags.DEFINE_string('src', None,
                           'a torchvision ResNet-18 state dict (.pth/.pt/.safetensors)')
_TORCHVISION = flags.DEFINE_enum('torchvision', None, ['resnet18'],
                                 'download the ImageNet weights through torchvision (network)')
_OUT = flags.DEFINE_string('out', None, 'the Flax weights file to write (.msgpack)')
_VERIFY = flags.DEFINE_bool('verify', False,
                            'compare Flax and torchvision logits on random inputs (needs torch)')
_VERIFY_SIZE = flags.DEFINE_integer('verify_size', 224, 'input size for --verify')
_VERIFY_BATCH = flags.DEFINE_integer('verify_batch', 2, 'batch size for --verify')
_TOLERANCE = flags.DEFINE_float('tolerance', 1e-4,
                                'largest max |logit difference| --verify accepts')

USAGE = 'usage: python scripts/port_weights.py (--src FILE | --torchvision resnet18) --out FILE'


class UsageError(ValueError):
  """Flags that do not say what to port, or ask for what this installation cannot do."""


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (for app.run), a mistake one `error:` line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {" ".join(str(e).split())} ({USAGE})', file=sys.stderr)
    sys.exit(2)


def _torchvision(why: str):
  try:
    import torchvision  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UsageError(f'{why} needs torch and torchvision: pip install torch torchvision, '
                     f'or port a downloaded .safetensors file with --src (no torch '
                     f'needed)') from None
  return torchvision


def _from_torchvision(arch: str) -> tuple[dict, dict]:
  torchvision = _torchvision(f'--torchvision {arch}')
  tv_weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
  model = torchvision.models.get_model(arch, weights=tv_weights)
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  return state_dict, {'source': f'torchvision {arch} {tv_weights}', 'url': tv_weights.url,
                      'torchvision': torchvision.__version__}


def _from_file(src: Path) -> tuple[dict, dict]:
  digest = weights.sha256_of(src)
  # torch hub names carry the first hex digits of the file's SHA-256 (resnet18-f37072fd.pth).
  m = re.search(r'-([0-9a-f]{8,64})\.[a-z]+$', src.name)
  if m and not digest.startswith(m.group(1)):
    raise weights.WeightsFileError(
        f'{src.name}: its name says SHA-256 {m.group(1)}..., the file has '
        f'{digest[:len(m.group(1))]}...; the download is corrupt or the file is not what its name says')
  try:
    state_dict = weights.read_state_dict(src)
  except ModuleNotFoundError as e:  # torch for a .pth, safetensors for a .safetensors
    raise UsageError(str(e)) from None
  return state_dict, {'source': src.name, 'source_sha256': digest}


def verify(state_dict: dict, variables: dict, size: int, batch: int) -> float:
  """Max |logit difference| between torchvision and Flax on random N(0, 1) inputs."""
  torchvision = _torchvision('--verify')
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from rf_jax.models.resnet import ResNet18  # pylint: disable=g-import-not-at-top

  num_classes = np.shape(variables['params']['fc']['kernel'])[-1]
  tmodel = torchvision.models.resnet18(num_classes=num_classes)
  tmodel.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()},
                         strict=True)
  tmodel.eval()
  x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  out = ResNet18(num_classes=num_classes).apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  return float(np.abs(np.asarray(out) - ref).max())


def _check_flags(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UsageError(f'unexpected arguments {" ".join(argv[1:])!r} ({USAGE})')
  if (_SRC.value is None) == (_TORCHVISION.value is None):
    raise UsageError(f'give exactly one of --src and --torchvision ({USAGE})')
  if not _OUT.value:
    raise UsageError(f'--out is required ({USAGE})')


def _port_and_verify(out: Path) -> int:
  if _TORCHVISION.value:
    state_dict, meta = _from_torchvision(_TORCHVISION.value)
  else:
    state_dict, meta = _from_file(Path(_SRC.value))
  variables = weights.torchvision_to_flax(state_dict)
  meta['ported'] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
  digest = weights.save_weights_file(variables, out, meta)
  print(f'wrote {out} (sha256 {digest}, recorded in {out.name}.sha256)')
  if not _VERIFY.value:
    return 0
  reloaded = weights.load_weights_file(out)  # verify what was written, SHA check included
  diff = verify(state_dict, reloaded, _VERIFY_SIZE.value, _VERIFY_BATCH.value)
  ok = diff <= _TOLERANCE.value
  print(f'verify: max |logit difference| Flax vs torchvision = {diff:.3g} on '
        f'{_VERIFY_BATCH.value} random {_VERIFY_SIZE.value}x{_VERIFY_SIZE.value} inputs '
        f'({"OK" if ok else "FAILED"}, tolerance {_TOLERANCE.value:g})')
  return 0 if ok else 1


def main(argv: list[str]) -> int:
  """Runs on parsed flags (app.run); `argv` is what flag parsing left, the program first."""
  try:
    _check_flags(argv)
    return _port_and_verify(Path(_OUT.value))
  except (UsageError, weights.UnsafeCheckpointError, weights.WeightsMismatchError,
          weights.WeightsFileError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
