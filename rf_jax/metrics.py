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
  They serve rf_jax/bootstrap.py, whose 2,000 resamples of the 13,359 validation chips each get
  all of them; :class:`_ThresholdSearch` says how the tuning does that in seconds.
* :func:`tail_accuracy`: for one tag, over its ``top_n`` highest-scored chips, for each t:
  ``sum_i 1[f_i > t] 1[pred_i == y_i] / sum_i 1[f_i > t]`` with ``pred_i = 1[f_i > 0.5]``.
"""

from __future__ import annotations

import math
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
  if not w.size or w.max() >= 256:
    return None
  if w.dtype == np.uint8:
    return w
  if np.issubdtype(w.dtype, np.integer) or np.array_equal(w, np.floor(w)):
    return w.astype(np.uint8)
  return None


def _decreasing(s: np.ndarray) -> np.ndarray:
  """Each column's chips in decreasing score order, ties in chip order, int [N, K]."""
  return np.argsort(-s, axis=0, kind='stable')


class _Buffers:
  """Work arrays reused from pass to pass, by name. A fresh large temporary comes from the
  system (glibc maps it) and costs a page fault per 4 KiB on first touch: more time than the
  arithmetic of the passes below (measured: ~40% of the threshold search's time)."""

  def __init__(self):
    self._flat = {}

  def __call__(self, name: str, shape: tuple, dtype) -> np.ndarray:
    size = math.prod(shape)
    flat = self._flat.get(name)
    if flat is None or flat.dtype != np.dtype(dtype) or flat.size < size:
      flat = self._flat[name] = np.empty(size, dtype)
    return flat[:size].reshape(shape)


class _APPlan:
  """The weight-independent part of :func:`average_precision_weighted`: per tag, the decreasing
  score order, where its positives sit in it and the end of each one's tie group."""

  def __init__(self, y: np.ndarray, s: np.ndarray, order: np.ndarray | None = None):
    n, k = y.shape
    # Decreasing score order (scikit-learn: stable argsort, then reversed; any order within a tie
    # group gives the same result because only group ends are thresholds).
    self.order = _decreasing(s) if order is None else order
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

  def __call__(self, w: np.ndarray) -> np.ndarray:
    """AP [R, K] of the rows of ``w`` [R, N]."""
    counts = _as_counts(w)
    source, acc = (w, np.float64) if counts is None else (counts, np.int64)
    rows = len(w)
    buf = self.buffers
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
      total = np.multiply(precision, w_pos, out=precision).sum(axis=1)
      num_pos = w_pos.sum(axis=1, dtype=np.float64)
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
# Thresholds whose chips _ThresholdSearch sums first; the others' are bounded (its doc).
_WINDOW = (0.05, 0.95)


class _ThresholdSearch:
  """:func:`tune_thresholds_weighted`'s coordinate search, set up once for many weight rows.

  ``search(w)`` tunes every row of ``w`` [R, N] on the chips ``tuned_on`` (bool [N]; None: all;
  the others count as weight 0 there, e.g. a cross-fit's held-out fold) and returns the
  thresholds [R, K] and ``w * F2`` of every chip (tuned on or not) at them, [R, N] (written to
  ``out`` when given). Row b's thresholds are those the coordinate search finds on its chips.

  How. A chip's F2 depends only on its state, its true positives T and D = 4 |true| + |predicted|
  (small integers). Each row keeps one code per chip, its weight's index and state, updated
  only for the chips a threshold move flips. The gain of predicting tag j of a chip,
  ``(y d - t) 5 w / (d (d + 1))`` with t and d its T and D without tag j, is read from a table
  indexed by (weight, t, d, y) that holds exactly that expression, as tune_thresholds always
  computed it. A threshold predicts a prefix of the chips in decreasing score order, so the F2
  of every candidate is a running sum of gains over that order, summed per segment between
  candidates (``np.add.reduceat``), over the chips some candidate (or the start, 0.5) predicts
  and another does not: chips above every candidate gain the same at all of them, which cannot
  change the choice.

  Two shortcuts, both exact. (1) After its first sweep a row skips tag j when none of its
  thresholds moved since it last visited tag j: it would find the sums it found then, and no
  move. (2) A row whose tag j is at a threshold in _WINDOW sums first the chips scoring inside
  it only: the candidates below the window add chips scoring below it, which gain at most
  ``5 w / (4 |true| + 1)`` each when positive and nothing when negative; those above drop
  chips, which gain at most ``w / (5 |true| + 1)`` each when negative (``zero_division w``
  without true tags) and lose when positive. When these bounds put every candidate outside
  the window below the best one inside it by more than the tolerance (and a margin for
  rounding), the best is inside and so are all within the tolerance of it: the decision is
  that of the full sums, which the row computes otherwise.
  """

  def __init__(self, y: np.ndarray, s: np.ndarray, *, tuned_on: np.ndarray | None = None,
               candidates: Sequence[float] | None = None, zero_division: float = 0.0,
               order: np.ndarray | None = None):
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
    # A chip's code: 2 (u ns + T nd + D), T <= K, D <= 5 K; + y in the gain table's index.
    self.nd = 5 * k + 1
    self.ns = (k + 1) * self.nd
    ntrue = y.sum(1)
    pred = s > DEFAULT_THRESHOLD
    tp = (y * pred).sum(1)
    npred = pred.sum(1)
    self.start_state = (tp * self.nd + 4 * ntrue + npred).astype(np.int64)
    self.f2_start = _f2_per_chip(tp, ntrue, npred, self.zero_division)  # each chip's F2 at 0.5
    # The window's states, and the bounds of the gains of the chips outside it (class doc).
    inside = np.append((cand >= _WINDOW[0]) & (cand <= _WINDOW[1]), True)
    windowed = inside.sum() > 1 and not inside.all() and self.zero_division >= 0
    with np.errstate(divide='ignore'):
      gain_low = 5.0 / (4.0 * ntrue + 1.0)  # a positive's, below the window
      gain_high = np.where(ntrue > 0, 1.0 / (5.0 * ntrue + 1.0), self.zero_division)  # a negative's
    order = _decreasing(s) if order is None else order  # (order: the scores', if known)
    s_asc = np.take_along_axis(s, order[::-1], axis=0)
    self.tags = []
    for j in range(k):
      # chips predicted at each state: those scoring above its threshold, a prefix of order_j
      full_cut = n - np.searchsorted(s_asc[:, j], self.values, side='right')
      order_j = order[:, j]
      if self.tuned_on is None:
        sub, cut = order_j, full_cut
      else:
        on = self.tuned_on[order_j]
        sub = order_j[on]
        cut = np.concatenate([[0], np.cumsum(on)])[full_cut]
      if cut.min() == cut.max():  # every state predicts the same chips: the tag never moves
        self.tags.append(None)
        continue
      tag = dict(order=order_j, full_cut=full_cut,
                 flip=(2 * (y[order_j, j] * self.nd + 1)).astype(np.int32),  # code change, j on
                 full=self._span(y[:, j], sub, cut, np.ones(len(cut), bool)), window=None)
      if windowed:
        first, last = cut[inside].max(), cut[inside].min()  # positions the window's chips take
        low, high = sub[first:cut.max()], sub[cut.min():last]
        low, high = low[y[low, j] == 1], high[y[high, j] == 0]
        kept = np.flatnonzero(inside[:-1])  # the window's candidates
        tag['window'] = dict(self._span(y[:, j], sub, cut, inside), inside=inside, kept=kept,
                             low=low, gain_low=gain_low[low], high=high, gain_high=gain_high[high],
                             # whether there are candidates below / above it
                             below=kept[0] > 0, above=kept[-1] < len(cand) - 1)
      self.tags.append(tag)
    self.buffers = _Buffers()

  def _span(self, y_j, sub, cut, states):
    """The chips some of ``states`` predict and another does not, and their segments."""
    lo, hi = cut[states].min(), cut[states].max()
    bounds = np.unique(cut[states])  # segment ends, lo .. hi
    cols = sub[lo:hi]
    return dict(cols=cols, starts=bounds[:-1] - lo, cut=np.clip(cut - lo, 0, hi - lo),
                segment=np.searchsorted(bounds, np.clip(cut, lo, hi)),
                positive=y_j[cols].astype(np.intp),
                flip_cols=(2 * (y_j[cols] * self.nd + 1)).astype(np.intp))

  def _tables(self, weight_values: np.ndarray):
    """The gain table [U, T, D, 2 (y)] and the weighted-F2 table [U, T, D, 2 (one used)],
    flattened: a chip's code (2 (u ns + T nd + D)) indexes the F2 table, code + y the gains."""
    t = np.arange(self.ns // self.nd, dtype=np.float64)[:, None]
    d = np.arange(self.nd, dtype=np.float64)[None, :]
    gain = np.zeros((len(weight_values), len(t), self.nd, 2))
    f2 = np.zeros(gain.shape)
    with np.errstate(invalid='ignore', divide='ignore'):
      chip_f2 = _f2_per_chip(t, 0.0, d, self.zero_division)  # 5 T / D (D = 4 |true| + |pred|)
      for i, w in enumerate(weight_values):
        five_w = 5.0 * w
        f2[i, :, :, 0] = w * chip_f2
        for yy in (0, 1):
          # As tune_thresholds always computed it: one rounding, at the division.
          g = (yy * d - t) * five_w / (d * (d + 1.0) + (d == 0))
          if self.zero_division:
            g = np.where(d == 0, -self.zero_division * w, g)
          gain[i, :, :, yy] = np.where(np.isfinite(g), g, 0.0)
    return gain.ravel(), f2.ravel()

  def _sums(self, span, code, rows, current, gain_table, w, folded):
    """Running sums of the gains of ``span``'s chips at its segment ends, [rows, segments + 1]."""
    buf = self.buffers
    cols = span['cols']
    source = code
    if len(rows) < len(code):
      source = np.take(code, rows, axis=0, out=buf('rows', (len(rows), code.shape[1]),
                                                    code.dtype), mode='clip')
    gathered = np.take(source, cols, axis=1, out=buf('gathered', (len(rows), len(cols)),
                                                     code.dtype), mode='clip')
    index = np.add(gathered, span['positive'], out=buf('index', gathered.shape, np.intp))
    flip = span['flip_cols']
    for row, cut in zip(index, span['cut'][current]):
      row[:cut] -= flip[:cut]  # tag j predicted now: the state without it
    gains = np.take(gain_table, index, out=buf('gains', gathered.shape, np.float64), mode='clip')
    if not folded:
      gains *= (w if len(rows) == len(w) else w[rows]).take(cols, axis=1)
    sums = np.zeros((len(rows), len(span['starts']) + 1))
    np.cumsum(np.add.reduceat(gains, span['starts'], axis=1), axis=1, out=sums[:, 1:])
    return sums

  def _choose(self, value, candidates, now, tol):
    """tune_thresholds' choice from the F2 (up to a constant) at ``candidates`` [C] and now:
    whether to move, and to which candidate."""
    best = value.max(1)
    better = best > now + tol
    ok = value >= (best - tol)[:, None]
    nearest = candidates[np.argmin(np.where(ok, self.distance[candidates], np.inf), axis=1)]
    return better, nearest, best

  def __call__(self, w: np.ndarray, *, max_sweeps: int = 3, out: np.ndarray | None = None):
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
    buf = self.buffers
    # uint16 codes when they fit: the gathers below move half the bytes
    code = buf('code', w.shape, np.uint16 if gain_table.size <= 1 << 16 else np.int32)
    np.multiply(weight_index.reshape(w.shape), 2 * self.ns, out=code, dtype=code.dtype,
                casting='unsafe')
    code += (2 * self.start_state).astype(code.dtype)
    state = np.full((rows_all, k), m)  # every tag starts at 0.5
    total = w_tune.sum(1)
    tolerance = 1e-12 * total  # of sums over the (weighted) chips: 1e-12 per chip
    # and the rounding of those sums (|gain| <= max(5, zero_division) w), with room
    margin = tolerance + 1e-8 * (5.0 + self.zero_division) * total
    # Per row, the most the chips outside each tag's window could add (class doc).
    slack = []
    for tag in self.tags:
      window = None if tag is None else tag['window']
      slack.append(None if window is None else tuple(
          w.take(window[side], axis=1) @ window['gain_' + side] + margin if window[where]
          else np.full(rows_all, -np.inf) for side, where in (('low', 'below'), ('high', 'above'))))
    all_candidates = np.arange(m)
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
        chosen = []  # (rows, move, to which candidate)
        window = tag['window']
        if window is not None:
          inside = window['inside'][state[rows, j]]
          sub, rows = rows[inside], rows[~inside]
          if sub.size:
            current = state[sub, j]
            sums = self._sums(window, code, sub, current, gain_table, w, folded)
            kept = window['kept']
            value = sums[:, window['segment'][kept]]
            now = sums[np.arange(len(sub)), window['segment'][current]]
            better, nearest, best = self._choose(value, kept, now, tolerance[sub])
            edge = value[:, [0, -1]]  # F2 at the window's lowest and highest candidates
            low, high = slack[j]
            sure = (edge[:, 0] + low[sub] < best) & (edge[:, 1] + high[sub] < best)
            chosen.append((sub[sure], better[sure], nearest[sure]))
            rows = np.sort(np.concatenate([rows, sub[~sure]]))
        if rows.size:
          current = state[rows, j]
          sums = self._sums(tag['full'], code, rows, current, gain_table, w, folded)
          value = sums[:, tag['full']['segment'][:m]]
          now = sums[np.arange(len(rows)), tag['full']['segment'][current]]
          chosen.append((rows, *self._choose(value, all_candidates, now, tolerance[rows])[:2]))
        rows = np.concatenate([r[b] for r, b, _ in chosen])
        if not rows.size:
          continue
        nearest = np.concatenate([c[b] for _, b, c in chosen])
        in_order = np.argsort(rows)  # as code's rows, for the update below
        rows, nearest = rows[in_order], nearest[in_order]
        old = state[rows, j]
        state[rows, j] = nearest
        moved[rows] = step
        # The chips between the old and the new threshold flip tag j (every chip, tuned on or
        # not: the F2 of all of them is returned).
        c_old, c_new = tag['full_cut'][old][:, None], tag['full_cut'][nearest][:, None]
        lo, hi = min(c_old.min(), c_new.min()), max(c_old.max(), c_new.max())
        position = np.arange(lo, hi)
        shape = (len(rows), hi - lo)
        delta = buf('delta', shape, np.int32)
        delta[...] = np.less(position, c_new, out=buf('less', shape, bool))
        delta -= np.less(position, c_old, out=buf('less', shape, bool))
        delta *= tag['flip'][lo:hi]
        chips = tag['order'][lo:hi]
        flipped = np.take(code, chips, axis=1, out=buf('span', (rows_all, hi - lo), code.dtype),
                          mode='clip')
        if len(rows) < rows_all:
          flipped = np.take(flipped, rows, axis=0, out=buf('flipped', shape, code.dtype),
                            mode='clip')
        np.add(flipped, delta, out=flipped, casting='unsafe')
        code[np.ix_(rows, chips)] = flipped
      if not (moved >= sweep * k).any():  # a sweep that moved no row: the next would move none
        break
    chip_f2 = np.take(f2_table, code, out=out, mode='clip')  # w * F2 per chip at the thresholds
    if not folded:
      chip_f2 *= w
    # Guarantee: never below all-0.5 on the chips tuned on (checked; all-0.5 otherwise). As
    # tune_thresholds always compared them: sums of w * F2 over all chips, 0 where w is.
    tuned = chip_f2
    if self.tuned_on is not None:
      tuned = np.multiply(chip_f2, self.tuned_on, out=buf('tuned', w.shape, np.float64))
    found = tuned.sum(1)
    worse = found < np.multiply(w_tune, self.f2_start, out=buf('tuned', w.shape, np.float64)).sum(1)
    thresholds = self.values[state]
    thresholds[worse] = DEFAULT_THRESHOLD
    chip_f2[worse] = w[worse] * self.f2_start
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
