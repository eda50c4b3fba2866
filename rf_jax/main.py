"""Entry point: `python -m rf_jax.main --config configs/dual.py --workdir runs/dual`.

Modes: `train`; `evaluate` (restore, predict validation, reproduction check,
metrics and report); `predict` (Kaggle submission for the test chips);
`compare` (side-by-side of the --compare workdirs, written into --workdir);
`all` (default): train, evaluate, and predict when the dataset has test chips.
"""

import errno
import re
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from rf_jax import checkpoints
from rf_jax import config_checks
from rf_jax import evaluate
from rf_jax import parallel
from rf_jax import report
from rf_jax import train
from rf_jax.data import planet
from rf_jax.models import port

FLAGS = flags.FLAGS

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, history, TensorBoard files.')
flags.DEFINE_enum('mode', 'all', ['all', 'train', 'evaluate', 'predict', 'compare'],
                  'What to do in the workdir.')
flags.DEFINE_list('compare', [], 'Workdirs to compare side by side (--mode compare).')
flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() (one process per host).')
config_flags.DEFINE_config_file('config', None, 'A get_config() file, e.g. configs/dual.py.',
                                lock_config=True)

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
    train.WorkdirError,
    FileNotFoundError,
    PermissionError,
)


# OSErrors that describe the user's file system rather than a bug (str(e) names the path).
FILESYSTEM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOTDIR,
                               errno.EISDIR, errno.EACCES, errno.EPERM, errno.EEXIST})


def _config_arg(argv, missing: str) -> str:
  """The --config.* argument that names the key `missing` (or a generic hint)."""
  for arg in argv[1:]:
    if arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=', 1)[0]
      if missing in key.split('.'):
        return arg
  return f'--config.*{missing}'


def parse_flags(argv):
  """absl's flag parsing, with every mistake reported as one `error:` line (exit 1)."""
  try:
    rest = FLAGS(argv)
    if FLAGS.config is not None:
      FLAGS.config.keys()  # a config file loads lazily: fail here rather than deep in a run
    return rest
  except OSError as e:  # the config file is missing or does not load
    print(f'error: --config: {" ".join(str(e).split())}', file=sys.stderr)
  except flags.Error as e:
    message = ' '.join(str(e).split())
    hint = (' Every config key and its type is in configs/default.py.'
            if '--config' in message else ' See --helpfull.')
    print(f'error: {message}.{hint}', file=sys.stderr)
  except (AttributeError, KeyError) as e:  # an override of a key the config does not have
    found = re.search(r"'([A-Za-z_]\w*)\\*'", str(e))
    missing = found.group(1) if found else str(e)
    suggestion = re.search(r'[Dd]id you mean "[^"]+"', str(e))
    print(f'error: {_config_arg(argv, missing)}: the config has no key {missing!r}'
          f'{" (" + suggestion.group(0) + "?)" if suggestion else ""}; every key is '
          'in configs/default.py, e.g. --config.data.crop_size=224.', file=sys.stderr)
  sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not FLAGS.workdir:  # checked here, not marked required: importing this module
    # (tests, grain workers parsing flags) must not make --workdir mandatory for them.
    raise app.UsageError('--workdir is required, e.g. --workdir runs/dual')
  if FLAGS.mode == 'compare':
    if not FLAGS.compare:
      raise app.UsageError('--mode compare needs --compare=WORKDIR,WORKDIR,...')
    print(report.write_comparison(FLAGS.compare, FLAGS.workdir))
    return
  if FLAGS.config is None:
    raise app.UsageError('--config is required, e.g. --config configs/dual.py')
  if not FLAGS['verbosity'].present:  # library logs (orbax, tfds) drown the progress lines
    logging.set_verbosity(logging.ERROR)
  if FLAGS.multihost:
    jax.distributed.initialize()
  logging.info('JAX process %d/%d, devices: %s', jax.process_index(), jax.process_count(),
               jax.devices())
  try:
    if FLAGS.mode in ('train', 'all'):
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if FLAGS.mode in ('evaluate', 'all'):
      evaluate.evaluate(FLAGS.config, FLAGS.workdir)
    if FLAGS.mode == 'predict' or (
        FLAGS.mode == 'all' and evaluate.has_test_chips(FLAGS.config, FLAGS.workdir)):
      evaluate.predict_test(FLAGS.config, FLAGS.workdir)
  except train.TrainingStopped as e:  # a clean stop: exit status 0
    print(e, file=sys.stderr)
  except KeyboardInterrupt:  # a second SIGTERM/SIGINT during training, or Ctrl-C elsewhere
    print('error: interrupted: stopped at once, without saving. The last checkpoint in '
          f'{FLAGS.workdir} is intact: rerun the same command to resume from it.', file=sys.stderr)
    sys.exit(130)
  except USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except OSError as e:  # the file system refused (full disk, a path through a file, read-only)
    if e.errno not in FILESYSTEM_ERRNOS:
      raise
    print(f'error: {e}: check that path (--workdir, config.data.raw_dir/prepared_dir), its '
          'permissions and the free disk space, then rerun the same command.', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
