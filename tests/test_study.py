"""scripts/study.py: the plan (models x seeds -> workdirs and commands), which runs are finished
(fake workdirs), the loop with stand-in commands (a finished run skipped, an unfinished one
rerun, a failing one stopping the study with one line), and one study end to end on the tiny
config, in this process: 1 model x 2 seeds trained, compared, then skipped by a rerun that
touches no file of theirs; and a run that rf_jax refuses at start, named.
"""
import contextlib
import dataclasses
import importlib.util
import io
import json
import os
from pathlib import Path
import re
import shlex
import signal
import sys
import threading
import time

import pytest

from rf_jax.models import registry
from rf_jax.workdir import Workdir
from tiny_configs import cli_flags, tiny

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'scripts' / 'study.py'
_spec = importlib.util.spec_from_file_location('study', SCRIPT)
study = importlib.util.module_from_spec(_spec)
sys.modules['study'] = study  # its dataclasses look their module up
_spec.loader.exec_module(study)

OVERRIDES = ('--config.num_epochs=2', '--config.optim.lr=0.01')


# --- the plan ----------------------------------------------------------------------------


def test_plan_is_models_times_seeds():
  plan = study.plan('runs/s', 'demo', ['rgb', 'dual'], [1, 2, 3], OVERRIDES, python='py')
  assert [(r.model, r.seed, r.name) for r in plan.runs] == [
      ('rgb', 1, 'rgb_seed1'), ('rgb', 2, 'rgb_seed2'), ('rgb', 3, 'rgb_seed3'),
      ('dual', 1, 'dual_seed1'), ('dual', 2, 'dual_seed2'), ('dual', 3, 'dual_seed3')]
  assert plan.runs[4].workdir == Path('runs/s/dual_seed2')
  assert plan.runs[4].command == (
      'py', '-m', 'rf_jax.main', '--mode', 'all', '--config', 'demo',
      '--config.model.name=dual', '--config.seed=2', *OVERRIDES, '--workdir', 'runs/s/dual_seed2')
  assert plan.compare == (
      'py', '-m', 'rf_jax.main', '--mode', 'compare', '--compare',
      ','.join(f'runs/s/{m}_seed{s}' for m in ('rgb', 'dual') for s in (1, 2, 3)),
      '--workdir', 'runs/s/comparison')
  assert plan.logs == Path('runs/s/logs')


@pytest.mark.parametrize('models, seeds, overrides, message', [
    (['rgb', 'rgb'], [1], (), '--models: rgb given more than once'),
    (['rgb'], [1, 2, 1], (), '--seeds: 1 given more than once'),
    (['rgb', 'resnet50'], [1], (), "unknown 'resnet50'; the models are rgb, rgbir, dual"),
    ([], [1], (), 'at least one model'),
    (['rgb'], [], (), 'at least one'),
    (['rgb'], [1], ('--config.seed=4',), 'use --seeds'),
    (['rgb'], [1], ('--config.model.name=dual',), 'use --models'),
    (['rgb'], [1], ('--config.num_epochs', '3'), 'one --config.KEY=VALUE argument'),
    (['rgb'], [1], ('--epochs=3',), "unrecognized argument '--epochs=3'"),
])
def test_plan_refuses(models, seeds, overrides, message):
  with pytest.raises(study.StudyError, match=re.escape(message)):
    study.plan('runs/s', 'demo', models, seeds, overrides)


def test_models_are_the_registry_s():
  assert study.plan('r', 'demo', registry.MODEL_NAMES, [0]).runs[-1].model == 'dual'


def main(capsys, *args):
  """study.main(args) in this process: (exit status, stdout, stderr)."""
  try:
    study.main(list(args))
    code = 0
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


@pytest.mark.parametrize('args, message', [
    (('--root', 'r', '--config', 'demo', '--seeds', '1,x'),
     "argument --seeds: '1,x' is not a comma-separated list of ints"),
    (('--root', 'r', '--config', 'demo', '--seeds', '1,2', '--models', 'rgb,rgb'),
     '--models: rgb given more than once'),
    (('--config', 'demo', '--seeds', '1'), 'the following arguments are required: --root'),
    (('--root', 'r', '--config', 'demo', '--seeds', '1', '--config.num_epochs', '3'),
     '--config.num_epochs: give a config override as one --config.KEY=VALUE argument'),
])
def test_command_line_mistakes_are_one_error_line(capsys, args, message):
  code, out, err = main(capsys, *args)
  assert (code, out) == (1, '')
  assert err.startswith(f'error: {message}') and err.count('\n') == 1, err


def test_help_and_dry_run(capsys, tmp_path):
  code, out, _ = main(capsys, '--help')
  assert code == 0 and '--seeds' in out and '--dry-run' in out and '--config.KEY=VALUE' in out
  root = tmp_path / 'study'
  code, out, err = main(capsys, '--root', str(root), '--config', 'demo', '--models', 'rgb,dual',
                        '--seeds', '1,2', '--config.num_epochs=1', '--dry-run')
  assert code == 0, err
  commands = [shlex.split(line) for line in out.splitlines() if line.startswith('  ')]
  assert len(commands) == 5  # 4 runs and the comparison
  assert commands[1][1:] == ['-m', 'rf_jax.main', '--mode', 'all', '--config', 'demo',
                             '--config.model.name=rgb', '--config.seed=2',
                             '--config.num_epochs=1', '--workdir', str(root / 'rgb_seed2')]
  assert commands[4][3:6] == ['--mode', 'compare', '--compare']
  assert not root.exists()  # nothing run, nothing created


# --- which runs are finished (fake workdirs) ---------------------------------------------


def _fake_finished(run, *, test_chips: bool):
  """A workdir as `--mode all` leaves it, its config.json the one the run asks for."""
  config = study.requested_config(run)
  assert config is not None
  wd = Workdir(run.workdir)
  wd.eval_dir.mkdir(parents=True)
  wd.report_dir.mkdir()
  wd.config.write_text(json.dumps(config, indent=1))
  wd.history.write_text(json.dumps({'model': run.model, 'epochs': [
      {'epoch': e} for e in range(1, config['num_epochs'] + 1)]}))
  wd.metrics.write_text('{}')
  wd.report.write_text('# report')
  if test_chips:
    wd.submission.write_text('image_name,tags\n')
  return wd


def test_status_of_fake_workdirs(tmp_path):
  raw = tmp_path / 'raw'
  (raw / 'test-tif-v2').mkdir(parents=True)
  (raw / 'test-tif-v2' / 'test_0.tif').write_bytes(b'')
  overrides = (f'--config.data.raw_dir={raw}', '--config.num_epochs=2')
  runs = study.plan(tmp_path / 'study', 'rgb', ['rgb', 'dual'], [1, 2], overrides).runs
  assert [study.status(r) for r in runs] == ['new'] * 4
  wds = [_fake_finished(r, test_chips=True) for r in runs]
  assert [study.status(r) for r in runs] == ['finished'] * 4
  wds[0].metrics.unlink()  # killed while evaluating
  wds[1].submission.unlink()  # killed while predicting the test chips
  history = json.loads(wds[2].history.read_text())
  wds[2].history.write_text(json.dumps({**history, 'epochs': history['epochs'][:1]}))
  assert [study.status(r) for r in runs] == ['unfinished'] * 3 + ['finished']
  other = study.plan(tmp_path / 'study', 'rgb', ['dual'], [2],
                     overrides + ('--config.model.width=16',)).runs[0]
  assert study.status(other) == 'other config'
  wds[3].config.write_text('{"model": ')  # damaged: rf_jax names it when the run is rerun
  assert study.status(runs[3]) in ('other config', 'unfinished')


def test_no_submission_needed_without_test_chips(tmp_path):
  run = study.plan(tmp_path / 'study', 'rgb', ['rgb'], [1],
                   (f'--config.data.raw_dir={tmp_path}',)).runs[0]
  _fake_finished(run, test_chips=False)
  assert study.status(run) == 'finished'


def test_an_unparsable_config_is_left_to_rf_jax(tmp_path):
  run = study.plan(tmp_path / 'study', 'rgb', ['rgb'], [1], ('--config.optim.lrr=1',)).runs[0]
  assert study.requested_config(run) is None
  Workdir(run.workdir).root.mkdir(parents=True)
  Workdir(run.workdir).config.write_text('{}')
  assert study.status(run) == 'other config'  # rerun: rf_jax says what is wrong


# --- the loop, with stand-in commands ----------------------------------------------------


def _python(code: str) -> tuple:
  return (sys.executable, '-c', code)


def _with_commands(plan, *commands):
  return study.Plan(tuple(dataclasses.replace(r, command=c) for r, c in zip(plan.runs, commands)),
                    commands[len(plan.runs)], plan.logs)


def test_reruns_the_unfinished_and_skips_the_finished(tmp_path, capsys):
  plan = study.plan(tmp_path / 'study', 'rgb', ['rgb'], [1, 2],
                    (f'--config.data.raw_dir={tmp_path}',))
  _fake_finished(plan.runs[0], test_chips=False)
  metrics = _fake_finished(plan.runs[1], test_chips=False).metrics
  metrics.unlink()  # killed while evaluating: rf_jax, rerun, writes it (here a stand-in does)
  ran = tmp_path / 'first_ran'
  study.run_study(_with_commands(plan, _python(f'open({str(ran)!r}, "w")'),
                                 _python(f'print("evaluating"); open({str(metrics)!r}, "w")'),
                                 _python('print("compared")')))
  out = capsys.readouterr().out
  assert not ran.exists()
  assert 'study: 2 runs, 1 finished, 1 to run' in out
  assert 'study: run 1/2 rgb_seed1: finished with this config, skipped' in out
  assert 'study: run 2/2 rgb_seed2 (unfinished; elapsed 0:00:00, ETA after the first run)' in out
  assert '[rgb_seed2] evaluating' in out and '[comparison] compared' in out
  assert metrics.is_file()


RF_JAX_ERROR = 'import sys; print("working"); print({!r}, file=sys.stderr); sys.exit({})'


@pytest.mark.parametrize('stand_in, said', [
    (RF_JAX_ERROR.format('error: config.optim.lr=-1.0 must be > 0.', 3),
     'exited with code 3: config.optim.lr=-1.0 must be > 0. Log: '),
    # rf_jax's refusal of a workdir of other settings: its first line, the rest in the log
    (RF_JAX_ERROR.format('error: w holds a run with another config; its results would be '
                         "mixed with this one's:\n  config.model.width: the run has 8, this "
                         'config has 16', 1),
     "exited with code 1: w holds a run with another config; its results would be mixed with "
     "this one's (the rest is in the log). Log: "),
    ('print("SIGTERM received: saved step 3")',  # stopped cleanly from outside the study
     'exited with code 0 without finishing (its output says why; a run stopped by a signal '
     'keeps its last checkpoint). Log: '),
])
def test_a_failing_run_stops_the_study_with_one_line(tmp_path, capsys, stand_in, said):
  plan = study.plan(tmp_path / 'study', 'demo', ['rgb'], [1, 2])
  never = _python(f'open({str(tmp_path / "ran")!r}, "w")')
  with pytest.raises(SystemExit) as stopped:
    study.run_study(_with_commands(plan, _python(stand_in), never, never))
  assert stopped.value.code == 1
  out, err = capsys.readouterr()
  assert out.count('[rgb_seed1] ') >= 1 and '[rgb_seed2]' not in out
  log = plan.logs / 'rgb_seed1.log'
  assert err.count('error: ') == 1 and err.count('\n') == 1, err
  assert err.startswith(f'error: run rgb_seed1 (1/2, {plan.runs[0].workdir}) {said}{log}. '
                        'Then rerun the same study command'), err
  assert log.read_text().startswith(f'$ {sys.executable} -c ')
  assert not (tmp_path / 'ran').exists()


# --- end to end on the tiny config -------------------------------------------------------


def _mtimes(root: Path) -> dict:
  return {p: p.stat().st_mtime_ns for p in root.rglob('*') if p.is_file()}


def _study(*args) -> tuple[int, str, str]:
  """study.main(args) in this process (no capsys: module fixtures use it too)."""
  out, err = io.StringIO(), io.StringIO()
  code = 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      study.main(list(args))
    except SystemExit as e:
      code = e.code
  return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope='module')
def finished_study(tmp_path_factory, synthetic_kaggle_dir):
  """A study of rgb x seeds 1, 2 on the tiny config (1 epoch): its root, arguments, output."""
  tmp = tmp_path_factory.mktemp('study')
  config = tiny('rgb', synthetic_kaggle_dir, tmp / 'prepared')
  args = ('--root', str(tmp / 'study'), '--config', 'rgb', '--models', 'rgb', '--seeds', '1,2',
          *cli_flags(config)[2:])
  code, out, err = _study(*args)
  assert code == 0, out[-4000:] + err
  return tmp / 'study', args, out


def test_study_end_to_end_and_its_rerun(finished_study):
  root, args, out = finished_study
  assert 'study: run 1/2 rgb_seed1 (new; elapsed' in out
  assert 'ETA ' in out.split('study: run 2/2 rgb_seed2 (new; elapsed')[1].splitlines()[0]
  assert '[rgb_seed2] REPRODUCED exactly' in out
  for seed in (1, 2):
    wd = Workdir(root / f'rgb_seed{seed}')
    assert wd.metrics.is_file() and wd.submission.is_file()  # the tiny data has test chips
    assert json.loads(wd.config.read_text())['seed'] == seed
    assert 'REPRODUCED exactly' in (root / 'logs' / f'rgb_seed{seed}.log').read_text()
  comparison = (root / 'comparison' / 'comparison.md').read_text()
  assert 'rgb_seed1' in comparison and 'rgb_seed2' in comparison

  before = _mtimes(root / 'rgb_seed1') | _mtimes(root / 'rgb_seed2')
  began = time.monotonic()
  code, rerun, err = _study(*args)
  seconds = time.monotonic() - began
  assert code == 0, err
  assert 'study: 2 runs, 2 finished, 0 to run' in rerun
  assert rerun.count('finished with this config, skipped') == 2
  assert '[rgb_seed' not in rerun  # no run started
  assert '[comparison] ' in rerun
  assert _mtimes(root / 'rgb_seed1') | _mtimes(root / 'rgb_seed2') == before
  assert seconds < 40, seconds  # the comparison only: no training, no evaluation


def test_rf_jax_s_refusal_names_the_run(tmp_path):
  """A run that rf_jax refuses at start: the study's one line names it and its log."""
  code, out, err = _study('--root', str(tmp_path / 'study'), '--config', 'rgb', '--models',
                          'rgbir', '--seeds', '5', '--config.optim.lr=-1')
  log = tmp_path / 'study' / 'logs' / 'rgbir_seed5.log'
  assert code == 1, out + err
  assert err == (f'error: run rgbir_seed5 (1/1, {tmp_path / "study" / "rgbir_seed5"}) exited '
                 f'with code 1: config.optim.lr=-1.0 must be > 0. Log: {log}. Then rerun the '
                 'same study command: it continues from this run, the finished ones kept.\n')
  assert '[rgbir_seed5] error: config.optim.lr=-1.0 must be > 0.' in out


def test_ctrl_c_reaches_the_run_once_and_stops_the_study(tmp_path, capsys):
  """SIGINT to the study is passed on to the run (which saves and exits 0, as rf_jax does);
  the study then stops, naming the run, with 128 + SIGINT."""
  plan = study.plan(tmp_path / 'study', 'demo', ['rgb'], [1])
  ready = tmp_path / 'ready'
  stand_in = _python(
      'import signal, sys, time\n'
      'signal.signal(signal.SIGINT, lambda *_: (print("SIGINT received: saved"), sys.exit(0)))\n'
      f'open({str(ready)!r}, "w").close()\n'
      'time.sleep(60)')

  def interrupt():
    while not ready.exists():
      time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGINT)

  handler = signal.getsignal(signal.SIGINT)
  threading.Thread(target=interrupt, daemon=True).start()
  began = time.monotonic()
  with pytest.raises(SystemExit) as stopped:
    study.run_study(_with_commands(plan, stand_in, _python('')))
  assert time.monotonic() - began < 30
  assert stopped.value.code == 128 + signal.SIGINT
  out, err = capsys.readouterr()
  assert '[rgb_seed1] SIGINT received: saved' in out
  assert err.startswith('error: run rgb_seed1 (1/1, '), err
  assert 'stopped on SIGINT (exited with code 0)' in err
  assert signal.getsignal(signal.SIGINT) is handler  # the study's own is gone again
