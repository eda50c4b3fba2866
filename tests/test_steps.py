"""The steps: the evaluation step's view-averaged loss where float32 probabilities saturate,
against a 50-digit reference (mpmath); a train step in bfloat16."""

import re

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

from rf_jax import steps
from rf_jax.models import registry

mpmath.mp.dps = 50


def _reference_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """[V, B, T] logits -> [B]: BCE of the mean over views of sigmoid, in 50 digits (1 - p as
  the mean of sigmoid(-x), which 50 digits still resolve at x = 1e4)."""
  sigmoid = lambda x: 1 / (1 + mpmath.exp(-mpmath.mpf(float(x))))
  out = []
  for b in range(logits.shape[1]):
    terms = []
    for t in range(logits.shape[2]):
      p = sum(sigmoid(x) for x in logits[:, b, t]) / logits.shape[0]
      not_p = sum(sigmoid(-x) for x in logits[:, b, t]) / logits.shape[0]
      y = float(labels[b, t])
      terms.append(-(y * mpmath.log(p) + (1 - y) * mpmath.log(not_p)))
    out.append(float(sum(terms) / len(terms)))
  return np.asarray(out)


# Logits whose float32 sigmoid is exactly 1.0 or 0.0 (|x| > ~17 and ~104), mixed with ordinary
# ones; labels both right and wrong about them.
LOGITS = np.asarray([[[40.0, -40.0, 3.0, 120.0], [-200.0, 0.5, 1e4, -1e4]],
                     [[35.0, -90.0, -2.0, 110.0], [-150.0, 60.0, 1e4, -3.0]]], np.float32)
LABELS = np.asarray([[1, 0, 1, 0], [1, 1, 0, 0]], np.float32)


def test_averaged_loss_is_finite_and_exact_where_probabilities_saturate():
  assert np.any(jax.nn.sigmoid(LOGITS).mean(axis=0) == 1.0)  # the case the old formula lost
  got = np.asarray(steps.averaged_sigmoid_bce(jnp.asarray(LOGITS), jnp.asarray(LABELS)))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, _reference_loss(LOGITS, LABELS), rtol=1e-6)


def test_one_view_is_the_plain_loss():
  got = steps.averaged_sigmoid_bce(jnp.asarray(LOGITS[:1]), jnp.asarray(LABELS))
  np.testing.assert_allclose(got, steps.sigmoid_bce(jnp.asarray(LOGITS[0]), LABELS), rtol=1e-6)


def test_eval_step_with_flip_scores_and_loss_the_averaged_views():
  """A model whose logits are its input's first row: the mirror image reverses the tags."""
  image = jnp.asarray(LOGITS[0])[:, None, :, None]  # [B, 1, T, 1]
  state = steps.TrainState(step=0, apply_fn=lambda v, x, train: x[:, 0, :, 0], params={},
                           batch_stats={}, tx=None, opt_state=None)
  out = jax.jit(steps.eval_step, static_argnames='tta')(
      state, {'image': image, 'labels': jnp.asarray(LABELS)}, tta='flip')
  views = np.stack([LOGITS[0], LOGITS[0][:, ::-1]])
  want = 1 / (1 + np.exp(-np.clip(views.astype(np.float64), -700, 700)))
  np.testing.assert_allclose(out['scores'], want.mean(0), rtol=1e-6, atol=1e-30)
  np.testing.assert_allclose(out['loss'], _reference_loss(views, LABELS), rtol=1e-6)


@pytest.mark.parametrize('tta', ['none', 'flip'])  # dihedral8: tests/test_tta.py
def test_eval_step_loss_matches_its_scores(tta):
  """The loss describes the scores reported: BCE of `scores`, where they are not saturated."""
  logits = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32) * 3
  labels = (np.random.default_rng(1).random((3, 5)) < 0.5).astype(np.float32)
  state = steps.TrainState(step=0, apply_fn=lambda v, x, train: x[:, 0, :, 0], params={},
                           batch_stats={}, tx=None, opt_state=None)
  out = steps.eval_step(state, {'image': jnp.asarray(logits)[:, None, :, None],
                                'labels': jnp.asarray(labels)}, tta=tta)
  p = np.asarray(out['scores'], np.float64)
  want = -(labels * np.log(p) + (1 - labels) * np.log1p(-p)).mean(axis=-1)
  np.testing.assert_allclose(out['loss'], want, rtol=1e-5)


def test_bfloat16_training_computes_in_bfloat16_and_keeps_float32_state():
  """config.dtype='bfloat16' trained as the trainer does (the tiny rgb model, 96 px, batch 8):
  every convolution JAX hands XLA takes bf16 operands (XLA:CPU then computes them in float32 on
  the bf16-rounded values; a GPU in bf16), while parameters, BatchNorm statistics, optimiser
  state, logits and loss stay float32, and the losses track a float32 run: closer than 2%, yet
  further apart than float32 round-off (~1e-7), which a run ignoring the dtype would be."""
  rng = np.random.default_rng(0)
  batches = [{'image': jnp.asarray(rng.standard_normal((8, 96, 96, 3)), jnp.float32),
              'labels': jnp.asarray(rng.random((8, 17)) < 0.3, jnp.float32)} for _ in range(3)]
  model = lambda dtype: registry.create_model('rgb', num_classes=17, dtype=dtype, width=8)
  variables = steps.init_variables(model(jnp.float32), jax.random.key(0), 96, 3)
  tx = steps.create_optimizer(steps.create_learning_rate_fn(0.005, 10, 0.3, 5), 0.9)
  losses, convolutions = {}, {}
  for dtype in (jnp.float32, jnp.bfloat16):
    state = steps.create_train_state(variables, model(dtype), tx)
    step = jax.jit(steps.train_step)
    # Each convolution's operand types: `: (tensor<...xT>, tensor<...xT>) -> ...`.
    convolutions[dtype] = re.findall(r'stablehlo\.convolution.*: \(tensor<\S+x(\w+)>, tensor<\S+x(\w+)>\)',
                                     step.lower(state, batches[0]).as_text())
    losses[dtype] = []
    for batch in batches:
      state, metrics = step(state, batch)
      losses[dtype].append(float(metrics['loss']))
      assert metrics['loss'].dtype == jnp.float32
    dtypes = {leaf.dtype for leaf in jax.tree.leaves((state.params, state.batch_stats,
                                                      state.opt_state))}
    assert dtypes == {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}  # int32: the step counts
    logits = jax.eval_shape(state.apply_fn, {'params': state.params,
                                             'batch_stats': state.batch_stats},
                            batches[0]['image'])
    assert logits.dtype == jnp.float32
  assert len(convolutions[jnp.float32]) == len(convolutions[jnp.bfloat16]) == 59  # fwd + bwd
  assert set(convolutions[jnp.float32]) == {('f32', 'f32')}
  assert set(convolutions[jnp.bfloat16]) == {('bf16', 'bf16')}
  f32, bf16 = np.asarray(losses[jnp.float32]), np.asarray(losses[jnp.bfloat16])
  print(f'\nlosses float32 {f32}, bfloat16 {bf16}')
  np.testing.assert_allclose(bf16, f32, rtol=2e-2)
  assert np.all(np.abs(bf16 - f32) > 1e-5 * f32)
