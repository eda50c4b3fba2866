"""The checkpoint manager: latest and best kept, the best chosen by config.eval.select_by."""

import ml_collections
import numpy as np
import pytest

from rf_jax import checkpoints

# A crafted history: mAP peaks at step 20, the study code's mean precision at 0.5 at step 10.
RECORDS = {
    10: {'val_map': 0.40, 'val_mean_precision_at_0.5': 0.70},
    20: {'val_map': 0.55, 'val_mean_precision_at_0.5': 0.50},
    30: {'val_map': 0.45, 'val_mean_precision_at_0.5': 0.60},
}


def _write_run(directory, select_by):
  manager = checkpoints.create_manager(directory, select_by=select_by)
  config = ml_collections.ConfigDict({'model': {'name': 'rgb'}})
  for step, record in RECORDS.items():
    scores = np.full((3, 17), step / 100, np.float32)
    checkpoints.save(manager, step, state={'w': np.full(2, step, np.float32)}, data_state=b'{}',
                     progress={'history': []}, config=config, record=record, val_scores=scores)
  checkpoints.save(manager, 35, state={'w': np.zeros(2, np.float32)}, data_state=b'{}',
                   progress={'history': []}, config=config)  # mid-epoch: no record, no scores
  manager.close()


@pytest.mark.parametrize('select_by,best', [('map', 20), ('mean_precision_at_0.5', 10)])
def test_select_by_chooses_the_best_checkpoint(tmp_path, select_by, best):
  _write_run(tmp_path / 'checkpoints', select_by)
  manager = checkpoints.create_manager(tmp_path / 'checkpoints', select_by=select_by,
                                       read_only=True)
  assert manager.all_steps() == [best, 35]  # the best and the latest are kept, nothing else
  restored = checkpoints.restore_for_evaluation(tmp_path / 'checkpoints', select_by=select_by)
  assert restored.step == best
  np.testing.assert_array_equal(restored.state['w'], np.full(2, best, np.float32))
  # The best epoch's validation scores are kept with it.
  np.testing.assert_array_equal(restored.val_scores, np.full((3, 17), best / 100, np.float32))


def test_a_mid_epoch_checkpoint_has_no_scores(tmp_path):
  _write_run(tmp_path / 'checkpoints', 'map')
  restored = checkpoints.restore_for_evaluation(tmp_path / 'checkpoints', step=35)
  assert restored.step == 35 and restored.val_scores is None


def test_another_models_checkpoint_is_refused():
  with pytest.raises(checkpoints.CheckpointError, match="model 'rgb'.*config.model.name is 'dual'"):
    checkpoints.check_model({'model': {'name': 'rgb'}}, 'dual', 'runs/x')
