"""Ensembles: the mean of several evaluated runs' probabilities, without their models.

`--mode ensemble --members A,B,... --workdir E` reads each member's eval/predictions.npz (its
validation scores, from --mode evaluate) and eval/test_predictions.npz (its test scores, written
with its submission), averages the probabilities chip by chip (matched by name), tunes the
per-tag F2 thresholds on the averaged validation scores, and writes E's eval/ (predictions.npz,
test_predictions.npz, metrics.json), report/ and submission.csv. Numpy and files only: the
members must have scored the same validation chips and the same test chips, with rf_jax's tags.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from rf_jax import bootstrap
from rf_jax import comparison
from rf_jax import errors
from rf_jax import metrics
from rf_jax import report
from rf_jax import submission
from rf_jax import workdir as workdir_lib
from rf_jax.data import planet


class EnsembleError(errors.UserError, ValueError):
  """The --members cannot be averaged (fewer than two, the ensemble's own workdir, other tags,
  other chips, test scores of another checkpoint); the message names the member."""


@dataclasses.dataclass(frozen=True)
class Member:
  """One member's saved results, its chips in name order."""
  root: Path
  summary: dict  # its eval/metrics.json
  validation: dict  # names, labels, scores
  test: dict  # names, scores


def _read_scores(path: Path, keys: tuple[str, ...], fix: str) -> dict:
  """The arrays `keys` of a member's .npz (and its step, -1 when it records none), sorted by
  chip name."""
  saved = workdir_lib.read_npz(path)
  if saved is None:
    raise workdir_lib.MissingRunFileError(f'{path} not found: {fix}')
  lacking = [k for k in keys if k not in saved]
  if lacking:
    raise workdir_lib.MissingRunFileError(f'{path} holds no {", ".join(lacking)}: {fix}')
  if saved['scores'].shape != (len(saved['names']), len(planet.TAGS)):
    raise workdir_lib.DamagedRunFileError(
        f'{path}: scores of shape {saved["scores"].shape} for {len(saved["names"])} chips and '
        f'{len(planet.TAGS)} tags: {fix}')
  order = np.argsort(saved['names'], kind='stable')
  return {**{k: saved[k][order] for k in keys}, 'step': int(saved.get('step', -1))}


def _load_member(root: Path) -> Member:
  wd = workdir_lib.Workdir(root)
  summary = report.read_metrics(wd.metrics)
  if list(summary['ap']) != list(planet.TAGS):
    raise EnsembleError(
        f'{wd.metrics}: tags {list(summary["ap"])} differ from rf_jax\'s {list(planet.TAGS)}: run '
        f'--mode evaluate --workdir {root} again with this rf_jax, then the ensemble.')
  validation = _read_scores(wd.predictions, ('names', 'labels', 'scores'),
                            f'run --mode evaluate --workdir {root} first.')
  test = _read_scores(
      wd.test_predictions, ('names', 'scores'),
      f'{root} has no test scores: run --mode predict --workdir {root} with this rf_jax (the '
      'submission step, which --mode all runs when the dataset has test chips), then the '
      'ensemble.')
  if test['step'] != validation['step']:
    raise EnsembleError(
        f'{wd.test_predictions} holds the test scores of step {test["step"]}, '
        f'{wd.predictions} the validation scores of step {validation["step"]}: run --mode '
        f'predict --workdir {root} again, then the ensemble.')
  return Member(root, summary, validation, test)


def _difference(a: dict, b: dict) -> str:
  """How two members' chips differ, in a few words."""
  only_a = np.setdiff1d(a['names'], b['names'])
  only_b = np.setdiff1d(b['names'], a['names'])
  if only_a.size or only_b.size:
    example = lambda names: f' (e.g. {names[0]})' if names.size else ''
    return (f'{len(a["names"])} and {len(b["names"])} chips, {only_a.size} only in the first'
            f'{example(only_a)}, {only_b.size} only in the second{example(only_b)}')
  return f'the same {len(a["names"])} chip names, other labels'


def _check_same_chips(members: Sequence[Member]) -> None:
  """Refuses members evaluated on other validation chips (names and labels, as comparison.py
  decides) or scored on other test chips: their scores would not describe the same chips."""
  first = members[0]
  for m in members[1:]:
    if not comparison.same_chips(first.validation, m.validation, 'names'):
      raise EnsembleError(
          f'--members: {m.root} was evaluated on other validation chips than {first.root} '
          f'({_difference(first.validation, m.validation)}): evaluate every member on the same '
          'chips (the same config.data.raw_dir, val_fraction and split_seed), then the ensemble.')
    if not np.array_equal(first.test['names'], m.test['names']):
      raise EnsembleError(
          f'--members: {m.root} scored other test chips than {first.root} '
          f'({_difference(first.test, m.test)}): run --mode predict on every member with the same '
          'test chips, then the ensemble.')


def _mean(scores: Sequence[np.ndarray]) -> np.ndarray:
  """The mean probabilities, summed in float64, stored as the members' float32."""
  return np.mean(np.stack(scores).astype(np.float64), axis=0).astype(np.float32)


def load_members(members: Sequence, workdir) -> list[Member]:
  """Every member's saved scores, checked: two or more distinct workdirs, none the ensemble's
  own, with rf_jax's tags, the same validation and test chips. Nothing is written."""
  roots = [Path(m) for m in members]
  if len(roots) < 2:
    raise EnsembleError(f'--members names {len(roots)} workdir: an ensemble averages two or '
                        'more, e.g. --members runs/rgb,runs/dual.')
  comparison.check_workdirs(roots, '--members')
  wd = workdir_lib.Workdir(workdir)
  for root in roots:
    if root.resolve() == wd.root.resolve():
      raise EnsembleError(f'--workdir {wd.root} is the member {root}: its eval/ and '
                          'submission.csv would be replaced; give the ensemble a workdir of its '
                          'own.')
  if wd.config.is_file():
    raise EnsembleError(f'--workdir {wd.root} holds a trained run ({wd.config}): its eval/ and '
                        'submission.csv would be replaced; give the ensemble a workdir of its own.')
  loaded = [_load_member(root) for root in roots]
  _check_same_chips(loaded)
  return loaded


def write_ensemble(members: Sequence, workdir, *, resamples: int, seed: int,
                   folds: int) -> dict:
  """Averages the members' probabilities into `workdir` (module docstring); returns its
  metrics.json, with each metric's 95% bootstrap interval over the validation chips
  (`resamples` and `seed`: config.compare; `folds`: config.eval.crossfit_folds)."""
  loaded = load_members(members, workdir)
  wd = workdir_lib.Workdir(workdir)
  first = loaded[0]
  validation = {'names': first.validation['names'], 'labels': first.validation['labels'],
                'scores': _mean([m.validation['scores'] for m in loaded])}
  test = {'names': first.test['names'], 'scores': _mean([m.test['scores'] for m in loaded])}
  thresholds = metrics.tune_thresholds(validation['labels'], validation['scores'])
  models = [str(m.summary.get('model') or m.root.name) for m in loaded]
  name = f'ensemble {"+".join(models)}'
  # No loss: the members' losses came from their logits, and only probabilities are saved.
  summary = report.metrics_summary(
      validation['labels'], validation['scores'], planet.TAGS, model=name,
      thresholds=thresholds, crossfit_folds=folds, members=[{'workdir': str(m.root), 'model': model,
                                       'step': m.validation['step'], 'map': m.summary['map']}
                                      for m, model in zip(loaded, models)])
  summary['intervals'] = bootstrap.compare(
      validation['labels'], {name: validation['scores']}, planet.TAGS, resamples=resamples,
      seed=seed, folds=folds)['runs'][name]
  with workdir_lib.locked(wd):
    workdir_lib.write_npz(wd.predictions, validation)
    workdir_lib.write_npz(wd.test_predictions, test)
    workdir_lib.write_json(wd.metrics, summary)
    submission.write_submission(wd.submission, test['names'],
                                metrics.binarize(test['scores'], thresholds))
    # No chip pictures: the ensemble has no dataset of its own to read them from.
    md = report.write_report(wd.root, history=None, predictions=validation, tags=planet.TAGS,
                             load_rgb=None, thresholds=thresholds, model=name,
                             crossfit_folds=folds)
  value = lambda x: 'n/a' if x is None else f'{x:.4f}'
  each = ', '.join(f'{model} {value(m.summary["map"])}' for m, model in zip(loaded, models))
  print(f'{name}: val mAP {value(summary["map"])} (members: {each}), F2 '
        f'{value(summary["f2_tuned"])} tuned; {len(test["names"])} test chips in '
        f'{wd.submission}; report: {md}')
  return summary
