"""rf_jax.metrics against scikit-learn (random and adversarial inputs) and direct loops."""

import time
import warnings

import numpy as np
import pytest

from rf_jax import metrics

sklearn_metrics = pytest.importorskip('sklearn.metrics', reason='scikit-learn is a test extra')

K = 17


def _sk_ap(labels, scores):
  out = []
  for k in range(labels.shape[1]):
    if labels[:, k].sum() == 0:
      out.append(np.nan)
    else:
      out.append(sklearn_metrics.average_precision_score(labels[:, k], scores[:, k]))
  return np.array(out)


def _sk_f2(labels, preds, zero_division=0.0):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    return sklearn_metrics.fbeta_score(labels, preds, beta=2, average='samples',
                                       zero_division=zero_division)


def _random_case(rng, n, k=K, kind='continuous'):
  prevalence = rng.uniform(0.02, 0.9, size=k)
  labels = (rng.random((n, k)) < prevalence).astype(np.float32)
  if kind == 'continuous':
    scores = np.clip(labels * 0.3 + rng.random((n, k)) * 0.8, 0, 1).astype(np.float32)
  elif kind == 'ties':  # few distinct values: big tie groups mixing positives and negatives
    scores = (rng.integers(0, 5, size=(n, k)) / 4).astype(np.float32)
  elif kind == 'binary':
    scores = rng.integers(0, 2, size=(n, k)).astype(np.float32)
  else:
    raise ValueError(kind)
  return labels, scores


def _adversarial_cases():
  rng = np.random.default_rng(7)
  cases = {}
  for kind in ('continuous', 'ties', 'binary'):
    for n in (1, 2, 3, 10, 257):
      cases[f'{kind}-n{n}'] = _random_case(rng, n, kind=kind)
  labels, scores = _random_case(rng, 100)
  labels[:, 3] = 0  # all-negative tag
  labels[:, 5] = 1  # all-positive tag
  labels[:, 7] = 0
  labels[0, 7] = 1  # single positive
  scores[:, 8] = 0.5  # constant scores (one tie group)
  scores[:, 9] = scores[:, 9].round(1)
  cases['special-columns'] = (labels, scores)
  one = np.zeros((1, K), np.float32)
  one[0, [0, 12]] = 1
  cases['single-chip'] = (one, rng.random((1, K)).astype(np.float32))
  cases['all-negative'] = (np.zeros((20, K), np.float32), rng.random((20, K)).astype(np.float32))
  cases['all-positive'] = (np.ones((20, K), np.float32), rng.random((20, K)).astype(np.float32))
  labels, scores = _random_case(rng, 300)
  cases['perfect'] = (labels, labels * 0.9 + 0.05)
  cases['inverted'] = (labels, 1 - labels * 0.9 - 0.05)
  cases['float64-close'] = (labels, (0.5 + 1e-9 * rng.integers(0, 3, size=labels.shape)))
  return cases


CASES = _adversarial_cases()


@pytest.mark.parametrize('name', sorted(CASES))
def test_average_precision_matches_sklearn(name):
  labels, scores = CASES[name]
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    expected = _sk_ap(labels, scores)
  got = metrics.average_precision(labels, scores)
  assert got.dtype == np.float64 and got.shape == (labels.shape[1],)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9, equal_nan=True)
  mean_expected = np.nanmean(expected) if not np.isnan(expected).all() else np.nan
  np.testing.assert_allclose(metrics.mean_average_precision(labels, scores), mean_expected,
                             rtol=0, atol=1e-9, equal_nan=True)


def test_tags_without_positives_are_nan_and_excluded_from_map():
  rng = np.random.default_rng(0)
  labels, scores = _random_case(rng, 50)
  labels[:, [2, 11]] = 0
  ap = metrics.average_precision(labels, scores)
  assert np.isnan(ap[[2, 11]]).all()
  assert not np.isnan(np.delete(ap, [2, 11])).any()
  np.testing.assert_array_equal(metrics.tags_without_positives(labels), [2, 11])
  assert metrics.mean_average_precision(labels, scores) == pytest.approx(
      np.delete(ap, [2, 11]).mean(), abs=1e-12)
  # scikit-learn itself reports 0 for such a tag (with a warning): we do not average that in.
  with pytest.warns(UserWarning):
    assert sklearn_metrics.average_precision_score(labels[:, 2], scores[:, 2]) == 0.0
  assert np.isnan(metrics.mean_average_precision(np.zeros((4, 3)), rng.random((4, 3))))


def test_average_precision_hand_example():
  # sklearn docs example: AP = 0.8333...
  y = np.array([[0], [0], [1], [1]])
  s = np.array([[0.1], [0.4], [0.35], [0.8]])
  assert metrics.average_precision(y, s)[0] == pytest.approx(0.8333333333333333, abs=1e-15)
  # one tie group containing 1 positive of 2 chips -> precision 0.5 at recall 1.
  assert metrics.average_precision([[1], [0]], [[0.3], [0.3]])[0] == 0.5


@pytest.mark.parametrize('name', sorted(CASES))
@pytest.mark.parametrize('zero_division', [0.0, 1.0, np.nan])
def test_f2_matches_sklearn(name, zero_division):
  labels, scores = CASES[name]
  for thr in (0.5, 0.25, 0.9):
    preds = metrics.binarize(scores, thr)
    got = metrics.f2_samples(labels, preds, zero_division=zero_division)
    expected = _sk_f2(labels, preds.astype(int), zero_division=zero_division)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9, equal_nan=True)


def test_f2_empty_chip_default_matches_sklearn_default():
  labels = np.array([[0, 0, 0], [1, 0, 1]])
  preds = np.array([[0, 0, 0], [1, 0, 0]])
  with pytest.warns(Warning):  # sklearn's default zero_division='warn' -> 0.0 for the empty chip
    expected = sklearn_metrics.fbeta_score(labels, preds, beta=2, average='samples')
  assert metrics.f2_samples(labels, preds) == pytest.approx(expected, abs=1e-12)
  assert metrics.f2_samples(labels, preds) == pytest.approx((0 + 5 / 9) / 2, abs=1e-12)


def test_binarize_is_strict():
  np.testing.assert_array_equal(metrics.binarize(np.array([0.4, 0.5, 0.6])), [False, False, True])
  np.testing.assert_array_equal(metrics.binarize(np.array([[0.5, 0.5]]), [0.4, 0.5]),
                                [[True, False]])


def test_bad_inputs_are_errors():
  with pytest.raises(ValueError, match='shapes'):
    metrics.average_precision(np.zeros((3, 2)), np.zeros((3, 3)))
  with pytest.raises(ValueError, match='0/1'):
    metrics.average_precision(np.full((3, 2), 2), np.zeros((3, 2)))
  with pytest.raises(ValueError, match='NaN'):
    metrics.average_precision(np.zeros((3, 2)), np.full((3, 2), np.nan))
  with pytest.raises(ValueError, match='binarize'):
    metrics.f2_samples(np.zeros((3, 2)), np.full((3, 2), 0.7))


@pytest.mark.parametrize('name', sorted(CASES))
def test_tuned_thresholds_never_below_half(name):
  labels, scores = CASES[name]
  thr = metrics.tune_thresholds(labels, scores)
  assert thr.shape == (labels.shape[1],)
  assert ((thr > 0) & (thr < 1)).all()
  tuned = metrics.f2_at(labels, scores, thr)
  at_half = metrics.f2_at(labels, scores, 0.5)
  assert tuned >= at_half
  assert tuned == pytest.approx(_sk_f2(labels, metrics.binarize(scores, thr).astype(int)), abs=1e-9)


def test_tuned_thresholds_improve_and_are_coordinatewise_optimal():
  rng = np.random.default_rng(3)
  labels, scores = _random_case(rng, 500)
  scores = scores * 0.6  # systematically low scores: 0.5 is a bad threshold
  thr = metrics.tune_thresholds(labels, scores, max_sweeps=20)
  best = metrics.f2_at(labels, scores, thr)
  assert best > metrics.f2_at(labels, scores, 0.5) + 0.05
  # After convergence no single-tag move to a grid candidate improves F2 (checked by brute force).
  for j in range(0, K, 4):
    for c in metrics.DEFAULT_CANDIDATES[::7]:
      trial = thr.copy()
      trial[j] = c
      assert metrics.f2_at(labels, scores, trial) <= best + 1e-12


def test_tune_thresholds_keeps_half_when_nothing_better():
  labels = np.array([[1, 0], [0, 1], [1, 1]])
  scores = np.where(labels == 1, 0.9, 0.1)  # already perfect at 0.5
  np.testing.assert_array_equal(metrics.tune_thresholds(labels, scores), [0.5, 0.5])


def test_tune_thresholds_is_fast_at_validation_size():
  rng = np.random.default_rng(1)
  labels, scores = _random_case(rng, 13_400)
  start = time.perf_counter()
  metrics.tune_thresholds(labels, scores)
  assert time.perf_counter() - start < 3.0


def _plain_tune(labels, scores, weights=None, *, max_sweeps=3, zero_division=0.0,
                candidates=metrics.DEFAULT_CANDIDATES):
  """tune_thresholds' documented coordinate search spelled out: every candidate's F2 (chip F2
  summed with the chips' weights) from the predictions themselves, no shortcut."""
  labels = np.asarray(labels, np.float64)
  scores = np.asarray(scores, np.float64)
  w = np.ones(len(labels)) if weights is None else np.asarray(weights, np.float64)
  candidates = np.asarray(candidates, np.float64)

  def f2_sum(thresholds):  # [C, K] -> [C]
    pred = scores[None] > thresholds[:, None, :]
    tp = (pred & (labels[None] == 1)).sum(2)
    denom = 4 * labels.sum(1)[None] + pred.sum(2)
    return (w * np.where(denom > 0, 5 * tp / np.maximum(denom, 1), zero_division)).sum(1)

  thr = np.full(labels.shape[1], 0.5)
  tolerance = 1e-12 * w.sum()
  for _ in range(max_sweeps):
    changed = False
    for j in range(labels.shape[1]):
      trials = np.repeat(thr[None], len(candidates), axis=0)
      trials[:, j] = candidates
      value = f2_sum(trials)
      if value.max() > f2_sum(thr[None])[0] + tolerance:  # strictly better: move, to the
        ok = value >= value.max() - tolerance            # candidate nearest 0.5 among the best
        thr[j] = candidates[np.argmin(np.where(ok, np.abs(candidates - 0.5), np.inf))]
        changed = True
    if not changed:
      break
  if f2_sum(thr[None])[0] < f2_sum(np.full((1, len(thr)), 0.5))[0]:
    thr[:] = 0.5
  return thr


def _tails_case(rng, n):
  """Scores of some tags far below 0.5 (best thresholds under 0.05), of others near 1, others
  rounded onto the candidates (ties), and two tags whose best threshold lies outside
  metrics._WINDOW while a threshold inside it is better than its edges: every path of the
  threshold search, and its bounds put to work."""
  labels, scores = _random_case(rng, n)
  scores = scores.astype(np.float64)
  scores[:, :4] *= 0.06
  scores[:, 4:7] = 1 - (1 - scores[:, 4:7]) * 0.1
  scores[:, 7:10] = scores[:, 7:10].round(2)
  u = rng.random(n)
  # tag 10: half the positives at 0.6-0.9, half at 0.02-0.04, negatives at 0.1-0.3 (best: 0.02)
  labels[:, 10] = u < 0.5
  scores[:, 10] = np.where(u < 0.5, np.where(rng.random(n) < 0.5, 0.6 + 0.3 * u, 0.02 + 0.02 * u),
                           0.1 + 0.2 * u)
  # tag 11: positives above every candidate but a few at 0.92, half the negatives at 0.97, the
  # others at 0.3-0.5 (best: 0.97)
  labels[:, 11] = u < 0.5
  scores[:, 11] = np.where(u < 0.5, np.where(rng.random(n) < 0.05, 0.92, 0.999),
                           np.where(rng.random(n) < 0.5, 0.97, 0.3 + 0.2 * u))
  return labels, scores


@pytest.mark.parametrize('name', ['continuous-n257', 'ties-n257', 'special-columns', 'perfect',
                                  'float64-close', 'tails'])
@pytest.mark.parametrize('zero_division', [0.0, 1.0])
def test_tune_thresholds_equals_the_plain_search(name, zero_division):
  labels, scores = CASES[name] if name != 'tails' else _tails_case(np.random.default_rng(4), 300)
  np.testing.assert_array_equal(
      metrics.tune_thresholds(labels, scores, zero_division=zero_division),
      _plain_tune(labels, scores, zero_division=zero_division))


@pytest.mark.parametrize('weights', ['counts', 'fractional'])
def test_tune_thresholds_weighted_equals_the_plain_search(weights):
  """Row b: the plain search on the chips repeated weights[b] times (counts: on the copied rows;
  fractional: weighted), whatever shortcuts the weighted search takes."""
  rng = np.random.default_rng(5)
  labels, scores = _tails_case(rng, 60)
  if weights == 'counts':
    w = np.stack([np.bincount(rng.integers(0, 60, 60), minlength=60) for _ in range(6)])
  else:
    w = rng.integers(0, 40, (6, 60)) / 8.0  # 40 values: int32 codes
  got = metrics.tune_thresholds_weighted(labels, scores, w)
  for b in range(len(w)):
    if weights == 'counts':
      rows = np.repeat(np.arange(60), w[b].astype(int))
      want = _plain_tune(labels[rows], scores[rows])
    else:
      want = _plain_tune(labels, scores, w[b])
    np.testing.assert_array_equal(got[b], want)


def test_threshold_search_shortcuts_change_nothing(monkeypatch):
  """The search with its window of thresholds (bounding the others) and weights folded into its
  tables equals the search summing every chip and multiplying by the weights, on resamples and
  on resamples without a fold; and its chips' F2 are f2_at's."""
  rng = np.random.default_rng(6)
  labels, scores = _tails_case(rng, 300)
  counts = np.stack([np.bincount(rng.integers(0, 300, 300), minlength=300) for _ in range(30)])
  fold = metrics.crossfit_folds(300, 4, 0)

  def run():
    out = []
    for tuned_on in (None, fold != 1):
      search = metrics._ThresholdSearch(labels, scores, tuned_on=tuned_on)
      out.append(search(counts.astype(np.uint8)))
    return out

  fast = run()
  monkeypatch.setattr(metrics, '_WINDOW', (0.0, 1.0))
  monkeypatch.setattr(metrics, '_MAX_WEIGHT_VALUES', 0)
  for (thr, chip_f2), (plain_thr, plain_f2) in zip(fast, run()):
    np.testing.assert_array_equal(thr, plain_thr)
    np.testing.assert_array_equal(chip_f2, plain_f2)
    for b in range(0, 30, 7):
      f2 = metrics.f2_at_weighted(labels, scores, thr[b:b + 1], counts[b:b + 1])[0]
      assert chip_f2[b].sum() / counts[b].sum() == pytest.approx(f2, abs=1e-12)


def _tail_loop(labels, scores, thresholds, top_n):
  order = sorted(range(len(scores)), key=lambda i: -scores[i])[:top_n]
  out = []
  for t in thresholds:
    num = den = 0
    for i in order:
      pred = 1 if scores[i] > 0.5 else 0
      if scores[i] > t:
        den += 1
        num += int(pred == labels[i])
    out.append(num / den if den else np.nan)
  return np.array(out)


@pytest.mark.parametrize('seed', range(5))
@pytest.mark.parametrize('top_n', [1, 7, 50, 10_000])
def test_tail_accuracy_matches_loop(seed, top_n):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 120))
  labels = (rng.random(n) < 0.4).astype(np.float32)
  scores = rng.random(n).astype(np.float32)
  if seed % 2:
    scores = np.round(scores, 1)  # ties, including at the top-N cut and at thresholds
  thresholds = np.concatenate([np.linspace(0.0, 1.0, 41), [0.5, 0.95]])
  got = metrics.tail_accuracy(labels, scores, thresholds, top_n)
  np.testing.assert_allclose(got, _tail_loop(labels, scores, thresholds, top_n), equal_nan=True)


def test_tail_accuracy_nan_and_values():
  labels = np.array([1, 0, 1, 1, 0])
  scores = np.array([0.99, 0.95, 0.9, 0.3, 0.6])
  got = metrics.tail_accuracy(labels, scores, [0.5, 0.92, 0.99], top_n=3)
  # top 3: 0.99(y1) 0.95(y0) 0.9(y1); t=0.5: 2/3; t=0.92: 1/2; t=0.99: none above -> NaN.
  np.testing.assert_allclose(got, [2 / 3, 1 / 2, np.nan], equal_nan=True)
  assert np.isnan(metrics.tail_accuracy(labels, scores, [0.5], top_n=None)).sum() == 0


def test_mean_precision_at_half_equals_sklearn():
  rng = np.random.default_rng(3)
  labels = (rng.random((200, 17)) < 0.3).astype(np.float32)
  scores = np.clip(labels * 0.3 + rng.random((200, 17)) * 0.7, 0, 1)
  scores[:, 5] = 0.1  # a tag predicted nowhere: precision 0, as the study's code counted it
  want = np.mean([sklearn_metrics.precision_score(labels[:, k], scores[:, k] > 0.5, zero_division=0)
                  for k in range(17)])
  assert metrics.mean_precision_at(labels, scores, 0.5) == pytest.approx(want, abs=1e-12)
