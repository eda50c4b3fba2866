#!/usr/bin/env python
"""Port torchvision ResNet-18 weights to a Flax weights file for rf_jax.

  python scripts/port_weights.py --torchvision resnet18 --out weights/resnet18-imagenet.msgpack
  python scripts/port_weights.py --src resnet18-f37072fd.pth --out weights/resnet18-imagenet.msgpack
  python scripts/port_weights.py --src model.safetensors --out weights/resnet18-imagenet.msgpack
  ... --verify      # also compare Flax and torchvision logits on random inputs

--src .pth/.pt is read with torch.load(weights_only=True) only: a pickle holding code is refused.
--src .safetensors needs no torch. --torchvision downloads IMAGENET1K_V1 through torchvision (network).
The output is a msgpack file (flax.serialization) plus `<out>.sha256`, checked on every load
(rf_jax.models.port.load_weights_file). Exit status: 0 ok, 1 verification failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from pathlib import Path

import numpy as np

from rf_jax.models import port


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument('--src', type=Path, help='a torchvision ResNet-18 state dict (.pth/.pt/.safetensors)')
  src.add_argument('--torchvision', choices=['resnet18'],
                   help='download the ImageNet weights through torchvision (needs a network)')
  p.add_argument('--out', type=Path, required=True, help='the Flax weights file to write (.msgpack)')
  p.add_argument('--verify', action='store_true',
                 help='compare Flax and torchvision logits on random inputs (needs torch)')
  p.add_argument('--verify-size', type=int, default=224, help='input size for --verify (224)')
  p.add_argument('--verify-batch', type=int, default=2, help='batch size for --verify (2)')
  p.add_argument('--tolerance', type=float, default=1e-4,
                 help='largest max |logit difference| --verify accepts (1e-4)')
  return p


def _from_torchvision(arch: str) -> tuple[dict, dict]:
  import torchvision  # pylint: disable=g-import-not-at-top
  weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
  model = torchvision.models.get_model(arch, weights=weights)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  return sd, {'source': f'torchvision {arch} {weights}', 'url': weights.url,
              'torchvision': torchvision.__version__}


def _from_file(src: Path) -> tuple[dict, dict]:
  digest = port.sha256_of(src)
  # torch hub names carry the first hex digits of the file's SHA-256 (resnet18-f37072fd.pth).
  m = re.search(r'-([0-9a-f]{8,64})\.[a-z]+$', src.name)
  if m and not digest.startswith(m.group(1)):
    raise port.WeightsFileError(
        f'{src.name}: its name says SHA-256 {m.group(1)}..., the file has {digest[:len(m.group(1))]}...'
        f'; the download is corrupt or the file is not what its name says')
  return port.read_state_dict(src), {'source': src.name, 'source_sha256': digest}


def verify(state_dict: dict, variables: dict, size: int, batch: int) -> float:
  """Max |logit difference| between torchvision and Flax on random N(0, 1) inputs."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
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


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.torchvision:
      state_dict, meta = _from_torchvision(args.torchvision)
    else:
      state_dict, meta = _from_file(args.src)
    variables = port.torchvision_to_flax(state_dict)
    meta['ported'] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    digest = port.save_weights_file(variables, args.out, meta)
    print(f'wrote {args.out} (sha256 {digest}, recorded in {args.out.name}.sha256)')
    if args.verify:
      reloaded = port.load_weights_file(args.out)  # verify what was written, SHA check included
      diff = verify(state_dict, reloaded, args.verify_size, args.verify_batch)
      ok = diff <= args.tolerance
      print(f'verify: max |logit difference| Flax vs torchvision = {diff:.3g} on '
            f'{args.verify_batch} random {args.verify_size}x{args.verify_size} inputs '
            f'({"OK" if ok else "FAILED"}, tolerance {args.tolerance:g})')
      if not ok:
        return 1
  except (port.UnsafeCheckpointError, port.WeightsMismatchError, port.WeightsFileError,
          FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
