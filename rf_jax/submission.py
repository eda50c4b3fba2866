"""The Kaggle submission: the test chips scored by the evaluated checkpoint, tags at its thresholds.

The test scores are kept beside it (eval/test_predictions.npz): an ensemble (ensemble.py)
averages its members' without their models.
"""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import numpy as np

from rf_jax import checkpoints
from rf_jax import config_checks
from rf_jax import evaluate
from rf_jax import inputs
from rf_jax import metrics
from rf_jax import workdir as workdir_lib
from rf_jax.data import planet


def tuned_thresholds(wd: workdir_lib.Workdir, step: int) -> np.ndarray:
  """The per-tag F2 thresholds that `--mode evaluate` tuned for checkpoint `step`."""
  if not wd.metrics.is_file():
    raise workdir_lib.MissingRunFileError(
        f'{wd.metrics} not found: run --mode evaluate first (it tunes the per-tag thresholds '
        'the submission uses).')
  summary = workdir_lib.read_json(wd.metrics)
  if summary.get('step') != step:
    raise checkpoints.CheckpointError(
        f'{wd.metrics} was computed at step {summary.get("step")}, the checkpoint is step '
        f'{step}: run --mode evaluate again first.')
  return np.asarray([summary['thresholds'][t] for t in planet.TAGS])


def predicted_tags(row) -> str:
  """The tags set in one row of binarized predictions, space-separated (Kaggle's `tags`)."""
  return ' '.join(t for t, on in zip(planet.TAGS, row) if on)


def write_submission(path: pathlib.Path, names, predicted: np.ndarray) -> None:
  """Kaggle's format: `image_name,tags` with the predicted tags space-separated."""
  workdir_lib.write_csv(path, ['image_name', 'tags'],
            ([name, predicted_tags(row)] for name, row in zip(names, predicted)))


def predict_test(config: ml_collections.ConfigDict, workdir, data=None,
                 runner=None) -> pathlib.Path:
  """Writes the submission for the test chips with the thresholds tuned at evaluation, and
  their scores (eval/test_predictions.npz: names, scores, step).
  `runner`: the run's steps when the caller already built them (runner.for_config)."""
  config_checks.check(config)
  wd = workdir_lib.Workdir(workdir)
  state, restored = evaluate.restore_model(config, wd)
  thresholds = tuned_thresholds(wd, restored.step)
  data = data or inputs.prepare(config, wd)
  if data.test is None:
    raise planet.PlanetDataError(
        f'No test chips in the prepared dataset ({data.data_dir}): put the Kaggle test-tif-v2 '
        'folder in config.data.raw_dir and prepare again.')
  scores, _, _ = evaluate.make_predict_fn(config, data, state, runner)(
      inputs.eval_batches(config, data, 'test'))
  if jax.process_index() != 0:  # every process predicts its part; process 0 writes
    return wd.submission
  workdir_lib.write_npz(wd.test_predictions, {'names': np.asarray(data.names['test']),
                                               'scores': scores.astype(np.float32),
                                               'step': np.int64(restored.step)})
  write_submission(wd.submission, data.names['test'], metrics.binarize(scores, thresholds))
  print(f'{wd.submission}: {len(scores)} test chips, thresholds from {wd.metrics}.')
  return wd.submission
