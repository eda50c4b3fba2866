"""Evaluation end to end: reproduction check, metrics, report files, Kaggle submission."""

import contextlib
import csv
import io
import json

import jax
import numpy as np
import pytest

from rf_jax.configs import demo
from rf_jax import checkpoints
from rf_jax import evaluate
from rf_jax import submission
from rf_jax import train
from rf_jax.data import planet
from rf_jax.workdir import Workdir


@pytest.fixture(scope='module')
def trained(tmp_path_factory, synthetic_kaggle_dir):
  """The demo recipe, shrunk: rgb from scratch for one epoch on the session's chips."""
  config = demo.get_config()
  config.model.name = 'rgb'
  config.data.raw_dir = str(synthetic_kaggle_dir)
  config.data.synthetic.num_chips = 0
  config.data.crop_size = 96
  config.data.eval_size = 96
  config.data.num_workers = 0
  config.batch_size = 8
  config.eval_batch_size = 16
  config.num_epochs = 1
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


def test_report_files_are_written(trained):
  _, workdir, _ = trained
  report = workdir / 'report'
  text = (report / 'report.md').read_text()
  pngs = sorted(report.glob('*.png'))
  assert len(pngs) >= 5
  for png in pngs:
    assert png.name in text
    assert png.stat().st_size > 5000, png
  assert '| primary |' in text or 'primary' in text


def test_submission_has_one_row_per_test_chip(trained):
  config, workdir, _ = trained
  path = submission.predict_test(config, workdir)
  with open(path, newline='') as f:
    rows = list(csv.reader(f))
  assert rows[0] == ['image_name', 'tags']
  data_names = sorted(r[0] for r in rows[1:])
  assert data_names == sorted(f'test_{i}' for i in range(7))
  for _, tags in rows[1:]:
    assert set(tags.split()) <= set(planet.TAGS)


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
