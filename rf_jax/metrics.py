"""Evaluation metrics of the study (numpy only; checked against scikit-learn in tests).

Conventions used everywhere in rf_jax:

* ``labels`` are 0/1 arrays ``[N, K]`` (chips x tags, TAGS order); ``scores`` are sigmoid
  probabilities of the same shape.
* A tag is *predicted* when its score is strictly above its threshold: ``scores > threshold``
  (see :func:`binarize`). At the default threshold 0.5 a score of exactly 0.5 is negative.

Definitions (../shared/DESIGN.md section 1):

* :func:`average_precision` is scikit-learn's ``average_precision_score`` per column: the step-wise
  area under the precision-recall curve, ``sum_k (R_k - R_{k-1}) P_k`` over the distinct score values
  taken as thresholds in decreasing order (tied scores enter together). scikit-learn returns 0 (with
  a warning) for a tag without positives; here such a tag is NaN and
  :func:`mean_average_precision` leaves it out (:func:`tags_without_positives` says which).
* :func:`f2_samples` is the Kaggle metric, ``fbeta_score(beta=2, average='samples')``: per chip
  ``F2 = 5 TP / (5 TP + 4 FN + FP) = 5 TP / (4 |true| + |predicted|)``, averaged over chips. A chip
  with no true and no predicted tags has 0/0; scikit-learn's default (``zero_division='warn'``) counts
  it as 0.0 and so does ours (``zero_division=0.0``); 1.0 and NaN (chip left out of the mean) are
  supported as in scikit-learn.
* :func:`tail_accuracy`: for one tag, over its ``top_n`` highest-scored chips, for each t:
  ``sum_i 1[f_i > t] 1[pred_i == y_i] / sum_i 1[f_i > t]`` with ``pred_i = 1[f_i > 0.5]``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_THRESHOLD = 0.5
# Candidate thresholds of the coordinate search: 0.01 .. 0.99 (0.5 included exactly).
DEFAULT_CANDIDATES = np.round(np.arange(1, 100) / 100.0, 2)


def _check(labels, scores, *, ndim: int = 2, scores_name: str = 'scores'):
  labels = np.asarray(labels)
  scores = np.asarray(scores)
  if labels.ndim != ndim or labels.shape != scores.shape:
    raise ValueError(
        f'labels and {scores_name} must both have {ndim} dims and equal shapes, got '
        f'{labels.shape} and {scores.shape}')
  if labels.shape[0] == 0:
    raise ValueError('no chips (N == 0)')
  if not np.isin(labels, (0, 1)).all():
    raise ValueError('labels must be 0/1')
  if scores.dtype != bool and not np.isfinite(scores).all():
    raise ValueError(f'{scores_name} contain NaN or inf')
  return labels.astype(np.float64), scores


def tags_without_positives(labels) -> np.ndarray:
  """Indices of the columns of ``labels`` [N, K] with no positive: their AP is NaN."""
  labels = np.asarray(labels)
  return np.flatnonzero(labels.sum(axis=0) == 0)


def average_precision(labels, scores) -> np.ndarray:
  """Per-tag average precision, float64 [K]; NaN for a tag without positives.

  Equals ``sklearn.metrics.average_precision_score(labels[:, k], scores[:, k])`` for every tag
  with at least one positive (step-wise, ties as in scikit-learn).
  """
  y, s = _check(labels, scores)
  s = s.astype(np.float64)  # exact for float32 inputs: distinct values stay distinct
  n = s.shape[0]
  # Decreasing score order (scikit-learn: stable argsort, then reversed; any order within a tie group
  # gives the same result because only group ends are thresholds).
  order = np.argsort(-s, axis=0, kind='stable')
  s_sorted = np.take_along_axis(s, order, axis=0)
  y_sorted = np.take_along_axis(y, order, axis=0)
  tps = np.cumsum(y_sorted, axis=0)  # true positives when thresholding at each position
  # Position i is a threshold when it is the last of its tie group.
  is_end = np.ones_like(s_sorted, dtype=bool)
  is_end[:-1] = s_sorted[:-1] != s_sorted[1:]
  idx = np.arange(n)[:, None]
  # end[i] = the last index of i's tie group (reverse running minimum over group ends).
  end = np.where(is_end, idx, n)
  end = np.minimum.accumulate(end[::-1], axis=0)[::-1]
  tps_end = np.take_along_axis(tps, end, axis=0)
  precision_end = tps_end / (end + 1.0)
  num_pos = tps[-1]
  # Each positive adds 1/P recall at its group's threshold, at that threshold's precision.
  with np.errstate(invalid='ignore', divide='ignore'):
    ap = (y_sorted * precision_end).sum(axis=0) / num_pos
  ap = np.where(num_pos > 0, ap, np.nan)
  return ap.astype(np.float64)


def mean_average_precision(labels, scores) -> float:
  """Mean over tags of :func:`average_precision`, leaving out tags without positives (NaN if all)."""
  ap = average_precision(labels, scores)
  if np.isnan(ap).all():
    return float('nan')
  return float(np.nanmean(ap))


def mean_precision_at(labels, scores, threshold: float = DEFAULT_THRESHOLD) -> float:
  """Mean over tags of the precision of ``scores > threshold`` (0 for a tag predicted nowhere).

  The number the study's code printed as "mAP" and chose its best epoch by. Equals the mean of
  ``sklearn.metrics.precision_score(labels[:, k], scores[:, k] > threshold, zero_division=0)``.
  """
  y, s = _check(labels, scores)
  predicted = s > threshold
  num_predicted = predicted.sum(0)
  true_positives = (predicted & (y > 0)).sum(0)
  precision = np.where(num_predicted > 0, true_positives / np.maximum(num_predicted, 1), 0.0)
  return float(precision.mean())


def binarize(scores, thresholds=DEFAULT_THRESHOLD) -> np.ndarray:
  """Predicted tags: ``scores > thresholds`` (thresholds scalar or [K]), bool."""
  return np.asarray(scores) > np.asarray(thresholds)


def _f2_per_chip(tp, num_true, num_pred, zero_division):
  denom = 4.0 * num_true + num_pred
  with np.errstate(invalid='ignore', divide='ignore'):
    f = np.where(denom > 0, 5.0 * tp / np.where(denom > 0, denom, 1.0), zero_division)
  return f


def f2_samples(labels, preds, *, zero_division: float = 0.0) -> float:
  """Kaggle F2: F-beta (beta=2) per chip, averaged over chips.

  ``preds`` is 0/1 or bool [N, K] (use :func:`binarize` on scores). Equals
  ``sklearn.metrics.fbeta_score(labels, preds, beta=2, average='samples')``; ``zero_division`` is
  the value of a chip with no true and no predicted tag (0.0 = scikit-learn's default; NaN leaves
  such chips out of the mean).
  """
  y, p = _check(labels, preds, scores_name='preds')
  p = np.asarray(p)
  if not np.isin(p, (0, 1)).all():
    raise ValueError('preds must be 0/1 or bool (binarize scores first)')
  p = p.astype(np.float64)
  f = _f2_per_chip((y * p).sum(1), y.sum(1), p.sum(1), zero_division)
  if np.isnan(f).all():
    return float('nan')
  return float(np.nanmean(f))


def f2_at(labels, scores, thresholds=DEFAULT_THRESHOLD, *, zero_division: float = 0.0) -> float:
  """:func:`f2_samples` of ``scores > thresholds``."""
  return f2_samples(labels, binarize(scores, thresholds), zero_division=zero_division)


def tune_thresholds(labels, scores, *, candidates: Sequence[float] | None = None,
                    max_sweeps: int = 3, zero_division: float = 0.0) -> np.ndarray:
  """Per-tag thresholds [K] maximising :func:`f2_at` on (labels, scores), by coordinate search.

  Starts with every tag at 0.5; a sweep visits the tags in order and moves a tag's threshold to the
  candidate (default 0.01..0.99) that maximises the sample-averaged F2 with the other thresholds held,
  only when that is strictly better than its current threshold (ties between candidates go to the one
  nearest 0.5). Stops after ``max_sweeps`` sweeps or a sweep without change. Guarantee: the returned
  thresholds never score below all-0.5 on the data they were tuned on (checked; all-0.5 is returned
  otherwise).
  """
  y, s = _check(labels, scores)
  s = s.astype(np.float64)
  cand = DEFAULT_CANDIDATES if candidates is None else np.unique(np.asarray(candidates, np.float64))
  if cand.ndim != 1 or cand.size == 0:
    raise ValueError('candidates must be a non-empty 1-d sequence')
  if zero_division != zero_division:  # NaN: averaging over a changing set of chips; not supported
    raise ValueError('tune_thresholds needs a finite zero_division')
  n, k = y.shape
  start = np.full(k, DEFAULT_THRESHOLD)
  thr = start.copy()
  pred = s > thr
  tp = (y * pred).sum(1)
  npred = pred.sum(1).astype(np.float64)
  ntrue = y.sum(1)
  # Per tag, once: order of decreasing score and, per candidate, how many chips score above it.
  order = np.argsort(-s, axis=0, kind='stable')
  s_desc = np.take_along_axis(s, order, axis=0)
  above = np.stack([n - np.searchsorted(s_desc[::-1, j], cand, side='right') for j in range(k)])
  for _ in range(max_sweeps):
    changed = False
    for j in range(k):
      p_j = pred[:, j]
      tp_rest = tp - y[:, j] * p_j
      npred_rest = npred - p_j
      f0 = _f2_per_chip(tp_rest, ntrue, npred_rest, zero_division)
      f1 = _f2_per_chip(tp_rest + y[:, j], ntrue, npred_rest + 1.0, zero_division)
      gain = np.concatenate([[0.0], np.cumsum((f1 - f0)[order[:, j]])])
      value = gain[above[j]]  # sum of chip F2 gains of the chips predicted, per candidate
      current = gain[int(p_j.sum())]
      best = value.max()
      if best <= current + 1e-12 * n:
        continue
      ok = np.flatnonzero(value >= best - 1e-12 * n)
      c = cand[ok[np.argmin(np.abs(cand[ok] - DEFAULT_THRESHOLD))]]
      thr[j] = c
      new = s[:, j] > c
      tp = tp_rest + y[:, j] * new
      npred = npred_rest + new
      pred[:, j] = new
      changed = True
    if not changed:
      break
  if f2_at(y, s, thr, zero_division=zero_division) < f2_at(y, s, start, zero_division=zero_division):
    return start
  return thr


def tail_accuracy(labels, scores, thresholds, top_n: int | None = 50, *,
                  decision_threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
  """Tail accuracy of one tag (DESIGN.md section 1), float64 [T].

  Over the ``top_n`` highest-scored chips (all when None or >= N; ties at the cut taken in input
  order), for each threshold t: ``sum_i 1[f_i > t] 1[pred_i == y_i] / sum_i 1[f_i > t]`` where
  ``pred_i = 1[f_i > decision_threshold]`` (0.5). For t >= 0.5 every counted chip is predicted
  positive, so this is the precision of the chips scoring above t. NaN where no chip scores above t.
  """
  y, f = _check(labels, scores, ndim=1)
  f = f.astype(np.float64)
  t = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
  if t.ndim != 1:
    raise ValueError('thresholds must be a scalar or 1-d')
  if top_n is not None:
    if top_n < 1:
      raise ValueError(f'top_n must be >= 1, got {top_n}')
    top = np.argsort(-f, kind='stable')[:top_n]
    y, f = y[top], f[top]
  correct = (f > decision_threshold) == (y == 1)
  counted = f[None, :] > t[:, None]  # [T, n]
  num = (counted & correct[None, :]).sum(1)
  den = counted.sum(1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
