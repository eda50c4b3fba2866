"""The per-chip numpy transforms the host ran before the steps took them over (rf_jax/augment.py).

Kept as the reference: the on-device functions are tested against these (test_augment.py,
test_data_pipeline.py), and the input benchmark (benchmarks/input_pipeline.py) times them as the
host cost the device path removed. One chip [S, S, 4] at a time, in the order the loaders
applied them: band selection, crop or resize, flip, float32 normalisation in place.
"""

from __future__ import annotations

import functools

import numpy as np

from rf_jax import augment


@functools.lru_cache(maxsize=16)
def _resize_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """augment.resize_matrix as K taps per output: (indices [out, K], weights [out, K])."""
  matrix = augment.resize_matrix(in_size, out_size)
  nonzero = matrix != 0
  lo = nonzero.argmax(axis=1)
  k = int(nonzero.sum(axis=1).max())
  pos = lo[:, None] + np.arange(k)
  idx = np.minimum(pos, in_size - 1)
  weights = np.where(pos < in_size, np.take_along_axis(matrix, idx, 1), 0)
  return idx, weights.astype(np.float32)


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """[H, W, C] -> [size, size, C] float32, separable antialiased bilinear, as a few gathered
  taps per axis (single-threaded: a BLAS matmul's threads fought the loader's workers)."""
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


def normalise(p: augment.Preprocess, image: np.ndarray) -> np.ndarray:
  """float32 (x - mean) / std, in place on a float32 image."""
  image -= np.asarray(p.mean, np.float32)
  image *= np.asarray(p.inv_std, np.float32)
  return image


def train_input(p: augment.Preprocess, chip: np.ndarray, corner, flip: bool) -> np.ndarray:
  """One chip's training input for the draws (corner (y, x) of a crop_flip crop, flip)."""
  bands = list(p.bands)
  if p.train_transform == 'resize_flip':
    image = resize(chip[..., bands], p.crop_size)
  else:  # crop on the raw dtype first, so the float work is on the crop only
    (y, x), c = corner, p.crop_size
    image = chip[y:y + c, x:x + c, bands]
  if flip:
    image = image[:, ::-1]
  return normalise(p, image.astype(np.float32))


def eval_input(p: augment.Preprocess, chip: np.ndarray) -> np.ndarray:
  """One chip's evaluation input: resized whole to eval_size, normalised."""
  return normalise(p, resize(chip[..., list(p.bands)], p.eval_size))
