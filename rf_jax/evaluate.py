"""Evaluation: restore the best checkpoint, recompute the validation scores, check, report.

The study's reproduction routine: the checkpoint of the best epoch (by `config.eval.select_by`,
or `config.eval.step`) holds that epoch's validation scores from training; evaluation restores
the model, scores the validation chips again with a predict function built from the pure steps
(it never imports the training loop), and says plainly whether the scores reproduce. Saved
predictions are never overwritten by different ones: a non-reproducing rerun is written beside
them.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rf_jax import checkpoints
from rf_jax import config_checks
from rf_jax import history
from rf_jax import inputs
from rf_jax import parallel
from rf_jax import predict
from rf_jax import provenance
from rf_jax import report
from rf_jax import reproduction
from rf_jax import runner as runner_lib
from rf_jax import steps
from rf_jax import workdir as workdir_lib
from rf_jax.data import planet
from rf_jax.models import registry


def restore_model(config: ml_collections.ConfigDict,
                  wd: workdir_lib.Workdir) -> tuple[steps.TrainState, checkpoints.Restored]:
  """The checkpoint's variables in an eval-only state for `config.model`, and the checkpoint."""
  restored = checkpoints.restore_for_evaluation(wd.checkpoints, config.eval.step,
                                                select_by=config.eval.select_by)
  where = f'The checkpoint at step {restored.step} in {wd.root}'
  checkpoints.check_model(restored.config, config.model.name, where)
  # Evaluation does not depend on the training length: only keys that change what was trained.
  config_checks.check_same_run(restored.config, config, config_checks.CHANGEABLE_KEYS, where)
  model = registry.create_model(config.model.name, num_classes=planet.NUM_TAGS,
                                dtype=jnp.dtype(config.dtype), width=config.model.width,
                                cpu_tuning=config.cpu_tuning)
  size, channels = config.data.eval_size, len(registry.input_bands(config.model.name))
  expected = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jnp.zeros((1, size, size, channels)))
  variables = {k: restored.state[k] for k in ('params', 'batch_stats')}
  _check_same_tree(variables, expected, wd.root, restored.step)
  return steps.eval_state(variables, model, restored.step), restored


def _check_same_tree(found, expected, where, step) -> None:
  flat = lambda tree: {jax.tree_util.keystr(k): np.shape(v)
                       for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  found, expected = flat(found), flat(expected)
  problems = [f'{name}: expected {expected.get(name, "nothing")}, found {found.get(name, "nothing")}'
              for name in sorted(found.keys() | expected.keys())
              if found.get(name) != expected.get(name)]
  if problems:
    raise checkpoints.CheckpointError(
        f'The checkpoint at step {step} in {where} does not fit this model:\n  '
        + '\n  '.join(problems[:20]) + (f'\n  ... and {len(problems) - 20} more'
                                         if len(problems) > 20 else ''))


def make_predict_fn(config: ml_collections.ConfigDict, data, state: steps.TrainState,
                    runner: parallel.Runner | None = None) -> predict.PredictFn:
  """Batches of `data` (inputs.eval_batches) -> (scores, labels, mean loss) with the restored
  model, over all devices, the chips preprocessed as in training. `runner`: the run's steps
  when the caller already built them (runner.for_config)."""
  if runner is None or runner_lib.layout(config) == 'pmap':  # evaluation lays out with jit
    runner = runner_lib.create_runner('jit', tta=config.eval.tta,
                                      preprocess=inputs.preprocess(config, data))
  return predict.predict_fn(runner, state)


def _summary_key(select_by: str) -> str:
  """metrics.json names a validation value as history.json does, without 'val_'."""
  return checkpoints.SELECT_BY[select_by].removeprefix('val_')


def _history_value(wd: workdir_lib.Workdir, step: int, select_by: str) -> float | None:
  """The selection value history.json recorded for `step` (None when it has none)."""
  if not wd.history.is_file():
    return None
  key = checkpoints.SELECT_BY[select_by]
  return next((r[key] for r in history.read(wd.history)['epochs'] if r['step'] == step), None)


def _tta_of(predictions: dict) -> str:
  """The eval.tta saved predictions were made with (a file from before the key: 'none')."""
  return str(predictions.get('tta', 'none'))


def _trained_tta(restored: checkpoints.Restored) -> str:
  """The eval.tta of the scores saved with a checkpoint at training."""
  return config_checks.with_defaults(restored.config)['eval']['tta']


def _check_reproduction(restored: checkpoints.Restored, current: dict,
                        previous: dict | None) -> dict | None:
  """Compares with the training-time scores of that epoch, else with saved predictions, made
  with the same test-time augmentation (another one scores differently by design)."""
  tta = str(current['tta'])
  if restored.val_scores is not None and _trained_tta(restored) == tta:
    reference, against = restored.val_scores, 'the scores saved with the checkpoint at training'
  elif (previous is not None and int(previous.get('step', -1)) == restored.step
        and _tta_of(previous) == tta):
    reference, against = previous['scores'], 'the saved predictions'
  else:
    if restored.val_scores is not None:
      print(f'No reproduction check: step {restored.step} was scored at training with '
            f'eval.tta={_trained_tta(restored)!r}, this evaluation uses {tta!r}.')
    return None
  result = reproduction.compare(reference, current['scores'], current['labels'])
  print(reproduction.verdict(result, restored.step, against))
  return result


def _save_predictions(wd: workdir_lib.Workdir, current: dict, previous: dict | None) -> None:
  """Writes eval/predictions.npz, keeping different saved scores of the same step."""
  step = int(current['step'])
  if (previous is not None and int(previous.get('step', -1)) == step
      and _tta_of(previous) != str(current['tta'])):  # the same checkpoint, other views
    os.replace(wd.predictions, wd.predictions_of_tta(step, _tta_of(previous)))
  elif previous is not None and int(previous.get('step', -1)) == step:
    same = (list(previous['names']) == list(current['names']) and reproduction.compare(
        previous['scores'], current['scores'], current['labels'])['reproduces'])
    if not same:
      workdir_lib.write_npz(wd.predictions_rerun, current)
      print(f'The saved predictions of step {step} differ from these: they are kept in '
            f'{wd.predictions}; this evaluation is in {wd.predictions_rerun}.')
      return
  elif previous is not None:  # another checkpoint's scores: keep them under their step
    os.replace(wd.predictions, wd.predictions_of_step(int(previous.get('step', -1))))
  workdir_lib.write_npz(wd.predictions, current)


def write_report(config, wd: workdir_lib.Workdir, data, current: dict, summary: dict,
                 loss: float):
  """The run's report from one evaluation's predictions and metrics (its chips drawn from
  `data`); the path of its markdown."""
  index = {name: i for i, name in enumerate(data.names['validation'])}
  return report.write_report(
      wd.root, history=history.read(wd.history) if wd.history.is_file() else None,
      predictions=current, tags=planet.TAGS,
      load_rgb=lambda name: data.validation[index[name]]['image'][..., :3],
      top_n=config.eval.top_n, thresholds=[summary['thresholds'][t] for t in planet.TAGS],
      loss=loss, model=config.model.name, crossfit_folds=config.eval.crossfit_folds)


def evaluate(config: ml_collections.ConfigDict, workdir, data=None, runner=None) -> dict:
  """Restores, predicts the validation split, checks reproduction, writes metrics and report.

  Every process predicts its part of the chips; process 0 checks and writes the results.
  `runner`: the run's steps when the caller already built them (runner.for_config).
  """
  config_checks.check(config)
  wd = workdir_lib.Workdir(workdir)
  state, restored = restore_model(config, wd)
  data = data or inputs.prepare(config, wd)
  scores, labels, loss = make_predict_fn(config, data, state, runner)(
      inputs.eval_batches(config, data, 'validation'))
  step = restored.step
  summary = report.metrics_summary(labels, scores, planet.TAGS, model=config.model.name,
                                   loss=loss, step=step, tta=config.eval.tta,
                                   crossfit_folds=config.eval.crossfit_folds)
  if jax.process_index() != 0:
    return summary
  provenance.record_invocation(wd, 'evaluate', config, data)
  current = {'names': np.asarray(data.names['validation']), 'labels': labels,
             'scores': scores.astype(np.float32), 'step': np.int64(step),
             'tta': np.asarray(config.eval.tta)}
  previous = workdir_lib.read_npz(wd.predictions)
  checked = _check_reproduction(restored, current, previous)
  if checked is not None:
    checked['history_value'] = _history_value(wd, step, config.eval.select_by)
    if checked['history_value'] is not None:
      print(f'{config.eval.select_by} of step {step}: {checked["history_value"]:.6f} in '
            f'{wd.history.name}, recomputed '
            f'{summary[_summary_key(config.eval.select_by)]:.6f}.')
  summary['reproduction'] = checked
  _save_predictions(wd, current, previous)
  workdir_lib.write_json(wd.metrics, summary)
  md = write_report(config, wd, data, current, summary, loss)
  print(f'step {step}: val mAP {summary["map"]:.4f}, F2 {summary["f2_at_0.5"]:.4f} at 0.5, '
        f'{summary["f2_tuned"]:.4f} tuned; report: {md}')
  return summary
