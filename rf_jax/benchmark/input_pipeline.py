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

  python -m rf_jax.benchmark.input_pipeline job.json result.json   (spawned by orchestrate)
"""

from __future__ import annotations

from collections.abc import Callable
import pathlib
import shutil
import tempfile
import time

from absl import app

from rf_jax.benchmark import common

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
  passes = iter(())

  def next_batch() -> int:
    nonlocal passes
    batch = next(passes, None)
    if batch is None:
      passes = pipeline.eval_batches(data, 'validation', batch_size=settings.eval_batch,
                                     threads=settings.workers)
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
    counts = {settings.workers} | ({0} if settings.pipeline_zero_workers else set())
    result['runs'] = {str(n): _train(data, settings, n) for n in sorted(counts)}
    result['eval'] = _eval(data, settings)
    configured = result['runs'][str(settings.workers)]
    result['batches_per_s'] = configured['batches_per_s']
    result['train_cpu_ms_per_chip'] = configured['cpu_ms_per_chip']
    result['eval_cpu_ms_per_chip'] = result['eval']['cpu_ms_per_chip']
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
  return text + (f'. Eval: {pipe["eval"]["chips_per_s"]:.0f} chips/s, host CPU '
                 f'{pipe["eval_cpu_ms_per_chip"]:.2f} ms per evaluation chip. '
                 f'tifffile.imread alone: {pipe["imread_ms_per_chip"]:.2f} ms per chip.')


if __name__ == '__main__':
  app.run(common.child_main(run))
