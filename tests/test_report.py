"""rf_jax.report on small fake workdirs: files exist, PNGs are real pictures, markdown links them."""

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image as mpimg

from rf_jax import comparison, errors, metrics, report
from rf_jax import workdir as workdir_lib

TAGS = ('clear', 'cloudy', 'haze', 'partly_cloudy', 'agriculture', 'artisinal_mine', 'bare_ground',
        'blooming', 'blow_down', 'conventional_mine', 'cultivation', 'habitation', 'primary', 'road',
        'selective_logging', 'slash_burn', 'water')


def _history(model, epochs, rng):
  rows = []
  for e in range(1, epochs + 1):
    rows.append({'epoch': e, 'step': 10 * e, 'train_loss': 0.6 / e + 0.01 * rng.random(),
                 'val_loss': 0.5 / e + 0.1 + 0.01 * rng.random(), 'val_map': 0.3 + 0.4 * (1 - 1 / e),
                 'val_ap': [None if k == 8 else float(rng.random()) for k in range(17)],
                 'lr': 0.005, 'train_images_per_s': 10.0, 'epoch_seconds': 1.0})
  rows[0]['val_map'] = None  # a missing value must not break the curves
  return {'model': model, 'epochs': rows}


def _predictions(rng, n=60, skill=0.4, chips_rng=None):
  """`chips_rng` draws the labels (the chips evaluated; default `rng`), `rng` the scores."""
  labels = ((chips_rng or rng).random((n, 17)) < 0.3).astype(np.float32)
  labels[:, 8] = 0  # blow_down: no positives -> excluded
  scores = np.clip(skill * labels + rng.random((n, 17)) * (1 - skill), 0, 1).astype(np.float32)
  names = np.array([f'train_{i}' for i in range(n)])
  return {'names': names, 'labels': labels, 'scores': scores}


def _load_rgb(name):
  rng = np.random.default_rng(int(name.split('_')[1]))
  return rng.integers(0, 2 ** 14, size=(32, 32, 3), dtype=np.uint16)


def _make_workdir(tmp_path, model, seed, skill, dirname=None, chips=(60, 0)):
  """A fake evaluated run; `chips`: (how many, seed of their labels), the same validation chips
  for every workdir unless told otherwise (a comparison refuses other chips)."""
  rng = np.random.default_rng(seed)
  wd = tmp_path / (dirname or model)
  (wd / 'eval').mkdir(parents=True)
  hist = _history(model, 4, rng)
  (wd / 'history.json').write_text(json.dumps(hist))
  pred = _predictions(rng, n=chips[0], skill=skill, chips_rng=np.random.default_rng(chips[1]))
  np.savez(wd / 'eval' / 'predictions.npz', **pred)
  summary = report.metrics_summary(pred['labels'], pred['scores'], TAGS, model=model, loss=0.2,
                                   step=40)
  (wd / 'eval' / 'metrics.json').write_text(json.dumps(summary, allow_nan=False))
  return wd, hist, pred


def _assert_nontrivial_png(path):
  assert path.is_file() and path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', path
  img = mpimg.imread(path)
  assert img.ndim == 3 and min(img.shape[:2]) > 200, (path, img.shape)
  assert img[..., :3].std() > 0.05, f'{path} looks blank'
  return img


def test_write_report(tmp_path):
  wd, hist, pred = _make_workdir(tmp_path, 'rgb', 0, 0.4)
  md_path = report.write_report(wd, history=hist, predictions=pred, tags=TAGS, load_rgb=_load_rgb,
                                top_n=20)
  assert md_path == wd / 'report' / 'report.md'
  md = md_path.read_text()
  pngs = sorted(p.name for p in (wd / 'report').glob('*.png'))
  assert pngs == sorted(['loss.png', 'map.png', 'ap_per_tag.png', 'tail_accuracy.png',
                         'best_tag_chips.png'])
  for name in pngs:
    _assert_nontrivial_png(wd / 'report' / name)
    assert f']({name})' in md
  linked = re.findall(r'\]\(([^)]+\.png)\)', md)
  assert sorted(linked) == pngs
  # the per-tag table: every tag once, excluded one marked, mAP equals the metrics module's
  for t in TAGS:
    assert len(re.findall(rf'^\| {t} \|', md, flags=re.M)) == 1
  assert 'blow_down | 0 | n/a (excluded)' in md
  assert 'Excluded from mAP (no positives among these chips): blow_down.' in md
  assert f'{metrics.mean_average_precision(pred["labels"], pred["scores"]):.4f}' in md
  best = TAGS[int(np.nanargmax(metrics.average_precision(pred['labels'], pred['scores'])))]
  assert f'Best tag (highest AP): **{best}**' in md


def test_write_report_without_history_or_loader(tmp_path):
  rng = np.random.default_rng(1)
  pred = _predictions(rng, n=5)
  md = report.write_report(tmp_path, history=None, predictions=pred, tags=TAGS, load_rgb=None,
                           thresholds=0.5).read_text()
  assert 'No training history given.' in md and 'chip grid not drawn' in md
  assert sorted(p.name for p in (tmp_path / 'report').glob('*.png')) == ['ap_per_tag.png',
                                                                         'tail_accuracy.png']


def test_stretch():
  img = np.zeros((50, 50, 3), np.uint16)
  img[..., 0] = np.arange(50)[:, None] * 1000
  img[..., 1] = 7  # constant band -> zeros, no division by zero
  img[..., 2] = np.arange(50)[None, :]
  out = report.stretch(img)
  assert out.dtype == np.float64 and out.min() == 0 and out.max() == 1
  assert (out[..., 1] == 0).all()
  with pytest.raises(ValueError, match='RGB'):
    report.stretch(np.zeros((4, 4, 4)))


def test_metrics_summary_keys_and_json(tmp_path):
  rng = np.random.default_rng(2)
  pred = _predictions(rng)
  s = report.metrics_summary(pred['labels'], pred['scores'], TAGS, model='dual', loss=float('nan'))
  assert set(report.METRICS_JSON_KEYS) <= set(s)
  assert list(s['ap']) == list(TAGS) and s['ap']['blow_down'] is None
  assert s['excluded_tags'] == ['blow_down'] and s['loss'] is None
  assert s['f2_tuned'] >= s['f2_at_0.5']
  json.dumps(s, allow_nan=False)
  (tmp_path / 'm.json').write_text(json.dumps({'model': 'x'}))
  with pytest.raises(ValueError, match='missing keys'):
    report.read_metrics(tmp_path / 'm.json')
  with pytest.raises(FileNotFoundError, match='evaluate'):
    report.read_metrics(tmp_path / 'nope.json')


def test_write_comparison(tmp_path):
  workdirs = [_make_workdir(tmp_path, m, i, skill)[0]
              for i, (m, skill) in enumerate([('rgb', 0.2), ('rgbir', 0.4), ('dual', 0.6)])]
  path = comparison.write_comparison(workdirs, tmp_path / 'cmp', resamples=200)
  md = path.read_text()
  header = next(line for line in md.splitlines() if line.startswith('| tag |'))
  assert header == '| tag | rgb | rgbir | dual |'
  table = md.split(header)[1].split('\n\n')[0]  # the side-by-side table, before the intervals
  rows = [line for line in table.splitlines() if line.startswith('| ')]
  assert all(line.count('|') == 5 for line in rows)
  for t in TAGS:
    assert any(line.startswith(f'| {t} |') for line in rows)
  map_row = next(line for line in rows if line.startswith('| **mAP** |'))
  cells = [c.strip() for c in map_row.split('|')[2:-1]]
  assert cells[2].startswith('**') and not cells[0].startswith('**')  # most skilful model wins
  assert '| blow_down | n/a | n/a | n/a |' in md
  for name in ('comparison_curves.png', 'comparison_ap.png'):
    _assert_nontrivial_png(tmp_path / 'cmp' / name)
    assert f']({name})' in md


def test_write_comparison_errors(tmp_path):
  wd, _, _ = _make_workdir(tmp_path, 'rgb', 0, 0.4)
  (wd / 'eval' / 'metrics.json').unlink()
  with pytest.raises(FileNotFoundError, match='metrics.json'):
    comparison.write_comparison([wd], tmp_path / 'cmp')
  with pytest.raises(ValueError):
    comparison.write_comparison([], tmp_path / 'cmp')


def _compare_cli(workdirs, out):
  return subprocess.run(
      [sys.executable, '-m', 'rf_jax.main', '--mode', 'compare', '--workdir', str(out),
       '--compare', ','.join(map(str, workdirs))],
      capture_output=True, text=True, timeout=300, cwd=pathlib.Path(__file__).resolve().parents[1])


def test_comparison_cli(tmp_path):
  workdirs = [_make_workdir(tmp_path, 'rgb', i, 0.4, dirname=f'run{i}')[0] for i in range(2)]
  result = _compare_cli(workdirs, tmp_path / 'cmp')
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().endswith('comparison.md')
  md = (tmp_path / 'cmp' / 'comparison.md').read_text()
  header = next(line for line in md.splitlines() if line.startswith('| tag |'))
  assert header == '| tag | rgb (run0) | rgb (run1) |'  # same model twice: told apart by directory


def test_stretch_real_chips():
  from pathlib import Path
  data = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'planet'
  if not (data / 'train_1.tif').is_file():
    pytest.skip(f'real sample chips not found in {data} (the repo has no ../shared/data/planet)')
  from rf_jax.data import planet
  for name in ('train_0', 'train_1'):
    rgb = planet.read_chip(data / f'{name}.tif')[..., :3]  # R,G,B of a uint16 Kaggle chip
    out = report.stretch(rgb)
    assert out.shape == rgb.shape and out.min() == 0.0 and out.max() == 1.0
    assert (out.reshape(-1, 3).std(0) > 0.1).all(), name  # every band uses the display range


def test_comparison_cli_names_a_workdir_without_results(tmp_path):
  good = _make_workdir(tmp_path, 'rgb', 0, 0.4, dirname='run0')[0]
  result = _compare_cli([good, tmp_path / 'never_trained'], tmp_path / 'cmp')
  assert result.returncode == 1
  assert result.stderr.startswith('error: ') and 'never_trained' in result.stderr
  assert 'does not exist' in result.stderr  # a mistyped path, not "train that workdir first"
  assert 'Traceback' not in result.stderr


def _refused(workdirs, out, error, *fragments):
  """The comparison's error names each fragment, and nothing is written."""
  with pytest.raises(error) as raised:
    comparison.write_comparison(workdirs, out)
  assert isinstance(raised.value, errors.UserError)
  for fragment in fragments:
    assert str(fragment) in str(raised.value), (fragment, str(raised.value))
  assert not (out / 'comparison.md').exists()
  return str(raised.value)


def test_comparison_refuses_runs_evaluated_on_other_chips(tmp_path):
  a = _make_workdir(tmp_path, 'rgb', 0, 0.4, dirname='a')[0]
  fewer = _make_workdir(tmp_path, 'dual', 1, 0.6, dirname='fewer', chips=(40, 0))[0]
  relabelled = _make_workdir(tmp_path, 'dual', 2, 0.6, dirname='relabelled', chips=(60, 1))[0]
  out = tmp_path / 'cmp'
  _refused([a, fewer], out, comparison.ComparisonError, f'{a}: 60 chips', f'{fewer}: 40 chips',
           'different validation chips', '--mode evaluate')
  # The same chip names with other labels (another dataset that names its chips alike).
  _refused([a, relabelled], out, comparison.ComparisonError, f'{a}: 60 chips',
           f'{relabelled}: 60 chips', 'different validation chips')


def _without_predictions(wd, fingerprint):
  (wd / 'eval' / 'predictions.npz').unlink()
  if fingerprint:
    (wd / 'provenance.json').write_text(json.dumps({'dataset': {'fingerprint': fingerprint}}))


def test_comparison_without_saved_predictions_compares_dataset_fingerprints(tmp_path):
  a, b, c = (_make_workdir(tmp_path, m, i, 0.4)[0] for i, m in enumerate(['rgb', 'rgbir', 'dual']))
  _without_predictions(a, 'kaggle128_val0p33_seed321_aaaa')
  _without_predictions(b, 'kaggle128_val0p33_seed321_aaaa')
  assert comparison.write_comparison([a, b], tmp_path / 'same').is_file()
  _without_predictions(c, 'kaggle128_val0p2_seed0_bbbb')
  _refused([a, c], tmp_path / 'cmp', comparison.ComparisonError,
           'dataset kaggle128_val0p33_seed321_aaaa', 'dataset kaggle128_val0p2_seed0_bbbb')
  (c / 'provenance.json').unlink()  # nothing tells which chips c was evaluated on
  _refused([a, c], tmp_path / 'cmp', comparison.ComparisonError, f'cannot tell', str(c),
           f'--mode evaluate --workdir {c}')


def test_comparison_refuses_a_workdir_given_twice(tmp_path):
  a = _make_workdir(tmp_path, 'rgb', 0, 0.4)[0]
  b = _make_workdir(tmp_path, 'dual', 1, 0.6)[0]
  _refused([a, b, a], tmp_path / 'cmp', comparison.ComparisonError, f'names {a} twice',
           'give each workdir once')
  other_spelling = tmp_path / 'dual' / '..' / 'rgb'
  _refused([a, other_spelling], tmp_path / 'cmp', comparison.ComparisonError,
           f'{a} and {other_spelling}, the same directory')


def test_comparison_tells_a_missing_workdir_from_an_unevaluated_one(tmp_path):
  a = _make_workdir(tmp_path, 'rgb', 0, 0.4)[0]
  typo = tmp_path / 'rbg'
  message = _refused([a, typo], tmp_path / 'cmp', comparison.WorkdirNotFoundError,
                     f'workdir {typo} does not exist', 'check the path')
  assert 'train' not in message.split('(')[0]  # not "train that workdir first"
  (tmp_path / 'untrained').mkdir()
  _refused([a, tmp_path / 'untrained'], tmp_path / 'cmp', FileNotFoundError,
           tmp_path / 'untrained' / 'history.json', 'train that workdir first')
  _refused([a, a / 'history.json'], tmp_path / 'cmp', comparison.WorkdirNotFoundError,
           'is a file, not a directory')


def test_comparison_refuses_other_tags_and_damaged_metrics(tmp_path):
  a = _make_workdir(tmp_path, 'rgb', 0, 0.4)[0]
  b = _make_workdir(tmp_path, 'dual', 1, 0.6)[0]
  metrics_file = b / 'eval' / 'metrics.json'
  summary = json.loads(metrics_file.read_text())
  summary['ap'] = {('blowdown' if t == 'blow_down' else t): v for t, v in summary['ap'].items()}
  metrics_file.write_text(json.dumps(summary))
  _refused([a, b], tmp_path / 'cmp', comparison.ComparisonError, metrics_file, 'blowdown',
           a / 'eval' / 'metrics.json', '--mode evaluate')
  del summary['f2_tuned']
  metrics_file.write_text(json.dumps(summary))
  _refused([a, b], tmp_path / 'cmp', workdir_lib.DamagedRunFileError, metrics_file,
           "missing keys ['f2_tuned']", f'--mode evaluate --workdir {b}')
  metrics_file.write_text('[1, 2]')
  _refused([a, b], tmp_path / 'cmp', workdir_lib.DamagedRunFileError, metrics_file,
           'not a JSON object')
  metrics_file.write_text('{"model": ')
  _refused([a, b], tmp_path / 'cmp', workdir_lib.DamagedRunFileError, f'{metrics_file}:1')
