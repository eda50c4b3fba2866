"""--mode ensemble on fake evaluated and predicted workdirs (no training): the mean of the
members' probabilities matched by chip name, thresholds tuned on it, its submission; every
refusal one UserError naming the member."""

import csv
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from rf_jax import comparison
from rf_jax import ensemble
from rf_jax import errors
from rf_jax import metrics
from rf_jax import report
from rf_jax import workdir as workdir_lib
from rf_jax.data import planet

NUM_VAL, NUM_TEST = 50, 30
STATISTICS = {'resamples': 200, 'seed': 0, 'folds': 5}  # config.compare, eval.crossfit_folds


def _chips(n: int, prefix: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The same chips (names, labels) for every member unless `seed` differs."""
  labels = (np.random.default_rng(seed).random((n, planet.NUM_TAGS)) < 0.3).astype(np.float32)
  return np.asarray([f'{prefix}_{i}' for i in range(n)]), labels


def _member(root: pathlib.Path, seed: int, model: str = 'rgb', val_seed: int = 0,
            num_val: int = NUM_VAL, num_test: int = NUM_TEST, step: int = 40,
            test_step: int | None = None) -> pathlib.Path:
  """A fake member: its validation and test scores in an order of its own (seeded)."""
  rng = np.random.default_rng(100 + seed)
  wd = workdir_lib.Workdir(root)
  names, labels = _chips(num_val, 'train', val_seed)
  scores = np.clip(0.4 * labels + 0.6 * rng.random(labels.shape), 0, 1).astype(np.float32)
  order = rng.permutation(num_val)
  workdir_lib.write_npz(wd.predictions, {'names': names[order], 'labels': labels[order],
                                         'scores': scores[order], 'step': np.int64(step)})
  workdir_lib.write_json(wd.metrics, report.metrics_summary(labels, scores, planet.TAGS,
                                                            model=model, loss=0.2, step=step))
  test_names = _chips(num_test, 'test')[0][rng.permutation(num_test)]
  workdir_lib.write_npz(wd.test_predictions, {
      'names': test_names, 'scores': rng.random((num_test, planet.NUM_TAGS)).astype(np.float32),
      'step': np.int64(step if test_step is None else test_step)})
  return root


def _by_name(path: pathlib.Path) -> dict:
  saved = workdir_lib.read_npz(path)
  return {str(n): (saved['scores'][i], saved['labels'][i] if 'labels' in saved else None)
          for i, n in enumerate(saved['names'])}


def _mean_by_name(members, path) -> dict:
  """name -> the mean of the members' saved scores of that chip (float64)."""
  each = [_by_name(path(workdir_lib.Workdir(m))) for m in members]
  return {n: np.mean([e[n][0].astype(np.float64) for e in each], axis=0) for n in each[0]}


def test_the_ensemble_is_the_mean_of_its_members_matched_by_chip_name(tmp_path, capsys):
  members = [_member(tmp_path / m, i, m) for i, m in enumerate(('rgb', 'rgbir', 'dual'))]
  out = tmp_path / 'ens'
  summary = ensemble.write_ensemble(members, out, **STATISTICS)
  wd = workdir_lib.Workdir(out)

  saved = workdir_lib.read_npz(wd.predictions)
  want = _mean_by_name(members, lambda w: w.predictions)
  assert sorted(map(str, saved['names'])) == sorted(want)
  first = _by_name(workdir_lib.Workdir(members[0]).predictions)
  for name, scores, labels in zip(saved['names'], saved['scores'], saved['labels']):
    np.testing.assert_allclose(scores, want[str(name)], rtol=1e-6, err_msg=name)
    np.testing.assert_array_equal(labels, first[str(name)][1], err_msg=name)

  thresholds = metrics.tune_thresholds(saved['labels'], saved['scores'])
  assert summary['thresholds'] == {t: float(v) for t, v in zip(planet.TAGS, thresholds)}
  assert summary == workdir_lib.read_json(wd.metrics)
  for metric in ('map', 'f2_at_0.5', 'f2_tuned', 'f2_tuned_crossfit'):  # with intervals
    low, high = summary['intervals'][metric]['ci']
    assert summary['intervals'][metric]['value'] == pytest.approx(summary[metric])
    assert 0 <= low < high <= 1, metric
  assert summary['map'] == pytest.approx(metrics.mean_average_precision(saved['labels'],
                                                                        saved['scores']))
  assert summary['model'] == 'ensemble rgb+rgbir+dual' and summary['loss'] is None
  assert [m['workdir'] for m in summary['members']] == list(map(str, members))

  test = workdir_lib.read_npz(wd.test_predictions)
  want_test = _mean_by_name(members, lambda w: w.test_predictions)
  for name, scores in zip(test['names'], test['scores']):
    np.testing.assert_allclose(scores, want_test[str(name)], rtol=1e-6, err_msg=name)
  with open(wd.submission, newline='') as f:
    rows = list(csv.reader(f))
  assert rows[0] == ['image_name', 'tags'] and len(rows) == 1 + NUM_TEST
  predicted = 0
  for name, tags in rows[1:]:
    want_tags = [t for t, on in zip(planet.TAGS, metrics.binarize(want_test[name], thresholds))
                 if on]
    assert tags.split() == want_tags, name
    predicted += len(want_tags)
  assert predicted > 0
  assert 'ensemble rgb+rgbir+dual: val mAP' in capsys.readouterr().out
  assert wd.report.is_file() and 'chip grid not drawn' in wd.report.read_text()

  # An ensemble is itself a member: its saved scores have what a member's have.
  again = ensemble.write_ensemble([out, members[0]], tmp_path / 'ens2', **STATISTICS)
  assert again['model'] == 'ensemble ensemble rgb+rgbir+dual+rgb'


def _refused(members, out, error, *fragments) -> str:
  """The ensemble's error names each fragment, and nothing is written."""
  files = lambda: {p: p.read_bytes() for p in pathlib.Path(out).rglob('*') if p.is_file()}
  before = files()
  with pytest.raises(error) as raised:
    ensemble.write_ensemble(members, out, **STATISTICS)
  assert isinstance(raised.value, errors.UserError)
  for fragment in fragments:
    assert str(fragment) in str(raised.value), (fragment, str(raised.value))
  assert files() == before
  return str(raised.value)


def test_members_that_cannot_be_averaged_are_refused(tmp_path):
  a, b = _member(tmp_path / 'a', 0), _member(tmp_path / 'b', 1)
  out = tmp_path / 'ens'
  _refused([a], out, ensemble.EnsembleError, 'names 1 workdir', 'two or more')
  _refused([a, b, a], out, comparison.ComparisonError, f'--members names {a} twice')
  _refused([a, tmp_path / 'b' / '..' / 'a'], out, comparison.ComparisonError,
           'the same directory')
  _refused([a, tmp_path / 'typo'], out, comparison.WorkdirNotFoundError,
           f'--members: workdir {tmp_path / "typo"} does not exist')
  _refused([a, b], a, ensemble.EnsembleError, f'--workdir {a} is the member {a}')
  trained = tmp_path / 'trained'
  workdir_lib.write_json(workdir_lib.Workdir(trained).config, {})
  _refused([a, b], trained, ensemble.EnsembleError, f'--workdir {trained} holds a trained run')

  fewer = _member(tmp_path / 'fewer', 2, num_val=40)
  _refused([a, fewer], out, ensemble.EnsembleError, f'{fewer} was evaluated on other validation '
           f'chips than {a}', '50 and 40 chips', 'the same config.data.raw_dir')
  relabelled = _member(tmp_path / 'relabelled', 3, val_seed=1)
  _refused([a, relabelled], out, ensemble.EnsembleError, f'{relabelled} was evaluated on other',
           'the same 50 chip names, other labels')
  other_test = _member(tmp_path / 'other_test', 4, num_test=20)
  _refused([a, other_test], out, ensemble.EnsembleError,
           f'{other_test} scored other test chips than {a}', '30 and 20 chips')
  stale = _member(tmp_path / 'stale', 5, test_step=30)
  _refused([a, stale], out, ensemble.EnsembleError, 'test scores of step 30',
           'validation scores of step 40', f'--mode predict --workdir {stale} again')

  workdir_lib.Workdir(b).test_predictions.unlink()
  _refused([a, b], out, workdir_lib.MissingRunFileError,
           f'{workdir_lib.Workdir(b).test_predictions} not found', f'--mode predict --workdir {b}')
  workdir_lib.Workdir(b).predictions.unlink()
  _refused([a, b], out, workdir_lib.MissingRunFileError,
           f'{workdir_lib.Workdir(b).predictions} not found', f'--mode evaluate --workdir {b}')

  other_tags = _member(tmp_path / 'other_tags', 6)
  summary = workdir_lib.read_json(workdir_lib.Workdir(other_tags).metrics)
  summary['ap'] = {('blowdown' if t == 'blow_down' else t): v for t, v in summary['ap'].items()}
  workdir_lib.write_json(workdir_lib.Workdir(other_tags).metrics, summary)
  _refused([a, other_tags], out, ensemble.EnsembleError, 'blowdown',
           f'--mode evaluate --workdir {other_tags} again')
  assert not out.exists()


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'rf_jax.main', *map(str, args)],
                        capture_output=True, text=True, timeout=300,
                        cwd=pathlib.Path(__file__).resolve().parents[1])


def test_the_cli_writes_the_ensemble_and_refuses_in_one_line(tmp_path):
  a, b = _member(tmp_path / 'a', 0), _member(tmp_path / 'b', 1)
  done = _cli('--mode', 'ensemble', '--members', f'{a},{b}', '--workdir', tmp_path / 'ens')
  assert done.returncode == 0, done.stderr[-2000:]
  assert (tmp_path / 'ens' / 'submission.csv').is_file()
  workdir_lib.Workdir(b).test_predictions.unlink()
  refused = _cli('--mode', 'ensemble', '--members', f'{a},{b}', '--workdir', tmp_path / 'ens2')
  assert refused.returncode == 1
  assert refused.stderr.startswith('error: ') and len(refused.stderr.splitlines()) == 1
  assert 'test_predictions.npz not found' in refused.stderr and '--mode predict' in refused.stderr
  assert not (tmp_path / 'ens2').exists()


@pytest.mark.parametrize('args, message', [
    (['--mode', 'ensemble'], '--mode ensemble needs --members=WORKDIR,WORKDIR,...'),
    (['--config', 'rgb', '--members', 'runs/a,runs/b'],
     '--members applies to --mode ensemble only, and this is --mode all (the default)'),
    (['--mode', 'ensemble', '--members', 'runs/a,', 'runs/b'],
     '--members takes one comma-separated list without spaces'),
])
def test_the_members_flag_is_checked_before_anything(tmp_path, args, message):
  refused = _cli(*args, '--workdir', tmp_path / 'ens')
  assert refused.returncode == 1
  assert refused.stderr.startswith('error: ') and len(refused.stderr.splitlines()) == 1
  assert message in refused.stderr, refused.stderr
  assert not (tmp_path / 'ens').exists()
