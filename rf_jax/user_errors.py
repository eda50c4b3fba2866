"""Mistakes in the user's input, reported as one `error: ...` line (exit status 1).

Every message names the file, line, config key or path and says what to do; anything else that
escapes is a bug in rf_jax and keeps its traceback.
"""

import contextlib
import errno
import re
import sys

from absl import flags

from rf_jax import checkpoints
from rf_jax import config_checks
from rf_jax import parallel
from rf_jax import preemption
from rf_jax import train
from rf_jax import weights
from rf_jax import workdir as workdir_lib
from rf_jax.data import planet

USER_ERRORS = (
    planet.PlanetDataError,
    config_checks.ConfigError,
    parallel.DeviceCountError,
    checkpoints.CheckpointError,
    weights.WeightsMismatchError,
    weights.WeightsFileError,
    weights.UnsafeCheckpointError,
    train.NonFiniteLossError,
    workdir_lib.WorkdirError,
    FileNotFoundError,
    PermissionError,
)

# OSErrors that describe the user's file system rather than a bug (str(e) names the path).
FILESYSTEM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOTDIR,
                               errno.EISDIR, errno.EACCES, errno.EPERM, errno.EEXIST})


def _fail(message: str, status: int = 1):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


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
  flag_values = flags.FLAGS
  try:
    rest = flag_values(argv)
    if 'config' in flag_values and flag_values.config is not None:
      flag_values.config.keys()  # a config file loads lazily: fail here, not deep in a run
    return rest
  except OSError as e:  # the config file is missing or does not load
    _fail(f'--config: {" ".join(str(e).split())}')
  except flags.Error as e:
    message = ' '.join(str(e).split())
    hint = (' Every config key and its type is in configs/default.py.'
            if '--config' in message else ' See --helpfull.')
    _fail(f'{message}.{hint}')
  except (AttributeError, KeyError) as e:  # an override of a key the config does not have
    found = re.search(r"'([A-Za-z_]\w*)\\*'", str(e))
    missing = found.group(1) if found else str(e)
    suggestion = re.search(r'[Dd]id you mean "[^"]+"', str(e))
    _fail(f'{_config_arg(argv, missing)}: the config has no key {missing!r}'
          f'{" (" + suggestion.group(0) + "?)" if suggestion else ""}; every key is in '
          'configs/default.py, e.g. --config.data.crop_size=224.')


@contextlib.contextmanager
def reported(workdir: str):
  """Runs the body; user mistakes become one `error:` line, a clean stop exits 0."""
  try:
    yield
  except preemption.TrainingStopped as e:
    print(e, file=sys.stderr)
  except KeyboardInterrupt:  # a second SIGTERM/SIGINT during training, or Ctrl-C elsewhere
    _fail(f'interrupted: stopped at once, without saving. The last checkpoint in {workdir} is '
          'intact: rerun the same command to resume from it.', status=130)
  except USER_ERRORS as e:
    _fail(str(e))
  except OSError as e:  # the file system refused (full disk, a path through a file, read-only)
    if e.errno not in FILESYSTEM_ERRNOS:
      raise
    _fail(f'{e}: check that path (--workdir, config.data.raw_dir/prepared_dir), its permissions '
          'and the free disk space, then rerun the same command.')
