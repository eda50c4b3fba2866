"""Bootstrap intervals and differences of the study's metrics over the validation chips (numpy).

The chips are resampled with replacement, ``resamples`` times, from ``np.random.default_rng(seed)``
(:func:`resample_indices`); every metric is recomputed on each resample (:func:`replicates`):

* ``map``, ``ap/<tag>``: :func:`rf_jax.metrics.average_precision` of the resample. A resample
  where a tag has no positive gives that tag a NaN AP and leaves it out of that resample's mAP
  (metrics.py's convention); intervals and p-values are taken over the finite replicates only
  (``np.nanpercentile``), i.e. conditional on the tag having a positive.
* ``f2_at_0.5``; ``f2_tuned``: F2 at thresholds tuned on the resample itself (in-sample,
  optimistic); ``f2_tuned_crossfit``: :func:`rf_jax.metrics.f2_tuned_crossfit` on the resample,
  each chip keeping the fold it has among all chips, so that a chip drawn twice is never both
  tuned on and scored.

A resample is computed as chip multiplicities (counts) rather than copied rows: one sort of the
scores serves every resample, and each metric of a resample equals that of its copied rows
(metrics.py's ``*_weighted`` functions and its threshold search ``metrics._ThresholdSearch``,
which tunes all resamples together exactly as :func:`rf_jax.metrics.tune_thresholds` would on
each). Every resample gets every metric, so that all differences are paired on the same
resampled chips. The time grows with chips x resamples and is mostly the threshold searches (of
``f2_tuned`` and of the cross-fit's k folds, ~85%): 2,000 resamples of the Kaggle validation
split's 13,359 chips x 17 tags take ~12-14 s of one CPU core per run, of 400 chips ~1.3 s
(measured on a busy 2-core machine; the per-resample search before it took ~10 min and ~6 s);
fewer resamples (config.compare.resamples) cost proportionally less. Memory: a few [resamples
per pass, N] arrays (_CELLS_PER_PASS) besides the [B, N] resample indices.

Intervals are 95% percentile intervals. A resample holds ~63% distinct chips, so thresholds
tuned on it fit it more closely than thresholds tuned on the chips themselves: the replicates of
``f2_tuned`` lie above its value and those of ``f2_tuned_crossfit`` below (a percentile interval
does not correct such a bias); in a paired difference most of it cancels.

The two-sided p-value of a difference d = a - b from its replicates d_1..d_B is
``min(1, 2 min(1 + #{d_b <= 0}, 1 + #{d_b >= 0}) / (B + 1))``: the share of replicates on the
other side of 0 (ties on both sides), with the +1 correction that keeps it above 0, doubled. It is
about the smallest alpha for which the (1 - alpha) percentile interval excludes 0; its resolution
is 2 / (B + 1) (0.001 at 2,000 resamples).

Runs evaluated on the same chips are paired: both are recomputed on the same resampled chips, so
what the chips share (easy and hard chips) cancels in the difference. Runs of one model that
differ in their seed form a group (:func:`compare`'s ``groups``): a two-level bootstrap resamples
the seeds of each model with replacement, then the chips (the same resampled chips for every
model), and averages over the resampled seeds.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from rf_jax import metrics as M

METRICS = ('map', 'f2_at_0.5', 'f2_tuned', 'f2_tuned_crossfit')
LEVEL = 0.95
# Resamples x chips per pass of replicates(): its [resamples, N] arrays hold about this many cells
# (4 MiB of float64), so memory stays bounded whatever the number of resamples.
_CELLS_PER_PASS = 1 << 19


def resample_indices(num_chips: int, resamples: int, seed: int) -> np.ndarray:
  """The chips of each resample, int [resamples, num_chips], drawn with replacement."""
  if num_chips < 1 or resamples < 1:
    raise ValueError(f'need chips and resamples, got {num_chips} chips, {resamples} resamples')
  return np.random.default_rng(seed).integers(0, num_chips, (resamples, num_chips))


def _counts(indices: np.ndarray, num_chips: int, dtype=np.float64) -> np.ndarray:
  """How often each chip is drawn in each resample, [B, N]."""
  rows = np.arange(len(indices))[:, None] * num_chips
  counts = np.bincount((rows + indices).ravel(), minlength=indices.size).reshape(indices.shape)
  if np.issubdtype(dtype, np.integer) and counts.max() > np.iinfo(dtype).max:
    dtype = np.float64
  return counts.astype(dtype)


def _mean_over_tags(ap: np.ndarray) -> np.ndarray:
  """mAP of each row of ap [B, K]: over the finite tags, NaN where none is."""
  finite = np.isfinite(ap)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(finite, ap, 0.0).sum(1) / finite.sum(1)


def replicates(labels, scores, indices: np.ndarray, *, folds: int,
               fold_seed: int = 0) -> dict[str, np.ndarray]:
  """Every metric of one run on every resample of ``indices`` [B, N].

  Returns ``{'map', 'f2_at_0.5', 'f2_tuned', 'f2_tuned_crossfit'}``: float [B], and ``'ap'``:
  float [B, K] (NaN where the resample has no positive of the tag). Row b equals the metrics of
  ``labels[indices[b]], scores[indices[b]]``; the cross-fit's folds are those of
  ``metrics.crossfit_folds(N, folds, fold_seed)``, carried by each chip into the resample. The
  resamples are taken _CELLS_PER_PASS / N at a time, as uint8 counts (a chip drawn more than 255
  times in one resample falls back to float weights).
  """
  y, s = M._check(labels, scores)
  s = s.astype(np.float64)
  n, k = y.shape
  fold = M.crossfit_folds(n, folds, fold_seed)
  # Everything that does not depend on the resample, once: the scores' orders and the search
  # set-ups (on all chips, and on all but each fold).
  order = M._decreasing(s)
  ap = M._APPlan(y, s, order)
  tuned = M._ThresholdSearch(y, s, order=order)
  crossfit = [(fold == f, M._ThresholdSearch(y, s, tuned_on=fold != f, order=order))
              for f in range(folds)]
  b = len(indices)
  out = {m: np.empty(b) for m in METRICS}
  out['ap'] = np.empty((b, k))
  step = max(1, _CELLS_PER_PASS // n)
  buf = M._Buffers()  # [rows, N] work arrays, reused chunk after chunk
  for start in range(0, b, step):
    rows = slice(start, start + step)
    counts = _counts(indices[rows], n, np.uint8)  # the metrics' integer paths
    total = counts.sum(1, dtype=np.float64)
    chip_f2 = buf('f2', counts.shape, np.float64)  # w * F2 of each chip
    out['ap'][rows] = ap(counts)
    out['map'][rows] = _mean_over_tags(out['ap'][rows])
    out['f2_at_0.5'][rows] = np.multiply(counts, tuned.f2_start, out=chip_f2).sum(1) / total
    out['f2_tuned'][rows] = tuned(counts, out=chip_f2)[1].sum(1) / total
    crossfit_f2 = buf('crossfit', counts.shape, np.float64)  # at the thresholds of other folds
    for held, search in crossfit:
      crossfit_f2[:, held] = search(counts, out=chip_f2)[1][:, held]
    out['f2_tuned_crossfit'][rows] = crossfit_f2.sum(1) / total
  return out


def point_values(labels, scores, *, folds: int, fold_seed: int = 0) -> dict:
  """The metrics of :func:`replicates` on all chips (metrics.py's own functions), same keys."""
  return {'map': M.mean_average_precision(labels, scores),
          'f2_at_0.5': M.f2_at(labels, scores, M.DEFAULT_THRESHOLD),
          'f2_tuned': M.f2_at(labels, scores, M.tune_thresholds(labels, scores)),
          'f2_tuned_crossfit': M.f2_tuned_crossfit(labels, scores, folds, fold_seed),
          'ap': M.average_precision(labels, scores)}


def interval(reps: np.ndarray) -> list[float]:
  """The 95% percentile interval [lo, hi] of the finite replicates ([nan, nan] if none)."""
  finite = np.asarray(reps, np.float64)
  finite = finite[np.isfinite(finite)]
  if not finite.size:
    return [float('nan'), float('nan')]
  tail = 50 * (1 - LEVEL)
  return [float(x) for x in np.percentile(finite, [tail, 100 - tail])]


def p_value(diffs: np.ndarray) -> float:
  """Two-sided bootstrap p-value of a difference (module docstring), over the finite replicates;
  NaN if none."""
  d = np.asarray(diffs, np.float64)
  d = d[np.isfinite(d)]
  if not d.size:
    return float('nan')
  side = min((d <= 0).sum(), (d >= 0).sum())
  return float(min(1.0, 2 * (1 + side) / (d.size + 1)))


def estimate(value: float, reps: np.ndarray) -> dict:
  """``{'value', 'ci'}`` of one metric of one run."""
  return {'value': float(value), 'ci': interval(reps)}


def difference(value_a: float, value_b: float, reps_a: np.ndarray, reps_b: np.ndarray) -> dict:
  """``{'value', 'ci', 'p'}`` of a - b from replicates on the same resamples (paired)."""
  d = np.asarray(reps_a) - np.asarray(reps_b)
  return {'value': float(value_a - value_b), 'ci': interval(d), 'p': p_value(d)}


def _flat(values: Mapping[str, np.ndarray], tags: Sequence[str]) -> dict[str, np.ndarray]:
  """{'map', ..., 'ap/<tag>'}: the per-tag AP as metrics of their own."""
  out = {m: values[m] for m in METRICS}
  out.update({f'ap/{t}': values['ap'][..., j] for j, t in enumerate(tags)})
  return out


def seed_replicates(reps: np.ndarray, seeds: np.ndarray) -> np.ndarray:
  """A model's replicates [B] from its runs' [S, B]: resample b averages the runs
  ``seeds[b]`` (indices into S, drawn with replacement) on chip resample b."""
  return reps[seeds, np.arange(reps.shape[1])[:, None]].mean(1)


def compare(labels, scores: Mapping[str, np.ndarray], tags: Sequence[str], *, resamples: int,
            seed: int, folds: int, groups: Mapping[str, Sequence[str]] | None = None) -> dict:
  """Intervals of every run, paired differences of every pair, and seed groups.

  ``scores``: {run name: [N, K]}, rows aligned on the same chips as ``labels``. ``groups``:
  {model: [run names]}, the runs of one model that differ only in their seed (>= 2 each;
  the model's sd is over them, ddof=1).
  Returns ``{'runs': {run: {metric: {'value', 'ci'}}}, 'differences': [{'a', 'b', 'metric',
  'value', 'ci', 'p'}], 'models': {model: {'runs', 'mean': {metric}, 'sd': {metric},
  'ci': {metric}}}, 'model_differences': [...as differences], 'resamples', 'seed', 'folds',
  'chips'}`` with metrics ``map``, ``f2_at_0.5``, ``f2_tuned``, ``f2_tuned_crossfit``,
  ``ap/<tag>``. Non-finite numbers stay NaN.
  """
  labels = np.asarray(labels)
  indices = resample_indices(len(labels), resamples, seed)
  names = list(scores)
  point = {r: _flat(point_values(labels, scores[r], folds=folds), tags) for r in names}
  reps = {r: _flat(replicates(labels, scores[r], indices, folds=folds), tags) for r in names}
  metric_names = list(point[names[0]])
  out = {
      'runs': {r: {m: estimate(point[r][m], reps[r][m]) for m in metric_names} for r in names},
      'differences': [{'a': a, 'b': b, 'metric': m,
                       **difference(point[a][m], point[b][m], reps[a][m], reps[b][m])}
                      for i, a in enumerate(names) for b in names[i + 1:] for m in metric_names],
      'models': {}, 'model_differences': [],
      'resamples': resamples, 'seed': seed, 'folds': folds, 'chips': len(labels)}
  # Seeds are drawn from a stream of their own, one per model: the chip resamples stay those of
  # the runs' intervals, and a model's draw does not depend on which others are compared.
  model_reps, model_mean = {}, {}
  for i, (model, runs) in enumerate((groups or {}).items()):
    seeds = np.random.default_rng([seed, 1, i]).integers(0, len(runs), (resamples, len(runs)))
    values = {m: np.array([point[r][m] for r in runs], np.float64) for m in metric_names}
    model_mean[model] = {m: float(v.mean()) for m, v in values.items()}
    model_reps[model] = {m: seed_replicates(np.stack([reps[r][m] for r in runs]), seeds)
                         for m in metric_names}
    out['models'][model] = {
        'runs': list(runs), 'mean': model_mean[model],
        'sd': {m: float(v.std(ddof=1)) for m, v in values.items()},  # runs of the seeds
        'ci': {m: interval(model_reps[model][m]) for m in metric_names}}
  models = list(model_reps)
  out['model_differences'] = [
      {'a': a, 'b': b, 'metric': m, **difference(model_mean[a][m], model_mean[b][m],
                                                   model_reps[a][m], model_reps[b][m])}
      for i, a in enumerate(models) for b in models[i + 1:] for m in metric_names]
  return out
