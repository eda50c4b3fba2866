"""The run's record per epoch: history.json (what the report reads) and TensorBoard.

history.json: {"model": str, "epochs": [record, ...], "config_changes": [...]}, one record per
finished epoch with the keys of `epoch_record` below (per-tag values in planet.TAGS order, null
where undefined), and the config changes allowed on resuming (--allow_config_change).
"""

from __future__ import annotations

import math
import pathlib
import sys
from typing import Any

import numpy as np

from rf_jax import metrics
from rf_jax import workdir as workdir_lib
from rf_jax.data import planet

# The scalars logged to TensorBoard at each epoch's end.
SCALARS = ('train_loss', 'train_grad_norm', 'train_param_norm', 'val_loss', 'val_map',
           'val_mean_precision_at_0.5', 'lr', 'train_images_per_s')
# The train step's metrics (steps.train_step), logged to TensorBoard as `step/<name>` at log
# points and recorded per epoch as `train_<name>`, the mean over the epoch's steps.
STEP_METRICS = ('loss', 'grad_norm', 'param_norm')


def _finite_or_none(values) -> list:
  return [float(v) if math.isfinite(v) else None for v in values]


def epoch_record(*, epoch: int, step: int, train: dict[str, float], val_loss: float,
                 labels: np.ndarray, scores: np.ndarray, lr: float, images_per_s: float,
                 seconds: float) -> dict[str, Any]:
  """One history.json record from the epoch's mean step metrics (`train`: STEP_METRICS, absent
  ones None) and its validation scores."""
  return {
      'epoch': epoch,
      'step': step,
      **{f'train_{name}': train.get(name) for name in STEP_METRICS},
      'val_loss': val_loss,
      'val_map': metrics.mean_average_precision(labels, scores),
      'val_ap': _finite_or_none(metrics.average_precision(labels, scores)),
      # What the study's code printed as "mAP" and chose its best epoch by.
      'val_mean_precision_at_0.5': metrics.mean_precision_at(labels, scores, 0.5),
      'lr': lr,
      'train_images_per_s': images_per_s,
      'epoch_seconds': seconds,
  }


def write(path: pathlib.Path, model: str, epochs: list[dict], config_changes=()) -> None:
  """`config_changes`: [{'key', 'from', 'to', 'step'}] allowed on resuming at `step`."""
  workdir_lib.write_json(path, {'model': model, 'epochs': epochs,
                                'config_changes': list(config_changes)})


def read(path) -> dict[str, Any]:
  path = pathlib.Path(path)
  if not path.is_file():
    raise workdir_lib.MissingRunFileError(
        f'{path}: no training history (train that workdir first)')
  data = workdir_lib.read_json(path)
  if not isinstance(data, dict) or not isinstance(data.get('epochs'), list):
    raise workdir_lib.DamagedRunFileError(
        f'{path}: holds no "epochs" list, so it is not an rf_jax training history: restore it '
        '(rf_jax writes it whole after every epoch), or train again in a new --workdir.')
  return data


def summary_writer(logdir: pathlib.Path):
  """A tensorboardX writer, imported with torch hidden.

  tensorboardX imports torch, if installed, only to accept torch tensors; that alone
  would add ~0.5 GB resident memory and seconds of start-up to every training run.
  """
  hide = 'torch' not in sys.modules
  if hide:
    sys.modules['torch'] = None  # makes `import torch` raise ImportError
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    if hide:
      del sys.modules['torch']
  return tensorboardX.SummaryWriter(str(logdir))


def log_train_metrics(writer, step: int, metrics: dict) -> None:
  """The train step's metrics at `step` (steps.train_step), as `step/<name>`."""
  for name in STEP_METRICS:
    writer.add_scalar(f'step/{name}', float(metrics[name]), step)


def log_to_tensorboard(writer, record: dict) -> None:
  for key in SCALARS:
    if record.get(key) is not None:
      writer.add_scalar(key, record[key], record['step'])
  for tag, value in zip(planet.TAGS, record['val_ap']):
    if value is not None:
      writer.add_scalar(f'val_ap/{tag}', value, record['step'])
  writer.flush()


def epoch_line(record: dict, num_epochs: int) -> str:
  return (f'epoch {record["epoch"]}/{num_epochs}  train_loss {record["train_loss"]:.4f}  '
          f'grad_norm {record["train_grad_norm"]:.3g}  '
          f'val_loss {record["val_loss"]:.4f}  val_mAP {record["val_map"]:.4f}  '
          f'val_P@0.5 {record["val_mean_precision_at_0.5"]:.4f}  lr {record["lr"]:.3g}  '
          f'{record["train_images_per_s"]:.1f} img/s  {record["epoch_seconds"]:.1f} s')
