"""The pure steps of training and evaluation, shared by the training loop and evaluation.

In the shape of the Flax ImageNet example: `create_learning_rate_fn`, `create_train_state`,
`train_step`, `eval_step`; plus `predict`, which runs an eval step over batches through a
`parallel.Runner` and drops padding rows.
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

from rf_jax import parallel


class TrainState(train_state.TrainState):
  batch_stats: Any


def create_learning_rate_fn(lr: float, decay_epochs: int, decay_rate: float,
                            steps_per_epoch: int) -> optax.Schedule:
  """StepLR: the rate drops by `decay_rate` every `decay_epochs` epochs."""
  return optax.exponential_decay(init_value=lr, transition_steps=decay_epochs * steps_per_epoch,
                                 decay_rate=decay_rate, staircase=True)


def init_variables(model, rng: jax.Array, image_size: int, channels: int) -> dict:
  """The model's freshly initialised {'params', 'batch_stats'}."""
  dummy = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  return jax.jit(functools.partial(model.init, train=False))(rng, dummy)


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


def create_runner(kind: str, flips: bool) -> parallel.Runner:
  """The train and eval steps laid over the devices as `kind` (parallel.KINDS)."""
  return parallel.create_runner(kind, train_step, functools.partial(eval_step, flips=flips))


# (scores [N, 17], labels [N, 17], mean loss) over every unpadded chip of some batches.
Predictions = tuple[np.ndarray, np.ndarray, float]
PredictFn = Callable[[Iterator[dict]], Predictions]


def predict(runner: parallel.Runner, state: TrainState, batches: Iterator[dict]) -> Predictions:
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
