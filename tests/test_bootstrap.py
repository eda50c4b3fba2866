"""rf_jax.bootstrap, the cross-fitted tuned F2 and the comparison's intervals, against independent
references: metrics on copied rows, scipy.stats.bootstrap, scikit-learn's F2, plain loops."""

import json

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as sklearn_metrics

from rf_jax import bootstrap, comparison, config_checks, metrics, report
from rf_jax.configs import default
from test_metrics import _plain_tune, _tails_case

TAGS = tuple(f'tag{k}' for k in range(17))
N = 120  # chips
R = 1000  # resamples of the shared fixture


def _labels(rng, n=N):
  labels = (rng.random((n, 17)) < 0.3).astype(np.float64)
  labels[:, 3] = 0
  labels[rng.choice(n, 2, replace=False), 3] = 1  # a rare tag: no positive in ~13% of resamples
  labels[:, 8] = 0  # no positive at all: NaN AP, excluded from mAP
  return labels


def _scores(rng, labels, skill):
  return np.clip(skill * labels + (1 - skill) * rng.random(labels.shape), 0, 1)


@pytest.fixture(scope='module')
def study():
  """Three runs on the same chips: a; b, a with small noise (correlated with a); worse."""
  rng = np.random.default_rng(0)
  labels = _labels(rng)
  a = _scores(rng, labels, 0.35)
  scores = {'a': a, 'b': np.clip(a + 0.03 * rng.standard_normal(a.shape), 0, 1),
            'worse': _scores(rng, labels, 0.05)}
  indices = bootstrap.resample_indices(N, R, seed=0)
  reps = {r: bootstrap.replicates(labels, s, indices, folds=5) for r, s in scores.items()}
  return labels, scores, indices, reps


def _sk_f2(labels, preds):
  return sklearn_metrics.fbeta_score(labels, preds, beta=2, average='samples', zero_division=0)


def _crossfit_reference(labels, scores, chip_fold, folds):
  """Cross-fitted tuned F2, plainly: tune on the chips of the other folds, predict the held
  fold, scikit-learn's F2 over all chips pooled."""
  preds = np.zeros(labels.shape, int)
  for f in range(folds):
    held = chip_fold == f
    thr = metrics.tune_thresholds(labels[~held], scores[~held])
    preds[held] = scores[held] > thr
  return _sk_f2(labels.astype(int), preds)


def test_replicates_are_the_metrics_of_the_resampled_chips(study):
  """Each resample's weighted metrics equal metrics.py (and scikit-learn's F2) on the rows the
  resample copies: AP (NaN where the tag has no positive), mAP, F2 at 0.5, tuned F2 with the same
  thresholds, and the cross-fit with each chip in its own fold."""
  labels, scores, indices, reps = study
  fold = metrics.crossfit_folds(N, 5, 0)
  for b in range(0, R, 97):
    rows = indices[b]
    y, s = labels[rows], scores['a'][rows]
    np.testing.assert_allclose(reps['a']['ap'][b], metrics.average_precision(y, s), rtol=1e-12)
    assert reps['a']['map'][b] == pytest.approx(metrics.mean_average_precision(y, s), abs=1e-12)
    assert reps['a']['f2_at_0.5'][b] == pytest.approx(_sk_f2(y.astype(int), (s > 0.5) * 1),
                                                      abs=1e-12)
    thr = metrics.tune_thresholds(y, s)
    np.testing.assert_array_equal(
        metrics.tune_thresholds_weighted(labels, scores['a'], bootstrap._counts(rows[None], N))[0],
        thr)
    assert reps['a']['f2_tuned'][b] == pytest.approx(_sk_f2(y.astype(int), (s > thr) * 1),
                                                     abs=1e-12)
    assert reps['a']['f2_tuned_crossfit'][b] == pytest.approx(
        _crossfit_reference(y, s, fold[rows], 5), abs=1e-12)
  assert np.isnan(reps['a']['ap'][:, 8]).all()
  assert 0 < np.isnan(reps['a']['ap'][:, 3]).mean() < 0.5  # the rare tag: NaN in some resamples


def test_replicates_equal_plain_loops():
  """Every replicate against plain loops on the rows each resample copies, without the
  vectorised path or its shortcuts: scikit-learn's AP and F2, and the coordinate search spelled
  out (test_metrics._plain_tune) on the resample and on each fold's complement in it; on scores
  that send thresholds below, inside and above metrics._WINDOW."""
  labels, scores = _tails_case(np.random.default_rng(8), 48)
  indices = bootstrap.resample_indices(48, 4, seed=2)
  reps = bootstrap.replicates(labels, scores, indices, folds=4)
  fold = metrics.crossfit_folds(48, 4, 0)
  for b, rows in enumerate(indices):
    y, s, chip_fold = labels[rows].astype(int), scores[rows], fold[rows]
    ap = [sklearn_metrics.average_precision_score(y[:, k], s[:, k]) if y[:, k].any() else np.nan
          for k in range(17)]
    np.testing.assert_allclose(reps['ap'][b], ap, rtol=0, atol=1e-12, equal_nan=True)
    assert reps['map'][b] == pytest.approx(np.nanmean(ap), abs=1e-12)
    assert reps['f2_at_0.5'][b] == pytest.approx(_sk_f2(y, (s > 0.5) * 1), abs=1e-12)
    assert reps['f2_tuned'][b] == pytest.approx(_sk_f2(y, (s > _plain_tune(y, s)) * 1), abs=1e-12)
    preds = np.zeros_like(y)
    for f in range(4):
      held = chip_fold == f
      preds[held] = s[held] > _plain_tune(y[~held], s[~held])
    assert reps['f2_tuned_crossfit'][b] == pytest.approx(_sk_f2(y, preds), abs=1e-12)


def test_all_chips_once_give_the_point_values(study):
  labels, scores, _, _ = study
  once = bootstrap.replicates(labels, scores['a'], np.arange(N)[None], folds=5)
  point = bootstrap.point_values(labels, scores['a'], folds=5)
  for m in bootstrap.METRICS:
    assert once[m][0] == pytest.approx(point[m], abs=1e-12), m
  np.testing.assert_allclose(once['ap'][0], point['ap'], rtol=1e-12)


def test_map_interval_matches_scipy_bootstrap(study):
  """The percentile interval of mAP: exactly that of a plain loop over the same resamples, and
  within Monte-Carlo error of scipy.stats.bootstrap's (its own random resamples). Each end of a
  95% percentile interval from R = 1000 resamples has a standard error of about
  sqrt(0.025 * 0.975 / R) / phi(1.96) = 0.085 bootstrap standard deviations (normal
  approximation), 0.12 for the difference of two independent runs: 0.5 is over 4 of them."""
  labels, scores, indices, reps = study
  y, s = labels, scores['a']
  loop = [metrics.mean_average_precision(y[i], s[i]) for i in indices]
  np.testing.assert_allclose(bootstrap.interval(reps['a']['map']),
                             np.percentile(loop, [2.5, 97.5]), rtol=1e-12)
  ref = scipy.stats.bootstrap((np.arange(N),), lambda i: metrics.mean_average_precision(y[i], s[i]),
                              vectorized=False, n_resamples=R, method='percentile',
                              confidence_level=0.95, rng=np.random.default_rng(1))
  sd = np.std(reps['a']['map'])
  lo, hi = bootstrap.interval(reps['a']['map'])
  assert abs(lo - ref.confidence_interval.low) < 0.5 * sd
  assert abs(hi - ref.confidence_interval.high) < 0.5 * sd


def test_per_tag_ap_interval_ignores_resamples_without_positives(study):
  labels, scores, indices, reps = study
  loop = [metrics.average_precision(labels[i], scores['a'][i])[3] for i in indices]
  np.testing.assert_allclose(bootstrap.interval(reps['a']['ap'][:, 3]),
                             np.nanpercentile(loop, [2.5, 97.5]), rtol=1e-12)
  assert np.isnan(bootstrap.interval(reps['a']['ap'][:, 8])).all()


def test_paired_interval_is_narrower_than_unpaired(study):
  """b is a plus small noise: the chips' shared difficulty cancels in the paired difference, not
  in one of runs resampled independently (computed here from two other resample draws)."""
  labels, scores, _, reps = study
  paired = bootstrap.difference(0.0, 0.0, reps['a']['map'], reps['b']['map'])['ci']
  unpaired = []
  for seed, run in ((1, 'a'), (2, 'b')):
    counts = bootstrap._counts(bootstrap.resample_indices(N, R, seed), N)
    unpaired.append(np.nanmean(metrics.average_precision_weighted(labels, scores[run], counts), 1))
  lo, hi = np.percentile(unpaired[0] - unpaired[1], [2.5, 97.5])
  assert paired[1] - paired[0] < 0.5 * (hi - lo)


def test_p_value_small_for_a_clearly_better_run(study):
  _, _, _, reps = study
  for m in bootstrap.METRICS:
    d = bootstrap.difference(1.0, 0.0, reps['a'][m], reps['worse'][m])
    assert d['p'] == pytest.approx(2 / (R + 1)), m  # no resample on the other side of 0
    assert d['ci'][0] > 0


def test_p_value_large_for_runs_of_equal_quality():
  """Two runs with i.i.d. noise of the same size: under this null the p-value is about uniform,
  so one dataset can give a small one; over 9 datasets the median stays above 0.2 (it fails with
  probability ~2%, fixed here by the seeds)."""
  p = []
  for seed in range(9):
    rng = np.random.default_rng(100 + seed)
    labels = _labels(rng, 80)
    counts = bootstrap._counts(bootstrap.resample_indices(80, 500, seed), 80)
    reps = [np.nanmean(metrics.average_precision_weighted(labels, _scores(rng, labels, 0.2),
                                                          counts), 1) for _ in range(2)]
    p.append(bootstrap.p_value(reps[0] - reps[1]))
  assert np.median(p) > 0.2, p


def test_p_value_definition():
  assert bootstrap.p_value(np.array([1.0, 2.0, 3.0])) == pytest.approx(2 * 1 / 4)
  assert bootstrap.p_value(np.array([-1.0, 2.0, 3.0, np.nan])) == pytest.approx(2 * 2 / 4)
  assert bootstrap.p_value(np.zeros(10)) == 1.0  # identical runs
  assert np.isnan(bootstrap.p_value(np.full(3, np.nan)))


def test_crossfit_folds():
  fold = metrics.crossfit_folds(23, 5, seed=3)
  assert sorted(np.bincount(fold)) == [4, 4, 5, 5, 5]
  np.testing.assert_array_equal(fold, metrics.crossfit_folds(23, 5, seed=3))
  assert not np.array_equal(fold, metrics.crossfit_folds(23, 5, seed=4))
  with pytest.raises(ValueError, match='folds'):
    metrics.crossfit_folds(3, 5)


@pytest.mark.parametrize('seed', range(4))
def test_crossfit_f2_is_honest(seed):
  """On scores unrelated to the labels, thresholds tuned in-sample find chance structure that the
  held-out folds do not have: cross-fitted F2 <= in-sample tuned F2. And it equals the plain
  re-implementation with scikit-learn's F2."""
  rng = np.random.default_rng(seed)
  labels = (rng.random((200, 17)) < 0.2).astype(np.float64)
  scores = rng.random((200, 17))
  crossfit = metrics.f2_tuned_crossfit(labels, scores, 5, seed)
  assert crossfit <= metrics.f2_at(labels, scores, metrics.tune_thresholds(labels, scores))
  assert crossfit == pytest.approx(
      _crossfit_reference(labels, scores, metrics.crossfit_folds(200, 5, seed), 5), abs=1e-12)


def test_seed_replicates_are_a_two_level_resample():
  rng = np.random.default_rng(0)
  reps = rng.random((3, 50))  # 3 seeds' runs x 50 chip resamples
  seeds = rng.integers(0, 3, (50, 3))
  loop = [np.mean([reps[s, b] for s in seeds[b]]) for b in range(50)]
  np.testing.assert_allclose(bootstrap.seed_replicates(reps, seeds), loop, rtol=1e-12)


# --------------------------------------------------------------------------- write_comparison

def _workdir(tmp_path, name, model, seed, labels, scores, config=None):
  """A fake evaluated run (as tests/test_report.py's): predictions.npz, metrics.json,
  history.json, and config.json with its seed."""
  wd = tmp_path / name
  (wd / 'eval').mkdir(parents=True)
  names = np.array([f'train_{i}' for i in range(len(labels))])
  order = np.random.default_rng(seed).permutation(len(labels))  # rows in another order: aligned
  np.savez(wd / 'eval' / 'predictions.npz', names=names[order],
           labels=labels[order].astype(np.float32), scores=scores[order].astype(np.float32))
  summary = report.metrics_summary(labels, scores.astype(np.float32), TAGS, model=model, loss=0.2)
  (wd / 'eval' / 'metrics.json').write_text(json.dumps(summary))
  (wd / 'history.json').write_text(json.dumps({'model': model, 'epochs': []}))
  (wd / 'config.json').write_text(json.dumps({'seed': seed, 'model': {'name': model},
                                              **(config or {})}))
  return wd


def _runs(tmp_path, models=(('rgb', 0.2), ('dual', 0.4)), seeds=(0,), n=40):
  rng = np.random.default_rng(7)
  labels = _labels(rng, n)
  return [_workdir(tmp_path, f'{m}_s{s}', m, s, labels, _scores(rng, labels, skill))
          for m, skill in models for s in seeds]


def test_comparison_json(tmp_path):
  workdirs = _runs(tmp_path)
  # An earlier rf_jax's metrics.json has no cross-fitted F2: computed from predictions.npz.
  old = json.loads((workdirs[0] / 'eval' / 'metrics.json').read_text())
  del old['f2_tuned_crossfit'], old['crossfit_folds']
  (workdirs[0] / 'eval' / 'metrics.json').write_text(json.dumps(old))
  md = comparison.write_comparison(workdirs, tmp_path / 'cmp', resamples=200, seed=0,
                                   folds=4).read_text()
  out = json.loads((tmp_path / 'cmp' / 'comparison.json').read_text())
  assert (out['resamples'], out['seed'], out['folds'], out['chips']) == (200, 0, 4, 40)
  metric_names = [*bootstrap.METRICS, *(f'ap/{t}' for t in TAGS)]
  assert list(out['runs']) == ['rgb', 'dual']
  for run in out['runs'].values():
    assert list(run) == metric_names
    for m in bootstrap.METRICS:
      lo, hi = run[m]['ci']
      assert lo <= run[m]['value'] <= hi, m
    assert run['ap/tag8'] == {'value': None, 'ci': [None, None]}  # no positives
  first, second = (np.load(w / 'eval' / 'predictions.npz') for w in workdirs)
  assert out['runs']['rgb']['f2_tuned_crossfit']['value'] == pytest.approx(
      metrics.f2_tuned_crossfit(first['labels'], first['scores'], 4), abs=1e-12)  # its row order
  assert out['runs']['dual']['map']['value'] == pytest.approx(  # rows aligned on the chip names
      metrics.mean_average_precision(second['labels'], second['scores']), abs=1e-12)
  assert [(d['a'], d['b'], d['metric']) for d in out['differences']] == [
      ('rgb', 'dual', m) for m in metric_names]
  for d in out['differences']:
    assert set(d) == {'a', 'b', 'metric', 'value', 'ci', 'p'}
    assert d['value'] is None or d['value'] == pytest.approx(
        out['runs']['rgb'][d['metric']]['value'] - out['runs']['dual'][d['metric']]['value'])
  assert out['models'] == {} and out['model_differences'] == []
  assert '| rgb - dual | F2 cross-fitted |' in md and '| tag3 | ' in md
  assert '](comparison_differences.png)' in md
  assert (tmp_path / 'cmp' / 'comparison_differences.png').read_bytes()[:4] == b'\x89PNG'


def test_comparison_is_deterministic(tmp_path):
  workdirs = _runs(tmp_path)
  texts = []
  for out, seed in (('one', 0), ('two', 0), ('other', 1)):
    comparison.write_comparison(workdirs, tmp_path / out, resamples=200, seed=seed)
    texts.append((tmp_path / out / 'comparison.json').read_text())
  assert texts[0] == texts[1]
  same, other = json.loads(texts[0]), json.loads(texts[2])
  assert other['runs']['rgb']['map']['value'] == same['runs']['rgb']['map']['value']
  assert other['runs']['rgb']['map']['ci'] != same['runs']['rgb']['map']['ci']


def test_seed_groups(tmp_path):
  workdirs = _runs(tmp_path, seeds=(0, 1, 2), n=30)
  md = comparison.write_comparison(workdirs, tmp_path / 'cmp', resamples=100).read_text()
  out = json.loads((tmp_path / 'cmp' / 'comparison.json').read_text())
  assert list(out['models']) == ['rgb', 'dual']
  for model, summary in out['models'].items():
    assert summary['seeds'] == [0, 1, 2]
    assert summary['runs'] == [f'{model} ({model}_s{s})' for s in range(3)]
    for m in bootstrap.METRICS:
      values = [out['runs'][r][m]['value'] for r in summary['runs']]
      assert summary['mean'][m] == pytest.approx(np.mean(values), abs=1e-12)
      assert summary['sd'][m] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
      lo, hi = summary['ci'][m]
      assert lo <= hi
  diffs = {d['metric']: d for d in out['model_differences']}
  assert all((d['a'], d['b']) == ('rgb', 'dual') for d in out['model_differences'])
  assert diffs['map']['value'] == pytest.approx(
      out['models']['rgb']['mean']['map'] - out['models']['dual']['mean']['map'])
  assert '## Seeds' in md and '## Differences between models' in md
  assert '| rgb - dual | mAP |' in md and '| tag0 | ' in md


def test_runs_of_other_configs_are_not_a_seed_group(tmp_path):
  rng = np.random.default_rng(3)
  labels = _labels(rng, 30)
  workdirs = [_workdir(tmp_path, f'rgb_{s}', 'rgb', s, labels, _scores(rng, labels, 0.3),
                       config={'optim': {'lr': lr}}) for s, lr in ((0, 0.005), (1, 0.01))]
  md = comparison.write_comparison(workdirs, tmp_path / 'cmp', resamples=100).read_text()
  assert json.loads((tmp_path / 'cmp' / 'comparison.json').read_text())['models'] == {}
  assert 'rgb: the runs differ in config.optim.lr besides the seed' in md


def test_comparison_without_predictions_has_values_without_intervals(tmp_path):
  workdirs = _runs(tmp_path)
  for wd in workdirs:  # compared by the dataset's fingerprint instead of the chips' names
    (wd / 'eval' / 'predictions.npz').unlink()
    (wd / 'provenance.json').write_text(json.dumps({'dataset': {'fingerprint': 'same'}}))
  md = comparison.write_comparison(workdirs, tmp_path / 'cmp', resamples=200).read_text()
  out = json.loads((tmp_path / 'cmp' / 'comparison.json').read_text())
  summary = json.loads((workdirs[1] / 'eval' / 'metrics.json').read_text())
  assert out['runs']['dual']['map'] == {'value': summary['map'], 'ci': None}
  assert out['differences'] == [] and out['models'] == {}
  assert f'No intervals: {workdirs[0] / "eval" / "predictions.npz"} does not exist' in md


@pytest.mark.parametrize('key, value, message', [
    ('compare.resamples', 50, r'config.compare.resamples=50 must be an integer >= 100'),
    ('compare.seed', -1, r'config.compare.seed=-1 must be >= 0'),
    ('eval.crossfit_folds', 1, r'config.eval.crossfit_folds=1 must be an integer >= 2')])
def test_config_keys_are_checked(key, value, message):
  config = default.get_config()
  config_checks.check(config)
  section, field = key.split('.')
  config[section][field] = value
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.check(config)


def test_more_folds_than_chips_is_refused_before_writing(tmp_path):
  workdirs = _runs(tmp_path, n=40)
  with pytest.raises(comparison.ComparisonError, match='config.eval.crossfit_folds=50'):
    comparison.write_comparison(workdirs, tmp_path / 'cmp', resamples=100, folds=50)
  assert not (tmp_path / 'cmp').exists()


def test_metrics_summary_and_report_carry_the_crossfit(tmp_path):
  rng = np.random.default_rng(5)
  labels = _labels(rng, 40)
  scores = _scores(rng, labels, 0.3)
  summary = report.metrics_summary(labels, scores, TAGS, model='rgb', crossfit_folds=4)
  assert summary['f2_tuned_crossfit'] == metrics.f2_tuned_crossfit(labels, scores, 4)
  assert summary['crossfit_folds'] == 4
  assert report.metrics_summary(labels[:3], scores[:3], TAGS, model='rgb')[
      'f2_tuned_crossfit'] is None  # fewer chips than folds
  md = report.write_report(tmp_path, history=None, predictions={
      'names': np.array([f'c{i}' for i in range(40)]), 'labels': labels, 'scores': scores},
                           tags=TAGS, load_rgb=None, crossfit_folds=4).read_text()
  assert 'tuned on these same chips (optimistic)' in md and 'cross-fitted, 4 folds' in md
  assert f'| **F2 tuned, cross-fitted** (4 folds) | | {summary["f2_tuned_crossfit"]:.4f} |' in md
