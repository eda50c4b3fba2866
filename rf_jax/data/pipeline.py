"""Grain input pipelines over the prepared Planet dataset (data/prepared.py).

`train_loader` and `eval_batches` turn a `prepared.PlanetData` into fixed-shape float32
batches.

Worker processes (num_workers > 0): grain starts child processes that
re-import the caller's main module and read absl flags. Callers must
  * guard their entry point with `if __name__ == '__main__':` and
  * run under `absl.app.run(main)` (or call `ensure_flags_parsed()` first,
    which is what `train_loader` does for you when flags are not parsed yet,
    e.g. under pytest).
num_workers=0 runs everything in the calling process and works anywhere;
evaluation always does.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import sys
from typing import Iterator, Sequence

import grain.python as grain
import numpy as np

from rf_jax.data import planet
from rf_jax.data import prepared

# config.data.train_transform: the whole chip resized (the study's code) or a random crop.
TRAIN_TRANSFORMS = ('resize_flip', 'crop_flip')
# config.data.normalisation: train-split band statistics, or the course's constants (8-bit chips).
NORMALISATIONS = ('dataset', 'course')


def ensure_flags_parsed() -> None:
  """Grain reads absl flags (also in its worker processes); parse them with
  defaults when the caller did not run under absl.app.run (pytest, scripts).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1], known_only=True)


# --- per-record transforms ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Normaliser:
  """Band selection and normalisation of a chip in raw units.

  `bands` is a slice when the bands are consecutive (a view, where a list
  would copy the chip); mean and 1/std are in the chip's raw units.
  """
  bands: slice | tuple
  mean: np.ndarray
  inv_std: np.ndarray

  def __call__(self, image: np.ndarray) -> np.ndarray:
    """float32 image of the selected bands, normalised in place."""
    image -= self.mean
    image *= self.inv_std
    return image


def normaliser(data: prepared.PlanetData, bands: Sequence[int],
               normalisation: str) -> Normaliser:
  """The Normaliser of `bands` (indices into R,G,B,NIR) for a
  `normalisation` of NORMALISATIONS: 'dataset' uses the training split's band
  statistics, 'course' the course's constants on 8-bit chips / 255."""
  bands = list(bands)
  if not bands or any(b not in range(4) for b in bands):
    raise ValueError(f'bands must be indices into R,G,B,NIR, got {bands}')
  if normalisation == 'dataset':
    mean, std = data.mean, data.std
  elif normalisation == 'course':
    if data.layout != 'course':
      raise planet.PlanetDataError(
          f"config.data.normalisation='course' needs the course layout's 8-bit "
          f'chips, and {data.data_dir} holds {data.layout}-layout chips: set '
          "config.data.normalisation='dataset' (the training split's band "
          'statistics)')
    # (x / 255 - mean) / std, applied to x in raw units.
    mean = np.multiply(planet.COURSE_MEAN, planet.COURSE_PIXEL_MAX)
    std = np.multiply(planet.COURSE_STD, planet.COURSE_PIXEL_MAX)
  else:
    raise ValueError(f'normalisation must be one of {NORMALISATIONS}, got '
                     f'{normalisation!r}')
  mean = np.asarray(mean, np.float32)[bands]
  inv_std = 1.0 / np.asarray(std, np.float32)[bands]
  consecutive = bands == list(range(bands[0], bands[-1] + 1))
  index = slice(bands[0], bands[-1] + 1) if consecutive else tuple(bands)
  return Normaliser(index, mean, inv_std)


@dataclasses.dataclass(frozen=True)
class CropFlipNormalise(grain.RandomMapTransform):
  """Train 'crop_flip': a random image_size crop + horizontal flip, then
  normalise. Crops on the raw dtype first so the float work is on the crop
  only. grain seeds `rng` per record from the loader seed and the record's
  position, so output does not depend on workers."""
  image_size: int
  normalise: Normaliser

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    image, c = record['image'], self.image_size
    y, x = rng.integers(0, image.shape[0] - c + 1, size=2)
    patch = image[y:y + c, x:x + c, self.normalise.bands]
    if rng.random() < 0.5:
      patch = patch[:, ::-1]
    # The one copy; then normalise in place.
    out = self.normalise(patch.astype(np.float32))
    return {'image': out, 'labels': record['labels']}


@dataclasses.dataclass(frozen=True)
class ResizeFlipNormalise(grain.RandomMapTransform):
  """Train 'resize_flip' (the study's code): the whole chip resized to
  image_size exactly as evaluation resizes it, a horizontal flip with
  probability 0.5, then normalise. Seeded per record like CropFlipNormalise."""
  image_size: int
  normalise: Normaliser

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    image = resize(record['image'][..., self.normalise.bands], self.image_size)
    if rng.random() < 0.5:
      image = image[:, ::-1]
    return {'image': self.normalise(image), 'labels': record['labels']}


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
  image_size: int
  normalise: Normaliser

  def map(self, record: dict) -> dict:
    image = resize(record['image'][..., self.normalise.bands], self.image_size)
    return {'image': self.normalise(image), 'labels': record['labels']}


# --- loaders -----------------------------------------------------------------


def _read_options(batch_size: int) -> grain.ReadOptions:
  # grain's default (16 reader threads, 500 records ahead, per process) is
  # sized for big hosts; 2 threads and two batches ahead keep a 2-core
  # machine busy without oversubscribing it or holding ~250 MB of chips.
  return grain.ReadOptions(num_threads=2,
                           prefetch_buffer_size=max(2 * batch_size, 16))


def _train_transform(data: prepared.PlanetData, transform: str, image_size: int,
                     normalise: Normaliser) -> grain.RandomMapTransform:
  if transform == 'resize_flip':
    if image_size < 1:
      raise ValueError(f'image_size {image_size} must be >= 1')
    return ResizeFlipNormalise(image_size, normalise)
  if transform == 'crop_flip':
    if not 0 < image_size <= data.chip_size:
      raise ValueError(f'image_size {image_size} must be in 1..'
                       f'{data.chip_size} (the chip size) to crop')
    return CropFlipNormalise(image_size, normalise)
  raise ValueError(f'transform must be one of {TRAIN_TRANSFORMS}, got '
                   f'{transform!r}')


def train_loader(data: prepared.PlanetData, *, batch_size: int, image_size: int,
                 bands: Sequence[int], seed: int, transform: str,
                 normalisation: str, num_workers: int = 0,
                 shard_index: int = 0, shard_count: int = 1,
                 worker_buffer_size: int = 2) -> grain.DataLoader:
  """Infinite train batches: a fresh seeded shuffle each epoch, epochs
  concatenated, the last partial batch of the stream never emitted.

  `transform` (TRAIN_TRANSFORMS) makes the image_size input: 'resize_flip'
  resizes the whole chip, 'crop_flip' crops it; both flip at random.
  `normalisation` is one of NORMALISATIONS (see `normaliser`).
  `iter(loader)` gives a grain iterator with get_state() -> bytes and
  set_state(bytes): restoring continues with the exact next batch.
  Determinism: a record's crop/flip depends only on (seed, its position in
  the stream); which records share a batch also depends on num_workers
  (grain gives worker i the records i, i+n, ... to batch), so keep
  num_workers fixed across a run and its restores.
  Batches: {'image': float32[B, size, size, len(bands)], 'labels': f32[B,17]}.
  """
  operation = _train_transform(data, transform, image_size,
                               normaliser(data, bands, normalisation))
  if num_workers:
    ensure_flags_parsed()
  sampler = grain.IndexSampler(
      num_records=len(data.train),
      shard_options=grain.ShardOptions(shard_index, shard_count,
                                       drop_remainder=True),
      shuffle=True, num_epochs=None, seed=seed)
  return grain.DataLoader(
      data_source=data.train, sampler=sampler,
      operations=[operation, grain.Batch(batch_size, drop_remainder=True)],
      worker_count=num_workers, worker_buffer_size=worker_buffer_size,
      read_options=_read_options(batch_size))


def eval_batches(data: prepared.PlanetData, split: str, *, batch_size: int,
                 image_size: int, bands: Sequence[int],
                 normalisation: str) -> Iterator[dict]:
  """One pass over `split` in source order, fixed batch shape: each chip
  resized whole to image_size, normalised as `normalisation`.

  Batches: {'image': float32[B, size, size, C], 'labels': float32[B, 17],
  'mask': float32[B]}; the last batch is zero-padded with mask 0.
  """
  source = getattr(data, split, None) if split in prepared.SPLITS else None
  if source is None:
    raise ValueError(f'no {split!r} split in this dataset')
  operation = ResizeNormalise(image_size,
                              normaliser(data, bands, normalisation))
  # No grain.Batch: the last batch is padded to the fixed shape instead.
  loader = grain.DataLoader(
      data_source=source,
      sampler=grain.IndexSampler(len(source), grain.NoSharding(),
                                 shuffle=False, num_epochs=1, seed=0),
      operations=[operation], read_options=_read_options(batch_size))
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
