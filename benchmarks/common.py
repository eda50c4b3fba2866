"""What every benchmark process shares: the settings, their presets, timing and memory probes."""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

from benchmarks import jax_patches

# The repository: this package and rf_jax beside it, what every child process imports from.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# models/registry.MODEL_NAMES, spelled here so that the PyTorch child never imports JAX (its
# memory is measured); tests/test_benchmark.py checks that the two agree.
VARIANTS = ('rgb', 'rgbir', 'dual')
TORCH_LAYOUTS = ('channels_last', 'contiguous')
FRAMEWORKS = ('jax', 'torch')
NUM_TAGS = 17
SEED = 0


@dataclasses.dataclass(frozen=True)
class Settings:
  """One benchmark invocation; the fields are scripts/benchmark.py's flags."""
  variant: tuple[str, ...]  # the variants measured
  batch: int  # train batch
  eval_batch: int
  size: int  # image side in px
  dtype: str  # compute dtype: float32 | bfloat16
  steps: int  # timed train steps per run
  eval_steps: int
  warmup: int  # untimed steps after the first call
  rounds: int  # A B A B rounds
  torch_layouts: tuple[str, ...]  # the first is the reference
  frameworks: tuple[str, ...]
  no_eval: bool
  jax_patch: tuple[str, ...]  # jax_patches.NAMES
  xla_flags: str  # appended to XLA_FLAGS for the rf_jax processes
  preload: str  # LD_PRELOAD for every child process ('' = none)
  pipeline_chips: int  # synthetic chips generated for the pipeline
  pipeline_seconds: float  # timed seconds per pipeline measurement; 0 skips it
  pipeline_zero_workers: bool  # also measure the pipeline reading in the calling thread
  workers: int  # the pipeline's reader threads
  quick: bool

  @classmethod
  def from_dict(cls, fields: dict) -> Settings:
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


# The fields no preset sets; workers is study_config()'s data.num_workers.
DEFAULTS = dict(variant=VARIANTS, dtype='float32', torch_layouts=('channels_last',),
                frameworks=FRAMEWORKS, no_eval=False, jax_patch=(), xla_flags='', preload='',
                pipeline_zero_workers=False)
# Fields a preset fills when the command line leaves them unset.
FULL = dict(batch=16, eval_batch=64, size=256, steps=4, eval_steps=2, warmup=1, rounds=2,
            pipeline_chips=300, pipeline_seconds=10.0)
QUICK = dict(batch=8, eval_batch=16, size=128, steps=2, eval_steps=2, warmup=1, rounds=1,
             pipeline_chips=48, pipeline_seconds=2.0)


def study_config():
  """rf_jax/configs/default.py: the optimiser and input pipeline both sides follow."""
  from rf_jax.configs import default  # pylint: disable=g-import-not-at-top
  return default.get_config()


def create_settings(quick: bool = False, **given) -> Settings:
  """Settings from the given fields, the rest from the full or `quick` preset, DEFAULTS and
  the study config's `data.num_workers`.

  A value of None counts as not given. Raises ValueError naming the flag for a bad value.
  """
  given = {k: v for k, v in given.items() if v is not None}
  settings = Settings.from_dict({**DEFAULTS, 'workers': study_config().data.num_workers,
                                 **(QUICK if quick else FULL), **given, 'quick': quick})
  for flag, values, valid in (('variant', settings.variant, VARIANTS),
                              ('torch-layouts', settings.torch_layouts, TORCH_LAYOUTS),
                              ('frameworks', settings.frameworks, FRAMEWORKS),
                              ('jax-patch', settings.jax_patch, jax_patches.NAMES + ('none',))):
    for value in values:
      if value not in valid:
        raise ValueError(f'--{flag}={value!r} is not one of {",".join(valid)}')
  if not settings.variant or not settings.torch_layouts:
    raise ValueError('--variant and --torch-layouts each need at least one value')
  for flag in ('batch', 'eval_batch', 'size', 'steps', 'eval_steps', 'rounds', 'pipeline_chips'):
    if getattr(settings, flag) < 1:
      raise ValueError(f'--{flag.replace("_", "-")}={getattr(settings, flag)}: must be >= 1')
  if settings.preload:
    # Ask the loader the children will use (loading it here would put the library in this
    # process too); it only warns about a preload it cannot open, and runs without it.
    probe = subprocess.run([sys.executable, '-c', ''], capture_output=True, text=True,
                           env={**os.environ, 'LD_PRELOAD': settings.preload}, check=False)
    if probe.returncode or 'cannot be preloaded' in probe.stderr:
      raise ValueError(f'--preload={settings.preload!r} cannot be loaded: '
                       f'{probe.stderr.strip() or f"exit {probe.returncode}"}')
  if settings.workers < 0:
    raise ValueError(f'--workers={settings.workers}: must be >= 0')
  return settings


def cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def maxrss_mb() -> float:
  """Peak resident memory of this process so far."""
  kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return kb / 1024 if sys.platform != 'darwin' else kb / 2**20


def random_batches(n: int, batch: int, size: int, channels: int, seed: int = 0) -> list[dict]:
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return [{'image': rng.standard_normal((batch, size, size, channels), np.float32),
           'labels': (rng.random((batch, NUM_TAGS)) < 0.3).astype(np.float32)}
          for _ in range(n)]


def timed(fn: Callable, batches: list, warmup: int, steps: int) -> dict:
  """Times `fn(batch)`, which must block until done; the first call (compile) alone."""
  start = time.perf_counter()
  fn(batches[0])
  first = time.perf_counter() - start
  rss_first = maxrss_mb()  # includes compilation for rf_jax
  for i in range(warmup):
    fn(batches[(i + 1) % len(batches)])
  times = []
  for i in range(steps):
    start = time.perf_counter()
    fn(batches[i % len(batches)])
    times.append(time.perf_counter() - start)
  return {'first_call_s': first, 'step_s': times, 'median_s': statistics.median(times),
          'rss_peak_after_first_call_mb': rss_first}


def child_main(run: Callable[..., dict]) -> Callable[[list[str]], None]:
  """The absl main of a child module: `argv[1:]` = job.json (written by the parent) and
  the path for the result; calls `run(settings, **job['args'])` and writes its JSON."""

  def main(argv: list[str]) -> None:
    _, job_path, result_path = argv
    job = json.loads(pathlib.Path(job_path).read_text())
    result = run(Settings.from_dict(job['settings']), **job['args'])
    pathlib.Path(result_path).write_text(json.dumps(result))

  return main
