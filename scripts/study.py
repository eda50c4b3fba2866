r"""The whole study in one command: every model x seed trained, evaluated and compared.

  python scripts/study.py --root runs/study --config demo --models rgb,rgbir,dual --seeds 1,2,3
  python scripts/study.py --root runs/study --config dual --seeds 1,2,3 \
      --config.data.raw_dir=/data/planet          # --config.X=Y reaches every run unchanged
  python scripts/study.py ... --dry-run           # the commands, and which runs are done

Each run is `python -m rf_jax.main --mode all --config C --config.model.name=M --config.seed=S
[--config.X=Y ...] --workdir ROOT/M_seedS`, one after the other; then `--mode compare` of all
of them into ROOT/comparison. A run's output is shown with its name as prefix and kept in
ROOT/logs/M_seedS.log. Rerunning the same command skips the finished runs (evaluated, with
the submission where there are test chips, made with the same config) and resumes an
interrupted one from its latest checkpoint (rf_jax's own resume). A run that fails, or that
rf_jax refuses (an existing workdir made with other settings), stops the study with one
`error:` line naming it; the finished runs stay as they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

# rf_jax from this checkout, whatever the current directory; the runs get it on PYTHONPATH.
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from ml_collections import config_flags

from rf_jax import cli
from rf_jax import config_checks
from rf_jax import errors
from rf_jax import inputs
from rf_jax import workdir as workdir_lib
from rf_jax.data.tfds_planet import planet_amazon_test
from rf_jax.models import registry
# pylint: enable=g-import-not-at-top,wrong-import-position

OVERRIDE = re.compile(r'--config\.([A-Za-z_][\w.]*)=(.*)', re.DOTALL)
STUDY_KEYS = {'model.name': '--models', 'seed': '--seeds'}  # set per run by the study


class StudyError(ValueError):
  """The study's command line cannot make a plan (the message says what to fix)."""


@dataclasses.dataclass(frozen=True)
class Run:
  model: str
  seed: int
  workdir: pathlib.Path
  config_args: tuple[str, ...]  # --config C --config.model.name=M --config.seed=S overrides
  command: tuple[str, ...]

  @property
  def name(self) -> str:
    return self.workdir.name


@dataclasses.dataclass(frozen=True)
class Plan:
  runs: tuple[Run, ...]
  compare: tuple[str, ...]  # the comparison of every run's workdir
  logs: pathlib.Path  # one log file per run, <logs>/<run name>.log


def plan(root, config: str, models, seeds, overrides=(), python: str = sys.executable) -> Plan:
  """The runs of models x seeds (model-major) and the comparison; refuses unknown or repeated
  models, repeated seeds, and overrides that are not --config.KEY=VALUE or set what the study
  sets per run."""
  models, seeds = list(models), list(seeds)
  if not models or not seeds:
    raise StudyError('give at least one model (--models) and one seed (--seeds).')
  unknown = [m for m in models if m not in registry.MODEL_NAMES]
  if unknown:
    raise StudyError(f'--models: unknown {", ".join(map(repr, unknown))}; the models are '
                     f'{", ".join(registry.MODEL_NAMES)}.')
  for flag, values in (('--models', models), ('--seeds', seeds)):
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
      raise StudyError(f'{flag}: {", ".join(repeated)} given more than once.')
  for arg in overrides:
    match = OVERRIDE.fullmatch(arg)
    if not match and arg.startswith('--config.'):
      raise StudyError(f'{arg}: give a config override as one --config.KEY=VALUE argument '
                       '(e.g. --config.num_epochs=3), as every run receives it.')
    if not match:
      raise StudyError(f'unrecognized argument {arg!r}: the study takes its own options '
                       '(--help) and --config.KEY=VALUE overrides, which reach every run.')
    if match.group(1) in STUDY_KEYS:
      raise StudyError(f'{arg}: the study sets config.{match.group(1)} for each run; use '
                       f'{STUDY_KEYS[match.group(1)]}.')
  root = pathlib.Path(root)
  runs = []
  for model in models:
    for seed in seeds:
      workdir = root / f'{model}_seed{seed}'
      config_args = ('--config', config, f'--config.model.name={model}',
                     f'--config.seed={seed}', *overrides)
      runs.append(Run(model, seed, workdir, config_args, (
          python, '-m', 'rf_jax.main', '--mode', 'all', *config_args, '--workdir',
          str(workdir))))
  compare = (python, '-m', 'rf_jax.main', '--mode', 'compare',
             '--compare', ','.join(str(r.workdir) for r in runs),
             '--workdir', str(root / 'comparison'))
  return Plan(tuple(runs), compare, root / 'logs')


def requested_config(run: Run) -> dict | None:
  """The resolved config of `run.config_args`, as rf_jax saves it in config.json (parsed as
  rf_jax parses it); None where it does not parse (the run itself then says why)."""
  _, config, *overrides = run.config_args
  config = cli._builtin_config(config)  # pylint: disable=protected-access
  argv = ['study', '--config', config, *overrides]
  values = flags.FlagValues()  # ml_collections reads the overrides from its sys_argv
  config_flags.DEFINE_config_file('config', None, '', flag_values=values, lock_config=True,
                                  sys_argv=argv)
  try:
    values(argv)
    config = config_checks.with_expanded_paths(values.config)
    return config_checks.with_defaults(json.loads(config.to_json_best_effort()))
  except Exception:  # pylint: disable=broad-except
    return None


def _has_test_chips(config: dict, wd: workdir_lib.Workdir) -> bool:
  """Whether `--mode all` writes a submission: the raw directory inputs.prepare reads has test
  chips."""
  raw_dir, _ = inputs.data_dirs(config['data'], wd)
  return bool(raw_dir) and bool(planet_amazon_test.list_test_chips(raw_dir))


def status(run: Run) -> str:
  """'new', 'finished' (nothing to do: skipped), 'unfinished' (rerun: rf_jax resumes it) or
  'other config' (rerun: rf_jax refuses a change that matters, or evaluates again)."""
  wd = workdir_lib.Workdir(run.workdir)
  if not wd.config.is_file():
    return 'new'
  requested = requested_config(run)
  try:
    saved = config_checks.with_defaults(workdir_lib.read_json(wd.config))
    if requested is None or saved != requested:
      return 'other config'
    epochs = workdir_lib.read_json(wd.history)['epochs'] if wd.history.is_file() else []
    done = (wd.metrics.is_file() and wd.report.is_file()
            and bool(epochs) and epochs[-1]['epoch'] >= requested['num_epochs']
            and (wd.submission.is_file() or not _has_test_chips(requested, wd)))
  except (errors.UserError, OSError, KeyError, TypeError, AttributeError):
    return 'unfinished'  # a damaged file: rf_jax names it
  return 'finished' if done else 'unfinished'


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def _env() -> dict:
  env = dict(os.environ, PYTHONUNBUFFERED='1')  # the run's lines as they are printed
  env['PYTHONPATH'] = os.pathsep.join(p for p in (str(REPO), env.get('PYTHONPATH', '')) if p)
  return env


def execute(command, prefix: str, log_path: pathlib.Path) -> tuple[int, str | None, str | None]:
  """Runs `command`, its output shown line by line after `prefix` (progress bars redrawn in
  place on a terminal) and appended to `log_path`. Returns (exit status, rf_jax's last
  `error:` line or None, the signal the study passed on or None).

  The run has a session of its own: SIGINT/SIGTERM reach it once, from the study, so a Ctrl-C
  saves a checkpoint at the next step boundary (a second one stops it at once)."""
  log_path.parent.mkdir(parents=True, exist_ok=True)
  tty, error_line, mid_line, caught = sys.stdout.isatty(), None, False, []
  with open(log_path, 'a', encoding='utf-8') as log:
    log.write(f'$ {shlex.join(command)}\n')
    log.flush()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=_env(), start_new_session=True)
    output = io.TextIOWrapper(proc.stdout, encoding='utf-8', errors='replace', newline='')

    def forward(signum, frame):
      del frame
      caught.append(signal.Signals(signum).name)
      proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      for piece in output:  # newline='': each piece ends with its own '\n' or '\r'
        text = piece.rstrip('\r\n')
        if piece.endswith('\r') and not piece.endswith('\r\n'):  # a progress bar's update
          if tty and text:
            sys.stdout.write(f'\r{prefix}{text}\x1b[K')
            sys.stdout.flush()
            mid_line = True
          continue
        if text.startswith('error: '):
          error_line = text[len('error: '):]
        log.write(text + '\n')
        log.flush()
        sys.stdout.write(('\r' if mid_line else '') + f'{prefix}{text}\n')
        sys.stdout.flush()
        mid_line = False
      return proc.wait(), error_line, (caught[0] if caught else None)
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)


def _fail(message: str, status_code: int = 1):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(status_code)


def _run_failed(what: str, code: int, error_line: str | None, stopped_by: str | None,
                log: pathlib.Path) -> str:
  """The study's one line for a run that did not finish: which, how, where its log is, and
  rf_jax's own error line (its first line, where the message goes on in the log)."""
  how = f'was killed by {signal.Signals(-code).name}' if code < 0 else f'exited with code {code}'
  if stopped_by:
    how = f'stopped on {stopped_by} ({how})'
  elif not code:
    how += (' without finishing (its output says why; a run stopped by a signal keeps its last '
            'checkpoint)')
  said = '.'
  if error_line:
    said = (f': {error_line.rstrip(":")} (the rest is in the log).' if error_line.endswith(':')
            else f': {error_line}' + ('' if error_line.endswith('.') else '.'))
  return (f'{what} {how}{said} Log: {log}. Then rerun the same study command: it continues '
          'from this run, the finished ones kept.')


def run_study(study: Plan, dry_run: bool = False) -> None:
  states = [status(r) for r in study.runs]
  n, todo = len(study.runs), sum(s != 'finished' for s in states)
  print(f'study: {n} runs, {n - todo} finished, {todo} to run; logs in {study.logs}',
        flush=True)
  start, durations = time.monotonic(), []
  for i, (run, state) in enumerate(zip(study.runs, states), 1):
    head = f'study: run {i}/{n} {run.name}'
    if state == 'finished':
      print(f'{head}: finished with this config, skipped', flush=True)
      continue
    if dry_run:
      print(f'{head} ({state}):\n  {shlex.join(run.command)}', flush=True)
      continue
    left = todo - len(durations)
    eta = (f'ETA {_clock(sum(durations) / len(durations) * left)}, {left} of {todo} runs left'
           if durations else 'ETA after the first run')
    print(f'{head} ({state}; elapsed {_clock(time.monotonic() - start)}, {eta})', flush=True)
    began = time.monotonic()
    log = study.logs / f'{run.name}.log'
    code, error_line, stopped_by = execute(run.command, f'[{run.name}] ', log)
    if code or stopped_by or status(run) != 'finished':
      _fail(_run_failed(f'run {run.name} ({i}/{n}, {run.workdir})', code, error_line,
                        stopped_by, log), 128 + signal.Signals[stopped_by] if stopped_by else 1)
    durations.append(time.monotonic() - began)
  if dry_run:
    print(f'study: comparison:\n  {shlex.join(study.compare)}', flush=True)
    return
  print(f'study: comparison of {n} runs (elapsed {_clock(time.monotonic() - start)})',
        flush=True)
  log = study.logs / 'comparison.log'
  code, error_line, stopped_by = execute(study.compare, '[comparison] ', log)
  if code or stopped_by:
    _fail(_run_failed('the comparison', code, error_line, stopped_by, log))
  print(f'study: done in {_clock(time.monotonic() - start)}', flush=True)


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    _fail(f'{message} (python scripts/study.py --help)')


def _list(cast):
  def parse(value: str):
    try:
      return [cast(v) for v in value.split(',') if v]
    except ValueError:
      raise argparse.ArgumentTypeError(f'{value!r} is not a comma-separated list of '
                                       f'{cast.__name__}s') from None
  return parse


def main(argv=None) -> None:
  parser = _Parser(prog='python scripts/study.py', allow_abbrev=False, description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter,
                   epilog='Any --config.KEY=VALUE (configs/default.py) is passed to every run.')
  parser.add_argument('--root', required=True, help='folder of the runs, their logs and the '
                      'comparison')
  parser.add_argument('--config', required=True, help='rf_jax config: a built-in name '
                      f'({", ".join(cli.BUILTIN_CONFIGS)}) or a get_config() file')
  parser.add_argument('--models', type=_list(str), default=list(registry.MODEL_NAMES),
                      help=f'comma-separated, of {",".join(registry.MODEL_NAMES)} (default all)')
  parser.add_argument('--seeds', type=_list(int), required=True,
                      help='comma-separated config.seed values, e.g. 1,2,3')
  parser.add_argument('--dry-run', action='store_true',
                      help='print the commands of the runs left to do, and run nothing')
  args, overrides = parser.parse_known_args(argv)
  try:
    study = plan(os.path.expanduser(args.root), args.config, args.models, args.seeds, overrides)
  except StudyError as e:
    _fail(str(e))
  try:
    run_study(study, args.dry_run)
  except KeyboardInterrupt:  # between runs: the runs catch their own
    _fail('interrupted; rerun the same study command to continue.', 130)


if __name__ == '__main__':
  main()
