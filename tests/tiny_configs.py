"""The one tiny config of the tests about logic: a study config shrunk to a few steps of a
narrow ResNet-18 on the session's synthetic chips (tests/conftest.py), in-process or, through
`cli_flags`, on the command line."""

import os

from rf_jax.configs import dual, rgb, rgbir

STUDY_CONFIGS = {'rgb': rgb, 'rgbir': rgbir, 'dual': dual}

# 96 px crops of a width-8 ResNet-18 (same layers as the study's, 1/64 of the arithmetic),
# batch 8: 5 steps an epoch on the 60 synthetic chips.
TINY = {'model.width': 8, 'data.crop_size': 96, 'data.eval_size': 96, 'data.num_workers': 0,
        'batch_size': 8, 'eval_batch_size': 16}


def tiny(name, raw_dir, prepared_dir, weights='', num_epochs=1):
  """configs/<name>.py with TINY, the data in `raw_dir` prepared into `prepared_dir`."""
  config = STUDY_CONFIGS[name].get_config()
  for key, value in TINY.items():
    section, _, field = key.rpartition('.')
    (config[section] if section else config)[field] = value
  config.model.weights = str(weights)
  config.data.raw_dir = str(raw_dir)
  config.data.prepared_dir = str(prepared_dir)
  config.num_epochs = num_epochs
  return config


def _flat(tree, prefix=''):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def cli_flags(config) -> list[str]:
  """The command line that gives `config`: its study config by name, every differing key as
  an override."""
  name = config.model.name
  base = _flat(STUDY_CONFIGS[name].get_config().to_dict())
  return ['--config', name] + [f'--config.{key}={value}'
                               for key, value in _flat(config.to_dict()).items()
                               if base.get(key) != value]


def tiny_weights_file(path) -> str:
  """A random-init ResNet-18 of TINY's width, written as a ported ImageNet weights file (the
  study models' trunks load it as they load the real one)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from rf_jax import weights  # pylint: disable=g-import-not-at-top
  from rf_jax.models import resnet  # pylint: disable=g-import-not-at-top
  net = resnet.ResNet18(num_classes=1000, num_filters=TINY['model.width'])
  variables = jax.jit(lambda key: net.init(key, jnp.zeros((1, 96, 96, 3))))(jax.random.key(0))
  weights.save_weights_file(variables, path)
  return str(path)


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


def xla_flags_with_devices(devices: int) -> str:
  """XLA_FLAGS for a process the tests start with `devices` CPU devices, keeping the session's
  own flags (tests/conftest.py) beside it."""
  return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
