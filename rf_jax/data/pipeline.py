"""Host input: batches of chips as stored, read by index from the prepared dataset
(data/prepared.py). The host only reads; the steps make the model's input on device
(rf_jax/augment.py).

Batches: {'image': uint16 (Kaggle) | uint8 (course) [b, S, S, 4] (R,G,B,NIR, full size),
'labels': float32 [b, 17]}, plus 'mask' float32 [b] in evaluation. With cache='device' a batch
is {'index': int32 [b], 'cache': {'image', 'labels'} (the whole split, on device)} (+ 'mask'),
and the step gathers its rows there; index len(split) marks a padding row (zeros).

A split's source has len(), source[i] -> {'image', 'labels', ...} and source.read_into(i, image)
-> labels, which copies chip i into a batch row (prepared.PlanetSource; chip_scores.ChipSource).

`cache` (CACHES): 'none' reads each batch's records; 'host' reads the split once into one
array in RAM and gathers batches from it; 'device' places that array in accelerator memory once.

Several processes: each reads ITS SLICE of the same global batch, positions
[p*B/P, (p+1)*B/P), whose record indices come from one seeded order of the whole split. The
batches therefore do not depend on the process count, and an iterator state (the global step)
saved on one topology resumes exactly on another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any
import concurrent.futures
import json
import os

import numpy as np

from rf_jax import errors
from rf_jax.data import planet
from rf_jax.data import prepared

# config.data.cache: where the chips of a split are held between batches.
CACHES = ('none', 'host', 'device')
# The training order's fields (TrainBatches state), as the user sets them.
_ORDER_KEYS = {'seed': 'config.seed', 'batch_size': 'config.batch_size',
               'num_records': 'the number of training chips'}


class LoaderError(errors.UserError, ValueError):
  """A loader that cannot run or resume as asked: the message names the config key or the
  dataset, and what to do."""


# --- where the chips come from -------------------------------------------------------------

# XLA:CPU adopts a host buffer aligned to this many bytes as a device array without copying it
# (measured: 0.1 ms instead of ~30 ms for a 32 MB batch); a GPU copies it either way.
_ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
  """np.empty(shape, dtype) whose data starts on an _ALIGNMENT-byte boundary."""
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
  offset = -raw.ctypes.data % _ALIGNMENT
  return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def _chip(source) -> tuple[tuple[int, ...], np.dtype]:
  image = source[0]['image']
  return image.shape, image.dtype


def _gather(source, indices: np.ndarray, shape, dtype, map_rows=map) -> dict:
  """A fresh aligned batch of `source`'s records `indices` (padding -1 last: zero rows), each
  chip copied into its row by `source.read_into`; `map_rows` runs the rows (map, a pool's)."""
  images = aligned_empty((len(indices),) + tuple(shape), dtype)
  labels = np.zeros((len(indices), planet.NUM_TAGS), np.float32)
  valid = indices[indices >= 0].tolist()
  images[len(valid):] = 0

  def fill(row: int) -> None:
    labels[row] = source.read_into(valid[row], images[row])

  list(map_rows(fill, range(len(valid))))
  return {'image': images, 'labels': labels}


class _Records:
  """cache='none': each batch's records read from the source, by `threads` threads (0: here),
  each chip copied from its record straight into the batch."""

  def __init__(self, source, threads: int):
    self.source, (self.shape, self.dtype) = source, _chip(source)
    self.pool = concurrent.futures.ThreadPoolExecutor(threads) if threads else None

  def read(self, indices: np.ndarray) -> dict:
    return _gather(self.source, indices, self.shape, self.dtype,
                   self.pool.map if self.pool else map)


class _HostArrays:
  """cache='host': the split's chips and labels in RAM, batches gathered by index; a run of
  consecutive records (evaluation) is handed over as a view, not copied."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def read_into(self, index: int, image: np.ndarray) -> np.ndarray:
    image[...] = self.images[index]  # a row copy: faster than np.take into a batch
    return self.labels[index]

  def read(self, indices: np.ndarray) -> dict:
    valid = indices[indices >= 0]  # padding (-1) comes last
    first = int(valid[0]) if len(valid) else 0
    if len(valid) == len(indices) and np.array_equal(valid, first + np.arange(len(valid))):
      return {'image': self.images[first:first + len(valid)],
              'labels': self.labels[first:first + len(valid)]}
    return _gather(self, indices, self.images.shape[1:], self.images.dtype)


class _DeviceArrays:
  """cache='device': the split on device; a batch is its indices, gathered in the step."""

  def __init__(self, cache: dict, num_records: int):
    self.cache, self.num_records = cache, num_records

  def read(self, indices: np.ndarray) -> dict:
    index = np.where(indices >= 0, indices, self.num_records).astype(np.int32)
    return {'index': index, 'cache': self.cache}


def read_split(source, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The whole split in RAM: chips [N, S, S, 4] in their stored dtype, labels float32 [N, 17];
  read-only (views of it are handed out as batches)."""
  shape, dtype = _chip(source)
  images = aligned_empty((len(source),) + shape, dtype)
  labels = np.empty((len(source), planet.NUM_TAGS), np.float32)

  def fill(i: int) -> None:
    labels[i] = source.read_into(i, images[i])

  with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
    list(pool.map(fill, range(len(source))))
  images.flags.writeable = labels.flags.writeable = False
  return images, labels


def available_host_bytes() -> int:
  """Memory the kernel can give this process without swapping (MemAvailable)."""
  try:
    with open('/proc/meminfo', encoding='ascii') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


def _device_free_bytes() -> tuple[int | None, str, int]:
  """Free accelerator memory on the fullest local device (None where the devices are the
  host's RAM, which reports no limit), that device's name, and the local devices."""
  import jax  # pylint: disable=g-import-not-at-top
  free = []
  for device in jax.local_devices():
    stats = device.memory_stats() or {}
    if 'bytes_limit' in stats:
      free.append((stats['bytes_limit'] - stats.get('bytes_in_use', 0), str(device)))
  name = str(jax.local_devices()[0])
  return (*(min(free) if free else (None, name)), jax.local_device_count())


def _gb(nbytes: int) -> str:
  return f'{nbytes / 1e9:.3g} GB'


def check_fits(sources: Mapping[str, Any], cache: str) -> None:
  """One clear error when the splits cannot all be held where `cache` puts them: checked for
  every split a run will hold before any is read (a training run holds train and validation)."""
  if cache == 'none':
    return
  first = next(iter(sources.values()))[0]['image']
  nbytes = sum(len(source) for source in sources.values()) * first.nbytes
  host = available_host_bytes()
  device_free, device, devices = (_device_free_bytes() if cache == 'device' else (None, '', 1))
  # Staged in RAM first. Devices without memory of their own (CPU) adopt the staged, aligned
  # array: one CPU device holds no second copy (at 10,000 chips cache 'device' peaked at the
  # RSS of 'host', docs/performance.md "At full size"), each further one a copy.
  host_needed = nbytes * (devices if cache == 'device' and device_free is None else 1)
  short = []
  if host_needed > host:
    short.append(f'{_gb(host_needed)} of host RAM, {_gb(host)} available')
  if device_free is not None and nbytes > device_free:
    short.append(f'{_gb(nbytes)} on each device, {_gb(device_free)} free on {device}')
  if short:
    others = ', '.join(f"'{c}'" for c in CACHES if c != cache)
    held = ' and '.join(f'{split} ({len(source):,} chips)' for split, source in sources.items())
    raise planet.PlanetDataError(
        f"config.data.cache='{cache}' holds the whole {held} split"
        f'{"s" if len(sources) > 1 else ""}: {sum(map(len, sources.values())):,} chips x '
        f'{"x".join(map(str, first.shape))} {first.dtype} = {_gb(nbytes)}, which needs '
        f'{" and ".join(short)}. Use --config.data.cache= one of {others} (\'none\' reads each '
        "batch's records from disk).")


def _held(source, split: str, cache: str, threads: int, to_device: Callable | None):
  check_fits({split: source}, cache)
  images, labels = read_split(source, threads)
  if cache == 'host':
    return _HostArrays(images, labels)
  return _DeviceArrays({'image': to_device(images), 'labels': to_device(labels)}, len(source))


def _store(data: prepared.PlanetData, split: str, cache: str, threads: int,
           to_device: Callable | None):
  source = getattr(data, split, None) if split in prepared.SPLITS else None
  if source is None:
    raise ValueError(f'no {split!r} split in this dataset')
  if cache not in CACHES:
    raise ValueError(f'cache must be one of {CACHES}, got {cache!r}')
  if cache == 'device' and to_device is None:
    raise ValueError("cache='device' needs to_device (numpy array -> device array)")
  if cache == 'none':
    return source, _Records(source, threads)
  return source, _held(source, split, cache, threads, to_device)


def _shard_size(batch_size: int, shard_index: int, shard_count: int) -> int:
  if batch_size % shard_count or not 0 <= shard_index < shard_count:
    raise ValueError(f'batch_size {batch_size} must divide by shard_count {shard_count}, and '
                     f'shard_index {shard_index} be in 0..{shard_count - 1}')
  return batch_size // shard_count


# --- training --------------------------------------------------------------------------------


def epoch_order(seed: int, num_records: int, epoch: int) -> np.ndarray:
  """Epoch `epoch`'s seeded shuffle of all records."""
  return np.random.default_rng([seed, epoch]).permutation(num_records)


def global_batch(seed: int, num_records: int, batch_size: int, step: int,
                 order: np.ndarray | None = None) -> np.ndarray:
  """Record indices of global batch `step`: epoch e is a seeded shuffle of all records, cut
  into num_records // batch_size whole batches (the remainder is left out of that epoch).
  `order`: that epoch's epoch_order, where the caller keeps it."""
  epoch, start = divmod(step, num_records // batch_size)
  if order is None:
    order = epoch_order(seed, num_records, epoch)
  return order[start * batch_size:(start + 1) * batch_size]


class TrainBatches:
  """Endless training batches: this process's slice of every global batch, from `step` on.

  get_state() -> bytes (JSON) and set_state(bytes): the state is the global step, so a state
  saved with any process count resumes exactly with any other.
  """

  def __init__(self, source, store, *, batch_size: int, seed: int, shard_index: int,
               shard_count: int):
    if len(source) < batch_size:
      raise LoaderError(f'config.batch_size={batch_size} exceeds the {len(source)} training '
                        f'chips of {source!r}: lower --config.batch_size')
    self._store, self._step = store, 0
    self._local = _shard_size(batch_size, shard_index, shard_count)
    self._first = shard_index * self._local
    self._order = {'seed': seed, 'num_records': len(source), 'batch_size': batch_size}
    self._source = repr(source)
    self._epoch = (-1, None)  # (epoch, its order): drawn once per epoch, not per batch

  def __iter__(self) -> 'TrainBatches':
    return self

  def __next__(self) -> dict:
    epoch = self._step // (self._order['num_records'] // self._order['batch_size'])
    if self._epoch[0] != epoch:
      self._epoch = (epoch, epoch_order(self._order['seed'], self._order['num_records'], epoch))
    indices = global_batch(step=self._step, order=self._epoch[1], **self._order)
    self._step += 1
    return self._store.read(indices[self._first:self._first + self._local])

  def get_state(self) -> bytes:
    return json.dumps({'step': self._step, 'order': self._order,
                       'source': self._source}).encode()

  def set_state(self, state: bytes) -> None:
    saved = json.loads(state)
    if 'step' not in saved:
      raise LoaderError('The data iterator state in checkpoint does not match this loader (it '
                        'was written by an older version of rf_jax): train in a new --workdir.')
    if saved['source'] != self._source:
      raise LoaderError(
          f'The data source in checkpoint does not match: the run trained on {saved["source"]}, '
          f"this one reads {self._source}. Point config.data.raw_dir at the run's own data "
          '(the same chips and labels), or train on this data in another --workdir. (A run '
          'started before datasets were named by their content, dataset format 3, resumes '
          'only with the rf_jax that started it.)')
    changed = [f'{_ORDER_KEYS[k]} was {saved["order"].get(k)}, is {mine}'
               for k, mine in self._order.items() if saved['order'].get(k) != mine]
    if changed:
      raise LoaderError(f'The data order in checkpoint does not match: {"; ".join(changed)}. '
                        "Resume with the run's own values, or train in another --workdir.")
    self._step = int(saved['step'])


def train_loader(data: prepared.PlanetData, *, batch_size: int, seed: int, cache: str = 'none',
                 threads: int = 0, shard_index: int = 0, shard_count: int = 1,
                 to_device: Callable | None = None) -> TrainBatches:
  """Endless training batches of raw chips (see the module docstring), a fresh seeded shuffle
  each epoch; `batch_size` is the GLOBAL batch, this process gets its shard_index-th
  1/shard_count of each. `threads` read records (cache 'none') or fill the cache;
  `to_device` places a held split on device (cache 'device')."""
  source, store = _store(data, 'train', cache, threads, to_device)
  return TrainBatches(source, store, batch_size=batch_size, seed=seed,
                      shard_index=shard_index, shard_count=shard_count)


# --- evaluation ------------------------------------------------------------------------------


class EvalBatches:
  """Passes over a split in source order, global batches (this process's slice of each), the
  last one padded with zero rows of mask 0. Each iteration is one pass; a split held in RAM or
  on device (cache) is read once, and released with this object."""

  def __init__(self, source, store, *, batch_size: int, shard_index: int, shard_count: int):
    self._store, self._n, self._batch_size = store, len(source), batch_size
    self._local = _shard_size(batch_size, shard_index, shard_count)
    self._first = shard_index * self._local

  def __iter__(self) -> Iterator[dict]:
    for start in range(0, self._n, self._batch_size):
      positions = start + self._first + np.arange(self._local)
      batch = self._store.read(np.where(positions < self._n, positions, -1))
      batch['mask'] = (positions < self._n).astype(np.float32)
      yield batch


def eval_batches(data: prepared.PlanetData, split: str, *, batch_size: int,
                 cache: str = 'none', threads: int = 0, shard_index: int = 0,
                 shard_count: int = 1, to_device: Callable | None = None) -> EvalBatches:
  """Passes over `split` in source order, global batches of `batch_size` (this process's
  slice of each), the last one padded with zero rows of mask 0."""
  source, store = _store(data, split, cache, threads, to_device)
  return EvalBatches(source, store, batch_size=batch_size, shard_index=shard_index,
                     shard_count=shard_count)
