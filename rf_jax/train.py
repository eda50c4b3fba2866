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
from rf_jax import steps
from rf_jax import workdir as workdir_lib
from rf_jax import weights
from rf_jax.data import planet
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
  """What a checkpoint holds besides the state: finished epochs, the running epoch's loss."""
  epochs: list[dict]
  loss: _LossSum

  def to_json(self) -> dict:
    return {'history': self.epochs, 'epoch_loss_total': float(self.loss.total),
            'epoch_loss_count': self.loss.count}

  @classmethod
  def from_json(cls, saved: dict) -> '_Progress':
    return cls(saved['history'], _LossSum(saved['epoch_loss_total'], saved['epoch_loss_count']))


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
      ir_stem_init=config.model.ir_stem_init, dont_load=tuple(config.model.dont_load),
      rng=stem_rng)
  tx = optax.sgd(learning_rate_fn, momentum=config.optim.momentum)
  return steps.create_train_state(variables, model, tx)


class _Checkpointer:
  """Saves the latest state (resume) and keeps the best epoch's, with its validation scores."""

  def __init__(self, config, wd: workdir_lib.Workdir, runner: parallel.Runner):
    self.config, self.runner = config, runner
    self.manager = checkpoints.create_manager(wd.checkpoints,
                                              select_by=config.eval.select_by)

  def restore(self, state):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return checkpoints.restore_latest(self.manager, abstract, self._check_same_model)

  def _check_same_model(self, saved: dict) -> None:
    if saved['model']['name'] != self.config.model.name:
      raise checkpoints.CheckpointError(
          f'{self.manager.directory} holds a run of model {saved["model"]["name"]!r}, but '
          f'config.model.name is {self.config.model.name!r}: use another --workdir or the '
          'matching config.')

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


def _set_up(config, wd: workdir_lib.Workdir, data) -> _Run:
  """Data, model, state and checkpoints of a run, restored from the latest checkpoint if any."""
  data = data or inputs.prepare(config, wd)
  steps_per_epoch = len(data.train) // config.batch_size
  if steps_per_epoch == 0:
    raise config_checks.ConfigError(
        f'config.batch_size={config.batch_size} exceeds the {len(data.train)} training chips.')
  kind = config.parallel if jax.device_count() > 1 else 'jit'
  model = registry.create_model(config.model.name, num_classes=planet.NUM_TAGS,
                                dtype=jnp.dtype(config.dtype),
                                axis_name=parallel.AXIS_NAME if kind == 'pmap' else None)
  o = config.optim
  learning_rate_fn = steps.create_learning_rate_fn(o.lr, o.decay_epochs, o.decay_rate,
                                                   steps_per_epoch)
  state = create_train_state(config, model, learning_rate_fn, jax.random.key(config.seed))
  is_chief = jax.process_index() == 0
  if is_chief:
    _write_parameter_table(wd, config.model.name, state.params)
  train_iter = iter(inputs.train_loader(config, data))
  runner = steps.create_runner(kind, flips=config.eval.flips)
  checkpointer = _Checkpointer(config, wd, runner)
  progress = _Progress([], _LossSum())
  restored = checkpointer.restore(state)
  if restored is not None:
    state = restored.state
    train_iter.set_state(restored.data_state)
    progress = _Progress.from_json(restored.progress)
    print(f'Resumed from step {restored.step} ({checkpointer.manager.directory}).')
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
    periodic_save = (config.checkpoint_every_steps and step < epoch_end
                     and step % config.checkpoint_every_steps == 0)
    if step % config.log_every_steps == 0 or periodic_save or stop or step == epoch_end:
      mean_loss = run.progress.loss.mean()
      _check_finite(mean_loss, step, epoch, manager.latest_step(), manager.directory)
      bar.set_postfix(loss=f'{mean_loss:.4f}', refresh=False)
    if stop and step < epoch_end:
      run.checkpointer.save(step, run.state, run.train_iter, run.progress)
      bar.close()
      raise run.checkpointer.stopped(stop[0], step)
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, data=None) -> steps.TrainState:
  """Trains `config.num_epochs` epochs, validating after each; returns the final state.

  `data`: the prepared dataset when the caller already has it (inputs.prepare).
  """
  config_checks.check(config)
  parallel.check_batch_sizes(config)
  wd = workdir_lib.Workdir(workdir)
  wd.create()
  run = _set_up(config, wd, data)
  writer = history.summary_writer(wd.tensorboard) if run.is_chief else None
  if run.is_chief:  # also after a resume: a kill may have come between checkpoint and file
    history.write(wd.history, config.model.name, run.progress.epochs)
  with preemption.stop_requests() as stop:
    for epoch in range(run.step // run.steps_per_epoch, config.num_epochs):
      first_step = run.step
      seconds = _train_epoch(run, epoch, stop)
      record, scores = _validate(run, epoch, seconds, first_step)
      run.progress = _Progress(run.progress.epochs + [record], _LossSum())
      run.checkpointer.save(record['step'], run.state, run.train_iter, run.progress,
                            record=record, scores=scores)
      if run.is_chief:
        history.write(wd.history, config.model.name, run.progress.epochs)
        history.log_to_tensorboard(writer, record)
        print(history.epoch_line(record, config.num_epochs), flush=True)
      if stop:
        raise run.checkpointer.stopped(stop[0], record['step'])
  if writer is not None:
    writer.close()
  run.checkpointer.manager.close()
  return run.runner.get_state(run.state)
