"""The bad-input catalogue: every mistake a user makes meets one specific error line.

Drives the real entry points: the CLI (`python -m rf_jax.main`, in subprocesses run two at
a time) for the cases that go through flags, config, workdir, weights and checkpoints, and
`inputs.prepare` / `weights.*` / `checkpoints.*` (what the CLI calls) in-process for the
many data-file cases, where a process per case would cost seconds each. Each case asserts:
the error names the file (and line) or the key, suggests the fix where obvious, is one of
the errors the CLI prints as one `error:` line (exit status 1, no traceback), and nothing
written before (checkpoints, history, predictions, the prepared dataset) changed.
"""

import concurrent.futures
import errno
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import unittest.mock

import numpy as np
import pytest
import tifffile

from rf_jax import checkpoints
from rf_jax import cli
from rf_jax import errors
from rf_jax import evaluate
from rf_jax import inputs
from rf_jax import train
from rf_jax.data import planet
from rf_jax import weights
from rf_jax import workdir as workdir_lib
from rf_jax.workdir import Workdir
from tiny_configs import cli_flags, tiny, train_recording_saves, xla_flags_with_devices

REPO = pathlib.Path(__file__).resolve().parents[1]
LABELS = 'train_v2.csv'
TRAIN_DIR = 'train-tif-v2'


# Every invocation may append to the run's log and takes its lock: neither is a result.
NOT_RESULTS = ('log.txt', '.lock')


def tree_digest(root: pathlib.Path) -> dict:
  """{relative path: sha256} of every file under `root` (what 'not damaged' compares)."""
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob('*')) if p.is_file() and p.name not in NOT_RESULTS}


def assert_user_error(error: BaseException, *patterns: str) -> None:
  """An error the CLI prints as an `error:` line: its first line matches the first pattern
  (the file, line or key), the whole message every pattern (a fix may be a command on its
  own line)."""
  assert isinstance(error, errors.UserError), f'{type(error).__name__} would be a traceback'
  _match(str(error), patterns)


def _match(message: str, patterns) -> None:
  assert re.search(patterns[0], message.splitlines()[0]), (patterns[0], message)
  for pattern in patterns:
    assert re.search(pattern, message), f'{pattern!r} not in {message!r}'


def assert_cli_error(result: subprocess.CompletedProcess, *patterns: str) -> None:
  """Exit status 1, no traceback, exactly one `error:` line; the message matches `patterns`."""
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
  lines = result.stderr.splitlines()
  starts = [i for i, line in enumerate(lines) if line.startswith('error: ')]
  assert len(starts) == 1, result.stderr[-3000:]
  _match('\n'.join(lines[starts[0]:])[len('error: '):], patterns)


# --- shared state: one trained + evaluated workdir, one prepared dataset -------------------


@pytest.fixture(scope='module')
def prepared_dir(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp('prepared')


@pytest.fixture(scope='module')
def trained(tmp_path_factory, synthetic_kaggle_dir, prepared_dir):
  """A finished 1-epoch rgb run with eval/predictions.npz; the steps it checkpointed."""
  workdir = tmp_path_factory.mktemp('trained')
  config = tiny('rgb', synthetic_kaggle_dir, prepared_dir)
  saved_steps = train_recording_saves(config, workdir)
  evaluate.evaluate(config, workdir)
  assert Workdir(workdir).predictions.is_file()
  return config, workdir, saved_steps


def test_checkpoints_every_epoch_by_default(trained):
  config, _, saved_steps = trained
  assert config.checkpoint_every_steps == 0
  assert saved_steps == [5]  # 40 training chips / batch 8: once, at the end of the epoch


# --- the CLI cases ------------------------------------------------------------------------


def _cli_cases(config, workdir, tmp: pathlib.Path) -> dict:
  """{case: (argv after `python -m rf_jax.main`, extra env, patterns of the error line)}."""
  base = cli_flags(config)
  fresh = lambda name: ['--workdir', str(tmp / name), '--mode', 'train']

  weights_dir = tmp / 'weights'
  weights_dir.mkdir()
  good = weights_dir / 'resnet18.msgpack'
  weights.save_weights_file(_resnet18_variables(), good)
  truncated = weights_dir / 'truncated.msgpack'
  truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
  shutil.copy(good.with_name(good.name + '.sha256'), truncated.with_name(truncated.name + '.sha256'))
  a_file = tmp / 'a_file'
  a_file.write_text('not a directory\n')
  empty_workdir = tmp / 'never_trained'
  empty_workdir.mkdir()
  bad_syntax = tmp / 'bad_syntax.py'
  bad_syntax.write_text('def get_config(:\n')
  bad_name = tmp / 'bad_name.py'
  bad_name.write_text('import ml_collections\n\ndef get_config():\n  return undefined\n')
  damaged = tmp / 'damaged_config_json'
  shutil.copytree(workdir, damaged)
  (damaged / 'config.json').write_text('{"model": ')

  return {
      'missing data directory': (
          base + [f'--config.data.raw_dir={tmp / "no_such_dir"}'] + fresh('w_missing'), {},
          [re.escape(str(tmp / 'no_such_dir' / LABELS)), 'not found', 'train-tif-v2']),
      'CSV with a wrong header': (
          base + [f'--config.data.raw_dir={_broken_dir(config.data.raw_dir, tmp / "hdr", "wrong header")}']
          + fresh('w_header'), {},
          [re.escape(LABELS) + ':1', 'header must be "image_name,tags"']),
      'truncated chip': (
          base + [f'--config.data.raw_dir={_broken_dir(config.data.raw_dir, tmp / "trunc", "chip truncated")}']
          + fresh('w_trunc'), {},
          [r'train_3\.tif', 'truncated']),
      'unknown config key': (
          base + ['--config.data.crop_sise=96'] + fresh('w_key'), {},
          [r'--config\.data\.crop_sise=96', "no key 'crop_sise'", 'crop_size', 'configs/default.py']),
      'bad value type': (
          base + ['--config.num_epochs=two'] + fresh('w_type'), {},
          [r'--config\.num_epochs=two', 'int']),
      'batch not divisible by the devices': (
          base + ['--config.batch_size=7'] + fresh('w_devices'),
          {'XLA_FLAGS': xla_flags_with_devices(2)},
          [r'config\.batch_size=7 does not divide by the 2 devices', r'--config\.batch_size=6']),
      'missing config file': (
          ['--config', str(tmp / 'no_such_config.py'), '--workdir', str(tmp / 'w_cfg')], {},
          ['no_such_config.py', 'No such file']),
      'weights file missing': (
          base + [f'--config.model.weights={weights_dir / "nope.msgpack"}'] + fresh('w_wmissing'), {},
          ['nope.msgpack', 'not found', 'port_weights.py', "weights=''"]),
      'weights file truncated': (
          base + [f'--config.model.weights={truncated}'] + fresh('w_wtrunc'), {},
          ['truncated.msgpack', 'SHA-256', 'does not match', 'port_weights.py']),
      'checkpoint of another model (evaluate)': (
          base + ['--config.model.name=rgbir', '--workdir', str(workdir), '--mode', 'evaluate'], {},
          [re.escape(str(workdir)), "model 'rgb'", "config.model.name is 'rgbir'"]),
      'evaluate before training': (
          base + ['--workdir', str(empty_workdir), '--mode', 'evaluate'], {},
          ['No checkpoints in', 'train first']),
      'no --config for a workdir without a run': (
          ['--workdir', str(tmp / 'no_run'), '--mode', 'evaluate'], {},
          [re.escape(str(tmp / 'no_run' / 'config.json')) + ' not found', 'give --config']),
      'prepared_dir not writable': (
          base + [f'--config.data.prepared_dir={a_file / "prepared"}'] + fresh('w_prep'), {},
          [re.escape(str(a_file)), 'Not a directory', 'prepared_dir']),
      'workdir not writable': (  # root ignores permissions; a path under a regular file fails for all
          base + fresh('a_file/run'), {},
          [re.escape(str(a_file / 'run')), 'not writable', 'Not a directory', '--workdir']),
      'workdir is a file': (
          base + ['--workdir', str(a_file), '--mode', 'train'], {},
          [re.escape(str(a_file)), 'is a file, not a directory', '--workdir']),
      'resumed with another config': (
          base + ['--config.optim.lr=0.01', '--config.batch_size=4', '--workdir', str(workdir),
                  '--mode', 'train'], {},
          [re.escape(str(workdir)), r'config\.batch_size: the run has 8, this config has 4',
           r'config\.optim\.lr: the run has 0\.005, this config has 0\.01', 'another --workdir']),
      'evaluated on another split': (
          base + ['--config.data.val_fraction=0.5', '--workdir', str(workdir), '--mode',
                  'evaluate'], {},
          [re.escape(str(workdir)), r'config\.data\.val_fraction: the run has 0\.33, this '
           r'config has 0\.5']),
      'a change that cannot be allowed': (
          base + ['--config.batch_size=4', '--allow_config_change=batch_size', '--workdir',
                  str(workdir), '--mode', 'train'], {},
          ['--allow_config_change=batch_size', 'only num_epochs', 'another --workdir']),
      'a config key given as a flag': (
          base + ['--num_epochs=1'] + fresh('w_flag'), {},
          ["Unknown command line flag 'num_epochs'", r'--config\.num_epochs']),
      'a missing JAX backend': (
          base + fresh('w_backend'), {'JAX_PLATFORMS': 'cuda'},
          ['could not start the cuda backend', 'JAX_PLATFORMS=cpu']),
      'crop larger than the chips': (
          base + ['--config.data.crop_size=200'] + fresh('w_crop'), {},
          [r'config\.data\.crop_size=200 exceeds the 128 px chips', r'--config\.data\.crop_size=128']),
      'config file with a syntax error': (
          ['--config', str(bad_syntax), '--workdir', str(tmp / 'w_syntax')], {},
          [re.escape(str(bad_syntax)) + ':1: SyntaxError', 'get_config']),
      'config file raising in get_config': (
          ['--config', str(bad_name), '--workdir', str(tmp / 'w_name')], {},
          [re.escape(str(bad_name)) + ":4: NameError: name 'undefined' is not defined"]),
      "a run's config.json that is not JSON": (
          ['--workdir', str(damaged), '--mode', 'evaluate'], {},
          [re.escape(str(damaged / 'config.json')) + ':1: not valid JSON', 'Restore it']),
      'a space after a comma in --compare': (
          ['--mode', 'compare', '--compare', 'runs/rgb,', 'runs/dual', '--workdir',
           str(tmp / 'w_space')], {},
          [r'unexpected argument\(s\) runs/dual', 'without spaces']),
      '--chips without --mode predict': (
          base + ['--chips', str(tmp)] + ['--workdir', str(tmp / 'w_chips')], {},
          [r'--chips applies to --mode predict only', r'--mode all \(the default\)',
           'add --mode predict']),
      '--compare with another mode': (
          base + ['--compare', 'runs/rgb,runs/dual'] + fresh('w_compare'), {},
          ['--compare applies to --mode compare only', 'mode train']),
      '--allow_config_change with evaluate': (
          ['--workdir', str(tmp / 'w_allow'), '--mode', 'evaluate',
           '--allow_config_change=num_epochs'], {},
          ['--allow_config_change applies to --mode train or all only']),
      '--output of the test split': (
          ['--workdir', str(tmp / 'w_output'), '--mode', 'predict', '--output', 'scores.csv'],
          {}, ['--output names the CSV of --mode predict --chips', 'submission.csv']),
      'a multi-process flag without --multihost': (
          base + ['--num_processes=2'] + fresh('w_processes'), {},
          [r'--num_processes \(for a multi-process job\) need --multihost']),
  }


def _resnet18_variables(num_classes: int = 1000) -> dict:
  """Zero-valued variables with torchvision ResNet-18's names and shapes."""
  flat = {k: np.zeros(s, np.float32) for k, s in weights.resnet18_shapes(num_classes, 3).items()}
  out = {}
  for key, value in flat.items():
    node = out
    for part in key[:-1]:
      node = node.setdefault(part, {})
    node[key[-1]] = value
  return out


@pytest.fixture(scope='module')
def cli_results(trained, tmp_path_factory, prepared_dir):
  """Every CLI case run once, two processes at a time; digests of the run and the dataset."""
  config, workdir, _ = trained
  tmp = tmp_path_factory.mktemp('cli')
  cases = _cli_cases(config, workdir, tmp)
  before = tree_digest(workdir), tree_digest(prepared_dir / 'planet_amazon')

  def run(case):
    argv, env, _ = cases[case]
    return subprocess.run([sys.executable, '-m', 'rf_jax.main', *argv], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=900)

  # The cases on the trained run take turns: its lock admits one process at a time.
  on_the_run = [case for case in cases if str(workdir) in cases[case][0]]
  others = [case for case in cases if case not in on_the_run]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    in_turn = pool.submit(lambda: {case: run(case) for case in on_the_run})
    results = dict(zip(others, pool.map(run, others)))
    results.update(in_turn.result())
  after = tree_digest(workdir), tree_digest(prepared_dir / 'planet_amazon')
  return cases, results, before, after


CLI_CASES = ['missing data directory', 'CSV with a wrong header', 'truncated chip',
             'unknown config key', 'bad value type', 'batch not divisible by the devices',
             'missing config file', 'weights file missing', 'weights file truncated',
             'checkpoint of another model (evaluate)',
             'evaluate before training', 'no --config for a workdir without a run',
             'workdir not writable', 'prepared_dir not writable',
             'workdir is a file', 'resumed with another config', 'evaluated on another split',
             'a change that cannot be allowed', 'a config key given as a flag',
             'a missing JAX backend', 'crop larger than the chips',
             'config file with a syntax error', 'config file raising in get_config',
             "a run's config.json that is not JSON", 'a space after a comma in --compare',
             '--chips without --mode predict', '--compare with another mode',
             '--allow_config_change with evaluate', '--output of the test split',
             'a multi-process flag without --multihost']


@pytest.mark.parametrize('case', CLI_CASES)
def test_cli_reports_one_specific_error_line(cli_results, case):
  cases, results, _, _ = cli_results
  assert_cli_error(results[case], *cases[case][2])


def test_a_refused_start_leaves_no_new_workdir(cli_results):
  """Every case that names a new workdir (`w_*`) is refused, whether before the workdir is
  created (a config check) or after (a missing dataset or weights file, an unwritable
  prepared_dir): none is left behind."""
  cases, _, _, _ = cli_results
  named = [pathlib.Path(argv[argv.index('--workdir') + 1]) for argv, _, _ in cases.values()
           if '--workdir' in argv]
  new = [w for w in named if w.name.startswith('w_')]
  assert len(new) >= 5
  assert [w for w in new if w.exists()] == []


@pytest.mark.parametrize('existed, written, removed', [
    (False, ('log.txt', '.lock', 'config.json', 'provenance.json'), True),
    (False, ('log.txt', 'synthetic/'), False),  # generated data is kept for the rerun
    (True, ('log.txt', '.lock'), False),  # a workdir the user had is never removed
])
def test_a_stopped_start_removes_only_the_workdir_it_created_empty(tmp_path, existed, written,
                                                                  removed):
  wd = workdir_lib.Workdir(tmp_path / 'run')
  if existed:
    wd.root.mkdir()
  with pytest.raises(errors.UserError), workdir_lib.removed_if_refused(wd):
    wd.root.mkdir(exist_ok=True)
    for name in written:
      (wd.root / name).mkdir() if name.endswith('/') else (wd.root / name).write_text('x')
    raise errors.UserError('refused')
  assert wd.root.exists() == (not removed)


def test_cli_errors_damage_nothing_written_before(cli_results, trained):
  _, _, before, after = cli_results
  assert after[0] == before[0]  # checkpoints, history.json, eval/predictions.npz, metrics
  assert {k: v for k, v in after[1].items() if k in before[1]} == before[1]
  _, workdir, _ = trained
  assert not list(workdir.rglob('*' + checkpoints.TMP_MARKER + '*'))


def test_a_second_process_in_a_running_workdir_is_refused(trained, tmp_path):
  config, _, _ = trained
  workdir = tmp_path / 'busy'
  argv = [sys.executable, '-m', 'rf_jax.main', *cli_flags(config), '--workdir', str(workdir),
          '--mode', 'train']
  first = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    lock = workdir / '.lock'
    for _ in range(600):  # the first run holds the lock from its start
      if lock.is_file() and lock.read_text().strip():
        break
      assert first.poll() is None, 'the first run ended before it could be refused company'
      time.sleep(0.1)
    second = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert_cli_error(second, re.escape(str(workdir)), f'in use by rf_jax pid {first.pid}',
                     'another --workdir')
  finally:
    first.kill()
    first.wait()
  # The kernel released the killed holder's lock: the workdir is usable again at once.
  third = subprocess.run(argv[:-2] + ['--mode', 'evaluate'], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
  assert 'in use by' not in third.stderr


def test_a_finished_training_says_so(trained, tmp_path, capsys):
  config, workdir, _ = trained
  shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
  train.train_and_evaluate(config, tmp_path)
  assert 'is already trained to epoch 1 (step 5); nothing to do' in capsys.readouterr().out


def test_configs_load_from_any_directory(tmp_path):
  """A config file imports the default config from the package, not from the checkout."""
  for config in (str(REPO / 'configs' / 'demo.py'), 'dual'):
    done = subprocess.run(
        [sys.executable, '-m', 'rf_jax.main', '--config', config, '--workdir',
         str(tmp_path / 'never_trained'), '--mode', 'evaluate'],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert_cli_error(done, 'No checkpoints in', 'train first')


def test_paths_and_config_names_mean_what_the_user_meant(tmp_path):
  home = tmp_path / 'home'
  home.mkdir()
  (tmp_path / 'dual').mkdir()  # as `rf-jax --config dual --workdir dual` leaves it
  run = lambda *argv: subprocess.run(
      [sys.executable, '-m', 'rf_jax.main', *argv], cwd=tmp_path,
      env={**os.environ, 'HOME': str(home)}, capture_output=True, text=True, timeout=300)
  # `~` after `=` (the shell leaves it alone) is the home directory, as in every path.
  assert_cli_error(run('--workdir=~/new_run', '--mode', 'evaluate'),
                   re.escape(str(home / 'new_run' / 'config.json')) + ' not found')
  # The built-in config, not the folder; and a refused config creates no workdir.
  assert_cli_error(run('--config', 'dual', '--workdir', 'dual_run', '--config.num_epochs=0'),
                   r'config\.num_epochs=0 must be > 0')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['dual', 'home']
  # compare's --workdir is where it writes, which a user comparing runs may not guess.
  assert_cli_error(run('--mode', 'compare', '--compare', 'a,b'),
                   r'--workdir is required: --mode compare writes the comparison there, e\.g\. '
                   r'--workdir runs/comparison')
  assert not list(home.iterdir())


def test_help_and_version_exit_0():
  script = pathlib.Path(sys.executable).with_name('rf-jax')  # the installed console script
  helped = subprocess.run([script, '--help'], capture_output=True, text=True, timeout=300)
  assert helped.returncode == 0, helped.stderr[-2000:]
  for flag in ('--workdir', '--mode', '--config', '--chips', '--output', '--compare'):
    assert f'  {flag}:' in helped.stdout, flag
  versioned = subprocess.run([script, '--version'], capture_output=True, text=True, timeout=300)
  assert versioned.returncode == 0, versioned.stderr[-2000:]
  assert re.match(r'rf-jax \S+ .*python 3\.\d+.*jax \d', versioned.stdout), versioned.stdout


@pytest.mark.parametrize('name, content, pattern', [
    ('history.json', b'[{"epoch": 1', r'history\.json:1: not valid JSON'),
    ('eval/predictions.npz', b'PK\x03\x04 cut short', r'eval/predictions\.npz: not readable'),
])
def test_a_damaged_run_file_is_named(tmp_path, name, content, pattern):
  path = tmp_path / name
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(content)
  read = workdir_lib.read_json if name.endswith('.json') else workdir_lib.read_npz
  with pytest.raises(errors.UserError) as raised:
    read(path)
  assert_user_error(raised.value, re.escape(str(tmp_path)) + '/' + pattern)
  assert path.read_bytes() == content  # kept for the user to restore


def test_an_interruption_names_the_checkpoint_left(trained, capsys):
  _, workdir, saved_steps = trained
  with pytest.raises(SystemExit) as stopped:
    with cli.reported(str(workdir)):
      raise KeyboardInterrupt
  assert stopped.value.code == 130
  assert (f'The last checkpoint in {workdir} (step {saved_steps[-1]}) is intact'
          in capsys.readouterr().err)


# --- data files, through inputs.prepare (what every mode calls first) -------------------


def _broken_dir(source, dest: pathlib.Path, case: str) -> pathlib.Path:
  """A copy of the synthetic Kaggle directory (chips symlinked) with one thing broken."""
  source = pathlib.Path(source)
  (dest / TRAIN_DIR).mkdir(parents=True)
  for chip in (source / TRAIN_DIR).iterdir():
    (dest / TRAIN_DIR / chip.name).symlink_to(chip)
  (dest / 'test-tif-v2').symlink_to(source / 'test-tif-v2')
  lines = (source / LABELS).read_text().splitlines()
  chip = dest / TRAIN_DIR / 'train_3.tif'
  good = tifffile.imread(source / TRAIN_DIR / 'train_3.tif')
  if case in ('chip truncated', 'chip not a TIF', 'wrong band count', 'wrong size', 'wrong dtype'):
    chip.unlink()
  if case == 'CSV missing':
    lines = None
  elif case == 'CSV empty':
    lines = []
  elif case == 'wrong header':
    lines[0] = 'name,labels'
  elif case == 'unknown tag':
    lines[3] = lines[3].split(',')[0] + ',clear primary jungle'
  elif case == 'empty tag field':
    lines[3] = lines[3].split(',')[0] + ','
  elif case == 'duplicate names':
    lines.append(lines[1].split(',')[0] + ',clear')
  elif case == 'names without chips':
    lines.append('train_999,clear primary')
  elif case == 'chip truncated':
    data = (source / TRAIN_DIR / 'train_3.tif').read_bytes()
    chip.write_bytes(data[: len(data) // 2])
  elif case == 'chip not a TIF':
    chip.write_bytes(b'<html><body>403 Forbidden</body></html>\n')
  elif case == 'wrong band count':
    tifffile.imwrite(chip, good[..., :3])
  elif case == 'wrong size':
    tifffile.imwrite(chip, good[:64, :64])
  elif case == 'wrong dtype':
    tifffile.imwrite(chip, good.astype(np.float32))
  else:
    assert case == 'none', case
  if lines is not None:
    (dest / LABELS).write_text('\n'.join(lines) + ('\n' if lines else ''))
  return dest


DATA_CASES = {
    # case: patterns of the message (LABELS / chip path are checked separately)
    'CSV missing': [re.escape(LABELS), 'not found'],
    'CSV empty': [re.escape(LABELS) + ':1', 'header must be', 'empty file'],
    'wrong header': [re.escape(LABELS) + ':1', 'header must be "image_name,tags"', 'name,labels'],
    'unknown tag': [re.escape(LABELS) + ':4', "unknown tag.*'jungle'", 'known tags: clear'],
    'empty tag field': [re.escape(LABELS) + ':4', 'empty tags'],
    'duplicate names': [re.escape(LABELS) + r':\d+', "duplicate image name 'train_0'",
                        'first seen on line 2'],
    'names without chips': [r'train_999\.tif', 'not found'],
    'chip truncated': [r'train_3\.tif', 'truncated'],
    'chip not a TIF': [r'train_3\.tif', 'not a (readable )?TIFF'],
    'wrong band count': [r'train_3\.tif', 'expected 4 bands', r'3 band\(s\)'],
    'wrong size': [r'train_3\.tif', 'expected 128x128', 'got 64x64'],
    'wrong dtype': [r'train_3\.tif', 'float32', 'uint16'],
}


@pytest.mark.parametrize('case', list(DATA_CASES))
def test_bad_data_files_are_named(case, synthetic_kaggle_dir, prepared_dir, trained, tmp_path):
  raw_dir = _broken_dir(synthetic_kaggle_dir, tmp_path / 'raw', case)
  before = tree_digest(prepared_dir / 'planet_amazon')
  with pytest.raises(Exception) as error:
    inputs.prepare(tiny('rgb', raw_dir, prepared_dir), Workdir(tmp_path / 'workdir'))
  assert_user_error(error.value, *DATA_CASES[case])
  after = tree_digest(prepared_dir / 'planet_amazon')
  # The good dataset intact. A bad-chip listing is named by the content it lists, so an earlier
  # attempt on the same broken chips (the CLI's truncated-chip case) has its listing rewritten.
  good = lambda digest: {k: v for k, v in digest.items() if not k.endswith('.bad_chips.txt')}
  assert {k: v for k, v in good(after).items() if k in before} == good(before)


def _version_dir(prepared_dir) -> pathlib.Path:
  (version,) = (prepared_dir / 'planet_amazon').glob('*/1.0.0')
  return version


def test_interrupted_tfds_build_is_ignored_and_rebuilt(synthetic_kaggle_dir, trained, tmp_path,
                                                       caplog):
  prepared = tmp_path / 'prepared'
  good = tiny('rgb', synthetic_kaggle_dir, trained[0].data.prepared_dir)
  shutil.copytree(good.data.prepared_dir, prepared)
  version = _version_dir(prepared)
  incomplete = version.parent / 'incomplete.abc123'
  version.rename(incomplete)  # a build killed before TFDS renamed it into place
  (incomplete / 'planet_amazon-train.array_record-00000-of-00001').write_bytes(b'half')
  config = tiny('rgb', synthetic_kaggle_dir, prepared)
  with caplog.at_level('WARNING'):
    data = inputs.prepare(config, Workdir(tmp_path / 'workdir'))
  assert len(data.train) == 40 and len(data.validation) == 20
  assert 'incomplete.abc123' in caplog.text  # said where the stale build is
  reference = inputs.prepare(good, Workdir(tmp_path / 'workdir'))
  np.testing.assert_array_equal(data.train[7]['image'], reference.train[7]['image'])


def test_prepared_dataset_missing_a_shard_is_named(synthetic_kaggle_dir, trained, tmp_path):
  prepared = tmp_path / 'prepared'
  shutil.copytree(trained[0].data.prepared_dir, prepared)
  version = _version_dir(prepared)
  (version / 'planet_amazon-train.array_record-00000-of-00001').unlink()  # a copy cut short
  with pytest.raises(Exception) as error:
    data = inputs.prepare(tiny('rgb', synthetic_kaggle_dir, prepared), Workdir(tmp_path / 'workdir'))
    data.train[0]  # pylint: disable=pointless-statement
  assert_user_error(error.value, re.escape(str(version)), 'delete')


# --- weights files, through the public loaders ---------------------------------------------


def test_weights_of_another_architecture_list_every_name(tmp_path):
  variables = _resnet18_variables()
  variables['params']['layer1_2'] = variables['params']['layer1_1']  # a ResNet-34's extra block
  variables['params']['fc']['kernel'] = np.zeros((2048, 1000), np.float32)  # a ResNet-50's head
  path = tmp_path / 'resnet34.msgpack'
  from flax import serialization  # pylint: disable=g-import-not-at-top
  path.write_bytes(serialization.msgpack_serialize(
      {'format': weights.WEIGHTS_FORMAT, 'arch': 'resnet34', 'meta': {}, **variables,
       'batch_stats': variables['batch_stats']}))
  path.with_name(path.name + '.sha256').write_text(f'{weights.sha256_of(path)}  {path.name}\n')
  with pytest.raises(Exception) as error:
    weights.load_weights_file(path)
  assert_user_error(error.value, 'resnet34.msgpack', 'not a torchvision ResNet-18')
  assert 'layer1_2' in str(error.value) and 'fc' in str(error.value)


class _RunsCode:
  def __reduce__(self):
    return (os.system, ('touch pwned',))


def test_pth_holding_a_pickle_with_code_is_refused(tmp_path, monkeypatch):
  torch = pytest.importorskip('torch')
  monkeypatch.chdir(tmp_path)
  path = tmp_path / 'resnet18.pth'
  torch.save({'conv1.weight': torch.zeros(64, 3, 7, 7), 'payload': _RunsCode()}, path)
  with pytest.raises(weights.UnsafeCheckpointError, match='refusing to load .*resnet18.pth'):
    weights.read_state_dict(path)
  assert not (tmp_path / 'pwned').exists()


def test_truncated_pth_is_named(tmp_path):
  torch = pytest.importorskip('torch')
  path = tmp_path / 'resnet18-f37072fd.pth'
  torch.save({'conv1.weight': torch.zeros(64, 3, 7, 7)}, path)
  path.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(Exception) as error:
    weights.read_state_dict(path)
  assert isinstance(error.value, (weights.WeightsFileError, weights.UnsafeCheckpointError,
                                  weights.WeightsMismatchError)), repr(error.value)
  assert 'resnet18-f37072fd.pth' in str(error.value)


# --- checkpoints under faults ----------------------------------------------------------------


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(trained, tmp_path, capsys):
  """ENOSPC after the state was written (mid-save): one error, step 5 intact, resume cleans up."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler  # pylint: disable=g-import-not-at-top
  config, workdir, _ = trained
  shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
  before = tree_digest(Workdir(tmp_path).checkpoints / '5')
  history = Workdir(tmp_path).history.read_text()
  config = config.copy_and_resolve_references()
  config.num_epochs = 2
  real_save = json_checkpoint_handler.JsonCheckpointHandler.async_save
  calls = []

  async def disk_full_on_second_item(self, directory, *args, **kwargs):
    calls.append(directory)
    if len(calls) >= 2:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return await real_save(self, directory, *args, **kwargs)

  with unittest.mock.patch.object(json_checkpoint_handler.JsonCheckpointHandler, 'async_save',
                                  disk_full_on_second_item):
    with pytest.raises(checkpoints.CheckpointError) as error:
      train.train_and_evaluate(config, tmp_path, allow_config_change=('num_epochs',))
  assert_user_error(error.value, 'checkpoint of step 10', 'No space left on device',
                    r'previous checkpoint \(step 5\) is intact', 'rerun the same command')
  directory = Workdir(tmp_path).checkpoints
  assert list(directory.glob('10' + checkpoints.TMP_MARKER + '*'))  # the half-written save
  assert tree_digest(directory / '5') == before
  # The epochs as before the failed save; the allowed change is recorded from step 5 on.
  after = json.loads(Workdir(tmp_path).history.read_text())
  assert after['epochs'] == json.loads(history)['epochs']
  assert after['config_changes'] == [{'key': 'num_epochs', 'from': 1, 'to': 2, 'step': 5}]
  assert checkpoints.restore_for_evaluation(Workdir(tmp_path).checkpoints).step == 5

  capsys.readouterr()
  train.train_and_evaluate(config, tmp_path, allow_config_change=('num_epochs',))  # disk freed
  out, err = capsys.readouterr()
  assert 'Removing 1 unfinished checkpoint write' in err and 'Resumed from step 5' in out
  assert not list(directory.glob('*' + checkpoints.TMP_MARKER + '*'))
  manager = checkpoints.create_manager(Workdir(tmp_path).checkpoints, read_only=True)
  assert manager.latest_step() == 10
