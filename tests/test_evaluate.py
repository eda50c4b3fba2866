"""Evaluation end to end: reproduction check, metrics, report files, Kaggle submission."""

import contextlib
import csv
import io
import json
import pathlib

import jax
import numpy as np
import pytest

from rf_jax.configs import demo
from rf_jax import checkpoints
from rf_jax import chip_scores
from rf_jax import evaluate
from rf_jax import submission
from rf_jax import train
from rf_jax.data import planet
from rf_jax.workdir import Workdir
from tiny_configs import tiny


@pytest.fixture(scope='module')
def trained(tmp_path_factory, synthetic_kaggle_dir):
  """The tiny rgb config from scratch at the demo's rate, one epoch on the session's chips."""
  config = tiny('rgb', synthetic_kaggle_dir, tmp_path_factory.mktemp('prepared'))
  config.optim.lr = demo.get_config().optim.lr
  config.eval.top_n = 10
  workdir = tmp_path_factory.mktemp('evaluated')
  train.train_and_evaluate(config, workdir)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    first = evaluate.evaluate(config, workdir)
  first['printed'] = printed.getvalue()
  return config, workdir, first


def test_first_evaluation_reproduces_the_training_time_scores(trained):
  _, workdir, first = trained
  # The checkpoint of the best epoch holds that epoch's validation scores from training.
  assert first['reproduction']['exact'] and first['reproduction']['reproduces']
  assert first['reproduction']['mean_relative_error'] == 0.0
  assert 'REPRODUCED exactly' in first['printed'] and 'at training' in first['printed']
  history = json.loads(Workdir(workdir).history.read_text())['epochs']
  assert first['reproduction']['history_value'] == history[-1]['val_map']
  assert first['map'] == pytest.approx(history[-1]['val_map'], rel=1e-6)


def test_first_evaluation_writes_predictions_and_metrics(trained):
  config, workdir, first = trained
  with np.load(workdir / 'eval' / 'predictions.npz') as saved:
    assert saved['scores'].shape == saved['labels'].shape == (20, 17)
    assert ((saved['scores'] > 0) & (saved['scores'] < 1)).all()
  metrics = json.loads((workdir / 'eval' / 'metrics.json').read_text())
  history = json.loads(Workdir(workdir).history.read_text())['epochs']
  assert metrics['map'] == pytest.approx(history[-1]['val_map'], rel=1e-6)
  assert metrics['loss'] == pytest.approx(history[-1]['val_loss'], rel=1e-5)
  assert metrics['f2_tuned'] >= metrics['f2_at_0.5']
  assert set(metrics['thresholds']) == set(planet.TAGS)
  assert metrics['tta'] == config.eval.tta == 'none'


def test_second_evaluation_reproduces_exactly(trained, capsys):
  config, workdir, _ = trained
  second = evaluate.evaluate(config, workdir)
  assert second['reproduction']['exact'] and second['reproduction']['reproduces']
  assert second['reproduction']['max_abs_score_difference'] == 0.0
  assert 'REPRODUCED exactly' in capsys.readouterr().out


def test_changed_checkpoint_does_not_reproduce(trained, tmp_path, capsys):
  import shutil  # pylint: disable=g-import-not-at-top
  config, workdir, _ = trained
  shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
  saved_before = (tmp_path / 'eval' / 'predictions.npz').read_bytes()
  directory = Workdir(tmp_path).checkpoints
  restored = checkpoints.restore_for_evaluation(directory)
  restored.state['params']['fc']['bias'] = restored.state['params']['fc']['bias'] + 0.5
  manager = checkpoints.create_manager(directory)
  manager.delete(restored.step)
  record = {'val_map': 0.5, 'val_mean_precision_at_0.5': 0.5}
  checkpoints.save(manager, restored.step, state=restored.state, data_state=restored.data_state,
                   progress=restored.progress, config=config, record=record,
                   val_scores=restored.val_scores)
  result = evaluate.evaluate(config, tmp_path)
  assert not result['reproduction']['reproduces']
  assert result['reproduction']['max_abs_score_difference'] > 0.01
  assert 'NOT REPRODUCED' in capsys.readouterr().out
  assert (tmp_path / 'eval' / 'predictions.npz').read_bytes() == saved_before  # kept
  assert (tmp_path / 'eval' / 'predictions.rerun.npz').is_file()


def test_another_tta_is_no_failed_reproduction(trained, tmp_path, capsys):
  """Evaluating a trained run with dihedral8 views scores differently by design: no
  reproduction verdict, the new scores become the run's predictions (what metrics.json
  describes), the training-time ones are kept under their TTA; a second dihedral8 evaluation
  reproduces the first."""
  import shutil  # pylint: disable=g-import-not-at-top
  config, workdir, _ = trained
  shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
  before = dict(np.load(tmp_path / 'eval' / 'predictions.npz'))
  config = config.copy_and_resolve_references()
  config.eval.tta = 'dihedral8'
  first = evaluate.evaluate(config, tmp_path)
  out = capsys.readouterr().out
  assert first['reproduction'] is None and 'REPRODUCED' not in out
  assert "scored at training with eval.tta='none', this evaluation uses 'dihedral8'" in out
  kept = dict(np.load(Workdir(tmp_path).predictions_of_tta(int(before['step']), 'none')))
  np.testing.assert_array_equal(kept['scores'], before['scores'])
  with np.load(tmp_path / 'eval' / 'predictions.npz') as now:
    assert str(now['tta']) == 'dihedral8' and not np.allclose(now['scores'], before['scores'])
    assert json.loads((tmp_path / 'eval' / 'metrics.json').read_text())['tta'] == 'dihedral8'
  second = evaluate.evaluate(config, tmp_path)
  assert second['reproduction']['exact'] and 'REPRODUCED exactly' in capsys.readouterr().out


def test_report_files_are_written(trained):
  _, workdir, _ = trained
  report = workdir / 'report'
  text = (report / 'report.md').read_text()
  pngs = sorted(report.glob('*.png'))
  assert len(pngs) >= 5
  for png in pngs:
    assert png.name in text
    assert png.stat().st_size > 5000, png


def test_report_table_holds_each_tags_ap_positives_and_threshold(trained):
  """The per-tag table against scikit-learn on the saved predictions and metrics.json."""
  from sklearn.metrics import average_precision_score  # pylint: disable=g-import-not-at-top
  _, workdir, _ = trained
  text = (workdir / 'report' / 'report.md').read_text()
  rows = {cells[0]: cells[1:] for cells in
          ([c.strip() for c in line.strip().strip('|').split('|')] for line in text.splitlines()
           if line.startswith('| '))}
  thresholds = json.loads(Workdir(workdir).metrics.read_text())['thresholds']
  with np.load(Workdir(workdir).predictions) as saved:
    labels, scores = saved['labels'], saved['scores']
  for k, tag in enumerate(planet.TAGS):
    positives, ap, threshold = rows[tag]
    assert int(positives) == labels[:, k].sum(), tag
    if labels[:, k].any():
      assert float(ap) == pytest.approx(average_precision_score(labels[:, k], scores[:, k]),
                                        abs=5e-5), tag
    else:
      assert ap == 'n/a (excluded)', tag
    assert float(threshold) == pytest.approx(thresholds[tag], abs=5e-3), tag


def test_submission_tags_are_the_test_chips_scores_above_their_thresholds(trained, tmp_path):
  """Each test chip's row against its scores from its own file (--chips reads the TIFs, not
  the prepared test split) and the thresholds tuned at evaluation. Some chips are scored under
  names with a comma or a quote and suffixes in other cases: their rows keep every column."""
  import shutil  # pylint: disable=g-import-not-at-top
  config, workdir, _ = trained
  path = submission.predict_test(config, workdir)
  with open(path, newline='') as f:
    rows = list(csv.reader(f))
  assert rows[0] == ['image_name', 'tags']
  assert sorted(r[0] for r in rows[1:]) == sorted(f'test_{i}' for i in range(7))
  renamed = {'test_0': 'site A, 2017.TIF', 'test_1': 'say "yes", then.tiff',
             'test_2': 'test_2.TIFF'}
  chips = tmp_path / 'chips'
  chips.mkdir()
  for i in range(7):
    name = f'test_{i}'
    shutil.copy(pathlib.Path(config.data.raw_dir) / 'test-tif-v2' / f'{name}.tif',
                chips / renamed.get(name, f'{name}.tif'))
  output = tmp_path / 'odd names.csv'
  assert chip_scores.predict_chips(config, workdir, str(chips), output=output) == output
  original = {pathlib.Path(v).stem: k for k, v in renamed.items()}
  with open(output, newline='') as f:
    scored = list(csv.reader(f))[1:]
  assert all(len(r) == 1 + len(planet.TAGS) + 1 for r in scored)
  scores = {original.get(r[0], r[0]): np.asarray(r[1:-1], np.float32) for r in scored}
  assert sorted(scores) == sorted(f'test_{i}' for i in range(7))
  thresholds = json.loads(Workdir(workdir).metrics.read_text())['thresholds']
  predicted = 0
  for name, tags in rows[1:]:
    want = [t for t, s in zip(planet.TAGS, scores[name]) if s > thresholds[t]]
    assert tags.split() == want, name
    predicted += len(want)
  assert predicted > 0  # some tags are predicted: the check compares something
  with np.load(Workdir(workdir).test_predictions) as saved:  # what an ensemble averages
    assert saved['step'] == checkpoints.restore_for_evaluation(Workdir(workdir).checkpoints).step
    assert sorted(saved['names']) == sorted(scores)
    for name, row in zip(saved['names'], saved['scores']):
      np.testing.assert_allclose(row, scores[name], rtol=1e-6, err_msg=name)


def test_evaluating_with_another_model_is_refused(trained):
  config, workdir, _ = trained
  config = config.copy_and_resolve_references()
  config.model.name = 'dual'
  with pytest.raises(checkpoints.CheckpointError, match="model 'rgb'.*config.model.name is 'dual'"):
    evaluate.evaluate(config, workdir)


def test_evaluating_an_empty_workdir_says_train_first(trained, tmp_path):
  config, _, _ = trained
  with pytest.raises(checkpoints.CheckpointError, match='train first'):
    evaluate.evaluate(config, tmp_path)


def test_export_holds_the_best_variables_tags_and_statistics(trained):
  from flax import serialization  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  from rf_jax import export  # pylint: disable=g-import-not-at-top
  config, workdir, _ = trained
  msgpack, tensors = export.export(config, workdir)
  restored = checkpoints.restore_for_evaluation(Workdir(workdir).checkpoints)
  want = {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(
              {'params': restored.state['params'],
               'batch_stats': restored.state['batch_stats']})[0]}
  got = load_file(str(tensors))
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)
  with safe_open(str(tensors), 'np') as f:
    meta = json.loads(f.metadata()['rf_jax'])
  provenance = json.loads(Workdir(workdir).provenance.read_text())['dataset']
  assert meta['tags'] == list(planet.TAGS) and meta['model'] == 'rgb'
  assert meta['band_mean'] == provenance['mean'] and meta['band_std'] == provenance['std']
  assert meta['step'] == restored.step and meta['input_bands'] == [0, 1, 2]
  payload = serialization.msgpack_restore(msgpack.read_bytes())
  np.testing.assert_array_equal(payload['variables']['params']['fc']['kernel'],
                                want['params/fc/kernel'])
  assert payload['meta'] == meta


def test_export_into_another_directory(trained, tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from rf_jax import export  # pylint: disable=g-import-not-at-top
  config, workdir, _ = trained
  output = tmp_path / 'elsewhere' / 'model'
  msgpack, tensors = export.export(config, workdir, output=output)
  assert (msgpack, tensors) == (output / 'model.msgpack', output / 'model.safetensors')
  restored = checkpoints.restore_for_evaluation(Workdir(workdir).checkpoints)
  np.testing.assert_array_equal(load_file(str(tensors))['params/fc/kernel'],
                                restored.state['params']['fc']['kernel'])


@pytest.mark.parametrize('layout', ['kaggle', 'course'])
def test_predict_any_chips_equals_evaluate(layout, trained, tmp_path_factory):
  """--mode predict --chips on the validation chips' own files gives evaluate's scores."""
  import shutil  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from rf_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  config, workdir, _ = trained
  if layout == 'course':  # a course-layout run of its own: 8-bit chips, the course's statistics
    raw = synthetic.write_dataset(tmp_path_factory.mktemp('course') / 'raw', 60, 128, seed=0,
                                  layout='course')
    config = config.copy_and_resolve_references()
    config.data.raw_dir, config.data.prepared_dir = str(raw), ''
    workdir = tmp_path_factory.mktemp('course_run')
    config.data.prepared_dir = str(workdir / 'prepared')
    train.train_and_evaluate(config, workdir)
    evaluate.evaluate(config, workdir)
  with np.load(Workdir(workdir).predictions) as saved:
    names, want = list(saved['names']), saved['scores']
  chips = tmp_path_factory.mktemp(f'chips_{layout}')
  for name in names:
    shutil.copy(pathlib.Path(config.data.raw_dir) / 'train-tif-v2' / f'{name}.tif', chips)
  repo = pathlib.Path(__file__).resolve().parents[1]
  done = subprocess.run([sys.executable, '-m', 'rf_jax.main', '--mode', 'predict', '--workdir',
                         str(workdir), '--chips', str(chips)],
                        cwd=repo, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(Workdir(workdir).chip_scores, newline='') as f:
    rows = list(csv.reader(f))
  assert rows[0] == ['image_name', *planet.TAGS, 'tags']
  got = {r[0]: np.asarray(r[1:-1], np.float32) for r in rows[1:]}
  assert sorted(got) == sorted(names)
  for name, scores in zip(names, want):
    np.testing.assert_array_equal(got[name], scores, err_msg=name)  # identical, not close


def test_a_run_evaluates_after_its_prepared_dataset_is_deleted(trained, tmp_path):
  """The workdir holds the config and statistics: evaluation prepares the data again."""
  import shutil  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  config, workdir, _ = trained
  run = tmp_path / 'run'
  shutil.copytree(workdir, run)
  prepared_copy = tmp_path / 'prepared'
  shutil.copytree(config.data.prepared_dir, prepared_copy)
  shutil.rmtree(config.data.prepared_dir)
  try:
    done = subprocess.run([sys.executable, '-m', 'rf_jax.main', '--mode', 'evaluate',
                           '--workdir', str(run)],  # no --config: the run's own
                          cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'REPRODUCED exactly' in done.stdout, done.stdout
  finally:  # the module's other tests read the prepared dataset
    shutil.rmtree(config.data.prepared_dir, ignore_errors=True)
    shutil.copytree(prepared_copy, config.data.prepared_dir)
