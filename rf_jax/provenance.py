"""What a workdir records about how it was made: the resolved config, the software, the machine,
the command, the dataset (fingerprint and normalisation statistics).

`config.json` holds the config the run was started with (and resumed with, after an allowed
change); `provenance.json` holds the dataset and one entry per invocation. A workdir is thereby
self-contained: evaluation and prediction need neither the original --config nor the prepared
dataset's metadata.
"""

from __future__ import annotations

import datetime
import functools
from importlib import metadata
import os
import pathlib
import platform
import subprocess
import sys

import jax
import ml_collections
import numpy as np

from rf_jax import config_checks
from rf_jax import workdir as workdir_lib

PACKAGES = ('rf_jax', 'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint',
            'tensorflow-datasets', 'numpy')


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
  found = {'python': platform.python_version()}
  for package in PACKAGES:
    try:
      found[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      found[package] = 'not installed'
  commit = git_commit()
  if commit:
    found['rf_jax_commit'] = commit
  return found


# The vector instruction sets by which XLA:CPU's libraries pick their kernels: where they differ,
# training's last bits differ (README, "On another machine").
CPU_ISA_FLAGS = ('sse4_2', 'avx', 'avx2', 'fma', 'avx512f', 'avx512bw', 'avx512vl', 'avx512_vnni',
                 'avx512_bf16', 'avx512_fp16', 'amx_tile', 'asimd', 'sve')


def machine() -> dict:
  """The processor (model, cores, vector instruction sets) and the devices the run used."""
  processor, flags = platform.processor() or platform.machine(), set()
  try:
    with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'model name':
          processor = value.strip()
        elif key.strip() in ('flags', 'Features'):  # x86, Arm
          flags = set(value.split())
  except OSError:  # not Linux: the platform module's name only
    pass
  devices = jax.local_devices()
  return {'processor': processor, 'cores': os.cpu_count(),
          'cpu_flags': [f for f in CPU_ISA_FLAGS if f in flags],
          'devices': f'{len(devices)} x {devices[0].device_kind} ({jax.default_backend()})'}


def git_commit() -> str | None:
  """The commit of the rf_jax checkout ('+dirty' with uncommitted changes); None if not a checkout."""
  root = pathlib.Path(__file__).resolve().parents[1]
  if not (root / '.git').exists():
    return None
  try:
    run = lambda *args: subprocess.run(['git', '-C', str(root), *args], capture_output=True,
                                       text=True, timeout=10, check=True).stdout.strip()
    return run('rev-parse', 'HEAD') + ('+dirty' if run('status', '--porcelain', '-uno') else '')
  except (OSError, subprocess.SubprocessError):
    return None


def dataset_record(data) -> dict:
  """The prepared dataset a run used: its fingerprint, where it was, and its band statistics."""
  return {
      'fingerprint': pathlib.Path(data.data_dir).parent.name,
      'data_dir': str(data.data_dir),
      'layout': data.layout,
      'chip_size': int(data.chip_size),
      'mean': [float(x) for x in np.asarray(data.mean)],
      'std': [float(x) for x in np.asarray(data.std)],
      'num_chips': {split: len(names) for split, names in data.names.items()},
  }


def record_invocation(wd: workdir_lib.Workdir, mode: str, config: ml_collections.ConfigDict,
                      data=None) -> None:
  """Writes config.json and adds this invocation (and the dataset, when known) to provenance.json."""
  record = workdir_lib.read_json(wd.provenance) if wd.provenance.is_file() else {'invocations': []}
  if data is not None:
    record['dataset'] = dataset_record(data)
  record['invocations'].append({
      'mode': mode,
      'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'command': sys.argv,
      'versions': versions(),
      'machine': machine(),
  })
  if mode in ('train', 'all') or not wd.config.is_file():
    workdir_lib.write_text(wd.config, config.to_json_best_effort(indent=1) + '\n')
  workdir_lib.write_json(wd.provenance, record)


def saved_config(wd: workdir_lib.Workdir) -> ml_collections.ConfigDict:
  """The config the run in `wd` was made with (config.json), as a locked ConfigDict."""
  if not wd.config.is_file():
    raise workdir_lib.MissingRunFileError(
        f'{wd.config} not found: {wd.root} holds no rf_jax run; give --config, or the '
        '--workdir of a trained run.')
  saved = workdir_lib.read_json(wd.config)
  if not isinstance(saved, dict):
    raise workdir_lib.DamagedRunFileError(
        f'{wd.config}: holds a JSON {type(saved).__name__}, not the run\'s config: restore the '
        'file, or give --config (the one the run was trained with).')
  config = ml_collections.ConfigDict(config_checks.with_defaults(saved))
  config.lock()
  return config


def saved_statistics(wd: workdir_lib.Workdir) -> tuple[np.ndarray, np.ndarray] | None:
  """The band mean and std the run normalised with (None when provenance.json has none)."""
  if not wd.provenance.is_file():
    return None
  dataset = workdir_lib.read_json(wd.provenance).get('dataset')
  if not dataset:
    return None
  return np.asarray(dataset['mean'], np.float32), np.asarray(dataset['std'], np.float32)
