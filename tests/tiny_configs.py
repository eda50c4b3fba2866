"""Study configs shrunk to a few steps on the session's synthetic chips (tests/conftest.py)."""

from rf_jax.configs import dual, rgb, rgbir

STUDY_CONFIGS = {'rgb': rgb, 'rgbir': rgbir, 'dual': dual}


def tiny(name, raw_dir, prepared_dir, weights='', num_epochs=1):
  """configs/<name>.py: 96 px crops, batch 8 (5 steps an epoch on 60 chips), in-process loading."""
  config = STUDY_CONFIGS[name].get_config()
  config.model.weights = str(weights)
  config.data.raw_dir = str(raw_dir)
  config.data.prepared_dir = str(prepared_dir)
  config.data.crop_size = 96
  config.data.eval_size = 96
  config.data.num_workers = 0
  config.batch_size = 8
  config.eval_batch_size = 16
  config.num_epochs = num_epochs
  return config


def train_recording_saves(config, workdir) -> list[int]:
  """Runs train_and_evaluate and returns the steps it checkpointed, in order."""
  import unittest.mock  # pylint: disable=g-import-not-at-top
  from rf_jax import checkpoints, train  # pylint: disable=g-import-not-at-top
  steps = []
  real_save = checkpoints.save

  def recording_save(manager, step, **kwargs):
    steps.append(step)
    return real_save(manager, step, **kwargs)

  with unittest.mock.patch.object(checkpoints, 'save', recording_save):
    train.train_and_evaluate(config, workdir)
  return steps
