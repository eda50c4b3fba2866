"""The parent process: one child process per measurement, frameworks alternating A B A B.

Each run of a framework is a fresh `python -m benchmarks.<child>` so that neither side
inherits the other's imports, threads or heap, and the rounds alternate the sides so that a
change in the machine's load shows in the per-round figures instead of favouring one side.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

from benchmarks import common
from benchmarks import convs
from benchmarks import input_pipeline
from benchmarks import op_profile
from benchmarks import summary

PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'torchvision', 'numpy')


class ChildError(RuntimeError):
  """A measurement process failed; its output has been written to stderr."""


def _versions() -> dict:
  out = {'python': platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def _load() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def _child_env(settings: common.Settings, jax_side: bool) -> dict:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (str(common.REPO_ROOT), env.get('PYTHONPATH', '')) if p)
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if jax_side and settings.xla_flags:  # after rf_jax's own: a flag given here wins
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + settings.xla_flags).strip()
  if settings.preload:  # both sides: a process-wide allocator is not one framework's doing
    env['LD_PRELOAD'] = ' '.join(p for p in (settings.preload, env.get('LD_PRELOAD', '')) if p)
  return env


def spawn(module: str, settings: common.Settings, **args) -> dict:
  """Runs `benchmarks.<module>`'s `run(settings, **args)` in a fresh process.

  Returns its JSON result plus the process's wall time and the load average after it.
  """
  jax_side = module == 'jax_child' or args.get('framework') == 'jax'
  with tempfile.TemporaryDirectory() as tmp:
    job, out = pathlib.Path(tmp) / 'job.json', pathlib.Path(tmp) / 'result.json'
    job.write_text(json.dumps({'settings': dataclasses.asdict(settings), 'args': args}))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, '-m', f'benchmarks.{module}', str(job), str(out)],
        env=_child_env(settings, jax_side), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, check=False)
    if proc.returncode or not out.exists():
      sys.stderr.write(proc.stdout[-6000:])
      raise ChildError(f'the benchmark process {module} {args} failed (exit '
                       f'{proc.returncode}); the end of its output is above')
    result = json.loads(out.read_text())
  result['process_s'] = time.perf_counter() - start
  result['load_after'] = _load()
  return result


def _report(settings: common.Settings) -> dict:
  """The report's record of when, where and with what it was measured."""
  return {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'versions': _versions(),
      'machine': {'cores': common.cores(), 'platform': platform.platform(),
                  'processor': platform.processor() or platform.machine()},
      'load_before': _load(),
      'settings': dataclasses.asdict(settings),
  }


def _progress(round_: int, variant: str, side: str, result: dict,
              settings: common.Settings) -> str:
  if 'train' not in result:
    return (f'round {round_} {variant:5s} {side:20s} torch.compile failed: '
            f'{result.get("compile_error")}')
  train = result['train']
  line = (f'round {round_} {variant:5s} {side:20s} train '
          f'{settings.batch / train["median_s"]:7.1f} img/s '
          f'(first call {train["first_call_s"]:.1f} s)')
  if 'host_input_share' in train:
    line += f', host input {train["host_input_share"]:.1%} of the step'
  if 'eval' in result:
    line += f', eval {settings.eval_batch / result["eval"]["median_s"]:7.1f} img/s'
  return line + (f', peak RSS train {result["rss_peak_train_mb"]:.0f} MB, '
                 f'load {result["load_after"]}')


def run_rounds(settings: common.Settings) -> tuple[dict, list[str]]:
  """Every (variant, side) run, rounds outermost: r1 rgb rf_jax, r1 rgb torch, ..., r2 ...

  The torch.compile side (summary.COMPILED, the reference layout) runs after the eager ones
  with --torch-compile yes, or (auto) once the first PyTorch run found CUDA; after a failed
  compile it is not tried again. Returns the runs by (variant, side) and the order they ran in.
  """
  jobs = []
  if 'jax' in settings.frameworks:
    jobs.append(('rf_jax', 'jax_child', {}))
  compiled = (summary.COMPILED, 'torch_child',
              {'layout': settings.torch_layouts[0], 'compiled': True})
  if 'torch' in settings.frameworks:
    jobs += [(f'torch_{layout}', 'torch_child', {'layout': layout})
             for layout in settings.torch_layouts]
    if settings.torch_compile == 'yes':
      jobs.append(compiled)
  runs, order = {}, []
  for round_ in range(1, settings.rounds + 1):
    for variant in settings.variant:
      i = 0
      while i < len(jobs):  # jobs may grow (the compiled side) or shrink (its failure)
        side, module, args = jobs[i]
        i += 1
        result = spawn(module, settings, variant=variant, **args)
        runs.setdefault((variant, side), []).append(result)
        order.append(f'r{round_} {variant} {side}')
        print(_progress(round_, variant, side, result, settings), flush=True)
        if (module == 'torch_child' and settings.torch_compile == 'auto'
            and compiled not in jobs and not any(k[1] == summary.COMPILED for k in runs)
            and result['device'].startswith('cuda')):
          jobs.append(compiled)
        if side == summary.COMPILED and 'compile_error' in result:
          jobs.remove(compiled)
          i -= 1
  return runs, order


def _one_batch(settings: common.Settings) -> dict:
  """The A/B comparison at `settings.batch`: its runs, figures, tables and GPU targets."""
  runs, order = run_rounds(settings)
  results = summary.summarise(runs, settings)
  found = summary.targets(results, settings)
  return {'order': order, 'results': results, 'targets': found,
          'runs': {f'{variant}/{side}': r for (variant, side), r in runs.items()},
          'table': '\n\n'.join((summary.table(results, settings),
                                 summary.per_side_table(results, settings),
                                 summary.describe_targets(found)))}


def benchmark(settings: common.Settings) -> dict:
  """The A/B comparison at each train batch (--batch-sizes), then the input pipeline against
  the rf_jax train step's demand at the first."""
  report = _report(settings)
  started = time.perf_counter()
  sizes = common.batch_sizes(settings)
  by_batch = {}
  for batch in sizes:
    by_batch[str(batch)] = _one_batch(dataclasses.replace(settings, batch=batch))
  report.update({k: by_batch[str(settings.batch)][k]
                 for k in ('order', 'results', 'runs', 'targets', 'table')})
  if len(sizes) > 1:
    report['by_batch'] = by_batch
    report['table'] = '\n\n'.join(f'**Train batch {batch}**\n\n{by_batch[str(batch)]["table"]}'
                                   for batch in sizes)
  if settings.pipeline_seconds > 0:
    demand = [row['rf_jax']['train']['images_per_s'] / settings.batch
              for row in report['results'].values() if row.get('rf_jax', {}).get('train')]
    report['pipeline'] = pipe = spawn('input_pipeline', settings)
    if demand:
      pipe['demand_batches_per_s'] = max(demand)
      pipe['supply_over_demand'] = pipe['batches_per_s'] / max(demand)
    report['table'] += '\n\n' + input_pipeline.describe(pipe)
  report['load_after'] = _load()
  report['wall_s'] = time.perf_counter() - started
  return report


def pipeline_only(settings: common.Settings) -> dict:
  """The input pipeline's host cost alone (no model runs)."""
  report = _report(settings)
  started = time.perf_counter()
  report['pipeline'] = spawn('input_pipeline', settings)
  report['table'] = input_pipeline.describe(report['pipeline'])
  report['load_after'] = _load()
  report['wall_s'] = time.perf_counter() - started
  return report


def conv_profile(settings: common.Settings) -> dict:
  """Each ResNet-18 conv shape alone in rf_jax and in each PyTorch layout."""
  report = _report(settings)
  results = {'rf_jax': spawn('convs', settings, framework='jax', layout='NHWC')['convs']}
  for layout in settings.torch_layouts:
    results[f'torch_{layout}'] = spawn('convs', settings, framework='torch',
                                       layout=layout)['convs']
  report['convs'] = results
  report['table'], report['totals_s'] = convs.table(results, settings)
  return report


def profile(settings: common.Settings) -> dict:
  """Each variant's train step per op kind, rf_jax and each PyTorch layout (op_profile)."""
  report = _report(settings)
  started = time.perf_counter()
  results = {}
  for variant in settings.variant:
    sides = results[variant] = {}
    if 'jax' in settings.frameworks:
      sides['rf_jax'] = spawn('op_profile', settings, variant=variant, framework='jax')
    if 'torch' in settings.frameworks:
      for layout in settings.torch_layouts:
        sides[f'torch_{layout}'] = spawn('op_profile', settings, variant=variant,
                                         framework='torch', layout=layout)
  report['profile'] = results
  report['table'] = op_profile.table(results, settings)
  report['load_after'] = _load()
  report['wall_s'] = time.perf_counter() - started
  return report
