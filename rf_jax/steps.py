"""The pure steps of training and evaluation, in the shape of the Flax ImageNet example.

`create_learning_rate_fn`, `create_optimizer`, `init_variables`, `create_train_state`;
`train_step` (returns the new state and its metrics: loss, gradient norm, parameter norm) and
`eval_step` on the model's input, its probabilities averaged over views of it (`TTA_CHOICES`);
`preprocessed_train_step` / `preprocessed_eval_step`, the same on chips as stored, the input
made on the device first (rf_jax/augment.py). How they are laid over devices is runner.py's;
the prediction loop is predict.py's.
"""

from typing import Any

from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

from rf_jax import augment


class TrainState(train_state.TrainState):
  batch_stats: Any


def create_learning_rate_fn(lr: float, decay_epochs: int, decay_rate: float,
                            steps_per_epoch: int) -> optax.Schedule:
  """StepLR: the rate drops by `decay_rate` every `decay_epochs` epochs."""
  return optax.exponential_decay(init_value=lr, transition_steps=decay_epochs * steps_per_epoch,
                                 decay_rate=decay_rate, staircase=True)


def create_optimizer(learning_rate_fn: optax.Schedule,
                     momentum: float) -> optax.GradientTransformation:
  """The study's optimiser: SGD with momentum on the schedule."""
  return optax.sgd(learning_rate_fn, momentum=momentum)


def init_variables(model, rng: jax.Array, image_size: int, channels: int) -> dict:
  """The model's freshly initialised {'params', 'batch_stats'} (jitted: op by op, a
  ResNet-18's init draws its random numbers several times slower)."""
  dummy = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  return jax.jit(lambda key, x: model.init(key, x, train=False))(rng, dummy)


def create_train_state(variables: dict, model, tx: optax.GradientTransformation) -> TrainState:
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables['batch_stats'], tx=tx)


def eval_state(variables: dict, model, step: int) -> TrainState:
  """A state that only evaluates: the variables, no optimiser."""
  return TrainState(step=step, apply_fn=model.apply, params=variables['params'],
                    batch_stats=variables['batch_stats'], tx=None, opt_state=None)


def sigmoid_bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example loss: the mean over tags of sigmoid binary cross-entropy, in >= float32."""
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  return optax.sigmoid_binary_cross_entropy(logits, labels).mean(axis=-1)


def train_step(state: TrainState, batch: dict,
               axis_name: str | None = None) -> tuple[TrainState, dict]:
  """One SGD step on the batch mean loss; returns the new state and the step's metrics:
  `loss` (the batch mean, before the update), `grad_norm` (global L2 norm of the gradient the
  update used) and `param_norm` (global L2 norm of the parameters after it)."""

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'],
        train=True, mutable=['batch_stats'])
    return sigmoid_bce(logits, batch['labels']).mean(), updates['batch_stats']

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    loss = jax.lax.pmean(loss, axis_name)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, {'loss': loss, 'grad_norm': optax.tree.norm(grads),
                 'param_norm': optax.tree.norm(state.params)}


def averaged_sigmoid_bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example loss of the probabilities averaged over views: `logits` [V, B, T] -> [B].

  The mean over tags of the binary cross-entropy of p = mean_v sigmoid(logits[v]), computed
  from log-sigmoids (log p = logsumexp_v log sigmoid(x_v) - log V, and likewise for 1 - p with
  -x): finite where p rounds to 0 or 1 in float32, where log(p) - log1p(-p) is not.
  """
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  log_views = jnp.log(logits.shape[0]).astype(logits.dtype)
  log_p = jax.nn.logsumexp(jax.nn.log_sigmoid(logits), axis=0) - log_views
  log_not_p = jax.nn.logsumexp(jax.nn.log_sigmoid(-logits), axis=0) - log_views
  return -(labels * log_p + (1 - labels) * log_not_p).mean(axis=-1)


# config.eval.tta: the views of each chip whose probabilities evaluation averages. A satellite
# chip has no "up": each of the square's 8 symmetries (dihedral8) shows the same ground.
TTA_CHOICES = ('none', 'flip', 'dihedral8')


def tta_views(images: jax.Array, tta: str) -> jax.Array:
  """The model inputs [B, H, W, C] -> the views [V, B, H, W, C] that `tta` averages: the
  images; then their horizontal mirror ('flip', V=2); then each of the two turned by 90, 180
  and 270 degrees ('dihedral8', V=8: k quarter turns of the images, then of the mirror)."""
  if tta not in TTA_CHOICES:
    raise ValueError(f'tta must be one of {TTA_CHOICES}, got {tta!r}')
  views = [images] if tta == 'none' else [images, images[:, :, ::-1]]
  if tta == 'dihedral8':
    views = [jnp.rot90(view, k, axes=(1, 2)) for view in views for k in range(4)]
  return jnp.stack(views)


def eval_step(state: TrainState, batch: dict, tta: str = 'none') -> dict:
  """Per-example sigmoid scores and loss (padding rows are masked by the caller).

  `tta` (TTA_CHOICES) other than 'none': the scores are the mean probabilities of the views
  of the model's input (`tta_views`), and the loss is that of the mean probabilities, so that
  it describes the scores reported.
  """
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  apply = lambda image: state.apply_fn(variables, image, train=False).astype(jnp.float32)
  if tta == 'none':
    logits = apply(batch['image'])
    return {'scores': jax.nn.sigmoid(logits), 'loss': sigmoid_bce(logits, batch['labels'])}
  # One view at a time: one compiled forward pass, and one view's activations in memory.
  views = jax.lax.map(apply, tta_views(batch['image'], tta))
  return {'scores': jax.nn.sigmoid(views).mean(axis=0),
          'loss': averaged_sigmoid_bce(views, batch['labels'])}


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
                            axis_name: str | None = None) -> tuple[TrainState, dict]:
  """train_step on raw chips: the input drawn from (seed, state.step, position in the batch)."""
  chips, labels = _rows(batch)
  image = augment.train_input(preprocess, chips, state.step,
                              _positions(chips.shape[0], axis_name))
  return train_step(state, {'image': image, 'labels': labels}, axis_name)


def preprocessed_eval_step(state: TrainState, batch: dict, preprocess: augment.Preprocess | None,
                           tta: str = 'none') -> dict:
  """eval_step on raw chips (`preprocess` None: on the model's input), its outputs with the
  labels and the batch's mask, so that every process gets all of them back (predict). The
  views of `tta` are those of the model's input: made after the resize and normalisation."""
  chips, labels = _rows(batch)
  image = chips if preprocess is None else augment.eval_input(preprocess, chips)
  out = {**eval_step(state, {'image': image, 'labels': labels}, tta), 'labels': labels}
  if 'mask' in batch:
    out['mask'] = batch['mask']
  return out
