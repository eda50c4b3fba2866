"""The command line around main.py: flag parsing, built-in config names, and the user's
mistakes reported as one `error: ...` line (exit status 1).

A user's mistake is an `errors.UserError` (its message names the file, line, config key or path
and says what to do) or an OSError of the file system (`is_file_system_refusal`); anything else
that escapes is a bug in rf_jax and keeps its traceback. Where only a library's message says
what happened, one small function reads it: `missing_config_key`, `is_peer_failure`.
"""

import contextlib
import errno
import os
import pathlib
import re
import sys
import traceback

from absl import flags
import jax

from rf_jax import checkpoints
from rf_jax import config_checks
from rf_jax import errors
from rf_jax import preemption
from rf_jax import provenance
from rf_jax import workdir as workdir_lib


class CommandLineError(errors.UserError, ValueError):
  """Flags that do not fit together (a mode's flag given to another mode, a stray argument)."""

# OSErrors that describe the user's file system rather than a bug (str(e) names the path).
FILESYSTEM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOTDIR,
                               errno.EISDIR, errno.EACCES, errno.EPERM, errno.EEXIST})


def is_file_system_refusal(error: OSError) -> bool:
  """An OSError that Python or a library raised because of the user's file system (a full disk,
  a read-only mount, a path through a file, no permission), not because of a bug."""
  return error.errno in FILESYSTEM_ERRNOS


def _fail(message: str, status: int = 1):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


# How another process's death reaches the survivors of a multi-process run: their next
# collective fails (gloo on CPU, NCCL on GPUs) or the coordination service reports the task.
# It has no exception class or code of its own: only the text tells.
PEER_FAILURE_MARKERS = ('Connection reset by peer', 'Connection closed by peer', 'heartbeat',
                        'Barrier failed', 'unhealthy', 'NCCL')
# A failed collective reaches Python as a JaxRuntimeError, or as a ValueError with the same
# status text where its result is read from a buffer it left in error (process_allgather's).
COLLECTIVE_ERRORS = (jax.errors.JaxRuntimeError, ValueError)


def is_peer_failure(error: Exception) -> bool:
  """Whether `error` is how a collective or the coordination service reports that another
  process of a multi-process run has died."""
  return (isinstance(error, COLLECTIVE_ERRORS)
          and any(marker in str(error) for marker in PEER_FAILURE_MARKERS))


def _peer_failed(error: Exception, workdir: str) -> None:
  """One error line and exit 1, skipping jax.distributed's shutdown at exit: its barrier would
  wait for the dead process until the heartbeat timeout, then abort this one."""
  first_line = str(error).strip().splitlines()[0]
  print(f'error: process {jax.process_index()} of {jax.process_count()} stops: another process '
        f'of this run has stopped ({first_line}). {_after_interruption(workdir)} See the other '
        'processes\' logs; rerun the whole job (every process).', file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(1)


def missing_config_key(error: Exception) -> tuple[str, str | None]:
  """(the key, ml_collections' suggestion or None) from the error that overriding a key the
  config lacks raises. ml_collections names the key only in the message: an AttributeError
  around a KeyError whose message is the quoted key and a 'Did you mean "..."' line (a missing
  leaf), the KeyError itself (a missing section), or a KeyError ending 'Attempting to lookup:
  num_epochs.x' (a key below a value)."""
  inner = error.args[0] if error.args and isinstance(error.args[0], Exception) else error
  text = inner.args[0] if inner.args and isinstance(inner.args[0], str) else str(inner)
  quoted = re.match(r"'([A-Za-z_]\w*)'", text)
  below_a_value = re.search(r'Attempting to lookup: (\S+)', text)
  if quoted:
    key = quoted.group(1)
  elif below_a_value:
    key = below_a_value.group(1).split('.')[-1]
  else:
    key = text
  suggestion = re.search(r'[Dd]id you mean "([^"]+)"', text)
  return key, suggestion.group(1) if suggestion else None


def _config_arg(argv, missing: str) -> str:
  """The --config.* argument that names the key `missing` (or a generic hint)."""
  for arg in argv[1:]:
    if arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=', 1)[0]
      if missing in key.split('.'):
        return arg
  return f'--config.*{missing}'


def _config_key_hint(name: str, flag_values) -> str:
  """For `--num_epochs=1`: 'Did you mean --config.num_epochs?' when the config has that key."""
  config = flag_values['config'].value if 'config' in flag_values else None
  keys = []
  if config is not None:
    stack = [('', config)]
    while stack:
      prefix, node = stack.pop()
      for key in node.keys():
        value = node[key]
        if hasattr(value, 'keys'):
          stack.append((f'{prefix}{key}.', value))
        else:
          keys.append(f'{prefix}{key}')
  matches = sorted(k for k in keys if k == name or k.endswith('.' + name))
  if matches:
    return f' Did you mean {" or ".join("--config." + k for k in matches)}?'
  return ' See --helpfull; config keys are set as --config.<key>=<value> (configs/default.py).'


def check_backend() -> None:
  """A JAX_PLATFORMS that names a missing backend, as one error line instead of an assertion."""
  try:
    jax.devices()
  except (RuntimeError, AssertionError) as e:
    platforms = os.environ.get('JAX_PLATFORMS', '')
    _fail(f'JAX could not start the {platforms or "default"} backend ({str(e).strip() or type(e).__name__}): '
          f'{"unset JAX_PLATFORMS or " if platforms else ""}install the jax build for this '
          'accelerator (e.g. pip install -U "jax[cuda13]" for an NVIDIA driver >= 580, '
          '"jax[cuda12]" for 525-579), or set JAX_PLATFORMS=cpu.')


CONFIGS_DIR = pathlib.Path(__file__).resolve().parent / 'configs'
BUILTIN_CONFIGS = tuple(sorted(p.stem for p in CONFIGS_DIR.glob('*.py') if p.stem != '__init__'))


def _builtin_config(value: str) -> str:
  """`--config dual` names rf_jax/configs/dual.py from any directory; a file named `dual` in
  the current directory wins, a folder of that name does not. `~` is the home directory, as
  in every path option (the shell leaves it alone after `=`)."""
  path = CONFIGS_DIR / f'{value}.py'
  if os.sep not in value and not os.path.isfile(value) and path.is_file():
    return str(path)
  return os.path.expanduser(value)


def _config_file(argv: list[str]) -> str | None:
  """The --config value in `argv` (None without one)."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg[len('--config='):]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _with_builtin_configs(argv: list[str]) -> list[str]:
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith('--config='):
      out[i] = '--config=' + _builtin_config(arg[len('--config='):])
    elif arg == '--config' and i + 1 < len(out):
      out[i + 1] = _builtin_config(out[i + 1])
  return out


def _same_file(a: str, b: str) -> bool:
  return os.path.realpath(a) == os.path.realpath(b)


def config_file_error(error: BaseException, path: str | None) -> str | None:
  """'PATH:LINE: what went wrong' when `error` came from running the config file `path` (its
  syntax, or an exception raised in it), else None: the user's code, not rf_jax's."""
  if not path or not os.path.isfile(path):
    return None
  if isinstance(error, SyntaxError) and error.filename and _same_file(error.filename, path):
    return f'{path}:{error.lineno}: {type(error).__name__}: {error.msg}'
  lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
           if _same_file(frame.filename, path)]
  if lines:
    return f'{path}:{lines[-1]}: {type(error).__name__}: {error}'
  if isinstance(error, AttributeError) and getattr(error, 'name', None) == 'get_config':
    return f'{path}: defines no get_config()'
  return None


HELP_FLAGS = ('-h', '-?', '-help', '--help', '--helpshort')
FULL_HELP_FLAGS = ('-helpfull', '--helpfull')


def _help(flag_values, full: bool) -> str:
  """The program's docstring and its own flags (every flag, absl's included, with `full`)."""
  doc = (sys.modules['__main__'].__doc__ or '').strip()
  listing = (flag_values.get_help() if full else
             flag_values.module_help(flag_values.find_module_defining_flag('workdir')))
  more = '' if full else '\n\n--helpfull lists every flag, absl\'s included.'
  return f'{doc}\n\nflags:\n{listing}{more}'


def version() -> str:
  """`rf-jax --version`: rf_jax's version and the libraries that decide its numbers."""
  found = provenance.versions()
  commit = f' (commit {found["rf_jax_commit"]})' if 'rf_jax_commit' in found else ''
  libraries = ', '.join(f'{name} {found[name]}' for name in ('jax', 'jaxlib', 'flax', 'optax')
                        if name in found)
  return (f'rf-jax {found.get("rf_jax", "not installed")}{commit}; python {found["python"]}, '
          f'{libraries}')


def parse_flags(argv):
  """absl's flag parsing, with every mistake reported as one `error:` line (exit 1); --help
  and --version print and exit 0."""
  flag_values = flags.FLAGS
  argv = _with_builtin_configs(argv)
  if '--version' in argv[1:]:
    print(version())
    sys.exit(0)
  asked = set(argv[1:])
  if asked & set(HELP_FLAGS + FULL_HELP_FLAGS):
    flag_values.mark_as_parsed()  # listing the flags reads their defaults
    print(_help(flag_values, full=bool(asked & set(FULL_HELP_FLAGS))))
    sys.exit(0)
  config_file = _config_file(argv)
  try:
    rest = flag_values(argv)
    if 'config' in flag_values and flag_values.config is not None:
      flag_values.config.keys()  # a config file loads lazily: fail here, not deep in a run
    return rest
  except Exception as e:  # pylint: disable=broad-except
    in_config_file = config_file_error(e, config_file)
    if in_config_file:
      _fail(f'--config {in_config_file}. Fix the config file: it defines get_config() '
            'returning a ConfigDict, as rf_jax/configs/*.py do.')
    _fail(_parse_error(e, argv, flag_values))


def _parse_error(error: Exception, argv, flag_values) -> str:
  """The one line for a mistake in the flags; anything else is re-raised (a bug)."""
  if isinstance(error, OSError):  # the config file is missing or cannot be read
    return (f'--config: {" ".join(str(error).split())}. Give a get_config() file, or one of '
            f'the built-in configs: {", ".join(BUILTIN_CONFIGS)}.')
  if isinstance(error, flags.UnrecognizedFlagError):
    return f'{" ".join(str(error).split())}.{_config_key_hint(error.flagname, flag_values)}'
  if isinstance(error, flags.Error):
    message = ' '.join(str(error).split())
    hint = (' Every config key and its type is in configs/default.py.'
            if '--config' in message else ' See --help.')
    return f'{message}.{hint}'
  if isinstance(error, (AttributeError, KeyError)):  # an override of a key the config lacks
    missing, suggestion = missing_config_key(error)
    arg = _config_arg(argv, missing)
    key = arg.removeprefix('--config.').split('=', 1)[0]
    if key in config_checks.RENAMED_KEYS:
      now, example = config_checks.RENAMED_KEYS[key]
      return (f'{arg}: config.{key} is now config.{now}, e.g. --config.{now}={example}; every '
              'key is in configs/default.py.')
    return (f'{arg}: the config has no key {missing!r}'
            f'{f" (did you mean {suggestion!r}?)" if suggestion else ""}; every key is in '
            'configs/default.py, e.g. --config.data.crop_size=224.')
  raise error


def _after_interruption(workdir: str | None) -> str:
  """What a stop without saving left behind, for the messages that follow one."""
  if not workdir:
    return 'Rerun the same command.'
  step = checkpoints.latest_step(workdir_lib.Workdir(workdir).checkpoints)
  if step is None:
    return (f'No checkpoint had been saved in {workdir} yet: rerun the same command to start '
            'again.')
  return (f'The last checkpoint in {workdir} (step {step}) is intact: rerun the same command '
          'to resume from it.')


@contextlib.contextmanager
def reported(workdir: str | None):
  """Runs the body; user mistakes become one `error:` line, a clean stop exits 0."""
  try:
    yield
  except preemption.TrainingStopped as e:
    print(e, file=sys.stderr)
  except KeyboardInterrupt:  # a second SIGTERM/SIGINT during training, or Ctrl-C elsewhere
    _fail(f'interrupted: stopped at once, without saving. {_after_interruption(workdir)}',
          status=130)
  except errors.UserError as e:
    _fail(str(e))
  except COLLECTIVE_ERRORS as e:
    if jax.process_count() == 1 or not is_peer_failure(e):
      raise
    _peer_failed(e, workdir)
  except OSError as e:
    if not is_file_system_refusal(e):
      raise
    _fail(f'{e}: check that path (--workdir, config.data.raw_dir/prepared_dir), its permissions '
          'and the free disk space, then rerun the same command.')
