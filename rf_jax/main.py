"""Entry point: `python -m rf_jax.main --config configs/dual.py --workdir runs/dual`."""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from rf_jax import checkpoints
from rf_jax import config_checks
from rf_jax import parallel
from rf_jax import train
from rf_jax.data import planet
from rf_jax.models import port

FLAGS = flags.FLAGS

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, history, TensorBoard files.')
flags.DEFINE_enum('mode', 'train', ['train'], 'What to do in the workdir.')
flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() (one process per host).')
config_flags.DEFINE_config_file('config', None, 'A get_config() file, e.g. configs/dual.py.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])

# Errors that describe the user's input (the message names the file, line or key and the
# fix): printed as one line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (
    planet.PlanetDataError,
    config_checks.ConfigError,
    parallel.DeviceCountError,
    checkpoints.CheckpointError,
    port.WeightsMismatchError,
    port.WeightsFileError,
    train.NonFiniteLossError,
    FileNotFoundError,
    PermissionError,
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.multihost:
    jax.distributed.initialize()
  logging.info('JAX process %d/%d, devices: %s', jax.process_index(), jax.process_count(),
               jax.devices())
  try:
    if FLAGS.mode == 'train':
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.TrainingStopped as e:
    logging.warning('%s', e)
    print(e, file=sys.stderr)
  except USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
