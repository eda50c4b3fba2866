"""`--scale N`: every phase of the study on N synthetic 256 px training chips, measured.

Each phase runs in its own process, rf_jax's real code paths (the CLI where a user would use
it), and is measured from outside: wall seconds, the process's peak resident memory (wait4),
chips handled. The phases:

  generate       N training chips (the real tag combinations) and the test chips
  prepare        the TFDS preparation of both (every chip checked, band statistics)
  loader_<cache> one training-input epoch through the loader, no model, per data.cache
                 ('device' on a CPU backend holds the split twice: refused when it does not fit)
  train          `--mode train`, stopped by SIGTERM after its first periodic checkpoint
  resume         the same command: resumes from the saved step, stopped the same way
  evaluate       `--mode evaluate` of the saved step on every validation chip (with the report)
  report         the report alone, from the saved predictions
  predict        `--mode predict`: every test chip scored, submission.csv written

The data is written under --scale-dir and deleted at the end unless --scale-keep.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from rf_jax.data import synthetic

REAL_TRAIN_CHIPS = synthetic.REAL_NUM_CHIPS  # 40,479
REAL_TEST_CHIPS = sum(count for _, count in synthetic.REAL_TEST_PREFIXES)  # 61,191
CHIP_SIZE = 256
LOADER_CACHES = ('none', 'host', 'device')
RESULT = 'SCALE_RESULT '  # a child's last line: its figures as JSON
REPO = pathlib.Path(__file__).resolve().parents[1]


def default_test_chips(train_chips: int) -> int:
  """The real competition's test set in proportion to the training chips."""
  return round(train_chips * REAL_TEST_CHIPS / REAL_TRAIN_CHIPS)


def run_settings(root: pathlib.Path, quick: bool) -> dict:
  """The config keys every run sets: the study's rgb config on the generated data, from
  random init (no ImageNet weights are assumed), its own compilation cache; --quick the tiny
  network at 96 px (the tests of the benchmark's logic)."""
  settings = {'data.raw_dir': str(root / 'raw'), 'data.prepared_dir': str(root / 'prepared'),
              'model.weights': '', 'compilation_cache': str(root / 'xla_cache')}
  if quick:
    settings.update({'model.width': 8, 'data.crop_size': 96, 'data.eval_size': 96,
                     'batch_size': 8, 'eval_batch_size': 32})
  return settings


def config_overrides(root: pathlib.Path, quick: bool) -> list[str]:
  """The rf-jax flags of every run (run_settings)."""
  return ['--config', 'rgb'] + [f'--config.{k}={v}' for k, v in run_settings(root, quick).items()]


def _config(root: pathlib.Path, quick: bool, **changes):
  """The runs' config (for the phases that call rf_jax's functions)."""
  from rf_jax.configs import rgb  # pylint: disable=g-import-not-at-top
  config = rgb.get_config()
  config.update_from_flattened_dict({**run_settings(root, quick), **changes})
  return config


# --- the phases' own processes ---------------------------------------------------------------


def _child_generate(root, train_chips, test_chips, **_):
  synthetic.write_dataset(root / 'raw', train_chips, CHIP_SIZE, seed=0, num_test=test_chips)
  return {'chips': train_chips + test_chips}


def _child_prepare(root, quick, **_):
  from rf_jax import inputs  # pylint: disable=g-import-not-at-top
  from rf_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  data = inputs.prepare(_config(root, quick), workdir_lib.Workdir(root / 'run'))
  test = len(data.test) if data.has_test else 0  # the test chips: prepared on first use
  return {'chips': len(data.train) + len(data.validation) + test,
          'train': len(data.train), 'validation': len(data.validation), 'test': test,
          'band_mean': [round(float(x), 2) for x in data.mean],
          'band_std': [round(float(x), 2) for x in data.std]}


def _child_loader(root, quick, cache, **_):
  from rf_jax import inputs  # pylint: disable=g-import-not-at-top
  from rf_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from rf_jax.data import prepared  # pylint: disable=g-import-not-at-top
  config = _config(root, quick, **{'data.cache': cache})
  data = inputs.prepare(config, workdir_lib.Workdir(root / 'run'))
  start = time.perf_counter()
  batches = inputs.train_loader(config, data)
  filled = time.perf_counter() - start
  steps = prepared.steps_per_epoch(data, config.batch_size)
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(steps):
    batch = next(batches)
  for value in batch.values():  # cache 'device': the gathered batch is computed there
    getattr(value, 'block_until_ready', lambda: None)()
  epoch, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  chips = steps * config.batch_size
  # host_ms_per_chip: the wall time per chip; cpu_ms_per_chip: the CPU time of all the
  # process's threads per chip (what a GPU's feeding costs in host cores).
  # 6 decimals: a held split's epoch takes milliseconds
  return {'chips': chips, 'chips_per_s': round(chips / epoch, 1), 'fill_seconds': round(filled, 2),
          'epoch_seconds': round(epoch, 6), 'host_ms_per_chip': round(1000 * epoch / chips, 6),
          'cpu_ms_per_chip': round(1000 * cpu / chips, 6)}


def _child_report(root, quick, **_):
  from rf_jax import evaluate  # pylint: disable=g-import-not-at-top
  from rf_jax import inputs  # pylint: disable=g-import-not-at-top
  from rf_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  wd = workdir_lib.Workdir(root / 'run')
  config = _config(root, quick)
  data = inputs.prepare(config, wd)
  current = dict(workdir_lib.read_npz(wd.predictions))
  summary = workdir_lib.read_json(wd.metrics)
  evaluate.write_report(config, wd, data, current, summary, summary['loss'])
  return {'chips': len(current['names'])}


CHILDREN = {'generate': _child_generate, 'prepare': _child_prepare, 'loader': _child_loader,
            'report': _child_report}


def child_main(argv: list[str]) -> None:
  """`python -m benchmarks.scale PHASE JSON`: one phase in this process; prints its result."""
  phase, args = argv[1], json.loads(argv[2])
  args['root'] = pathlib.Path(args['root'])
  if phase != 'generate':
    from rf_jax import xla_cpu  # pylint: disable=g-import-not-at-top
    xla_cpu.set_default_flags()
  result = CHILDREN[phase](**args)
  print(RESULT + json.dumps(result), flush=True)


# --- measuring them --------------------------------------------------------------------------


def measure(cmd: list[str], log: pathlib.Path, stop_when=None) -> dict:
  """Runs `cmd` (output into `log`); SIGTERM once `stop_when()` is true. Its wall seconds,
  exit code, CPU seconds and peak RSS (wait4: this child and its waited-for descendants)."""
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]),
         'PYTHONUNBUFFERED': '1'}
  start = time.perf_counter()
  with open(log, 'w', encoding='utf-8') as out:
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)  # pylint: disable=consider-using-with
    while True:
      pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      if pid:
        break
      if stop_when is not None and stop_when():
        proc.send_signal(signal.SIGTERM)
        stop_when = None
      time.sleep(0.2)
  proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4
  # CPU seconds (user + system, its waited-for descendants included) next to the wall
  # seconds: on a shared machine the wall time grows with the others' load, these much less.
  return {'seconds': round(time.perf_counter() - start, 2), 'exit': proc.returncode,
          'cpu_seconds': round(usage.ru_utime + usage.ru_stime, 2),
          'peak_rss_mb': round(usage.ru_maxrss / 1024, 1)}


class PhaseError(RuntimeError):
  """A phase exited with an error (its log is named)."""


def _result(log: pathlib.Path, measured: dict, expect_exit: int = 0) -> dict:
  text = log.read_text(encoding='utf-8', errors='replace')
  if measured['exit'] != expect_exit:
    raise PhaseError(f'exit {measured["exit"]} (see {log}):\n' + text[-3000:])
  found = [line for line in text.splitlines() if line.startswith(RESULT)]
  result = {**measured, **(json.loads(found[-1][len(RESULT):]) if found else {})}
  if result.get('chips') and 'chips_per_s' not in result:
    result['chips_per_s'] = round(result['chips'] / result['seconds'], 1)
  return result


def _latest_checkpoint(root: pathlib.Path) -> int:
  steps = [int(p.name) for p in (root / 'run' / 'checkpoints').glob('[0-9]*') if p.is_dir()
           and not p.name.endswith('.orbax-checkpoint-tmp')]
  return max(steps, default=0)


def _stopped_step(log: pathlib.Path) -> int:
  found = re.search(r'SIGTERM received: saved step (\d+)', log.read_text(encoding='utf-8'))
  if not found:
    raise PhaseError(f'no "SIGTERM received: saved step" in {log}')
  return int(found.group(1))


def _step_seconds(log: pathlib.Path) -> float | None:
  """The training steps' seconds at the end of a run: the progress bar's last rate (tqdm's
  moving average, so compilation and start-up are not in it)."""
  rates = re.findall(r'(\d+(?:\.\d+)?)(s/step|step/s)', log.read_text(encoding='utf-8'))
  if not rates:
    return None
  value, unit = rates[-1]
  return round(float(value) if unit == 's/step' else 1 / float(value), 3)


def _du_gb(path: pathlib.Path) -> float:
  return round(sum(p.stat().st_size for p in path.rglob('*') if p.is_file()) / 1e9, 3)


def run(train_chips: int, test_chips: int, root: pathlib.Path, quick: bool,
        steps: int, keep: bool, caches=LOADER_CACHES) -> dict:
  """Every phase on `train_chips` + `test_chips` generated chips under `root`; the report's
  `scale` entry. `steps`: train steps before the SIGTERM (the checkpoint period)."""
  root.mkdir(parents=True, exist_ok=True)
  logs = root.parent / f'{root.name}_logs'
  logs.mkdir(exist_ok=True)
  python = sys.executable
  args = {'root': str(root), 'quick': quick, 'train_chips': train_chips,
          'test_chips': test_chips}
  phases = {}

  def child(phase: str, name: str | None = None, **extra) -> None:
    name = name or phase
    log = logs / f'{name}.log'
    cmd = [python, '-m', 'benchmarks.scale', phase, json.dumps({**args, **extra})]
    print(f'[scale] {name} ...', flush=True)
    phases[name] = _result(log, measure(cmd, log))
    print(f'[scale] {name}: {json.dumps(phases[name])}', flush=True)

  def rf_jax(name: str, mode: str, *flags: str, stop_when=None) -> pathlib.Path:
    log = logs / f'{name}.log'
    cmd = [python, '-m', 'rf_jax.main', '--mode', mode, '--workdir', str(root / 'run'),
           *config_overrides(root, quick), *flags]
    print(f'[scale] {name} ...', flush=True)
    phases[name] = _result(log, measure(cmd, log, stop_when))
    print(f'[scale] {name}: {json.dumps(phases[name])}', flush=True)
    return log

  try:
    child('generate')
    phases['generate']['disk_gb'] = _du_gb(root / 'raw')
    child('prepare')
    prepared = phases['prepare']
    for cache in caches:
      try:
        child('loader', f'loader_{cache}', cache=cache)
      except PhaseError as e:  # a cache that does not fit is refused: record the refusal
        refusal = re.search(r"error: (config.data.cache=.*)", str(e))
        if not refusal:
          raise
        phases[f'loader_{cache}'] = {'refused': refusal.group(1)}
        print(f'[scale] loader_{cache}: refused: {refusal.group(1)}', flush=True)
    period = [f'--config.checkpoint_every_steps={steps}', f'--config.num_epochs=1']
    log = rf_jax('train', 'train', *period, stop_when=lambda: _latest_checkpoint(root) >= steps)
    saved = _stopped_step(log)
    log = rf_jax('resume', 'train', *period,
                 stop_when=lambda: _latest_checkpoint(root) > saved)
    if f'Resumed from step {saved}' not in log.read_text(encoding='utf-8'):
      raise PhaseError(f'{log}: did not resume from step {saved}')
    resumed = _stopped_step(log)
    batch = 8 if quick else 16
    phases['train'].update(chips=saved * batch, steps=saved)
    phases['resume'].update(chips=(resumed - saved) * batch, steps=resumed - saved,
                            resumed_from=saved)
    for name in ('train', 'resume'):
      phases[name]['chips_per_s'] = round(phases[name]['chips'] / phases[name]['seconds'], 2)
      phases[name]['step_seconds'] = _step_seconds(logs / f'{name}.log')
    at_step = f'--config.eval.step={resumed}'
    rf_jax('evaluate', 'evaluate', at_step)
    phases['evaluate'].update(chips=prepared['validation'], chips_per_s=round(
        prepared['validation'] / phases['evaluate']['seconds'], 1))
    child('report')
    if test_chips:
      rf_jax('predict', 'predict', at_step)
      phases['predict'].update(chips=prepared['test'], chips_per_s=round(
          prepared['test'] / phases['predict']['seconds'], 1))
    disk = {'raw': _du_gb(root / 'raw'), 'prepared': _du_gb(root / 'prepared'),
            'run': _du_gb(root / 'run')}
    disk['total'] = round(sum(disk.values()), 3)
  finally:
    if not keep:
      shutil.rmtree(root, ignore_errors=True)
  return {'train_chips': train_chips, 'test_chips': test_chips, 'chip_size': CHIP_SIZE,
          'quick': quick, 'steps': steps, 'phases': phases, 'disk_gb': disk,
          'logs': str(logs)}


def table(scale: dict) -> str:
  """The phase table (markdown)."""
  rows = ['| phase | seconds | CPU s | chips | chips/s | peak RSS MB | note |',
          '|---|---:|---:|---:|---:|---:|---|']
  for name, p in scale['phases'].items():
    if 'refused' in p:
      rows.append(f'| {name} | | | | | | refused before any work: {p["refused"][:160]} |')
      continue
    note = []
    if 'fill_seconds' in p:
      note.append(f'fill {p["fill_seconds"]} s, epoch {p["epoch_seconds"]:.3g} s, '
                  f'{p["host_ms_per_chip"]:.3g} ms/chip wall, {p["cpu_ms_per_chip"]:.3g} CPU')
    if 'steps' in p:
      note.append(f'{p["steps"]} steps, {p["step_seconds"]} s/step at the end')
    if 'resumed_from' in p:
      note.append(f'resumed from step {p["resumed_from"]}')
    if 'disk_gb' in p:
      note.append(f'{p["disk_gb"]} GB')
    rows.append(f'| {name} | {p["seconds"]} | {p.get("cpu_seconds", "")} | {p.get("chips", "")} '
                f'| {p.get("chips_per_s", "")} | {p["peak_rss_mb"]} | {"; ".join(note)} |')
  d = scale['disk_gb']
  rows.append(f'\nDisk: raw {d["raw"]} GB, prepared {d["prepared"]} GB, run {d["run"]} GB '
              f'(total {d["total"]} GB).')
  return '\n'.join(rows)


if __name__ == '__main__':
  child_main(sys.argv)
