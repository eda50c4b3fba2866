"""The pure steps of training and evaluation, shared by the training loop and evaluation.

In the shape of the Flax ImageNet example: `create_learning_rate_fn`, `create_train_state`,
`train_step`, `eval_step` (on the model's input); `create_runner`, which lays them over the
devices with the input made from raw chips inside the step (rf_jax/augment.py); and `predict`,
which runs the eval step over batches and drops padding rows.
"""

from collections.abc import Callable, Iterator
import ctypes
import functools
from typing import Any

from clu import metrics as clu_metrics
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rf_jax import augment
from rf_jax import parallel


class TrainState(train_state.TrainState):
  batch_stats: Any


# The builders below are memoised: equal arguments in one process (a sweep, a notebook, the
# tests) get the same functions back, so jit finds the programs it already traced and compiled
# (a ResNet-18 step costs 20-60 s to trace and compile on a small CPU) instead of redoing them.
_MEMO = functools.lru_cache(maxsize=32)


@_MEMO
def create_learning_rate_fn(lr: float, decay_epochs: int, decay_rate: float,
                            steps_per_epoch: int) -> optax.Schedule:
  """StepLR: the rate drops by `decay_rate` every `decay_epochs` epochs."""
  return optax.exponential_decay(init_value=lr, transition_steps=decay_epochs * steps_per_epoch,
                                 decay_rate=decay_rate, staircase=True)


@_MEMO
def create_optimizer(learning_rate_fn: optax.Schedule,
                     momentum: float) -> optax.GradientTransformation:
  """The study's optimiser: SGD with momentum on the schedule."""
  return optax.sgd(learning_rate_fn, momentum=momentum)


@_MEMO
def _jitted_init(model) -> Callable:
  return jax.jit(functools.partial(model.init, train=False))


def init_variables(model, rng: jax.Array, image_size: int, channels: int) -> dict:
  """The model's freshly initialised {'params', 'batch_stats'}."""
  dummy = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  return _jitted_init(model)(rng, dummy)


def create_train_state(variables: dict, model, tx: optax.GradientTransformation) -> TrainState:
  state = TrainState.create(apply_fn=model.apply, params=variables['params'],
                            batch_stats=variables['batch_stats'], tx=tx)
  _release_freed_heap()
  return state


def eval_state(variables: dict, model, step: int) -> TrainState:
  """A state that only evaluates: the variables, no optimiser."""
  return TrainState(step=step, apply_fn=model.apply, params=variables['params'],
                    batch_stats=variables['batch_stats'], tx=None, opt_state=None)


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


def _positions(rows: int, axis_name: str | None) -> jax.Array:
  """Each example's index in the global batch (under pmap a device holds one slice of it)."""
  first = 0 if axis_name is None else jax.lax.axis_index(axis_name) * rows
  return first + jnp.arange(rows)


def _rows(batch: dict) -> tuple[jax.Array, jax.Array]:
  """The raw chips and labels of a batch as fed, or gathered from the split held on device."""
  if 'cache' in batch:
    take = lambda x: jnp.take(x, batch['index'], axis=0, mode='fill', fill_value=0)
    return take(batch['cache']['image']), take(batch['cache']['labels'])
  return batch['image'], batch['labels']


def preprocessed_train_step(state: TrainState, batch: dict, preprocess: augment.Preprocess,
                            axis_name: str | None = None):
  """train_step on raw chips: the input drawn from (seed, state.step, position in the batch)."""
  chips, labels = _rows(batch)
  image = augment.train_input(preprocess, chips, state.step,
                              _positions(chips.shape[0], axis_name))
  return train_step(state, {'image': image, 'labels': labels}, axis_name)


def preprocessed_eval_step(state: TrainState, batch: dict, preprocess: augment.Preprocess | None,
                           flips: bool = False) -> dict:
  """eval_step on raw chips (`preprocess` None: on the model's input), its outputs with the
  labels and the batch's mask, so that every process gets all of them back (predict)."""
  chips, labels = _rows(batch)
  image = chips if preprocess is None else augment.eval_input(preprocess, chips)
  out = {**eval_step(state, {'image': image, 'labels': labels}, flips), 'labels': labels}
  if 'mask' in batch:
    out['mask'] = batch['mask']
  return out


def create_runner(kind: str, flips: bool, preprocess: augment.Preprocess | None = None,
                  devices=None) -> parallel.Runner:
  """The train and eval steps laid over `devices` (default: all) as `kind` (parallel.KINDS),
  taking raw chips made into the model's input by `preprocess` (None: batches are the model's
  input)."""
  return _create_runner(kind, flips, preprocess, None if devices is None else tuple(devices))


@_MEMO
def _create_runner(kind, flips, preprocess, devices) -> parallel.Runner:
  train = (train_step if preprocess is None
           else functools.partial(preprocessed_train_step, preprocess=preprocess))
  return parallel.create_runner(
      kind, train, functools.partial(preprocessed_eval_step, preprocess=preprocess, flips=flips),
      devices)


# (scores [N, 17], labels [N, 17], mean loss) over every unpadded chip of some batches.
Predictions = tuple[np.ndarray, np.ndarray, float]
PredictFn = Callable[[Iterator[dict]], Predictions]


def predict(runner: parallel.Runner, state: TrainState, batches: Iterator[dict]) -> Predictions:
  """Scores, labels and mean loss over every unpadded chip of the global `batches`, in order
  (each process feeds its slice of every batch and gets all of them back)."""
  scores, labels = [], []
  loss = None
  for batch in batches:
    out = jax.tree.map(np.asarray, runner.get_outputs(runner.eval_step(state,
                                                                       runner.put_batch(batch))))
    keep = out['mask'] > 0
    scores.append(out['scores'][keep])
    labels.append(out['labels'][keep])
    update = clu_metrics.Average.from_model_output(jnp.asarray(out['loss']),
                                                   mask=jnp.asarray(out['mask']))
    loss = update if loss is None else loss.merge(update)
  return np.concatenate(scores), np.concatenate(labels), float(loss.compute())
