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
* :func:`f2_tuned_crossfit`: F2 with each chip predicted at thresholds tuned (:func:`tune_thresholds`)
  on the other folds of a seeded k-fold split; F2 at thresholds tuned on all chips is optimistic.
* The ``*_weighted`` functions compute AP, F2 and the tuning for many chip multiplicities at once
  (bootstrap resamples, folds): row b equals the plain function on the chips repeated that often.
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
  return average_precision_weighted(y, s, np.ones((1, y.shape[0])))[0]


def _weights(weights, num_chips: int) -> np.ndarray:
  w = np.asarray(weights, np.float64)
  if w.ndim != 2 or w.shape[1] != num_chips or not (w >= 0).all():
    raise ValueError(f'weights must be [B, {num_chips}] and >= 0, got shape {w.shape}')
  return w


# Rows of a weights matrix handled per pass by the *_weighted functions: their [rows, N] arrays
# then hold about this many cells (4 MiB of float64), whatever B is.
_CELLS_PER_PASS = 1 << 19


def _rows_per_pass(num_chips: int) -> int:
  return max(1, _CELLS_PER_PASS // num_chips)


def _as_counts(w: np.ndarray):
  """``w`` as small unsigned integers when every weight is a whole number (bootstrap counts,
  folds' 0/1 masks), else None: integer cumulative sums are exact and several times faster."""
  if w.size and w.max() < 256 and np.array_equal(w, np.floor(w)):
    return w.astype(np.uint8)
  return None


class _Buffers:
  """Work arrays reused from pass to pass, by name. A fresh large temporary comes from the
  system (glibc maps it) and costs a page fault per 4 KiB on first touch: more time than the
  arithmetic of the passes below (measured: ~40% of the threshold search's time)."""

  def __init__(self):
    self._flat = {}

  def __call__(self, name: str, shape: tuple, dtype) -> np.ndarray:
    size = int(np.prod(shape))
    flat = self._flat.get(name)
    if flat is None or flat.dtype != np.dtype(dtype) or flat.size < size:
      flat = self._flat[name] = np.empty(size, dtype)
    return flat[:size].reshape(shape)


class _APPlan:
  """The weight-independent part of :func:`average_precision_weighted`: per tag, the decreasing
  score order, where its positives sit in it and the end of each one's tie group."""

  def __init__(self, y: np.ndarray, s: np.ndarray):
    n, k = y.shape
    # Decreasing score order (scikit-learn: stable argsort, then reversed; any order within a tie
    # group gives the same result because only group ends are thresholds).
    self.order = np.argsort(-s, axis=0, kind='stable')
    s_sorted = np.take_along_axis(s, self.order, axis=0)
    y_sorted = np.take_along_axis(y, self.order, axis=0)
    # Position i is a threshold when it is the last of its tie group.
    is_end = np.ones_like(s_sorted, dtype=bool)
    is_end[:-1] = s_sorted[:-1] != s_sorted[1:]
    # end[i] = the last index of i's tie group (reverse running minimum over group ends).
    end = np.where(is_end, np.arange(n)[:, None], n)
    end = np.minimum.accumulate(end[::-1], axis=0)[::-1]
    self.tags = []
    for j in range(k):
      pos = np.flatnonzero(y_sorted[:, j])  # the positives, in decreasing score order
      pos_end = end[pos, j]
      # The last positive at or before each positive's group end: its running count is the
      # group end's true positives.
      last = np.searchsorted(pos, pos_end, side='right') - 1
      stop = int(pos_end.max()) + 1 if pos.size else 0
      self.tags.append((self.order[:stop, j], pos, pos_end, last))
    self.buffers = _Buffers()
    self.terms = None

  def __call__(self, w: np.ndarray) -> np.ndarray:
    """AP [R, K] of the rows of ``w`` [R, N]."""
    counts = _as_counts(w)
    source, acc = (w, np.float64) if counts is None else (counts, np.int64)
    rows = len(w)
    buf = self.buffers
    if self.terms is None or self.terms.shape[0] < rows:
      self.terms = np.zeros((rows, len(self.order)))  # zero but at a tag's positives, in use
    terms = self.terms[:rows]
    ap = np.empty((rows, len(self.tags)))
    for j, (order, pos, pos_end, last) in enumerate(self.tags):
      if not pos.size:
        ap[:, j] = np.nan
        continue
      # [R, chips down to the last positive's group end], in decreasing score order
      w_sorted = np.take(source, order, axis=1, out=buf('sorted', (rows, len(order)),
                                                        source.dtype), mode='clip')
      w_pos = np.take(w_sorted, pos, axis=1, out=buf('pos', (rows, len(pos)), source.dtype),
                      mode='clip')  # the positives' weights (their true positives)
      counted = np.cumsum(w_sorted, axis=1, dtype=acc, out=buf('cum', w_sorted.shape, acc))
      counted_end = np.take(counted, pos_end, axis=1, out=buf('end', w_pos.shape, acc),
                            mode='clip')
      tps_end = np.cumsum(w_pos, axis=1, dtype=acc, out=buf('tps', w_pos.shape, acc))
      if not np.array_equal(last, np.arange(len(pos))):  # positives tied with later ones
        tps_end = tps_end.take(last, axis=1)
      precision = buf('precision', w_pos.shape, np.float64)
      with np.errstate(invalid='ignore', divide='ignore'):
        if counts is None:
          np.divide(tps_end, counted_end, out=precision)
          precision[counted_end <= 0] = 0.0
        else:  # no weight counted yet means no true positive either: 0 / 1
          np.divide(tps_end, np.maximum(counted_end, 1, out=counted_end), out=precision)
      # Each positive adds 1/P recall at its group's threshold, at that threshold's precision.
      # Summed as [R, N] rows in score order, zeros at the negatives: the same additions in the
      # same order as the formula on every chip.
      terms[:, pos] = np.multiply(precision, w_pos, out=precision)
      total = terms.sum(axis=1)
      if counts is None:  # fractional weights: their sum, too, in the formula's order
        terms[:, pos] = w_pos
        num_pos = terms.sum(axis=1)
      else:
        num_pos = w_pos.sum(axis=1, dtype=np.float64)
      terms[:, pos] = 0.0
      with np.errstate(invalid='ignore', divide='ignore'):
        ap[:, j] = np.where(num_pos > 0, total / num_pos, np.nan)
    return ap


def average_precision_weighted(labels, scores, weights) -> np.ndarray:
  """:func:`average_precision` of each row of ``weights`` [B, N] at once, float64 [B, K].

  Row b is the AP of the data with chip i repeated ``weights[b, i]`` times (the multiplicities of
  a bootstrap resample; 0 leaves a chip out): the repeats of a chip are tied, so they enter
  together, and sorting the chips once serves every row. Per row and tag the work is a running
  sum of the weights in score order (exact integer sums when the weights are whole numbers).
  """
  y, s = _check(labels, scores)
  w = _weights(weights, y.shape[0])
  plan = _APPlan(y, s.astype(np.float64))  # float64: exact for float32 inputs (ties stay ties)
  step = _rows_per_pass(y.shape[0])
  return np.concatenate([plan(w[i:i + step]) for i in range(0, max(len(w), 1), step)])


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


def f2_at_weighted(labels, scores, thresholds, weights, *,
                   zero_division: float = 0.0) -> np.ndarray:
  """:func:`f2_at` of each row of ``weights`` [B, N] (chip multiplicities), float64 [B].

  ``thresholds``: [B, K], one set per row, or [B, N, K], one per row and chip (a cross-fit
  predicts each chip at the thresholds of the folds it is not in).
  """
  y, s = _check(labels, scores)
  w = _weights(weights, y.shape[0])
  thr = np.asarray(thresholds, np.float64)
  pred = s[None] > (thr[:, None, :] if thr.ndim == 2 else thr)  # [B, N, K]
  f = _f2_per_chip((y * pred).sum(2), y.sum(1), pred.sum(2), zero_division)
  with np.errstate(invalid='ignore', divide='ignore'):
    return (w * f).sum(1) / w.sum(1)


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
  y, _ = _check(labels, scores)
  return tune_thresholds_weighted(labels, scores, np.ones((1, y.shape[0])), candidates=candidates,
                                  max_sweeps=max_sweeps, zero_division=zero_division)[0]


def tune_thresholds_weighted(labels, scores, weights, *, candidates: Sequence[float] | None = None,
                             max_sweeps: int = 3, zero_division: float = 0.0) -> np.ndarray:
  """:func:`tune_thresholds` of each row of ``weights`` [B, N] at once, thresholds [B, K].

  Row b gets the thresholds tuned on the data with chip i repeated ``weights[b, i]`` times (a
  bootstrap resample's multiplicities; 0 leaves a chip out, e.g. a held-out fold). See
  :class:`_ThresholdSearch` for how.
  """
  y, s = _check(labels, scores)
  w = _weights(weights, y.shape[0])
  search = _ThresholdSearch(y, s, candidates=candidates, zero_division=zero_division)
  step = _rows_per_pass(y.shape[0])
  return np.concatenate([search(w[i:i + step], max_sweeps=max_sweeps)[0]
                         for i in range(0, max(len(w), 1), step)])


# Distinct weights of one pass that _ThresholdSearch folds into its lookup tables (bootstrap
# counts have ~10); with more, it multiplies by the weights instead.
_MAX_WEIGHT_VALUES = 64


class _ThresholdSearch:
  """:func:`tune_thresholds_weighted`'s coordinate search, set up once for many weight rows.

  ``search(w)`` tunes every row of ``w`` [R, N] on the chips ``tuned_on`` (bool [N]; None: all;
  the others count as weight 0 there, e.g. a cross-fit's held-out fold) and returns the
  thresholds [R, K] and ``w * F2`` of every chip (tuned on or not) at them, [R, N].

  How: a chip's F2 depends only on its state, its true positives T and D = 4 |true| + |predicted|
  (small integers), so every chip gain of the search, ``(y d - t) 5 w / (d (d + 1))`` with
  t = T - y p, d = D - p without tag j (p: tag j predicted now), is read from a table indexed by
  (weight, y, p, T, D) that holds exactly that expression: each row keeps one int32 code per
  chip, updated only for the chips a threshold move flips. A threshold predicts a prefix of the
  chips in decreasing score order, so the F2 of every candidate is a running sum over that
  order, taken per segment between candidates (``np.add.reduceat``) over the chips whose tag j
  some candidate (or the start, 0.5) sets and another does not: chips above every candidate
  gain the same at all of them, which cannot change the choice. A row is skipped at tag j after
  its first sweep when none of its thresholds moved since it last visited tag j: it would find
  what it found then, no move (the same F2s).
  """

  def __init__(self, y: np.ndarray, s: np.ndarray, *, tuned_on: np.ndarray | None = None,
               candidates: Sequence[float] | None = None, zero_division: float = 0.0):
    cand = (DEFAULT_CANDIDATES if candidates is None
            else np.unique(np.asarray(candidates, np.float64)))
    if cand.ndim != 1 or cand.size == 0:
      raise ValueError('candidates must be a non-empty 1-d sequence')
    if zero_division != zero_division:  # NaN: averaging over a changing set of chips; not supported
      raise ValueError('tune_thresholds needs a finite zero_division')
    y = np.asarray(y, np.float64)
    s = np.asarray(s, np.float64)
    n, k = y.shape
    self.zero_division = float(zero_division)
    self.tuned_on = None if tuned_on is None else np.asarray(tuned_on, bool)
    # Threshold states of a tag: r < M is cand[r], r == M the start (0.5, a candidate or not).
    self.values = np.append(cand, DEFAULT_THRESHOLD)
    self.distance = np.abs(cand - DEFAULT_THRESHOLD)
    # Chip state code: T * nd + D (T <= K, D <= 5 K); the tables add the weight, y and p.
    self.nd = 5 * k + 1
    self.ns = (k + 1) * self.nd
    ntrue = y.sum(1)
    pred = s > DEFAULT_THRESHOLD
    tp = (y * pred).sum(1)
    npred = pred.sum(1)
    self.start_state = (tp * self.nd + 4 * ntrue + npred).astype(np.int32)
    self.f2_start = _f2_per_chip(tp, ntrue, npred, self.zero_division)  # each chip's F2 at 0.5
    order = np.argsort(-s, axis=0, kind='stable')
    s_asc = np.sort(s, axis=0)
    self.tags = []
    for j in range(k):
      # chips predicted at each state: those scoring above its threshold, a prefix of order_j
      full_cut = n - np.searchsorted(s_asc[:, j], self.values, side='right')
      order_j = order[:, j]
      flip = (y[order_j, j] * self.nd + 1).astype(np.int32)  # code change when tag j turns on
      if self.tuned_on is None:
        sub, cut = order_j, full_cut
      else:
        on = self.tuned_on[order_j]
        sub = order_j[on]
        cut = np.concatenate([[0], np.cumsum(on)])[full_cut]
      lo, hi = cut.min(), cut.max()
      if lo == hi:  # every state predicts the same chips: the tag never moves
        self.tags.append(None)
        continue
      bounds = np.unique(cut)  # segment ends, lo .. hi
      cols = sub[lo:hi]
      self.tags.append(dict(
          cols=cols, starts=bounds[:-1] - lo, segment=np.searchsorted(bounds, cut),
          cut=cut - lo, positive=y[cols, j].astype(np.int32), order=order_j,
          full_cut=full_cut, flip=flip))

  def _tables(self, weight_values: np.ndarray):
    """The gain table [2 (y), 2 (p), U, T, D] and the weighted-F2 table [U, T, D], flattened:
    a chip's code is ``u ns + T nd + D`` (u: its weight's index), the gain's index adds
    ``(2 y + p) U ns``."""
    t_all = np.arange(self.ns // self.nd, dtype=np.float64)[:, None]
    d_all = np.arange(self.nd, dtype=np.float64)[None, :]
    u = len(weight_values)
    gain = np.zeros((2, 2, u, len(t_all), self.nd))
    f2 = np.zeros((u, len(t_all), self.nd))
    with np.errstate(invalid='ignore', divide='ignore'):
      chip_f2 = _f2_per_chip(t_all, 0.0, d_all, self.zero_division)  # 5 T / D (D = 4 |true| + |pred|)
      for i, w in enumerate(weight_values):
        five_w = 5.0 * w
        f2[i] = w * chip_f2
        for yy in (0, 1):
          for p in (0, 1):
            t, d = t_all - yy * p, d_all - p  # without tag j
            # As tune_thresholds always computed it: one rounding, at the division.
            g = (yy * d - t) * five_w / (d * (d + 1.0) + (d == 0))
            if self.zero_division:
              g = np.where(d == 0, -self.zero_division * w, g)
            gain[yy, p, i] = np.where((t >= 0) & (d >= 0) & np.isfinite(g), g, 0.0)
    return gain.ravel(), f2.ravel()

  def __call__(self, w: np.ndarray, *, max_sweeps: int = 3):
    rows_all, n = w.shape
    k = len(self.tags)
    m = len(self.distance)
    if not rows_all:
      return np.empty((0, k)), np.empty((0, n))
    w_tune = w if self.tuned_on is None else w * self.tuned_on
    counts = _as_counts(w)
    if counts is not None and counts.max() < _MAX_WEIGHT_VALUES:
      weight_values, weight_index = np.arange(counts.max() + 1.0), counts
    else:
      weight_values, weight_index = np.unique(w, return_inverse=True)
    folded = len(weight_values) <= _MAX_WEIGHT_VALUES
    if not folded:  # tables of one weight, 1.0; the gains are multiplied by the weights
      weight_values, weight_index = np.ones(1), np.zeros(w.shape, np.int32)
    gain_table, f2_table = self._tables(weight_values)
    block = len(weight_values) * self.ns  # codes per (y, p) block of the gain table
    # uint16 codes when they fit: the gathers below move half the bytes
    code = (weight_index.reshape(w.shape).astype(np.int32) * np.int32(self.ns)
            + self.start_state).astype(np.uint16 if block <= 1 << 16 else np.int32)
    state = np.full((rows_all, k), m)  # every tag starts at 0.5
    tolerance = 1e-12 * w_tune.sum(1)  # of sums over the (weighted) chips: 1e-12 per chip
    moved = np.full(rows_all, -k - 1)  # step of each row's last threshold move
    for sweep in range(max_sweeps):
      for j, tag in enumerate(self.tags):
        step = sweep * k + j
        if tag is None:
          continue
        rows = np.arange(rows_all)
        if sweep:  # rows with a move since their last visit of tag j (the others would not move)
          rows = np.flatnonzero(moved > step - k)
          if not rows.size:
            continue
          if 2 * rows.size > rows_all:  # visiting them all is cheaper than selecting
            rows = np.arange(rows_all)
        every = len(rows) == rows_all
        index = (code if every else code[rows]).take(tag['cols'], axis=1)
        index = np.add(index, tag['positive'] * np.int32(2 * block), dtype=np.int32)
        current = state[rows, j]
        for row, cut in zip(index, tag['cut'][current]):
          row[:cut] += block  # tag j predicted now
        gains = gain_table.take(index)
        if not folded:
          gains *= (w if every else w[rows]).take(tag['cols'], axis=1)
        sums = np.zeros((len(rows), len(tag['starts']) + 1))
        np.cumsum(np.add.reduceat(gains, tag['starts'], axis=1), axis=1, out=sums[:, 1:])
        value = sums[:, tag['segment'][:m]]  # F2 gain over the tuned chips, per candidate
        now = sums[np.arange(len(rows)), tag['segment'][current]]
        best = value.max(1)
        tol = tolerance[rows]
        better = best > now + tol
        if not better.any():
          continue
        ok = value >= (best - tol)[:, None]
        nearest = np.argmin(np.where(ok, self.distance, np.inf), axis=1)[better]
        rows, old = rows[better], current[better]
        state[rows, j] = nearest
        moved[rows] = step
        # The chips between the old and the new threshold flip tag j (every chip, tuned on or
        # not: the F2 of all of them is returned).
        c_old, c_new = tag['full_cut'][old][:, None], tag['full_cut'][nearest][:, None]
        lo, hi = min(c_old.min(), c_new.min()), max(c_old.max(), c_new.max())
        position = np.arange(lo, hi)
        delta = (position < c_new).astype(np.int32) - (position < c_old)
        delta *= tag['flip'][lo:hi]
        cells = np.ix_(rows, tag['order'][lo:hi])
        code[cells] = code[cells] + delta
      if not (moved >= sweep * k).any():  # a sweep that moved no row: the next would move none
        break
    chip_f2 = f2_table.take(code)  # w * F2 of each chip at the found thresholds
    if not folded:
      chip_f2 *= w
    start = w * self.f2_start
    tuned = chip_f2 if self.tuned_on is None else np.where(self.tuned_on, chip_f2, 0.0)
    # Guarantee: never below all-0.5 on the chips tuned on (checked; all-0.5 otherwise).
    worse = tuned.sum(1) < (w_tune * self.f2_start).sum(1)
    thresholds = self.values[state]
    thresholds[worse] = DEFAULT_THRESHOLD
    chip_f2[worse] = start[worse]
    return thresholds, chip_f2


def crossfit_folds(num_chips: int, folds: int, seed: int = 0) -> np.ndarray:
  """The fold [0, folds) of each chip, int [N]: a seeded permutation dealt round-robin, so the
  folds differ in size by at most one chip."""
  if folds < 2 or folds > num_chips:
    raise ValueError(f'cross-fitting needs 2 <= folds <= chips, got {folds} folds, '
                     f'{num_chips} chips')
  fold = np.empty(num_chips, np.int64)
  fold[np.random.default_rng(seed).permutation(num_chips)] = np.arange(num_chips) % folds
  return fold


def f2_tuned_crossfit(labels, scores, folds: int = 5, seed: int = 0, *,
                      zero_division: float = 0.0) -> float:
  """Kaggle F2 at thresholds tuned on other chips: an honest estimate of tuned F2.

  The chips are split into ``folds`` folds (:func:`crossfit_folds`); each fold is predicted at
  the thresholds :func:`tune_thresholds` finds on the other folds, and F2 is averaged over all
  chips. F2 is a mean over chips, so pooling the held-out predictions is exact. :func:`f2_at` at
  thresholds tuned on all chips is the in-sample (optimistic) value.
  """
  y, s = _check(labels, scores)
  fold = crossfit_folds(y.shape[0], folds, seed)
  pred = np.zeros(y.shape, bool)
  for f in range(folds):
    held = fold == f
    pred[held] = binarize(s[held], tune_thresholds(y[~held], s[~held],
                                                   zero_division=zero_division))
  return f2_samples(y, pred, zero_division=zero_division)


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
