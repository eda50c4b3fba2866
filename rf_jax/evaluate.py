"""Evaluation: restore a checkpoint, predict, check the reproduction, report; Kaggle submission.

`evaluate` is the study's reproduction routine: it restores the best-by-mAP
checkpoint (or `config.eval.step`), recomputes the validation scores, and when
`eval/predictions.npz` already holds scores of the same checkpoint it compares
the two and says plainly whether the run reproduces. Saved predictions are
never overwritten by different ones: a non-reproducing rerun is written beside
them.
"""

import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rf_jax import checkpoints
from rf_jax import config_checks
from rf_jax import files
from rf_jax import metrics
from rf_jax import parallel
from rf_jax import report
from rf_jax import train
from rf_jax.data import pipeline
from rf_jax.data import planet
from rf_jax.models import registry

EVAL_DIR = 'eval'
PREDICTIONS = 'predictions.npz'
METRICS = 'metrics.json'
SUBMISSION = 'submission.csv'


def restore_model(config: ml_collections.ConfigDict, workdir) -> tuple[train.TrainState, int]:
  """The checkpoint's variables in an eval-only state for `config.model`; its step."""
  restored = checkpoints.restore_for_evaluation(workdir, config.eval.step)
  saved_model = restored.config.get('model', {}).get('name')
  if saved_model != config.model.name:
    raise checkpoints.CheckpointError(
        f'The checkpoint at step {restored.step} in {workdir} is of model {saved_model!r}, '
        f'but config.model.name is {config.model.name!r}: evaluate with the config it was '
        'trained with.')
  model = train.create_model(config)
  channels = len(registry.input_bands(config.model.name))
  size = config.data.eval_size
  expected = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jnp.zeros((1, size, size, channels)))
  variables = {k: restored.state[k] for k in ('params', 'batch_stats')}
  _check_same_tree(variables, expected, workdir, restored.step)
  state = train.TrainState(step=restored.step, apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables['batch_stats'], tx=None, opt_state=None)
  return state, restored.step


def _check_same_tree(found, expected, workdir, step) -> None:
  flat = lambda tree: {jax.tree_util.keystr(k): np.shape(v)
                       for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  found, expected = flat(found), flat(expected)
  problems = [f'{name}: expected {expected.get(name, "nothing")}, found {found.get(name, "nothing")}'
              for name in sorted(found.keys() | expected.keys())
              if found.get(name) != expected.get(name)]
  if problems:
    raise checkpoints.CheckpointError(
        f'The checkpoint at step {step} in {workdir} does not fit this model:\n  '
        + '\n  '.join(problems[:20]) + (f'\n  ... and {len(problems) - 20} more'
                                         if len(problems) > 20 else ''))


def _predict_split(config, state, data, split: str):
  runner = parallel.create_runner(
      'jit', train.train_step, functools.partial(train.eval_step, flips=config.eval.flips))
  batches = pipeline.eval_batches(data, split, batch_size=config.eval_batch_size,
                                  eval_size=config.data.eval_size,
                                  bands=registry.input_bands(config.model.name))
  return train.predict(runner, runner.put_state(state), batches)


# Scores must match to about float32 rounding of a probability: bit-exact on the same
# machine and software, within this on another (different XLA kernels sum differently).
REPRODUCTION_TOLERANCE = 1e-6


def compare_predictions(previous: dict, current: dict) -> dict:
  """How far the current scores are from the saved ones (same chips, same order)."""
  if list(previous['names']) != list(current['names']):
    return {'reproduces': False, 'exact': False,
            'reason': 'the saved predictions are for other chips (or another order)'}
  diff = np.abs(np.asarray(previous['scores'], np.float64) - current['scores'])
  ap_diff = (metrics.average_precision(current['labels'], current['scores'])
             - metrics.average_precision(previous['labels'], previous['scores']))
  return {
      'max_abs_score_difference': float(diff.max()),
      'max_abs_ap_difference': float(np.nanmax(np.abs(ap_diff))) if np.isfinite(ap_diff).any()
                               else 0.0,
      'ap_difference': {t: (None if not np.isfinite(d) else float(d))
                        for t, d in zip(planet.TAGS, ap_diff)},
      'exact': bool(diff.max() == 0),
      'reproduces': bool(diff.max() <= REPRODUCTION_TOLERANCE),
  }


def _load_predictions(path: pathlib.Path) -> dict | None:
  if not path.is_file():
    return None
  with np.load(path, allow_pickle=False) as saved:
    return {k: saved[k] for k in saved.files}


def evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
  """Restores, predicts the validation split, checks reproduction, writes metrics and report."""
  config_checks.check(config)
  workdir = pathlib.Path(workdir)
  state, step = restore_model(config, workdir)
  data = pipeline.prepare(config.data, workdir)
  scores, labels, loss = _predict_split(config, state, data, 'validation')
  current = {'names': np.asarray(data.names['validation']), 'labels': labels,
             'scores': scores.astype(np.float32), 'step': np.int64(step)}

  out = workdir / EVAL_DIR
  out.mkdir(parents=True, exist_ok=True)
  path = out / PREDICTIONS
  previous = _load_predictions(path)
  reproduction = None
  if previous is not None and int(previous.get('step', -1)) == step:
    reproduction = compare_predictions(previous, current)
    if reproduction['reproduces']:
      verdict = ('REPRODUCED exactly' if reproduction['exact'] else
                 'REPRODUCED within float rounding')
      print(f'{verdict}: step {step}, max |score difference| '
            f'{reproduction["max_abs_score_difference"]:.3g}, max |AP difference| '
            f'{reproduction["max_abs_ap_difference"]:.3g} (saved: {path}).')
    else:
      path = out / 'predictions.rerun.npz'
      reason = reproduction.get('reason') or (
          f'max |score difference| {reproduction["max_abs_score_difference"]:.3g}, '
          f'max |AP difference| {reproduction["max_abs_ap_difference"]:.3g}')
      print(f'NOT REPRODUCED: step {step} now scores differently from the saved predictions '
            f'({reason}). The saved ones are kept; this run is in {path}.')
      files.write_npz(path, current)
  else:
    if previous is not None:  # another checkpoint's scores: keep them under their step
      os.replace(path, out / f'predictions.step{int(previous.get("step", -1))}.npz')
    files.write_npz(path, current)

  summary = report.metrics_summary(labels, scores, planet.TAGS, model=config.model.name,
                                   loss=loss, step=step, flips=bool(config.eval.flips),
                                   reproduction=reproduction)
  files.write_json(out / METRICS, summary)
  history = report.read_history(workdir / train.HISTORY_FILE)
  names = list(data.names['validation'])
  index = {name: i for i, name in enumerate(names)}
  load_rgb = lambda name: data.validation[index[name]]['image'][..., :3]
  md = report.write_report(workdir, history=history, predictions=current, tags=planet.TAGS,
                           load_rgb=load_rgb, top_n=config.eval.top_n,
                           thresholds=[summary['thresholds'][t] for t in planet.TAGS],
                           loss=loss, model=config.model.name)
  print(f'step {step}: val mAP {summary["map"]:.4f}, F2 {summary["f2_at_0.5"]:.4f} at 0.5, '
        f'{summary["f2_tuned"]:.4f} tuned; report: {md}')
  return summary


def has_test_chips(config: ml_collections.ConfigDict, workdir) -> bool:
  return pipeline.prepare(config.data, workdir).test is not None


def predict_test(config: ml_collections.ConfigDict, workdir) -> pathlib.Path:
  """Kaggle submission for the test chips with the thresholds tuned at evaluation."""
  config_checks.check(config)
  workdir = pathlib.Path(workdir)
  state, step = restore_model(config, workdir)
  metrics_path = workdir / EVAL_DIR / METRICS
  if not metrics_path.is_file():
    raise FileNotFoundError(f'{metrics_path} not found: run --mode evaluate first (it tunes the '
                            'per-tag thresholds the submission uses).')
  summary = json.loads(metrics_path.read_text())
  if summary.get('step') != step:
    raise checkpoints.CheckpointError(
        f'{metrics_path} was computed at step {summary.get("step")}, the checkpoint is step '
        f'{step}: run --mode evaluate again first.')
  data = pipeline.prepare(config.data, workdir)
  if data.test is None:
    raise planet.PlanetDataError(
        f'No test chips in the prepared dataset ({data.data_dir}): put the Kaggle test-tif-v2 '
        'folder in config.data.raw_dir and prepare again.')
  scores, _, _ = _predict_split(config, state, data, 'test')
  thresholds = np.asarray([summary['thresholds'][t] for t in planet.TAGS])
  predicted = metrics.binarize(scores, thresholds)
  lines = ['image_name,tags'] + [
      f'{name},{" ".join(t for t, on in zip(planet.TAGS, row) if on)}'
      for name, row in zip(data.names['test'], predicted)]
  path = workdir / SUBMISSION
  files.write_text(path, '\n'.join(lines) + '\n')
  print(f'{path}: {len(lines) - 1} test chips, thresholds from {metrics_path}.')
  return path
