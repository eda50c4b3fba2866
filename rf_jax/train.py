"""Training with per-epoch validation: `train_and_evaluate(config, workdir)`.

Read top to bottom, as Flax's ImageNet example: set up the run (data, model, state, steps,
checkpoints; restored from the latest checkpoint when there is one), then one loop over the
steps. After each step, predicates say what else is due: a log point (the running means, the
non-finite-loss guard, TensorBoard), an epoch's end (validate, record, save the latest and the
best checkpoint), a periodic checkpoint, a stop request (save, then stop). A rerun in the same
workdir resumes exactly from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

from absl import logging
from clu import parameter_overview
import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
import tqdm

from rf_jax import checkpoints
from rf_jax import config_checks
from rf_jax import errors
from rf_jax import history
from rf_jax import host_memory
from rf_jax import inputs
from rf_jax import parallel
from rf_jax import predict
from rf_jax import preemption
from rf_jax import prefetch
from rf_jax import provenance
from rf_jax import runner as runner_lib
from rf_jax import steps
from rf_jax import weights
from rf_jax import workdir as workdir_lib
from rf_jax.data import planet
from rf_jax.data import prepared
from rf_jax.models import registry


class NonFiniteLossError(errors.UserError, RuntimeError):
  """The training loss became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class Progress:
  """What a checkpoint holds besides the state: the finished epochs' records, the running
  epoch's metric sums ({name: (sum, steps)}, summed on device) and the config changes the
  user allowed on resuming."""
  epochs: tuple[dict, ...] = ()
  sums: dict = dataclasses.field(default_factory=dict)
  config_changes: tuple[dict, ...] = ()

  def add(self, metrics: dict) -> Progress:
    sums = {k: (self.sums.get(k, (0.0, 0))[0] + v, self.sums.get(k, (0.0, 0))[1] + 1)
            for k, v in metrics.items()}
    return dataclasses.replace(self, sums=sums)

  def means(self) -> dict[str, float]:
    """The running epoch's mean of each step metric (reads them from the device)."""
    return {k: float(total) / count for k, (total, count) in self.sums.items()}

  def to_json(self) -> dict:
    return {'history': list(self.epochs), 'config_changes': list(self.config_changes),
            'epoch_sums': {k: [float(total), count] for k, (total, count) in self.sums.items()}}

  @classmethod
  def from_json(cls, saved: dict) -> Progress:
    sums = saved.get('epoch_sums')
    if sums is None:  # written before the step returned more metrics than its loss
      sums = {'loss': (saved['epoch_loss_total'], saved['epoch_loss_count'])}
    # float32 as summed before the save, so that the resumed sums continue bit for bit.
    return cls(tuple(saved['history']), {k: (jnp.float32(t), c) for k, (t, c) in sums.items()},
               tuple(saved.get('config_changes', ())))


def _check_finite(loss: float, step: int, steps_per_epoch: int, last_saved: int | None,
                  where) -> None:
  if not math.isfinite(loss):
    raise NonFiniteLossError(
        f'The training loss became {loss} by step {step} (epoch '
        f'{(step - 1) // steps_per_epoch + 1}); nothing was saved after it. The last good '
        f'checkpoint (step {last_saved}) is intact in {where}: lower --config.optim.lr or check '
        'the input data, then rerun to resume from it.')


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
  # Both splits a run holds, before the model is built and the first is read (minutes at the
  # real size), not the validation split's refusal after the training split filled the RAM.
  inputs.check_cache_fits(config, data, ('train', 'validation'))


def _write_parameter_table(wd: workdir_lib.Workdir, name: str, params) -> None:
  table = parameter_overview.get_parameter_overview(params, include_stats=False)
  workdir_lib.write_text(wd.parameters, f'Parameters of {name}:\n{table}\n')
  logging.info('Parameters of %s:\n%s', name, table)


def _progress_bar(start: int, total_steps: int, is_chief: bool) -> tqdm.tqdm:
  """The run's steps with their rate and the time left; closed however the loop ends, so that
  an error's line does not land on it."""
  return tqdm.tqdm(total=total_steps, initial=start, unit='step', file=sys.stderr,
                   disable=not is_chief, mininterval=1.0, dynamic_ncols=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, data=None,
                       allow_config_change=(), runner=None) -> steps.TrainState:
  """Trains `config.num_epochs` epochs, validating after each; returns the final state.

  `data`: the prepared dataset when the caller already has it (inputs.prepare).
  `allow_config_change`: keys (config_checks.CHANGEABLE_KEYS) that may differ from the run
  being resumed; any other difference is refused before any work.
  `runner`: the run's steps (runner.for_config) when the caller already built them, so that
  evaluation afterwards reuses their compiled programs.
  """
  # --- set-up ---
  config_checks.check(config)
  parallel.check_batch_sizes(config)
  wd = workdir_lib.Workdir(workdir)
  wd.create()
  changes = _check_resumable(config, wd, allow_config_change)
  data = data or inputs.prepare(config, wd)
  _check_data_fits(config, data)
  is_chief = jax.process_index() == 0
  if is_chief:
    provenance.record_invocation(wd, 'train', config, data)
  steps_per_epoch = prepared.steps_per_epoch(data, config.batch_size)
  total_steps = config.num_epochs * steps_per_epoch
  layout = runner_lib.layout(config)
  model = registry.create_model(
      config.model.name, num_classes=planet.NUM_TAGS, dtype=jnp.dtype(config.dtype),
      axis_name=parallel.AXIS_NAME if layout == 'pmap' else None, width=config.model.width,
      cpu_tuning=config.cpu_tuning)
  o = config.optim
  learning_rate_fn = steps.create_learning_rate_fn(o.lr, o.decay_epochs, o.decay_rate,
                                                   steps_per_epoch)
  state = create_train_state(config, model, learning_rate_fn, jax.random.key(config.seed))
  host_memory.release_freed_heap()  # before the train step's buffers come on top of it
  if is_chief:
    _write_parameter_table(wd, config.model.name, state.params)
  runner = runner or runner_lib.for_config(config, inputs.preprocess(config, data))
  train_iter = inputs.train_loader(config, data)
  manager = checkpoints.create_manager(wd.checkpoints, select_by=config.eval.select_by)
  progress = Progress()
  restored = checkpoints.restore_latest(manager,
                                        jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  if restored is not None:
    state = restored.state
    train_iter.set_state(restored.data_state)
    progress = Progress.from_json(restored.progress)
    progress = dataclasses.replace(progress, config_changes=progress.config_changes + tuple(
        dict(c, step=restored.step) for c in changes))
    print(f'Resumed from step {restored.step} ({manager.directory})'
          + ''.join(f'; config.{c["key"]} {c["from"]!r} -> {c["to"]!r}' for c in changes) + '.')
  state = runner.put_state(state)
  start = int(runner.get_state(state).step)
  if start >= total_steps:
    print(f'{wd.root} is already trained to epoch {len(progress.epochs)} (step {start}); '
          'nothing to do. Raise --config.num_epochs (with --allow_config_change=num_epochs) to '
          'train on.')
    return runner.get_state(state)
  validation = inputs.eval_batches(config, data, 'validation')  # held (cache) for the run
  train_batches = prefetch.Prefetched(train_iter, runner.put_batch)  # after any set_state

  def save(step: int, record=None, scores=None) -> None:
    _check_finite(progress.means()['loss'] if progress.sums else 0.0, step, steps_per_epoch,
                  manager.latest_step(), manager.directory)  # never save a non-finite state
    checkpoints.save(manager, step, state=jax.device_get(runner.get_state(state)),
                     data_state=train_batches.get_state(), progress=progress.to_json(),
                     config=config, record=record, val_scores=scores)

  writer = history.summary_writer(wd.tensorboard) if is_chief else None
  if is_chief:  # also after a resume: a kill may have come between checkpoint and file
    history.write(wd.history, config.model.name, progress.epochs, progress.config_changes)

  # --- the loop over steps ---
  epoch_start = (start, time.perf_counter())
  with preemption.stop_requests() as stop, _progress_bar(start, total_steps, is_chief) as bar:
    for step in range(start + 1, total_steps + 1):
      epoch = (step - 1) // steps_per_epoch
      bar.set_description(f'epoch {epoch + 1}/{config.num_epochs}', refresh=False)
      state, metrics = runner.train_step(state, next(train_batches))
      progress = progress.add(metrics)
      bar.update()
      epoch_end = step % steps_per_epoch == 0

      if step % config.log_every_steps == 0 or epoch_end:
        means = progress.means()
        _check_finite(means['loss'], step, steps_per_epoch, manager.latest_step(),
                      manager.directory)
        bar.set_postfix(loss=f'{means["loss"]:.4f}', refresh=False)
        if writer is not None:
          history.log_train_metrics(writer, step, jax.device_get(metrics))

      if epoch_end:
        seconds = time.perf_counter() - epoch_start[1]
        scores, labels, val_loss = predict.predict(runner, state, validation)
        record = history.epoch_record(
            epoch=epoch + 1, step=step, train=progress.means(), val_loss=val_loss,
            labels=labels, scores=scores, lr=float(learning_rate_fn(epoch * steps_per_epoch)),
            images_per_s=(step - epoch_start[0]) * config.batch_size / seconds, seconds=seconds)
        progress = dataclasses.replace(progress, epochs=progress.epochs + (record,), sums={})
        save(step, record, scores)
        if is_chief:
          history.write(wd.history, config.model.name, progress.epochs, progress.config_changes)
          history.log_to_tensorboard(writer, record)
          bar.write(history.epoch_line(record, config.num_epochs), file=sys.stdout)
        epoch_start = (step, time.perf_counter())

      stop_signal = preemption.agreed(stop, step, config.log_every_steps)
      if not epoch_end and (stop_signal or (config.checkpoint_every_steps and
                                            step % config.checkpoint_every_steps == 0)):
        save(step)
      if stop_signal:
        raise preemption.TrainingStopped(
            f'{stop_signal} received: saved step {step} in {manager.directory}. Rerun the '
            'same command to resume exactly from there.')
  if writer is not None:
    writer.close()
  manager.close()
  return runner.get_state(state)
