"""cli.py: which errors are the user's, and the two library messages it has to read.

The CLI end to end (one `error:` line per mistake, in a subprocess) is tests/test_bad_inputs.py's;
a real dead peer in a 2-process run is tests/test_multihost.py's.
"""

import errno
import importlib
import os
import pathlib
import pkgutil
import re
import sys

from absl import flags
import jax
from ml_collections import config_dict
from ml_collections import config_flags
import pytest

import rf_jax
from rf_jax import cli
from rf_jax import config_checks
from rf_jax import errors

RGB_CONFIG = pathlib.Path(rf_jax.__file__).resolve().parent / 'configs' / 'rgb.py'


# --- every error class rf_jax raises to the user is a UserError ---------------------------

# Exception classes of rf_jax that never reach the user as they are, and why.
INTERNAL = {
    # A clean stop at a step boundary: the CLI prints it and exits 0.
    'rf_jax.preemption.TrainingStopped',
    # The wire format walk's failure: data/prepared.py turns it into a PlanetDataError that
    # names the prepared dataset and says to rebuild it.
    'rf_jax.data.example_wire.WireError',
}


def _rf_jax_exception_classes() -> dict[str, type]:
  for module in pkgutil.walk_packages(rf_jax.__path__, 'rf_jax.'):
    importlib.import_module(module.name)
  found, stack = {}, [Exception]
  while stack:
    cls = stack.pop()
    stack.extend(cls.__subclasses__())
    if cls.__module__.startswith('rf_jax.'):
      found[f'{cls.__module__}.{cls.__qualname__}'] = cls
  return found


def test_every_error_class_of_rf_jax_is_a_user_error_or_listed_as_internal():
  classes = _rf_jax_exception_classes()
  assert 'rf_jax.data.planet.PlanetDataError' in classes  # the walk found the package
  assert INTERNAL <= classes.keys(), INTERNAL - classes.keys()  # no stale entry
  forgotten = [name for name, cls in classes.items()
               if name not in INTERNAL and not issubclass(cls, errors.UserError)]
  assert not forgotten, f'not UserErrors (the CLI would print a traceback): {forgotten}'


# --- cli.reported: the class decides ------------------------------------------------------


class _Mistake(errors.UserError, ValueError):
  pass


def test_a_user_error_is_one_line_and_exit_1(capsys):
  with pytest.raises(SystemExit) as stopped:
    with cli.reported('runs/W'):
      raise _Mistake('config.x=1 must be > 1.')
  assert stopped.value.code == 1
  assert capsys.readouterr().err == 'error: config.x=1 must be > 1.\n'


@pytest.mark.parametrize('error', [
    ValueError('a bug'),
    FileNotFoundError('a builtin error is no UserError, whatever it says'),
    OSError(errno.ENOENT, 'No such file or directory', 'runs/W/eval/predictions.npz'),
])
def test_anything_else_keeps_its_traceback(error):
  with pytest.raises(type(error)):
    with cli.reported('runs/W'):
      raise error


@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EROFS, errno.ENOTDIR, errno.EACCES])
def test_a_file_system_refusal_is_one_line(code, capsys):
  error = OSError(code, os.strerror(code), 'runs/W/history.json')
  assert cli.is_file_system_refusal(error)
  with pytest.raises(SystemExit) as stopped:
    with cli.reported('runs/W'):
      raise error
  assert stopped.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith(f'error: [Errno {code}] {os.strerror(code)}: \'runs/W/history.json\': '
                        'check that path'), err
  assert len(err.splitlines()) == 1


def test_an_errno_of_a_bug_is_no_file_system_refusal():
  assert not cli.is_file_system_refusal(OSError(errno.ENOENT, 'No such file or directory'))
  assert not cli.is_file_system_refusal(OSError('no errno'))


# --- missing_config_key: ml_collections' message of an override of a missing key ----------


def _override_error(override: str) -> Exception:
  """What ml_collections raises for `--config rgb.py <override>` (as main.py defines --config)."""
  argv = ['rf-jax', '--config', str(RGB_CONFIG), override]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)  # what it reads the override flags from
  with pytest.raises((AttributeError, KeyError)) as raised:
    flag_values(argv)
    flag_values.config.keys()  # as cli.parse_flags does: the file loads lazily
  return raised.value


@pytest.mark.parametrize('override, key, suggestion', [
    ('--config.data.crop_sise=96', 'crop_sise', 'crop_size'),  # a leaf, with a near key
    ('--config.num_epoch=3', 'num_epoch', 'num_epochs'),
    ('--config.dat.crop_size=96', 'dat', 'data'),  # a section
    ('--config.zzz=3', 'zzz', None),  # nothing near it
    ('--config.num_epochs.x=3', 'x', None),  # below a value
])
def test_missing_config_key_reads_ml_collections_error(override, key, suggestion):
  assert cli.missing_config_key(_override_error(override)) == (key, suggestion)


def test_a_renamed_key_names_its_new_key():
  override = '--config.eval.flips=True'
  argv = ['rf-jax', '--config', str(RGB_CONFIG), override]
  message = cli._parse_error(_override_error(override), argv, flags.FlagValues())
  assert message == (f'{override}: config.eval.flips is now config.eval.tta, e.g. '
                     '--config.eval.tta=flip; every key is in configs/default.py.')


# --- is_peer_failure: a failed collective's text ----------------------------------------

# What process 0 of 2 raised when process 1 was SIGKILLed mid-epoch (2 processes on 127.0.0.1,
# gloo); the real thing is tests/test_multihost.py's dead-peer test.
PEER_DIED = ('UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:538] '
             'Read error [127.0.0.1]:25293: Connection reset by peer')


def test_is_peer_failure():
  assert cli.is_peer_failure(jax.errors.JaxRuntimeError(PEER_DIED))
  # The same failure read from process_allgather's result (preemption.agreed at a step's end).
  assert cli.is_peer_failure(ValueError(PEER_DIED))
  assert not cli.is_peer_failure(ValueError('batch_size 41 exceeds the 40 training chips'))
  assert not cli.is_peer_failure(
      jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 4 GB'))
  assert not cli.is_peer_failure(ConnectionResetError('Connection reset by peer'))  # not JAX's


@pytest.mark.parametrize('error_class', [jax.errors.JaxRuntimeError, ValueError])
@pytest.mark.parametrize('message, processes', [
    ('RESOURCE_EXHAUSTED: Out of memory allocating 4 GB', 2),  # not a peer's failure
    (PEER_DIED, 1),  # a single process has no peer
])
def test_other_runtime_errors_keep_their_traceback(monkeypatch, message, processes,
                                                   error_class):
  monkeypatch.setattr(jax, 'process_count', lambda: processes)
  with pytest.raises(error_class, match=message[:20]):
    with cli.reported('runs/W'):
      raise error_class(message)


# --- config_file_error: a mistake inside the user's config file -------------------------


def _config_file_error(path: pathlib.Path) -> Exception:
  """What loading the config file `path` raises, as main.py defines --config."""
  argv = ['rf-jax', '--config', str(path)]
  # ml_collections loads every config file as module `config_config` over the one in
  # sys.modules: an earlier test's get_config would survive in a file that lacks one.
  sys.modules.pop('config_config', None)
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  with pytest.raises(Exception) as raised:  # whatever the user's file raises
    flag_values(argv)
    flag_values.config.keys()
  return raised.value


@pytest.mark.parametrize('text, expected', [
    ('def get_config(:\n', r':1: SyntaxError: '),
    ('import ml_collections\n\ndef get_config():\n  return ml_collections.ConfigDict(undefined)\n',
     r":4: NameError: name 'undefined' is not defined$"),
    ('x = 1\n', r': defines no get_config\(\)$'),
])
def test_a_config_file_error_names_its_line(tmp_path, text, expected):
  path = tmp_path / 'my_config.py'
  path.write_text(text)
  message = cli.config_file_error(_config_file_error(path), str(path))
  assert message is not None and message.startswith(str(path)), message
  assert re.search(expected, message), message


def test_an_error_outside_the_config_file_is_not_blamed_on_it(tmp_path):
  path = tmp_path / 'my_config.py'
  path.write_text('x = 1\n')
  assert cli.config_file_error(ValueError('a bug elsewhere'), str(path)) is None
  assert cli.config_file_error(_config_file_error(path), None) is None


def test_a_builtin_config_name_is_not_shadowed_by_a_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'dual').mkdir()  # `rf-jax --config dual --workdir dual` made it
  assert cli._with_builtin_configs(['rf-jax', '--config', 'dual']) == [
      'rf-jax', '--config', str(cli.CONFIGS_DIR / 'dual.py')]
  (tmp_path / 'rgb').write_text('a file of that name is what the user means\n')
  assert cli._with_builtin_configs(['rf-jax', '--config=rgb']) == ['rf-jax', '--config=rgb']
  monkeypatch.setenv('HOME', str(tmp_path))
  assert cli._with_builtin_configs(['rf-jax', '--config=~/mine.py']) == [
      'rf-jax', f'--config={tmp_path}/mine.py']


def test_an_interruption_before_any_checkpoint_says_so(tmp_path, capsys):
  # A write that a kill cut short is no checkpoint (orbax renames it to `7` when complete).
  (tmp_path / 'checkpoints' / '7.orbax-checkpoint-tmp-1764800000').mkdir(parents=True)
  with pytest.raises(SystemExit) as stopped:
    with cli.reported(str(tmp_path)):
      raise KeyboardInterrupt
  assert stopped.value.code == 130
  err = capsys.readouterr().err
  assert f'No checkpoint had been saved in {tmp_path} yet' in err, err
  assert 'intact' not in err


def test_config_paths_expand_the_home_directory(monkeypatch, tmp_path):
  monkeypatch.setenv('HOME', str(tmp_path))
  config = config_checks.with_expanded_paths(config_dict.ConfigDict(
      {'data': {'raw_dir': '~/planet', 'prepared_dir': ''}, 'model': {'weights': '~/w.msgpack'}}))
  assert (config.data.raw_dir, config.data.prepared_dir, config.model.weights) == (
      f'{tmp_path}/planet', '', f'{tmp_path}/w.msgpack')
