"""Grain input pipelines over the prepared Planet dataset.

`prepare` turns a data config into `PlanetData` (generating synthetic chips
and building the TFDS dataset on first use); `train_loader` and
`eval_batches` turn it into fixed-shape float32 batches.

Worker processes (num_workers > 0): grain starts child processes that
re-import the caller's main module and read absl flags. Callers must
  * guard their entry point with `if __name__ == '__main__':` and
  * run under `absl.app.run(main)` (or call `ensure_flags_parsed()` first,
    which is what `train_loader`/`eval_batches` do for you when flags are
    not parsed yet, e.g. under pytest).
num_workers=0 runs everything in the calling process and works anywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from absl import logging
import grain.python as grain
import numpy as np

from rf_jax.data import planet
from rf_jax.data import synthetic
from rf_jax.data import tfds_planet

SPLITS = ('train', 'validation', 'test')
# config.data.train_transform: the whole chip resized (the study's code) or a random crop.
TRAIN_TRANSFORMS = ('resize_flip', 'crop_flip')
# config.data.normalisation: train-split band statistics, or the course's constants (8-bit chips).
NORMALISATIONS = ('dataset', 'course')


@dataclasses.dataclass(frozen=True)
class PlanetData:
  """The prepared dataset: random-access sources and normalisation stats."""
  train: Any
  validation: Any
  test: Any | None
  mean: np.ndarray  # float32[4], R,G,B,NIR, raw units, training split only.
  std: np.ndarray
  chip_size: int
  layout: str = 'kaggle'
  # Chip names per split, in source order (for predictions files).
  names: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
  data_dir: str = ''


class PlanetSource:
  """A TFDS ArrayRecord source whose records carry `name` as str.

  Picklable (grain ships it to worker processes). Its repr names the TFDS
  config (which fingerprints the source and the split) and the split: grain
  checks it when restoring an iterator state, so a state saved on another
  dataset is refused instead of silently continuing elsewhere.
  """

  def __init__(self, source, description: str = ''):
    self._source = source
    self._description = description or repr(source)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index) -> dict:
    record = self._source[index]
    name = record['name']
    return {'image': record['image'], 'labels': record['labels'],
            'name': name.decode() if isinstance(name, bytes) else name}

  def __repr__(self) -> str:
    return f'PlanetSource({self._description}, len={len(self)})'


def ensure_flags_parsed() -> None:
  """Grain reads absl flags (also in its worker processes); parse them with
  defaults when the caller did not run under absl.app.run (pytest, scripts).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1], known_only=True)


# --- preparation -------------------------------------------------------------


def _ensure_synthetic(raw_dir: Path, syn, layout: str) -> None:
  """Writes the synthetic dataset once; refuses a directory written with
  other parameters (it would silently train on the wrong data)."""
  layout = 'kaggle' if layout == 'auto' else layout
  want = dict(num_chips=int(syn.num_chips), chip_size=int(syn.chip_size),
              seed=int(syn.seed), layout=layout,
              num_test=int(syn.get('num_test', 0)), label_csv=None)
  have = synthetic.read_spec(raw_dir)
  if have is None:
    if raw_dir.exists() and any(raw_dir.iterdir()):
      raise planet.PlanetDataError(
          f'{raw_dir}: not empty and not a synthetic dataset; set '
          'data.raw_dir to an empty or missing directory')
    synthetic.write_dataset(raw_dir, want['num_chips'], want['chip_size'],
                            seed=want['seed'], layout=layout,
                            num_test=want['num_test'])
  elif have != want:
    raise planet.PlanetDataError(
        f'{raw_dir / synthetic.SPEC_FILE}: synthetic data written with '
        f'{have}, config asks for {want}; delete {raw_dir} or use another '
        'workdir')


def prepare(data_config, workdir) -> PlanetData:
  """Generates (synthetic), builds (once) and opens the Planet dataset.

  See configs/default.py for `data_config`'s fields. An already prepared
  dataset is reused, never rebuilt; one prepared from another source or
  split lives under another TFDS config name (see tfds_planet).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  workdir = Path(workdir)
  syn = data_config.get('synthetic', None)
  use_synthetic = syn is not None and int(syn.get('num_chips', 0)) > 0
  layout = data_config.get('layout', 'auto')
  raw_dir = data_config.get('raw_dir', '')
  prepared_dir = data_config.get('prepared_dir', '')
  if use_synthetic:
    raw_dir = Path(raw_dir or workdir / 'synthetic').expanduser()
    prepared_dir = Path(prepared_dir or workdir / 'prepared').expanduser()
    _ensure_synthetic(raw_dir, syn, layout)
  else:
    if not raw_dir:
      raise planet.PlanetDataError(
          'data.raw_dir is empty and data.synthetic.num_chips is 0: point '
          'raw_dir at a Kaggle-layout directory (train_v2.csv, train-tif-v2/)')
    raw_dir = Path(raw_dir).expanduser()
    prepared_dir = Path(prepared_dir or '~/tensorflow_datasets').expanduser()
  config = tfds_planet.make_config(
      raw_dir, layout, data_config.get('val_fraction', 0.33),
      data_config.get('split_seed', 321))
  builder = tfds_planet.load_builder(prepared_dir, config)
  if not builder.is_prepared():
    # A killed build leaves TFDS's incomplete.* directory (never read as
    # prepared); it may hold gigabytes, so say where it is.
    stale = sorted(builder.data_path.parent.glob('incomplete.*'))
    if stale:
      logging.warning('Ignoring interrupted builds (delete to free disk): %s',
                      ', '.join(map(str, stale)))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(raw_dir)),
        file_format='array_record')
    builder = tfds_planet.load_builder(prepared_dir, config)
  return open_prepared(builder)


def open_prepared(builder) -> PlanetData:
  """PlanetData over a prepared `tfds_planet.PlanetAmazon` builder."""
  meta = builder.info.metadata
  sources = {
      s: PlanetSource(builder.as_data_source(s),
                      f'{builder.name}/{builder.builder_config.name}/{s}')
      for s in SPLITS if s in builder.info.splits}
  stats = meta['train_stats']
  return PlanetData(
      train=sources['train'], validation=sources.get('validation'),
      test=sources.get('test'),
      mean=np.asarray(stats['mean'], np.float32),
      std=np.asarray(stats['std'], np.float32),
      chip_size=int(meta['chip_size']), layout=meta['layout'],
      names={s: tuple(meta['names'][s]) for s in sources},
      data_dir=str(builder.data_dir))


def steps_per_epoch(data: PlanetData, batch_size: int) -> int:
  return len(data.train) // batch_size


# --- per-record transforms ---------------------------------------------------


def _normaliser(data: PlanetData, bands: Sequence[int]):
  """(band index, mean, 1/std) for `bands`; the index is a slice when the
  bands are consecutive (a view, where a list would copy the chip)."""
  bands = list(bands)
  if not bands or any(b not in range(4) for b in bands):
    raise ValueError(f'bands must be indices into R,G,B,NIR, got {bands}')
  mean = data.mean[bands].astype(np.float32)
  inv_std = (1.0 / data.std[bands]).astype(np.float32)
  consecutive = bands == list(range(bands[0], bands[-1] + 1))
  index = slice(bands[0], bands[-1] + 1) if consecutive else tuple(bands)
  return index, mean, inv_std


@dataclasses.dataclass(frozen=True)
class CropFlipNormalise(grain.RandomMapTransform):
  """Random crop + horizontal flip (the study's train augmentation), band
  selection and normalisation. Crops on the raw dtype first so the float
  work is on the crop only. grain seeds `rng` per record from the loader
  seed and the record's position, so output does not depend on workers."""
  crop_size: int
  bands: slice | tuple
  mean: np.ndarray
  inv_std: np.ndarray

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    image, c = record['image'], self.crop_size
    y, x = rng.integers(0, image.shape[0] - c + 1, size=2)
    patch = image[y:y + c, x:x + c, self.bands]
    if rng.random() < 0.5:
      patch = patch[:, ::-1]
    out = patch.astype(np.float32)  # The one copy; then normalise in place.
    out -= self.mean
    out *= self.inv_std
    return {'image': out, 'labels': record['labels']}


@functools.lru_cache(maxsize=16)
def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] antialiased bilinear weights (torchvision Resize on tensors
  with antialias=True, i.e. PIL's triangle filter widened by the scale)."""
  scale = in_size / out_size
  support = scale if scale >= 1.0 else 1.0
  inv = 1.0 / scale if scale >= 1.0 else 1.0
  weights = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    j = np.arange(lo, hi)
    w = np.maximum(0.0, 1.0 - np.abs((j - center + 0.5) * inv))
    weights[i, lo:hi] = w / w.sum() if w.sum() else w
  return weights.astype(np.float32)


@functools.lru_cache(maxsize=16)
def _resize_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """resize_matrix as K taps per output: (indices [out, K], weights [out, K])."""
  matrix = resize_matrix(in_size, out_size)
  nonzero = matrix != 0
  lo = nonzero.argmax(axis=1)
  k = int(nonzero.sum(axis=1).max())
  pos = lo[:, None] + np.arange(k)
  idx = np.minimum(pos, in_size - 1)
  weights = np.where(pos < in_size, np.take_along_axis(matrix, idx, 1), 0)
  return idx, weights.astype(np.float32)


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """[H, W, C] -> [size, size, C] float32, separable antialiased bilinear.

  Applied as a few gathered taps per axis rather than a matrix product: a
  BLAS matmul spawns threads that fight grain's workers (10x slower on a
  loaded 2-core machine), the taps are as fast single-threaded.
  """
  h, w, _ = image.shape
  if (h, w) == (size, size):
    return image.astype(np.float32)
  # The first pass reads the raw dtype: uint16 * float32 weights -> float32.
  idx, wts = _resize_taps(h, size)
  rows = image[idx[:, 0]] * wts[:, 0, None, None]          # [size, W, C]
  for k in range(1, idx.shape[1]):
    rows += image[idx[:, k]] * wts[:, k, None, None]
  idx, wts = _resize_taps(w, size)
  out = rows[:, idx[:, 0]]                                 # [size, size, C]
  out *= wts[None, :, 0, None]
  for k in range(1, idx.shape[1]):
    out += rows[:, idx[:, k]] * wts[None, :, k, None]
  return out.astype(np.float32, copy=False)


@dataclasses.dataclass(frozen=True)
class ResizeNormalise(grain.MapTransform):
  """Eval: resize the whole chip, select bands, normalise."""
  eval_size: int
  bands: slice | tuple
  mean: np.ndarray
  inv_std: np.ndarray

  def map(self, record: dict) -> dict:
    image = resize(record['image'][..., self.bands], self.eval_size)
    image -= self.mean
    image *= self.inv_std
    return {'image': image, 'labels': record['labels']}


# --- loaders -----------------------------------------------------------------


def _read_options(batch_size: int) -> grain.ReadOptions:
  # grain's default (16 reader threads, 500 records ahead, per process) is
  # sized for big hosts; 2 threads and two batches ahead keep a 2-core
  # machine busy without oversubscribing it or holding ~250 MB of chips.
  return grain.ReadOptions(num_threads=2,
                           prefetch_buffer_size=max(2 * batch_size, 16))


def train_loader(data: PlanetData, *, batch_size: int, crop_size: int,
                 bands: Sequence[int], seed: int, num_workers: int = 0,
                 shard_index: int = 0, shard_count: int = 1,
                 worker_buffer_size: int = 2) -> grain.DataLoader:
  """Infinite train batches: a fresh seeded shuffle each epoch, epochs
  concatenated, the last partial batch of the stream never emitted.

  `iter(loader)` gives a grain iterator with get_state() -> bytes and
  set_state(bytes): restoring continues with the exact next batch.
  Determinism: a record's crop/flip depends only on (seed, its position in
  the stream); which records share a batch also depends on num_workers
  (grain gives worker i the records i, i+n, ... to batch), so keep
  num_workers fixed across a run and its restores.
  Batches: {'image': float32[B, crop, crop, len(bands)], 'labels': f32[B,17]}.
  """
  if not 0 < crop_size <= data.chip_size:
    raise ValueError(f'crop_size {crop_size} must be in 1..{data.chip_size}')
  bands, mean, inv_std = _normaliser(data, bands)
  if num_workers:
    ensure_flags_parsed()
  sampler = grain.IndexSampler(
      num_records=len(data.train),
      shard_options=grain.ShardOptions(shard_index, shard_count,
                                       drop_remainder=True),
      shuffle=True, num_epochs=None, seed=seed)
  return grain.DataLoader(
      data_source=data.train, sampler=sampler,
      operations=[CropFlipNormalise(crop_size, bands, mean, inv_std),
                  grain.Batch(batch_size, drop_remainder=True)],
      worker_count=num_workers, worker_buffer_size=worker_buffer_size,
      read_options=_read_options(batch_size))


def eval_batches(data: PlanetData, split: str, *, batch_size: int,
                 eval_size: int, bands: Sequence[int],
                 num_workers: int = 0) -> Iterator[dict]:
  """One pass over `split` in source order, fixed batch shape.

  Batches: {'image': float32[B, eval, eval, C], 'labels': float32[B, 17],
  'mask': float32[B]}; the last batch is zero-padded with mask 0.
  """
  source = getattr(data, split, None) if split in SPLITS else None
  if source is None:
    raise ValueError(f'no {split!r} split in this dataset')
  bands, mean, inv_std = _normaliser(data, bands)
  if num_workers:
    ensure_flags_parsed()
  # No grain.Batch here: with workers, each worker would batch its own
  # interleaved slice (records 0, 2, 4, ...). Records come back in sampler
  # order, so batching them here keeps the source order for any num_workers.
  loader = grain.DataLoader(
      data_source=source,
      sampler=grain.IndexSampler(len(source), grain.NoSharding(),
                                 shuffle=False, num_epochs=1, seed=0),
      operations=[ResizeNormalise(eval_size, bands, mean, inv_std)],
      worker_count=num_workers, read_options=_read_options(batch_size))
  records = iter(loader)
  while chunk := list(itertools.islice(records, batch_size)):
    n = len(chunk)
    images = np.zeros((batch_size,) + chunk[0]['image'].shape, np.float32)
    labels = np.zeros((batch_size, planet.NUM_TAGS), np.float32)
    mask = np.zeros(batch_size, np.float32)
    for i, record in enumerate(chunk):
      images[i], labels[i] = record['image'], record['labels']
    mask[:n] = 1.0
    yield {'image': images, 'labels': labels, 'mask': mask}


def state_to_json(state: bytes) -> dict:
  """A grain iterator state as a JSON-able dict (for checkpoint metadata)."""
  return json.loads(state.decode())
