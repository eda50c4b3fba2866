"""scripts/device_check.sh's checks and summary (standard library only: it runs before and
whatever the wheels install).

  python scripts/device_check_summary.py OUT_DIR
      checks what device_check.sh wrote into OUT_DIR and writes OUT_DIR/summary.json and
      OUT_DIR/summary.md; exit status 1 when a step failed or a check did not pass
  python scripts/device_check_summary.py --missing-wheels WHEELS_DIR
      the wheels of WHEELS_DIR whose distribution this Python lacks, one path a line
      (protobuf is left out: device_check.sh installs it only where the imports need it)

The checks: every step exited 0 (the optional `pip install -e .` aside); JAX's backend is the
expected one; every training run has the epochs it was asked for, with finite losses (and, in
mode all, its own REPRODUCED line); every `--mode evaluate` in a new process says REPRODUCED;
the SIGTERM-stopped run saved a step and its rerun resumed from that step and finished; the
benchmark wrote its report.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import pathlib
import re
import sys

FALLBACK_ONLY = ('protobuf',)
REPRODUCED = re.compile(r'^(NOT REPRODUCED|REPRODUCED)\b.*$', re.M)
STOPPED = re.compile(r'SIGTERM received: saved step (\d+)')
RESUMED = re.compile(r'Resumed from step (\d+)')
COMPILED = re.compile(r'compiled (\d+) programs? in ([\d.]+) s')


def missing_wheels(directory: pathlib.Path) -> list[str]:
  missing = []
  for wheel in sorted(directory.glob('*.whl')):
    name = wheel.name.split('-')[0]
    if name.lower() in FALLBACK_ONLY:
      continue
    try:
      importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      missing.append(str(wheel))
  return missing


def _read(path: pathlib.Path) -> str:
  try:
    return path.read_text(errors='replace')
  except OSError:
    return ''


def _json(path: pathlib.Path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _settings(out: pathlib.Path) -> dict[str, str]:
  settings = {}
  for line in _read(out / 'settings.env').splitlines():
    key, _, value = line.partition('=')
    settings[key] = value
  return settings


def _steps(out: pathlib.Path) -> list[dict]:
  steps = []
  for line in _read(out / 'steps.tsv').splitlines():
    fields = line.split('\t')
    if len(fields) == 5:
      name, kind, rc, seconds, workdir = fields
      steps.append({'name': name, 'kind': kind, 'exit': rc, 'seconds': float(seconds or 0),
                    'workdir': workdir})
  return steps


def _last_line(pattern: re.Pattern, text: str) -> str | None:
  lines = [m.group(0).strip() for m in pattern.finditer(text)]
  return lines[-1] if lines else None


def _train_run(out: pathlib.Path, step: dict, want_epochs: int, mode: str,
               failures: list[str]) -> dict:
  name = step['name'].removeprefix('train_')
  model, dtype, cache = (name.split('_') + ['', '', ''])[:3]
  log = _read(out / 'logs' / f'{step["name"]}.log')
  history = _json(out / 'runs' / name / 'history.json')
  run = {'name': name, 'model': model, 'dtype': dtype, 'cache': cache, 'exit': step['exit'],
         'wall_s': step['seconds']}
  compiled = COMPILED.findall(log)
  if compiled:
    run['compiled_programs'] = sum(int(n) for n, _ in compiled)
    run['compile_s'] = round(sum(float(s) for _, s in compiled), 1)
  epochs = (history or {}).get('epochs') or []
  run['epochs'] = len(epochs)
  if epochs:
    last = epochs[-1]
    run['first_epoch_s'] = epochs[0].get('epoch_seconds')  # compilation included
    run['last_epoch_s'] = last.get('epoch_seconds')
    run['last_epoch_img_per_s'] = last.get('train_images_per_s')
    run['val_map'] = last.get('val_map')
    run['train_loss'] = last.get('train_loss')
    losses = [e.get('train_loss') for e in epochs] + [e.get('val_loss') for e in epochs]
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses):
      failures.append(f'train_{name}: a non-finite loss in history.json')
  if step['exit'] == '0' and len(epochs) != want_epochs:
    failures.append(f'train_{name}: history.json has {len(epochs)} epochs, not {want_epochs}')
  if mode == 'all':
    line = _last_line(REPRODUCED, log)
    run['reproduced_in_process'] = line
    if step['exit'] == '0' and not (line and line.startswith('REPRODUCED')):
      failures.append(f'train_{name}: no REPRODUCED line from its own evaluation')
  return run


def _evaluate(out: pathlib.Path, step: dict, failures: list[str]) -> dict:
  log = _read(out / 'logs' / f'{step["name"]}.log')
  line = _last_line(REPRODUCED, log)
  if not line or not line.startswith('REPRODUCED') or 'NOT REPRODUCED' in log:
    failures.append(f'{step["name"]}: no REPRODUCED line in a new process '
                    f'({line or "nothing"})')
  return {'name': step['name'].removeprefix('evaluate_'), 'exit': step['exit'],
          'wall_s': step['seconds'], 'line': line}


def _resume(out: pathlib.Path, steps: dict, want_epochs: int, failures: list[str]) -> dict:
  stopped_log = _read(out / 'logs' / 'resume_sigterm.log')
  rerun_log = _read(out / 'logs' / 'resume_rerun.log')
  saved = STOPPED.findall(stopped_log)
  resumed = RESUMED.findall(rerun_log)
  history = _json(out / 'runs' / 'resume' / 'history.json') or {}
  epochs = history.get('epochs') or []
  result = {'saved_step': int(saved[-1]) if saved else None,
            'resumed_step': int(resumed[-1]) if resumed else None,
            'epochs': len(epochs),
            'stop_s': steps.get('resume_sigterm', {}).get('seconds'),
            'rerun_s': steps.get('resume_rerun', {}).get('seconds')}
  if result['saved_step'] is None:
    failures.append('resume: the SIGTERM-stopped run did not say it saved a step '
                    '(logs/resume_sigterm.log)')
  if result['resumed_step'] is None or result['resumed_step'] != result['saved_step']:
    failures.append(f'resume: the rerun resumed from step {result["resumed_step"]}, the '
                    f'stopped run saved step {result["saved_step"]}')
  if len(epochs) != want_epochs:
    failures.append(f'resume: history.json has {len(epochs)} epochs, not {want_epochs}')
  elif [e.get('epoch') for e in epochs] != list(range(1, want_epochs + 1)):
    failures.append('resume: the epochs in history.json are not 1..N once each')
  return result


def summarise(out: pathlib.Path) -> tuple[dict, list[str]]:
  settings = _settings(out)
  steps = _steps(out)
  by_name = {s['name']: s for s in steps}
  failures = []
  if not steps:
    failures.append('no steps recorded (steps.tsv is empty or missing)')
  for step in steps:
    if step['exit'] != '0' and step['kind'] != 'optional':
      failures.append(f'{step["name"]}: exit {step["exit"]} (logs/{step["name"]}.log)')
  mode = settings.get('MODE', 'all')
  summary = {'settings': settings, 'steps': steps}
  elapsed = _read(out / 'elapsed_s').strip()
  summary['wall_s'] = int(elapsed) if elapsed.isdigit() else None
  devices = _read(out / 'logs' / 'jax_devices.log')
  backend = re.search(r'^backend (\S+)', devices, re.M)
  summary['backend'] = backend.group(1) if backend else None
  summary['devices'] = (re.search(r'^devices (.*)$', devices, re.M) or [None, None])[1]
  expected = settings.get('EXPECT_BACKEND')
  if expected and summary['backend'] != expected:
    failures.append(f'backend {summary["backend"]}, expected {expected}')
  summary['versions'] = _read(out / 'logs' / 'version.log').strip()
  summary['nvidia_smi'] = _read(out / 'env' / 'nvidia-smi.txt').strip()
  summary['runs'] = [_train_run(out, s, int(settings.get('EPOCHS', 0) or 0), mode, failures)
                     for s in steps if s['kind'] == 'train']
  summary['evaluations'] = [_evaluate(out, s, failures) for s in steps
                            if s['kind'] == 'evaluate']
  if settings.get('EVALUATE') == '1' and len(summary['evaluations']) != len(summary['runs']):
    failures.append(f'{len(summary["evaluations"])} evaluations for {len(summary["runs"])} runs')
  if settings.get('RESUME') == '1':
    summary['resume'] = _resume(out, by_name, int(settings.get('RESUME_EPOCHS', 0) or 0),
                                failures)
  if settings.get('BENCH') == '1':
    report = _json(out / 'benchmark.json')
    if report is None:
      failures.append('bench: no benchmark.json')
    else:
      summary['benchmark'] = {'table': report.get('table'), 'wall_s': report.get('wall_s'),
                              'results': report.get('results')}
  summary['failures'] = failures
  summary['ok'] = not failures
  return summary, failures


def _fmt(x, spec='.1f') -> str:
  return '-' if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def _cell(text) -> str:
  """A markdown table cell (REPRODUCED lines hold |x| figures)."""
  return str(text).replace('|', '\\|')


def markdown(summary: dict) -> str:
  s = summary['settings']
  lines = [f'# Device check: {"PASSED" if summary["ok"] else "FAILED"}', '',
           f'backend {summary["backend"]}, devices {summary["devices"]}; '
           f'wall time {_fmt(summary["wall_s"], "d")} s (DEADLINE_S={s.get("DEADLINE_S")})', '',
           'Settings: ' + (f'RUNS={s["RUNS"]!r} ' if s.get('RUNS') else
                           f'MODELS={s.get("MODELS")!r} DTYPES={s.get("DTYPES")!r} '
                           f'CACHES={s.get("CACHES")!r} ')
           + f'MODE={s.get("MODE")} EPOCHS={s.get("EPOCHS")} '
           f'CHIPS={s.get("CHIPS")} CHIP_SIZE={s.get("CHIP_SIZE")} CROP={s.get("CROP")} '
           f'WIDTH={s.get("WIDTH")} BATCH={s.get("BATCH")} PARALLEL={s.get("PARALLEL")} '
           f'EXTRA_FLAGS={s.get("EXTRA_FLAGS")!r}', '']
  if summary['failures']:
    lines += ['## Failures', ''] + [f'- {f}' for f in summary['failures']] + ['']
  lines += ['## Training runs', '',
            'img/s of the last epoch (the first includes compilation)'
            + (f'; {s.get("PARALLEL")} runs shared the machine at a time, so these are not '
               'speeds: the benchmark\'s are.' if s.get('PARALLEL', '1') != '1' else '.'), '',
            '| run | exit | epochs | wall s | compile s | first epoch s | last epoch s | '
            'img/s | val mAP | REPRODUCED (new process) |', '|' + '---|' * 10]
  evaluations = {e['name']: e for e in summary['evaluations']}
  for run in summary['runs']:
    line = (evaluations.get(run['name']) or {}).get('line') or '-'
    lines.append(f'| {run["name"]} | {run["exit"]} | {run["epochs"]} | {_fmt(run["wall_s"], ".0f")}'
                 f' | {_fmt(run.get("compile_s"))} | {_fmt(run.get("first_epoch_s"))}'
                 f' | {_fmt(run.get("last_epoch_s"))} | {_fmt(run.get("last_epoch_img_per_s"))}'
                 f' | {_fmt(run.get("val_map"), ".4f")} | {_cell(line)} |')
  if 'resume' in summary:
    r = summary['resume']
    lines += ['', '## Resume after SIGTERM', '',
              f'saved step {r["saved_step"]}, rerun resumed from step {r["resumed_step"]}, '
              f'{r["epochs"]} epochs in history.json (stop {_fmt(r["stop_s"], ".0f")} s, '
              f'rerun {_fmt(r["rerun_s"], ".0f")} s)']
  if summary.get('benchmark'):
    lines += ['', '## scripts/benchmark.py', '', f'`{s.get("BENCH_FLAGS")}`, wall '
              f'{_fmt(summary["benchmark"].get("wall_s"), ".0f")} s', '',
              summary['benchmark'].get('table') or '(no table)']
  lines += ['', '## Steps', '', '| step | kind | exit | seconds |', '|---|---|---|---|']
  lines += [f'| {st["name"]} | {st["kind"]} | {st["exit"]} | {st["seconds"]:.0f} |'
            for st in summary['steps']]
  lines += ['', '## Versions', '', '```', summary['versions'] or '(none)', '```', '',
            '## nvidia-smi', '', '```', summary['nvidia_smi'] or '(none)', '```', '']
  return '\n'.join(lines)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('out', nargs='?', type=pathlib.Path, help="device_check.sh's OUT_DIR")
  parser.add_argument('--missing-wheels', type=pathlib.Path, metavar='WHEELS_DIR')
  args = parser.parse_args(argv)
  if args.missing_wheels:
    print('\n'.join(missing_wheels(args.missing_wheels)))
    return 0
  if args.out is None:
    parser.error('give OUT_DIR or --missing-wheels WHEELS_DIR')
  summary, failures = summarise(args.out)
  (args.out / 'summary.json').write_text(json.dumps(summary, indent=1))
  (args.out / 'summary.md').write_text(markdown(summary))
  print(markdown(summary))
  if failures:
    print(f'device check FAILED: {len(failures)} problem(s), first: {failures[0]}',
          file=sys.stderr)
    return 1
  print(f'device check passed: {args.out}/summary.md')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
