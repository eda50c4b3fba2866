"""The input pipeline's host cost, on prepared synthetic Planet chips.

The host only reads: batches are chips as stored (all four bands, full size, uint16), and the
jitted steps make the model's input on device (rf_jax/augment.py). Measured, with the study
config's cache 'none' (each batch read from the prepared records):

* train: `pipeline.train_loader` batches (`--batch`) per second with `--workers` reader threads
  and, with `--pipeline-zero-workers`, reading in the calling thread; and host CPU ms per chip
  summed over this process's threads (CPU time hardly moves when other jobs load the machine;
  wall time does)
* eval: `pipeline.eval_batches` (`--eval-batch`, one pass in order, repeated) in chips/s and
  host CPU ms per chip, with `--workers` threads
* `tifffile.imread` alone, ms per chip on one core: what reading the raw files would cost
* `copy_ms_per_chip`: one chip copied within RAM, the floor of a host path that moves it once
* `host_cost`: host CPU ms per training and per evaluation chip for each cache mode (none, host,
  device) and 'before' (the per-chip numpy path the steps replaced, tests/numpy_transforms.py),
  JSON `pipeline.<mode>.host_ms_per_train_chip` / `host_ms_per_eval_chip`
* `augmentation_step_cost` (full runs only): the rgb train step with the input made in it vs on
  a ready input

  python -m benchmarks.input_pipeline job.json result.json   (spawned by orchestrate)
"""

from __future__ import annotations

from collections.abc import Callable
import importlib.util
import pathlib
import shutil
import tempfile
import time

from absl import app

from benchmarks import common

BANDS = 4  # R, G, B, NIR: every chip is read whole, whichever bands the model takes


def _rate(next_batch: Callable[[], int], seconds: float, warmup: int = 3) -> dict:
  """Batches/s, chips/s and CPU ms per chip of `next_batch` (which returns the chips in the
  batch it made), after `warmup` batches (start-up, timed alone); >= 3 timed batches."""
  start = time.perf_counter()
  for _ in range(warmup):
    next_batch()
  startup = time.perf_counter() - start
  batches = chips = 0
  cpu, start = time.process_time(), time.perf_counter()
  while time.perf_counter() - start < seconds or batches < 3:
    chips += next_batch()
    batches += 1
  elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
  return {'batches': batches, 'chips': chips, 'batches_per_s': batches / elapsed,
          'chips_per_s': chips / elapsed, 'cpu_ms_per_chip': cpu / chips * 1e3,
          'startup_s': startup}


def _train(data, settings: common.Settings, threads: int) -> dict:
  from rf_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  batches = pipeline.train_loader(data, batch_size=settings.batch, seed=common.SEED,
                                  threads=threads)
  shape = (settings.batch, data.chip_size, data.chip_size, BANDS)

  def next_batch() -> int:
    image = next(batches)['image']
    assert image.shape == shape, (image.shape, shape)
    return settings.batch

  return {'threads': threads, **_rate(next_batch, settings.pipeline_seconds)}


def _eval(data, settings: common.Settings) -> dict:
  """Passes over the validation split, one after the other, for the timed seconds."""
  from rf_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  evaluation = pipeline.eval_batches(data, 'validation', batch_size=settings.eval_batch,
                                     threads=settings.workers)
  passes = iter(())

  def next_batch() -> int:
    nonlocal passes
    batch = next(passes, None)
    if batch is None:
      passes = iter(evaluation)
      batch = next(passes)
    return int(batch['mask'].sum())  # the last batch of a pass is padded

  return {'threads': settings.workers, **_rate(next_batch, settings.pipeline_seconds, warmup=1)}


def _imread_ms(paths: list[pathlib.Path], seconds: float) -> float:
  import tifffile  # pylint: disable=g-import-not-at-top
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds or count < len(paths):
    tifffile.imread(paths[count % len(paths)])
    count += 1
  return (time.perf_counter() - start) / count * 1e3


def _copy_ms(chip_size: int, seconds: float) -> float:
  """CPU ms to copy one uint16 chip within RAM, both buffers already mapped: the floor of any
  host path that moves each chip once (a gather; a GPU's staging copy)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rows = 64
  source = np.ones((4 * rows, chip_size, chip_size, BANDS), np.uint16)
  batch = np.zeros((rows,) + source.shape[1:], np.uint16)
  order = np.random.default_rng(common.SEED).permutation(len(source))
  copies, cpu, start = 0, time.process_time(), time.perf_counter()
  while time.perf_counter() - start < seconds or copies < len(source):
    batch[copies % rows] = source[order[copies % len(source)]]
    copies += 1
  return (time.process_time() - cpu) / copies * 1e3


def _prepare(root: pathlib.Path, settings: common.Settings):
  """Synthetic chips of the study config's size (256 px, as the real ones), split as the
  study splits."""
  from rf_jax.data import prepared  # pylint: disable=g-import-not-at-top
  from rf_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  data = common.study_config().data
  spec = synthetic.Spec(num_chips=settings.pipeline_chips, chip_size=data.synthetic.chip_size,
                        num_test=0, seed=common.SEED)
  return prepared.prepare(root / 'raw', root / 'prepared', layout='kaggle',
                          val_fraction=data.val_fraction, split_seed=data.split_seed,
                          synthetic=spec)


# --- host cost per cache mode, against the per-chip numpy path it replaced ----------------


def _study_preprocess(data, bands: tuple[int, ...] = (0, 1, 2, 3)):
  """The study config's input (its train transform, 224 px crop and eval size) of `bands`."""
  from rf_jax import augment  # pylint: disable=g-import-not-at-top
  config = common.study_config()
  return augment.create(data, bands=bands, normalisation_name='dataset',
                        train_transform=config.data.train_transform,
                        crop_size=config.data.crop_size, eval_size=config.data.eval_size,
                        seed=common.SEED)


def _numpy_transforms():
  """tests/numpy_transforms.py: the per-chip numpy path the steps replaced, kept as the tests'
  reference and loaded from there by path (tests/ is not a package), so that the path timed is
  the one the device input is tested against."""
  path = common.REPO_ROOT / 'tests' / 'numpy_transforms.py'
  spec = importlib.util.spec_from_file_location('numpy_transforms', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _before(data, settings: common.Settings, train: bool) -> Callable[[], int]:
  """The path the loaders ran before: each record read, made into the model's input by the
  per-chip numpy transforms (draws on the host), the float32 batch put on the device."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  numpy_transforms = _numpy_transforms()
  p, rng = _study_preprocess(data), np.random.default_rng(common.SEED)
  source = data.train if train else data.validation
  size = settings.batch if train else settings.eval_batch
  top = data.chip_size - p.crop_size + 1

  def one(chip):
    if train:
      return numpy_transforms.train_input(p, chip, rng.integers(0, top, 2), rng.random() < 0.5)
    return numpy_transforms.eval_input(p, chip)

  def next_batch() -> int:
    records = [source[int(i)] for i in rng.integers(0, len(source), size)]
    batch = {'image': np.stack([one(r['image']) for r in records]),
             'labels': np.stack([r['labels'] for r in records])}
    jax.block_until_ready(jax.device_put(batch))
    return size

  return next_batch


def _raw(data, settings: common.Settings, train: bool, cache: str) -> Callable[[], int]:
  """The loaders now: chips as stored (or indices into the split held on device) put on the
  device by the runner, as training and evaluation put them, what the step then makes the
  input from."""
  import jax  # pylint: disable=g-import-not-at-top
  from rf_jax import parallel  # pylint: disable=g-import-not-at-top
  from rf_jax import runner as runner_lib  # pylint: disable=g-import-not-at-top
  from rf_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  runner = runner_lib.create_runner('jit', tta='none')  # nothing compiled: only its put_batch
  args = dict(cache=cache, threads=0, to_device=parallel.replicate)
  if train:
    loader = pipeline.train_loader(data, batch_size=settings.batch, seed=common.SEED, **args)
  else:  # a split held by the cache is read once, as a run's validation is
    evaluation = pipeline.eval_batches(data, 'validation', batch_size=settings.eval_batch,
                                       **args)
  passes = iter(())

  def next_batch() -> int:
    nonlocal passes
    if train:
      batch, chips = next(loader), settings.batch
    else:
      batch = next(passes, None)
      if batch is None:
        passes = iter(evaluation)
        batch = next(passes)
      chips = int(batch['mask'].sum())
    jax.block_until_ready(runner.put_batch(batch))
    return chips

  return next_batch


def host_cost(data, settings: common.Settings) -> dict:
  """{'before' | cache mode: {'host_ms_per_train_chip', 'host_ms_per_eval_chip'}}: host CPU
  time per chip in this process, reading in the calling thread, the batch's transfer to the
  device included. 'before' is the per-chip numpy path (the study's 224 px input made on the
  host); the cache modes hand over chips as stored. A held split is read before its timing
  starts (that one-off read, 'fill_s', is not per chip)."""
  from rf_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  seconds = settings.pipeline_seconds / 2
  ms = lambda next_batch: _rate(next_batch, seconds, warmup=1)['cpu_ms_per_chip']
  out = {'before': {'host_ms_per_train_chip': ms(_before(data, settings, True)),
                    'host_ms_per_eval_chip': ms(_before(data, settings, False))}}
  for cache in pipeline.CACHES:
    start = time.perf_counter()
    train, evaluation = (_raw(data, settings, t, cache) for t in (True, False))
    evaluation()  # holds the validation split from here on
    fill = time.perf_counter() - start
    out[cache] = {'host_ms_per_train_chip': ms(train), 'host_ms_per_eval_chip': ms(evaluation),
                  'fill_s': fill}
  return out


def augmentation_step_cost(data, settings: common.Settings) -> dict:
  """The rgb train step (random init, float32, batch --batch) on chips as stored with the
  study's input made in the step, against the same step on a ready 224 px float32 input:
  ms per step, best of alternating rounds, and their ratio."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from rf_jax import runner as runner_lib  # pylint: disable=g-import-not-at-top
  from rf_jax import steps  # pylint: disable=g-import-not-at-top
  from rf_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from rf_jax.models import registry  # pylint: disable=g-import-not-at-top
  p = _study_preprocess(data, bands=(0, 1, 2))  # normalised with the rgb bands' statistics
  model = registry.create_model('rgb', num_classes=17)
  variables = steps.init_variables(model, jax.random.key(0), p.crop_size, 3)
  raw = next(pipeline.train_loader(data, batch_size=settings.batch, seed=common.SEED))
  ready = {'image': np.random.default_rng(0).normal(
      size=(settings.batch, p.crop_size, p.crop_size, 3)).astype(np.float32),
           'labels': raw['labels']}
  runs = {}
  for name, preprocess, batch in (('in_step', p, raw), ('ready_input', None, ready)):
    runner = runner_lib.create_runner('jit', tta='none', preprocess=preprocess)
    state = runner.put_state(steps.create_train_state(variables, model, optax.sgd(1e-3)))
    runs[name] = {'runner': runner, 'state': state, 'batch': runner.put_batch(batch), 's': []}
  for round_ in range(max(settings.rounds, 2) + 1):  # round 0 compiles
    for run_ in runs.values():
      start = time.perf_counter()
      for _ in range(settings.steps):
        run_['state'], metrics = run_['runner'].train_step(run_['state'], run_['batch'])
      jax.block_until_ready(metrics)
      if round_:
        run_['s'].append((time.perf_counter() - start) / settings.steps)
  ms = {name: min(run_['s']) * 1e3 for name, run_ in runs.items()}
  return {'train_step_ms': ms, 'in_step_over_ready': ms['in_step'] / ms['ready_input']}


def run(settings: common.Settings) -> dict:
  """Prepares the synthetic chips in a temporary directory, then measures."""
  root = pathlib.Path(tempfile.mkdtemp(prefix='rf_jax_bench_'))
  try:
    start = time.perf_counter()
    data = _prepare(root, settings)
    result = {'chips': len(data.train), 'chip_size': data.chip_size, 'batch': settings.batch,
              'eval_batch': settings.eval_batch, 'prepare_s': time.perf_counter() - start,
              'workers': settings.workers}
    tifs = sorted((root / 'raw').rglob('*.tif'))  # the train chips (no test chips made)
    result['imread_ms_per_chip'] = _imread_ms(tifs, settings.pipeline_seconds / 2)
    result['copy_ms_per_chip'] = _copy_ms(data.chip_size, settings.pipeline_seconds / 4)
    counts = {settings.workers} | ({0} if settings.pipeline_zero_workers else set())
    result['runs'] = {str(n): _train(data, settings, n) for n in sorted(counts)}
    result['eval'] = _eval(data, settings)
    configured = result['runs'][str(settings.workers)]
    result['batches_per_s'] = configured['batches_per_s']
    result['train_cpu_ms_per_chip'] = configured['cpu_ms_per_chip']
    result['eval_cpu_ms_per_chip'] = result['eval']['cpu_ms_per_chip']
    result.update(host_cost(data, settings))
    if not settings.quick:  # compiles a ResNet-18 train step twice
      result['augmentation'] = augmentation_step_cost(data, settings)
    result['rss_peak_mb'] = common.maxrss_mb()
    return result
  finally:
    shutil.rmtree(root, ignore_errors=True)


def describe(pipe: dict) -> str:
  """One paragraph of `run`'s result (and the demand, where the benchmark added it)."""
  text = (f'Input pipeline ({pipe["workers"]} reader threads, {pipe["chips"]} synthetic '
          f'{pipe["chip_size"]} px train chips read as stored, batch {pipe["batch"]}): '
          f'{pipe["batches_per_s"]:.1f} train batches/s, host CPU '
          f'{pipe["train_cpu_ms_per_chip"]:.2f} ms per training chip')
  if 'demand_batches_per_s' in pipe:
    text += (f'; the fastest rf_jax train step demands {pipe["demand_batches_per_s"]:.2f} '
             f'batches/s -> {pipe["supply_over_demand"]:.1f}x')
  for run_ in pipe['runs'].values():
    if run_['threads'] != pipe['workers']:
      text += (f'; {run_["threads"]} threads {run_["batches_per_s"]:.1f} batches/s, '
               f'{run_["cpu_ms_per_chip"]:.2f} ms per chip')
  text += (f'. Eval: {pipe["eval"]["chips_per_s"]:.0f} chips/s, host CPU '
           f'{pipe["eval_cpu_ms_per_chip"]:.2f} ms per evaluation chip. '
           f'tifffile.imread alone: {pipe["imread_ms_per_chip"]:.2f} ms per chip; one copy '
           f'of a chip within RAM {pipe["copy_ms_per_chip"]:.3f} ms. '
           'Host CPU ms per train / eval chip (one thread, transfer included): ')
  text += ', '.join(f'{mode} {pipe[mode]["host_ms_per_train_chip"]:.3f} / '
                    f'{pipe[mode]["host_ms_per_eval_chip"]:.3f}'
                    for mode in ('before', 'none', 'host', 'device'))
  if 'augmentation' in pipe:
    ms = pipe['augmentation']['train_step_ms']
    text += (f'; the rgb train step with the input made in it {ms["in_step"]:.0f} ms vs '
             f'{ms["ready_input"]:.0f} ms on a ready input '
             f'({pipe["augmentation"]["in_step_over_ready"]:.3f}x)')
  return text + '.'


if __name__ == '__main__':
  app.run(common.child_main(run))
