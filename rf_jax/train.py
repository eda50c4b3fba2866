"""Training with per-epoch validation: `train_and_evaluate(config, workdir)`.

The loop reads top to bottom: set up the run (data, model, state, checkpoints), then per epoch
train `steps_per_epoch` steps and validate. What happens around the steps is named:
`_LossSum` (the epoch's running loss, kept in checkpoints for an exact resume),
`_check_finite` (the NaN guard), `_Checkpointer` (latest + best with the validation scores),
pre-emption (rf_jax/preemption.py), history and TensorBoard (rf_jax/history.py).
A rerun in the same workdir resumes exactly from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any

from absl import logging
from clu import parameter_overview
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from rf_jax import checkpoints
from rf_jax import config_checks
from rf_jax import history
from rf_jax import inputs
from rf_jax import parallel
from rf_jax import preemption
from rf_jax import provenance
from rf_jax import steps
from rf_jax import workdir as workdir_lib
from rf_jax import weights
from rf_jax.data import planet
from rf_jax.data import prepared
from rf_jax.models import registry


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite."""


class _LossSum:
  """The running sum of an epoch's step losses, on device until it is read."""

  def __init__(self, total: float = 0.0, count: int = 0):
    self.total, self.count = jnp.float32(total), count

  def add(self, loss: jax.Array) -> None:
    self.total, self.count = self.total + loss, self.count + 1

  def mean(self) -> float:
    return float(self.total) / self.count


@dataclasses.dataclass
class _Progress:
  """What a checkpoint holds besides the state: finished epochs, the running epoch's loss,
  and the config changes the user allowed on resuming."""
  epochs: list[dict]
  loss: _LossSum
  config_changes: list[dict] = dataclasses.field(default_factory=list)

  def to_json(self) -> dict:
    return {'history': self.epochs, 'epoch_loss_total': float(self.loss.total),
            'epoch_loss_count': self.loss.count, 'config_changes': self.config_changes}

  @classmethod
  def from_json(cls, saved: dict) -> '_Progress':
    return cls(saved['history'], _LossSum(saved['epoch_loss_total'], saved['epoch_loss_count']),
               saved.get('config_changes', []))


def _check_finite(loss: float, step: int, epoch: int, last_saved: int | None, where) -> None:
  if not math.isfinite(loss):
    raise NonFiniteLossError(
        f'The training loss became {loss} by step {step} (epoch {epoch + 1}); nothing was saved '
        f'after it. The last good checkpoint (step {last_saved}) is intact in {where}: lower '
        '--config.optim.lr or check the input data, then rerun to resume from it.')


def create_train_state(config: ml_collections.ConfigDict, model, learning_rate_fn,
                       rng: jax.Array) -> steps.TrainState:
  """The model initialised, with the ported ImageNet trunk merged in when configured."""
  init_rng, stem_rng = jax.random.split(rng)
  variables = steps.init_variables(model, init_rng, config.data.crop_size,
                                   len(registry.input_bands(config.model.name)))
  variables = weights.load_pretrained(
      variables, model=config.model.name, path=config.model.weights,
      ir_stem_init=config.model.ir_stem_init, dont_load=config.model.dont_load,
      rng=stem_rng)
  tx = steps.create_optimizer(learning_rate_fn, config.optim.momentum)
  return steps.create_train_state(variables, model, tx)


class _Checkpointer:
  """Saves the latest state (resume) and keeps the best epoch's, with its validation scores."""

  def __init__(self, config, wd: workdir_lib.Workdir, runner: parallel.Runner):
    self.config, self.runner = config, runner
    self.manager = checkpoints.create_manager(wd.checkpoints,
                                              select_by=config.eval.select_by)

  def restore(self, state):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return checkpoints.restore_latest(self.manager, abstract)

  def save(self, step, state, train_iter, progress: _Progress, record=None, scores=None):
    checkpoints.save(self.manager, step, state=jax.device_get(self.runner.get_state(state)),
                     data_state=train_iter.get_state(), progress=progress.to_json(),
                     config=self.config, record=record, val_scores=scores)

  def stopped(self, signal_name: str, step: int) -> preemption.TrainingStopped:
    return preemption.TrainingStopped(
        f'{signal_name} received: saved step {step} in {self.manager.directory}. Rerun the '
        'same command to resume exactly from there.')


@dataclasses.dataclass
class _Run:
  """Everything the epoch loop needs, set up once."""
  config: Any
  wd: workdir_lib.Workdir
  data: Any
  steps_per_epoch: int
  learning_rate_fn: optax.Schedule
  runner: parallel.Runner
  state: Any
  train_iter: Any
  checkpointer: _Checkpointer
  progress: _Progress
  is_chief: bool

  @property
  def step(self) -> int:
    return int(self.runner.get_state(self.state).step)


def _check_resumable(config, wd: workdir_lib.Workdir, allowed) -> list[dict]:
  """Before any work: the workdir's run (if any) must be of this config, up to allowed keys.

  Returns the allowed changes, to be recorded in the history.
  """
  saved = checkpoints.latest_config(wd.checkpoints)
  if saved is None:
    return []
  checkpoints.check_model(saved, config.model.name, wd.root)
  changes = config_checks.check_same_run(saved, config, tuple(allowed), wd.root)
  return [{'key': k, 'from': a, 'to': b} for k, (a, b) in changes.items()]


def _check_data_fits(config, data) -> None:
  """Sizes that only the prepared chips can tell, checked before the model is built."""
  if config.data.crop_size > data.chip_size:
    raise config_checks.ConfigError(
        f'config.data.crop_size={config.data.crop_size} exceeds the {data.chip_size} px chips '
        f'of {data.data_dir}: use --config.data.crop_size={data.chip_size} or less.')
  if config.batch_size > len(data.train):
    raise config_checks.ConfigError(
        f'config.batch_size={config.batch_size} exceeds the {len(data.train)} training chips.')


def _set_up(config, wd: workdir_lib.Workdir, data, changes: list[dict]) -> _Run:
  """Data, model, state and checkpoints of a run, restored from the latest checkpoint if any."""
  data = data or inputs.prepare(config, wd)
  _check_data_fits(config, data)
  is_chief = jax.process_index() == 0
  if is_chief:
    provenance.record_invocation(wd, 'train', config, data)
  steps_per_epoch = prepared.steps_per_epoch(data, config.batch_size)
  kind = config.parallel if jax.device_count() > 1 else 'jit'
  model = registry.create_model(config.model.name, num_classes=planet.NUM_TAGS,
                                dtype=jnp.dtype(config.dtype),
                                axis_name=parallel.AXIS_NAME if kind == 'pmap' else None)
  o = config.optim
  learning_rate_fn = steps.create_learning_rate_fn(o.lr, o.decay_epochs, o.decay_rate,
                                                   steps_per_epoch)
  state = create_train_state(config, model, learning_rate_fn, jax.random.key(config.seed))
  if is_chief:
    _write_parameter_table(wd, config.model.name, state.params)
  train_iter = inputs.train_loader(config, data)
  runner = steps.create_runner(kind, flips=config.eval.flips,
                               preprocess=inputs.preprocess(config, data))
  checkpointer = _Checkpointer(config, wd, runner)
  progress = _Progress([], _LossSum())
  restored = checkpointer.restore(state)
  if restored is not None:
    state = restored.state
    train_iter.set_state(restored.data_state)
    progress = _Progress.from_json(restored.progress)
    progress.config_changes += [dict(c, step=restored.step) for c in changes]
    print(f'Resumed from step {restored.step} ({checkpointer.manager.directory})'
          + ''.join(f'; config.{c["key"]} {c["from"]!r} -> {c["to"]!r}' for c in changes) + '.')
  return _Run(config, wd, data, steps_per_epoch, learning_rate_fn, runner,
              runner.put_state(state), train_iter, checkpointer, progress, is_chief)


def _write_parameter_table(wd: workdir_lib.Workdir, name: str, params) -> None:
  table = parameter_overview.get_parameter_overview(params, include_stats=False)
  workdir_lib.write_text(wd.parameters, f'Parameters of {name}:\n{table}\n')
  logging.info('Parameters of %s:\n%s', name, table)


def _train_epoch(run: _Run, epoch: int, stop: list) -> float:
  """Trains to the end of `epoch`; returns the seconds it took (this process's part of it)."""
  config, manager = run.config, run.checkpointer.manager
  step, epoch_end = run.step, (epoch + 1) * run.steps_per_epoch
  bar = tqdm.tqdm(total=run.steps_per_epoch, initial=step - epoch * run.steps_per_epoch,
                  desc=f'epoch {epoch + 1}/{config.num_epochs}', unit='step', file=sys.stderr,
                  disable=not run.is_chief, mininterval=1.0, dynamic_ncols=True)
  start = time.perf_counter()
  while step < epoch_end:
    run.state, loss = run.runner.train_step(run.state,
                                            run.runner.put_batch(next(run.train_iter)))
    run.progress.loss.add(loss)
    step += 1
    bar.update()
    stop_signal = preemption.agreed(stop)
    periodic_save = (config.checkpoint_every_steps and step < epoch_end
                     and step % config.checkpoint_every_steps == 0)
    if step % config.log_every_steps == 0 or periodic_save or stop_signal or step == epoch_end:
      mean_loss = run.progress.loss.mean()
      _check_finite(mean_loss, step, epoch, manager.latest_step(), manager.directory)
      bar.set_postfix(loss=f'{mean_loss:.4f}', refresh=False)
    if stop_signal and step < epoch_end:
      run.checkpointer.save(step, run.state, run.train_iter, run.progress)
      bar.close()
      raise run.checkpointer.stopped(stop_signal, step)
    if periodic_save:
      run.checkpointer.save(step, run.state, run.train_iter, run.progress)
  bar.close()
  return time.perf_counter() - start


def _validate(run: _Run, epoch: int, seconds: float, first_step: int) -> tuple[dict, np.ndarray]:
  """The epoch's history record and its validation scores."""
  scores, labels, val_loss = steps.predict(run.runner, run.state,
                                           inputs.eval_batches(run.config, run.data, 'validation'))
  step = run.step
  record = history.epoch_record(
      epoch=epoch + 1, step=step, train_loss=run.progress.loss.mean(), val_loss=val_loss,
      labels=labels, scores=scores, lr=float(run.learning_rate_fn(epoch * run.steps_per_epoch)),
      images_per_s=(step - first_step) * run.config.batch_size / seconds, seconds=seconds)
  return record, scores


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, data=None,
                       allow_config_change=()) -> steps.TrainState:
  """Trains `config.num_epochs` epochs, validating after each; returns the final state.

  `data`: the prepared dataset when the caller already has it (inputs.prepare).
  `allow_config_change`: keys (config_checks.CHANGEABLE_KEYS) that may differ from the run
  being resumed; any other difference is refused before any work.
  """
  config_checks.check(config)
  parallel.check_batch_sizes(config)
  wd = workdir_lib.Workdir(workdir)
  wd.create()
  changes = _check_resumable(config, wd, allow_config_change)
  run = _set_up(config, wd, data, changes)
  first_epoch = run.step // run.steps_per_epoch
  if first_epoch >= config.num_epochs:
    print(f'{wd.root} is already trained to epoch {len(run.progress.epochs)} (step {run.step}); '
          f'nothing to do. Raise --config.num_epochs (with --allow_config_change=num_epochs) to '
          'train on.')
    return run.runner.get_state(run.state)
  writer = history.summary_writer(wd.tensorboard) if run.is_chief else None
  if run.is_chief:  # also after a resume: a kill may have come between checkpoint and file
    history.write(wd.history, config.model.name, run.progress.epochs, run.progress.config_changes)
  with preemption.stop_requests() as stop:
    for epoch in range(first_epoch, config.num_epochs):
      first_step = run.step
      seconds = _train_epoch(run, epoch, stop)
      record, scores = _validate(run, epoch, seconds, first_step)
      run.progress = dataclasses.replace(run.progress, epochs=run.progress.epochs + [record],
                                         loss=_LossSum())
      run.checkpointer.save(record['step'], run.state, run.train_iter, run.progress,
                            record=record, scores=scores)
      if run.is_chief:
        history.write(wd.history, config.model.name, run.progress.epochs,
                      run.progress.config_changes)
        history.log_to_tensorboard(writer, record)
        print(history.epoch_line(record, config.num_epochs), flush=True)
      stop_signal = preemption.agreed(stop)
      if stop_signal:
        raise run.checkpointer.stopped(stop_signal, record['step'])
  if writer is not None:
    writer.close()
  run.checkpointer.manager.close()
  return run.runner.get_state(run.state)
