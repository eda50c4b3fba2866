"""A run's inputs: its config turned into the data layer's explicit arguments.

Training and evaluation read the same dataset, batches and on-device preprocessing through these
functions, so a key of `config.data` is interpreted in one place. `jax.process_index()` and
`process_count()` are read here: each process reads its slice of every global batch.
"""

import functools
import itertools

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from orbax.checkpoint import multihost as orbax_multihost

from rf_jax import augment
from rf_jax import config_checks
from rf_jax import parallel
from rf_jax import workdir as workdir_lib
from rf_jax.data import pipeline
from rf_jax.data import planet
from rf_jax.data import prepared
from rf_jax.data import synthetic
from rf_jax.models import registry

# Where TFDS keeps prepared datasets unless config.data.prepared_dir says otherwise.
DEFAULT_PREPARED_DIR = '~/tensorflow_datasets'


# How long the other processes wait for process 0 to prepare the dataset (40,479 real chips
# take tens of minutes on a slow disk).
PREPARE_TIMEOUT_S = 24 * 3600
_PREPARATIONS = itertools.count()  # barrier names must be unique


def wait_for_all_processes(name: str, timeout_s: int) -> None:
  """A barrier on the coordination service, for waits longer than a collective allows.

  A collective's first connection gives up after 30 s, and preparing a real dataset takes
  minutes. A process that dies fails the barrier for the others.
  """
  # orbax's public wrapper of the coordination service client (JAX exposes no barrier with a
  # timeout of its own).
  orbax_multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def data_dirs(data, wd: workdir_lib.Workdir) -> tuple[str, str]:
  """(raw, prepared) directories of `config.data` (a ConfigDict or a saved config's dict): a
  synthetic dataset is generated into the workdir unless the config names a place."""
  raw_dir, prepared_dir = data['raw_dir'], data['prepared_dir']
  if data['synthetic']['num_chips']:
    return raw_dir or str(wd.synthetic), prepared_dir or str(wd.prepared)
  return raw_dir, prepared_dir or DEFAULT_PREPARED_DIR


def prepare(config: ml_collections.ConfigDict, wd: workdir_lib.Workdir) -> prepared.PlanetData:
  """The prepared dataset of `config.data` (generated and prepared on first use).

  With several JAX processes, process 0 prepares while the others wait at a barrier, then
  they open its dataset; without a shared file system each host then prepares its own copy
  (processes on one host take turns through the dataset's lock file).
  """
  data = config.data
  spec = None
  if data.synthetic.num_chips:
    s = data.synthetic
    spec = synthetic.Spec(num_chips=s.num_chips, chip_size=s.chip_size, num_test=s.num_test,
                          seed=s.seed)
  raw_dir, prepared_dir = data_dirs(data, wd)
  prepare_here = functools.partial(
      prepared.prepare, raw_dir, prepared_dir, layout=data.layout,
      val_fraction=data.val_fraction, split_seed=data.split_seed, synthetic=spec)
  if jax.process_count() == 1:
    return prepare_here()
  dataset, failure = None, None
  if jax.process_index() == 0:
    try:
      dataset = prepare_here()
    except Exception as e:  # pylint: disable=broad-except
      failure = e  # raised after the barrier: no process is left waiting for ever
  wait_for_all_processes(f'rf_jax_prepare_{next(_PREPARATIONS)}', PREPARE_TIMEOUT_S)
  # Then every process learns whether process 0 succeeded.
  failed = multihost_utils.broadcast_one_to_all(np.int32(failure is not None))
  if failure is not None:
    raise failure
  if failed:
    raise planet.PlanetDataError(
        f'process 0 could not prepare {raw_dir} into {prepared_dir}: see its error')
  return dataset if dataset is not None else prepare_here()


def preprocess(config: ml_collections.ConfigDict, data: prepared.PlanetData) -> augment.Preprocess:
  """How the steps make the model's input from raw chips, for training and evaluation alike."""
  return augment.create(
      data, bands=registry.input_bands(config.model.name),
      normalisation_name=config.data.normalisation, train_transform=config.data.train_transform,
      crop_size=config.data.crop_size, eval_size=config.data.eval_size, seed=config.seed,
      dtype=config.dtype)


def train_loader(config: ml_collections.ConfigDict,
                 data: prepared.PlanetData) -> pipeline.TrainBatches:
  """This process's slice of every global training batch of raw chips (an iterator with
  get_state / set_state)."""
  _check_cache_layout(config)
  return pipeline.train_loader(
      data, batch_size=config.batch_size, seed=config.seed, cache=config.data.cache,
      threads=config.data.num_workers, shard_index=jax.process_index(),
      shard_count=jax.process_count(), to_device=parallel.replicate)


def check_cache_fits(config: ml_collections.ConfigDict, data: prepared.PlanetData,
                     splits: tuple[str, ...]) -> None:
  """Refuses a `config.data.cache` that cannot hold all of `splits` at once, before any is read."""
  pipeline.check_fits({split: getattr(data, split) for split in splits}, config.data.cache)


def _check_cache_layout(config: ml_collections.ConfigDict) -> None:
  if config.data.cache == 'device' and config.parallel == 'pmap' and jax.device_count() > 1:
    raise config_checks.ConfigError(
        "config.data.cache='device' needs config.parallel='jit' (one copy of the split per "
        "device, gathered in the step); pmap would copy it at every step: use "
        "--config.parallel=jit or --config.data.cache=host.")


def eval_batches(config: ml_collections.ConfigDict, data: prepared.PlanetData,
                 split: str) -> pipeline.EvalBatches:
  """Passes over `split` in source order (each iteration one pass; this process's slice of
  every global batch of raw chips); every process gets all scores back (predict)."""
  return pipeline.eval_batches(
      data, split, batch_size=config.eval_batch_size, cache=config.data.cache,
      threads=config.data.num_workers, shard_index=jax.process_index(),
      shard_count=jax.process_count(), to_device=parallel.replicate)
