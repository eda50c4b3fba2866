"""Training and per-epoch validation of the study models.

Pure functions in the shape of the Flax ImageNet example: `create_train_state`,
`train_step`, `eval_step`, `create_learning_rate_fn`, and `train_and_evaluate`,
which runs the epoch loop, keeps the latest and best checkpoints and resumes
exactly from the latest one when restarted in the same workdir.
"""

from collections.abc import Iterator
import contextlib
import ctypes
import functools
import math
import os
import pathlib
import signal
import sys
import time
from typing import Any

from clu import metrics as clu_metrics
from clu import parameter_overview
import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from rf_jax import checkpoints
from rf_jax import config_checks
from rf_jax import files
from rf_jax import metrics
from rf_jax import parallel
from rf_jax.data import pipeline
from rf_jax.data import planet
from rf_jax.models import registry
from rf_jax.models import port

HISTORY_FILE = 'history.json'


class TrainState(train_state.TrainState):
  batch_stats: Any


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite."""


class WorkdirError(OSError):
  """The workdir cannot be created or written."""


class TrainingStopped(Exception):
  """SIGTERM/SIGINT arrived; a checkpoint was saved at the step boundary."""


def create_learning_rate_fn(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """StepLR: the rate drops by `decay_rate` every `decay_epochs` epochs."""
  return optax.exponential_decay(
      init_value=config.optim.lr,
      transition_steps=config.optim.decay_epochs * steps_per_epoch,
      decay_rate=config.optim.decay_rate,
      staircase=True)


def create_model(config: ml_collections.ConfigDict, axis_name: str | None = None):
  return registry.create_model(config.model.name, num_classes=planet.NUM_TAGS,
                               dtype=jnp.dtype(config.dtype), axis_name=axis_name)


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict, model,
                       image_size: int, learning_rate_fn: optax.Schedule) -> TrainState:
  """Initialises the model (merging the ported ImageNet trunk when configured)."""
  init_rng, pretrained_rng = jax.random.split(rng)
  channels = len(registry.input_bands(config.model.name))
  dummy = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(init_rng, dummy)
  variables = port.load_pretrained(variables, config.model, pretrained_rng)
  state = TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      batch_stats=variables['batch_stats'],
      tx=optax.sgd(learning_rate_fn, momentum=config.optim.momentum))
  _release_freed_heap()
  return state


def _release_freed_heap() -> None:
  """Returns the heap that tracing and compiling `init` freed to the OS (glibc keeps it).

  The train step's buffers are allocated next; without this they come on top of that
  garbage and peak resident memory is ~150 MB higher (docs/performance.md).
  """
  try:
    trim = ctypes.CDLL(None).malloc_trim
  except (OSError, AttributeError):  # not glibc: nothing to do
    return
  trim(0)


def sigmoid_bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example loss: the mean over tags of sigmoid binary cross-entropy, in >= float32."""
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  return optax.sigmoid_binary_cross_entropy(logits, labels).mean(axis=-1)


def train_step(state: TrainState, batch: dict, axis_name: str | None = None):
  """One SGD step on the batch mean loss; returns the new state and that loss."""

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'],
        train=True, mutable=['batch_stats'])
    return sigmoid_bce(logits, batch['labels']).mean(), updates['batch_stats']

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    loss = jax.lax.pmean(loss, axis_name)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss


def eval_step(state: TrainState, batch: dict, flips: bool = False) -> dict:
  """Per-example sigmoid scores and loss (padding rows are masked by the caller)."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logits = state.apply_fn(variables, batch['image'], train=False).astype(jnp.float32)
  scores = jax.nn.sigmoid(logits)
  if flips:  # average the probabilities of the chip and its mirror image
    mirrored = state.apply_fn(variables, batch['image'][:, :, ::-1], train=False)
    scores = (scores + jax.nn.sigmoid(mirrored.astype(jnp.float32))) / 2
    # The loss of the averaged probabilities, so that it describes the scores reported.
    logits = jnp.log(scores) - jnp.log1p(-scores)
  return {'scores': scores, 'loss': sigmoid_bce(logits, batch['labels'])}


def predict(runner: parallel.Runner, state: TrainState, batches: Iterator[dict]):
  """Scores, labels and mean loss over every unpadded chip of `batches`."""
  scores, labels = [], []
  loss = None
  for batch in batches:
    out = runner.get_outputs(runner.eval_step(state, runner.put_batch(
        {'image': batch['image'], 'labels': batch['labels']})))
    keep = batch['mask'] > 0
    scores.append(np.asarray(out['scores'])[keep])
    labels.append(batch['labels'][keep])
    update = clu_metrics.Average.from_model_output(jnp.asarray(out['loss']),
                                                   mask=jnp.asarray(batch['mask']))
    loss = update if loss is None else loss.merge(update)
  return np.concatenate(scores), np.concatenate(labels), float(loss.compute())


def _summary_writer(logdir: pathlib.Path):
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


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _finite_or_none(values) -> list:
  return [None if not math.isfinite(v) else float(v) for v in values]


@contextlib.contextmanager
def _stop_requests():
  """Turns SIGTERM/SIGINT into a flag the loop reads at each step boundary."""
  requested = []

  def handler(signum, frame):
    if requested:  # asked twice: stop now, losing the work since the last checkpoint
      raise KeyboardInterrupt
    requested.append(signal.Signals(signum).name)
  previous = {}
  for sig in (signal.SIGTERM, signal.SIGINT):
    try:
      previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
      pass
  try:
    yield requested
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)


def _check_workdir(workdir: pathlib.Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / '.write_probe'
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f'workdir {workdir} is not writable ({e.strerror or e}): choose another '
                       '--workdir or fix its permissions.') from None


def _check_resumed_config(saved: dict, config: ml_collections.ConfigDict, workdir) -> None:
  if saved['model']['name'] != config.model.name:
    raise checkpoints.CheckpointError(
        f'{workdir} holds a run of model {saved["model"]["name"]!r}, but config.model.name is '
        f'{config.model.name!r}: use another --workdir or the matching config.')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> TrainState:
  """Trains `config.num_epochs` epochs, validating after each; returns the final state."""
  config_checks.check(config)
  parallel.check_batch_sizes(config)
  workdir = pathlib.Path(workdir)
  _check_workdir(workdir)
  is_chief = jax.process_index() == 0

  data = pipeline.prepare(config.data, workdir)
  steps_per_epoch = pipeline.steps_per_epoch(data, config.batch_size)
  if steps_per_epoch == 0:
    raise config_checks.ConfigError(
        f'config.batch_size={config.batch_size} exceeds the {len(data.train)} training chips.')
  bands = registry.input_bands(config.model.name)

  kind = config.parallel if jax.device_count() > 1 else 'jit'
  model = create_model(config, axis_name=parallel.AXIS_NAME if kind == 'pmap' else None)
  learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch)
  state = create_train_state(jax.random.key(config.seed), config, model,
                             config.data.crop_size, learning_rate_fn)
  if is_chief:
    print(f'Parameters of {config.model.name}:\n'
          f'{parameter_overview.get_parameter_overview(state.params, include_stats=False)}')

  loader = pipeline.train_loader(
      data, batch_size=config.batch_size // jax.process_count(), crop_size=config.data.crop_size,
      bands=bands, seed=config.seed, num_workers=config.data.num_workers,
      shard_index=jax.process_index(), shard_count=jax.process_count())
  train_iter = iter(loader)

  manager = checkpoints.create_manager(workdir)
  progress = {'history': [], 'epoch_loss_total': 0.0, 'epoch_loss_count': 0}
  restored = checkpoints.restore_latest(
      manager, _abstract(state), lambda saved: _check_resumed_config(saved, config, workdir))
  if restored is not None:
    state = restored.state
    train_iter.set_state(restored.data_state)
    progress = restored.progress
    print(f'Resumed from step {restored.step} ({manager.directory}).')

  runner = parallel.create_runner(
      kind, train_step, functools.partial(eval_step, flips=config.eval.flips))
  state = runner.put_state(state)
  step = int(runner.get_state(state).step)
  writer = _summary_writer(workdir / 'tensorboard') if is_chief else None

  def save(best_metric=None):
    checkpoints.save(manager, step, state=jax.device_get(runner.get_state(state)),
                     data_state=train_iter.get_state(), progress=progress, config=config,
                     metrics=best_metric)

  def write_history():
    if is_chief:  # also after a resume: a kill may have come between checkpoint and file
      files.write_json(workdir / HISTORY_FILE,
                       {'model': config.model.name, 'epochs': progress['history']})

  def stopped(signal_name):
    return TrainingStopped(f'{signal_name} received: saved step {step} in {manager.directory}. '
                           'Rerun the same command to resume exactly from there.')

  write_history()

  with _stop_requests() as stop:
    for epoch in range(step // steps_per_epoch, config.num_epochs):
      epoch_end = (epoch + 1) * steps_per_epoch
      loss_sum = clu_metrics.Average(total=jnp.float32(progress['epoch_loss_total']),
                                     count=jnp.int32(progress['epoch_loss_count']))
      first_step, start = step, time.perf_counter()
      bar = tqdm.tqdm(total=steps_per_epoch, initial=step - epoch * steps_per_epoch,
                      desc=f'epoch {epoch + 1}/{config.num_epochs}', unit='step',
                      file=sys.stderr, disable=not is_chief, mininterval=1.0, dynamic_ncols=True)
      while step < epoch_end:
        state, loss = runner.train_step(state, runner.put_batch(next(train_iter)))
        loss_sum = loss_sum.merge(clu_metrics.Average(total=loss, count=jnp.int32(1)))
        step += 1
        bar.update()
        mid_epoch_save = (config.checkpoint_every_steps and step < epoch_end
                          and step % config.checkpoint_every_steps == 0)
        if step % config.log_every_steps == 0 or mid_epoch_save or stop or step == epoch_end:
          progress['epoch_loss_total'] = float(loss_sum.total)
          progress['epoch_loss_count'] = int(loss_sum.count)
          mean_loss = progress['epoch_loss_total'] / progress['epoch_loss_count']
          if not math.isfinite(mean_loss):
            raise NonFiniteLossError(
                f'The training loss became {mean_loss} by step {step} (epoch {epoch + 1}); '
                f'nothing was saved after it. The last good checkpoint (step '
                f'{manager.latest_step()}) is intact in {manager.directory}: lower '
                '--config.optim.lr or check the input data, then rerun to resume from it.')
          bar.set_postfix(loss=f'{mean_loss:.4f}', refresh=False)
          if stop and step < epoch_end:
            save()
            bar.close()
            raise stopped(stop[0])
          if mid_epoch_save:
            save()
      bar.close()
      seconds = time.perf_counter() - start

      scores, labels, val_loss = predict(runner, state, pipeline.eval_batches(
          data, 'validation', batch_size=config.eval_batch_size,
          eval_size=config.data.eval_size, bands=bands))
      ap = metrics.average_precision(labels, scores)
      record = {
          'epoch': epoch + 1,
          'step': step,
          'train_loss': progress['epoch_loss_total'] / progress['epoch_loss_count'],
          'val_loss': val_loss,
          'val_map': metrics.mean_average_precision(labels, scores),
          'val_ap': _finite_or_none(ap),
          'lr': float(learning_rate_fn(epoch * steps_per_epoch)),
          'train_images_per_s': (step - first_step) * config.batch_size / seconds,
          'epoch_seconds': seconds,
      }
      progress = {'history': progress['history'] + [record], 'epoch_loss_total': 0.0,
                  'epoch_loss_count': 0}
      save({checkpoints.BEST_METRIC: record['val_map']})
      write_history()
      if is_chief:
        for key in ('train_loss', 'val_loss', 'val_map', 'lr', 'train_images_per_s'):
          writer.add_scalar(key, record[key], step)
        for tag, value in zip(planet.TAGS, ap):
          if math.isfinite(value):
            writer.add_scalar(f'val_ap/{tag}', value, step)
        writer.flush()
        print(f'epoch {epoch + 1}/{config.num_epochs}  train_loss {record["train_loss"]:.4f}  '
              f'val_loss {val_loss:.4f}  val_mAP {record["val_map"]:.4f}  lr {record["lr"]:.3g}  '
              f'{record["train_images_per_s"]:.1f} img/s  {seconds:.1f} s', flush=True)
      if stop:
        raise stopped(stop[0])

  if writer is not None:
    writer.close()
  manager.close()
  return runner.get_state(state)
