"""What every benchmark process shares: the settings, their presets, timing and memory probes."""

from __future__ import annotations

import collections
from collections.abc import Callable
import dataclasses
import itertools
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
# registry.input_bands (indices into R, G, B, NIR), spelled here for the same reason.
BANDS = {'rgb': (0, 1, 2), 'rgbir': (0, 1, 2, 3), 'dual': (0, 1, 2, 3)}
TORCH_LAYOUTS = ('channels_last', 'contiguous')
FRAMEWORKS = ('jax', 'torch')
NUM_TAGS = 17
SEED = 0
# --dtype, --feed, --torch-compile: 'auto' is each child's own choice from its device (resolve).
DTYPES = ('auto', 'float32', 'bfloat16')
# ready: the model's float32 input at --size, uploaded synchronously inside each step (the CPU
# default). chips: the chips as stored (uint16, 4 bands, --size px) made into the model's input
# in the step, IN_FLIGHT batches placed on the device ahead of their step (the GPU default).
FEEDS = ('auto', 'ready', 'chips')
TORCH_COMPILE = ('auto', 'yes', 'no')  # auto: a torch.compile side on CUDA only
IN_FLIGHT = 2  # batches placed ahead of use by the chips feed (rf_jax/prefetch.py's)
# The study (configs/default.py, README's split): what the benchmark projects a run from.
STUDY_EPOCHS = 35
STUDY_TRAIN_CHIPS = 27_120
STUDY_VAL_CHIPS = 13_359
# Synthetic chips (the chips feed): uniform uint16 below CHIP_MAX, normalised with its moments.
CHIP_MAX = 2**14
CHIP_MEAN = CHIP_MAX / 2
CHIP_STD = CHIP_MAX / 12**0.5


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
  feed: str = 'auto'  # FEEDS
  torch_compile: str = 'auto'  # TORCH_COMPILE
  batch_sizes: tuple[int, ...] = ()  # train batches measured in turn; () = (batch,)

  @classmethod
  def from_dict(cls, fields: dict) -> Settings:
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


# The fields no preset sets; workers is study_config()'s data.num_workers.
DEFAULTS = dict(variant=VARIANTS, dtype='auto', torch_layouts=('channels_last',),
                frameworks=FRAMEWORKS, no_eval=False, jax_patch=(), xla_flags='', preload='',
                pipeline_zero_workers=False, feed='auto', torch_compile='auto', batch_sizes=())
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
  if given.get('batch_sizes'):
    if 'batch' in given:
      raise ValueError('give --batch or --batch-sizes, not both')
    try:
      sizes = [int(b) for b in given['batch_sizes']]
    except ValueError:
      raise ValueError(f'--batch-sizes={",".join(given["batch_sizes"])}: give integers, '
                       'e.g. 16,256') from None
    if min(sizes) < 1 or len(set(sizes)) < len(sizes):
      raise ValueError(f'--batch-sizes={",".join(map(str, sizes))}: each must be >= 1, '
                       'and given once')
    given['batch_sizes'], given['batch'] = tuple(sizes), sizes[0]
  settings = Settings.from_dict({**DEFAULTS, 'workers': study_config().data.num_workers,
                                 **(QUICK if quick else FULL), **given, 'quick': quick})
  for flag, values, valid in (('variant', settings.variant, VARIANTS),
                              ('torch-layouts', settings.torch_layouts, TORCH_LAYOUTS),
                              ('frameworks', settings.frameworks, FRAMEWORKS),
                              ('jax-patch', settings.jax_patch, jax_patches.NAMES + ('none',)),
                              ('dtype', (settings.dtype,), DTYPES),
                              ('feed', (settings.feed,), FEEDS),
                              ('torch-compile', (settings.torch_compile,), TORCH_COMPILE)):
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


def batch_sizes(settings: Settings) -> tuple[int, ...]:
  """The train batches measured, in turn: --batch-sizes, else --batch."""
  return settings.batch_sizes or (settings.batch,)


def resolve(settings: Settings, accelerator: bool) -> tuple[str, str]:
  """(feed, dtype) of a child on an accelerator (a GPU) or on the CPU: 'auto' is the chips feed
  in bfloat16 on an accelerator, the ready float32 input on the CPU."""
  feed = settings.feed if settings.feed != 'auto' else ('chips' if accelerator else 'ready')
  dtype = settings.dtype if settings.dtype != 'auto' else (
      'bfloat16' if accelerator else 'float32')
  return feed, dtype


def input_size(settings: Settings) -> int:
  """The model's input side under the chips feed: the study's ratio of its train input to its
  chips (224 / 256 px, configs/default.py), applied to --size (the chips' side)."""
  data = study_config().data
  return max(1, round(settings.size * data.crop_size / data.synthetic.chip_size))


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


def random_chips(n: int, batch: int, size: int, seed: int = 0) -> list[dict]:
  """`n` batches of chips as stored: uint16 [batch, size, size, 4] (R, G, B, NIR, below
  CHIP_MAX) and float32 labels, 64-byte aligned as the loaders hand them over."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    chips = np.empty((batch, size, size, 4), np.uint16)
    if chips.ctypes.data % 64:  # numpy aligns to 16; XLA:CPU adopts 64-byte aligned arrays
      raw = np.empty(chips.nbytes + 64, np.uint8)
      offset = -raw.ctypes.data % 64
      chips = raw[offset:offset + chips.nbytes].view(np.uint16).reshape(chips.shape)
    chips[...] = rng.integers(0, CHIP_MAX, chips.shape, np.uint16)
    out.append({'image': chips,
                'labels': (rng.random((batch, NUM_TAGS)) < 0.3).astype(np.float32)})
  return out


def timed_fed(dispatch: Callable, wait: Callable, put: Callable, batches: list, warmup: int,
              steps: int, synchronous: bool = False) -> dict:
  """Times steps fed as training feeds them: IN_FLIGHT batches placed on the device ahead.

  `put(host_batch)` starts a batch's copy (its host side only is timed: the host input),
  `dispatch(placed)` starts a step and returns a handle, `wait(handle)` blocks until that step
  is done. Each iteration dispatches step i, places the next batch while the device computes,
  then waits for step i-1: the device always has a step queued, and a step's time is the
  interval between consecutive completions. `synchronous`: `dispatch` returns with its step
  done (PyTorch on the CPU), which completes there. The first call (compile) is timed alone.
  """
  source = itertools.cycle(batches)
  start = time.perf_counter()
  ahead = collections.deque(put(next(source)) for _ in range(IN_FLIGHT))
  handle = dispatch(ahead.popleft())
  ahead.append(put(next(source)))
  wait(handle)
  first = time.perf_counter() - start
  rss_first = maxrss_mb()
  host, completed = [], [time.perf_counter()]
  for i in range(warmup + steps):
    handle = dispatch(ahead.popleft())
    if synchronous:
      completed.append(time.perf_counter())
    start = time.perf_counter()
    ahead.append(put(next(source)))
    host.append(time.perf_counter() - start)
    if i:  # step i-1
      wait(pending)
      if not synchronous:
        completed.append(time.perf_counter())
    pending = handle
  wait(pending)
  if not synchronous:
    completed.append(time.perf_counter())
  times = [b - a for a, b in zip(completed, completed[1:])][warmup:]
  host = host[warmup:]
  return {'first_call_s': first, 'step_s': times, 'median_s': statistics.median(times),
          'host_input_s': host, 'host_input_share': sum(host) / sum(times),
          'in_flight': IN_FLIGHT, 'rss_peak_after_first_call_mb': rss_first}


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
