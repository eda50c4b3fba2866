"""Exports a trained run's best model for use outside rf_jax: flax msgpack and safetensors.

Both files hold the variables ('params/...', 'batch_stats/...') with what is needed to feed the
model: the study model's name, its input bands, the tag order of its outputs, the
normalisation and its per-band statistics, and the evaluation image size.
"""

from __future__ import annotations

import json
import pathlib

from flax import serialization
from flax import traverse_util
import ml_collections
import numpy as np

from rf_jax import checkpoints
from rf_jax import config_checks
from rf_jax import evaluate
from rf_jax import provenance
from rf_jax import workdir as workdir_lib
from rf_jax.data import planet
from rf_jax.models import registry

FORMAT = 'rf_jax.export/1'


def export_metadata(config: ml_collections.ConfigDict, wd: workdir_lib.Workdir,
                    step: int) -> dict:
  stats = provenance.saved_statistics(wd)
  if stats is None:
    raise checkpoints.CheckpointError(
        f'{wd.provenance} holds no dataset statistics: train (or evaluate) the run with this '
        'version of rf_jax first, so that it records them.')
  return {
      'format': FORMAT,
      'model': config.model.name,
      'step': int(step),
      'bands': ['R', 'G', 'B', 'NIR'],
      'input_bands': list(registry.input_bands(config.model.name)),
      'tags': list(planet.TAGS),
      'normalisation': config.data.normalisation,
      'band_mean': [float(x) for x in stats[0]],
      'band_std': [float(x) for x in stats[1]],
      'eval_size': int(config.data.eval_size),
  }


def export(config: ml_collections.ConfigDict, workdir, output=None) -> list[pathlib.Path]:
  """Writes model.msgpack and model.safetensors into `output` (a directory; default the
  workdir's export/); returns their paths."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  config_checks.check(config)
  wd = workdir_lib.Workdir(workdir)
  output = wd.export_dir if output is None else pathlib.Path(output).expanduser()
  workdir_lib.check_output_dir(output, 'the export',  # before the checkpoint is restored
                               'give --output DIR, a directory you can write.')
  state, restored = evaluate.restore_model(config, wd)
  meta = export_metadata(config, wd, restored.step)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  flat = {'/'.join(k): np.ascontiguousarray(np.asarray(v, np.float32))
          for k, v in traverse_util.flatten_dict(variables).items()}
  msgpack = output / 'model.msgpack'
  workdir_lib.write_bytes(msgpack, serialization.msgpack_serialize(
      {'meta': meta, 'variables': traverse_util.unflatten_dict(
          {tuple(k.split('/')): v for k, v in flat.items()})}))
  tensors = output / 'model.safetensors'
  tmp = tensors.with_name(tensors.name + '.tmp')
  save_file(flat, str(tmp), metadata={'rf_jax': json.dumps(meta)})
  tmp.replace(tensors)
  print(f'{msgpack}, {tensors}: {meta["model"]} at step {meta["step"]}, tags and band '
        'statistics included.')
  return [msgpack, tensors]
