"""Scores of every chip of some batches, through a runner's eval step.

Evaluation, the submission and chip scoring are handed a `PredictFn` (`predict_fn`): they
never build steps of their own, nor import the training loop.
"""

from collections.abc import Callable, Iterable

import jax
import numpy as np

from rf_jax import parallel
from rf_jax import prefetch
from rf_jax import steps

# (scores [N, 17], labels [N, 17], mean loss) over every unpadded chip of some batches.
Predictions = tuple[np.ndarray, np.ndarray, float]
PredictFn = Callable[[Iterable[dict]], Predictions]


def predict(runner: parallel.Runner, state: steps.TrainState,
            batches: Iterable[dict]) -> Predictions:
  """Scores, labels and mean loss over every unpadded chip of the global `batches`, in order
  (each process feeds its slice of every batch and gets all of them back)."""
  scores, labels, losses = [], [], []

  def collect(outputs) -> None:
    out = jax.tree.map(np.asarray, runner.get_outputs(outputs))
    keep = out['mask'] > 0
    scores.append(out['scores'][keep])
    labels.append(out['labels'][keep])
    losses.append(out['loss'][keep])

  pending = None
  for placed in prefetch.Prefetched(batches, runner.put_batch):
    outputs = runner.eval_step(state, placed)  # dispatched: the device starts on it now
    if pending is not None:
      collect(pending)  # the previous batch's outputs, read while this one computes
    pending = outputs
  if pending is not None:
    collect(pending)
  return (np.concatenate(scores), np.concatenate(labels),
          float(np.concatenate(losses).astype(np.float64).mean()))


def predict_fn(runner: parallel.Runner, state: steps.TrainState) -> PredictFn:
  """`predict` with this runner and state (placed on the devices once)."""
  placed = runner.put_state(state)
  return lambda batches: predict(runner, placed, batches)
