"""Orbax checkpoints of a run: the latest (for resume) and the best epoch (for evaluation).

A checkpoint holds the train state, the input iterator's state, the run's
progress (history and the running sums of a partly done epoch) and the config,
so that a restart continues exactly and an evaluation can check that it is
restoring the model it was asked for. A checkpoint saved at an epoch's end also
holds that epoch's validation scores: evaluation recomputes them from the
restored model and says whether they reproduce.
"""

from collections.abc import Mapping
import dataclasses
import glob
import os
import sys
from typing import Any

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from rf_jax import errors

# config.eval.select_by -> the history key that picks the best epoch.
SELECT_BY = {'map': 'val_map', 'mean_precision_at_0.5': 'val_mean_precision_at_0.5'}
TMP_MARKER = '.orbax-checkpoint-tmp'  # orbax writes <step>.orbax-checkpoint-tmp..., then renames


class CheckpointError(errors.UserError, RuntimeError):
  """A checkpoint that is missing or does not fit the request."""


@dataclasses.dataclass(frozen=True)
class Restored:
  state: Any
  data_state: Any
  progress: dict
  config: dict
  step: int
  val_scores: Any = None  # float32 [N, 17] at the epoch's end; None for mid-epoch checkpoints


def create_manager(directory: str | os.PathLike, *, select_by: str = 'map',
                   read_only: bool = False) -> ocp.CheckpointManager:
  """Keeps the latest checkpoint and the best one by `select_by` (a SELECT_BY key).

  `max_to_keep` would delete the latest checkpoint once a better one exists
  (and best_fn alone never writes the metrics), hence the explicit
  preservation policy; checkpoints saved mid-epoch carry no metrics and are
  dropped once a newer one exists.
  """
  metric = SELECT_BY[select_by]
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(1),
      checkpoint_managers.BestN(get_metric_fn=lambda m: m[metric], reverse=False, n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      best_fn=lambda m: m[metric],
      best_mode='max',
      enable_async_checkpointing=False,
      cleanup_tmp_directories=not read_only,
      read_only=read_only,
      create=not read_only,
  )
  directory = os.path.abspath(directory)
  if not read_only:  # orbax deletes them silently when the manager opens: say so
    leftovers = sorted(glob.glob(os.path.join(glob.escape(directory), '*' + TMP_MARKER + '*')))
    if leftovers:
      print(f'Removing {len(leftovers)} unfinished checkpoint write(s) (a kill or a full disk '
            f'interrupted them; never restored): {", ".join(leftovers)}', file=sys.stderr)
  return ocp.CheckpointManager(
      directory,
      options=options,
      item_names=('state', 'data', 'progress', 'config', 'val_scores'),
  )


def check_model(saved_config: Mapping[str, Any], name: str, where) -> None:
  """A checkpoint of another study model is refused with the way out."""
  saved = saved_config.get('model', {}).get('name')
  if saved != name:
    raise CheckpointError(
        f'{where} holds a run of model {saved!r}, but config.model.name is {name!r}: use the '
        'config it was trained with, or another --workdir.')


def _json_safe(data_state: Any) -> Any:
  return {'bytes': data_state.decode()} if isinstance(data_state, bytes) else {'json': data_state}


def _from_json_safe(saved: Mapping[str, Any]) -> Any:
  return saved['bytes'].encode() if 'bytes' in saved else saved['json']


def save(manager: ocp.CheckpointManager, step: int, *, state: Any, data_state: Any,
         progress: dict, config: ml_collections.ConfigDict,
         record: Mapping[str, Any] | None = None, val_scores: Any = None) -> None:
  """Saves synchronously; orbax writes to a temporary directory and renames it.

  `record`: the epoch's history record at an epoch's end (its SELECT_BY values rank the
  checkpoint), with `val_scores` the epoch's validation scores; None mid-epoch.

  A failed write (disk full, quota, permissions) raises CheckpointError; the
  previous checkpoint is untouched (orbax only renames a complete write), and
  the partial temporary directory is removed when the next manager opens.
  """
  previous = manager.latest_step()
  try:
    _save(manager, step, state=state, data_state=data_state, progress=progress, config=config,
          record=record, val_scores=val_scores)
  except OSError as e:
    kept = (f'the previous checkpoint (step {previous}) is intact' if previous is not None
            else 'no earlier checkpoint exists')
    raise CheckpointError(
        f'could not write the checkpoint of step {step} in {manager.directory} '
        f'({e.strerror or e}): {kept}. Free disk space (or fix the directory), then rerun the '
        'same command to resume from it.') from e


def _save(manager, step, *, state, data_state, progress, config, record, val_scores) -> None:
  items = dict(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(_json_safe(data_state)),
      progress=ocp.args.JsonSave(progress),
      config=ocp.args.JsonSave(config.to_dict()),
  )
  if val_scores is not None:
    items['val_scores'] = ocp.args.StandardSave({'scores': np.asarray(val_scores, np.float32)})
  metrics = None if record is None else {k: record[k] for k in SELECT_BY.values()}
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
  manager.wait_until_finished()


def latest_step(directory: str | os.PathLike) -> int | None:
  """The step of the latest complete checkpoint in `directory` (None: no checkpoint yet).

  Read from the listing, where orbax names a finished checkpoint by its step alone (it renames
  `<step>` + TMP_MARKER... when complete): a manager would sync the processes of a multi-process
  run, and this is asked after one of them died.
  """
  if not os.path.isdir(directory):
    return None
  return max((int(name) for name in os.listdir(directory) if name.isdigit()), default=None)


def latest_config(directory: str | os.PathLike) -> dict | None:
  """The config saved with the latest checkpoint in `directory` (None: no checkpoint yet)."""
  step = latest_step(directory)
  if step is None:
    return None
  manager = create_manager(directory, read_only=True)
  return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Restored | None:
  """The latest checkpoint restored into `abstract_state`'s structure, or None."""
  step = manager.latest_step()
  if step is None:
    return None
  return _restore(manager, step, ocp.args.StandardRestore(abstract_state))


def _restore(manager, step, state_args, with_scores: bool = False) -> Restored:
  items = dict(state=state_args, data=ocp.args.JsonRestore(),
               progress=ocp.args.JsonRestore(), config=ocp.args.JsonRestore())
  has_scores = with_scores and os.path.isdir(os.path.join(manager.directory, str(step),
                                                          'val_scores'))
  if has_scores:
    items['val_scores'] = ocp.args.StandardRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return Restored(state=restored['state'], data_state=_from_json_safe(restored['data']),
                  progress=restored['progress'], config=restored['config'], step=step,
                  val_scores=restored['val_scores']['scores'] if has_scores else None)


def restore_for_evaluation(directory: str | os.PathLike, step: int = -1,
                           select_by: str = 'map') -> Restored:
  """The best checkpoint by `select_by` (or `step`), state and scores as plain arrays."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    workdir = os.path.dirname(directory)
    raise CheckpointError(f'No checkpoints in {directory}: train first with '
                          f'`rf-jax --config <config> --workdir {workdir}`.')
  manager = create_manager(directory, select_by=select_by, read_only=True)
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f'{directory} holds no complete checkpoint: train first.')
  if step < 0:
    step = manager.best_step()
    if step is None:  # no finished epoch yet: only mid-epoch checkpoints
      step = manager.latest_step()
  elif step not in steps:
    raise CheckpointError(f'config.eval.step={step}: {directory} holds steps {sorted(steps)}.')
  return _restore(manager, step, ocp.args.StandardRestore(), with_scores=True)

