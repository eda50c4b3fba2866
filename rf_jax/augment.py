"""The model's input made on device: band selection, augmentation, resize, normalisation.

The loaders (data/pipeline.py) hand over chips as stored (uint16 Kaggle / uint8 course, all
four bands, full size); the jitted steps turn them into the model's input with these pure
functions, so the host does no per-chip float work. A training example's random draws depend
only on (seed, step, its position in the GLOBAL batch): a resumed run draws the same
augmentations, and how the batch is sharded over devices or processes changes nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rf_jax.data import planet
from rf_jax.data import prepared

# config.data.train_transform: the whole chip resized (the study's code) or a random crop.
TRAIN_TRANSFORMS = ('resize_flip', 'crop_flip')
# config.data.normalisation: train-split band statistics, or the course's constants (8-bit chips).
NORMALISATIONS = ('dataset', 'course')


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """How raw chips become the model's input; hashable, so the steps take it as configuration.

  `mean` and `inv_std` are per selected band, in the chips' raw units.
  """
  bands: tuple[int, ...]
  mean: tuple[float, ...]
  inv_std: tuple[float, ...]
  train_transform: str  # TRAIN_TRANSFORMS
  crop_size: int  # the training input size
  eval_size: int  # evaluation resizes the whole chip to this
  seed: int  # of the training draws
  dtype: str = 'float32'  # the model's input dtype; normalisation is float32


def normalisation(data: prepared.PlanetData, bands: Sequence[int],
                  name: str) -> tuple[np.ndarray, np.ndarray]:
  """float32 (mean, 1/std) of `bands` (indices into R,G,B,NIR) in raw units for `name` of
  NORMALISATIONS: 'dataset' is the training split's band statistics, 'course' the course's
  constants on 8-bit chips / 255."""
  bands = list(bands)
  if not bands or any(b not in range(4) for b in bands):
    raise ValueError(f'bands must be indices into R,G,B,NIR, got {bands}')
  if name == 'dataset':
    mean, std = data.mean, data.std
  elif name == 'course':
    if data.layout != 'course':
      raise planet.PlanetDataError(
          f"config.data.normalisation='course' needs the course layout's 8-bit chips, and "
          f'{data.data_dir} holds {data.layout}-layout chips: set '
          "config.data.normalisation='dataset' (the training split's band statistics)")
    # (x / 255 - mean) / std, applied to x in raw units.
    mean = np.multiply(planet.COURSE_MEAN, planet.COURSE_PIXEL_MAX)
    std = np.multiply(planet.COURSE_STD, planet.COURSE_PIXEL_MAX)
  else:
    raise ValueError(f'normalisation must be one of {NORMALISATIONS}, got {name!r}')
  return (np.asarray(mean, np.float32)[bands],
          np.float32(1.0) / np.asarray(std, np.float32)[bands])


def create(data: prepared.PlanetData, *, bands: Sequence[int], normalisation_name: str,
           train_transform: str, crop_size: int, eval_size: int, seed: int,
           dtype: str = 'float32') -> Preprocess:
  """The Preprocess of a dataset, its sizes checked against the chips."""
  if train_transform not in TRAIN_TRANSFORMS:
    raise ValueError(f'transform must be one of {TRAIN_TRANSFORMS}, got {train_transform!r}')
  if train_transform == 'crop_flip' and not 0 < crop_size <= data.chip_size:
    raise ValueError(f'image_size {crop_size} must be in 1..{data.chip_size} (the chip size) '
                     'to crop')
  if crop_size < 1 or eval_size < 1:
    raise ValueError(f'image sizes must be >= 1, got {crop_size} and {eval_size}')
  mean, inv_std = normalisation(data, bands, normalisation_name)
  return Preprocess(tuple(int(b) for b in bands), tuple(mean.tolist()), tuple(inv_std.tolist()),
                    train_transform, crop_size, eval_size, seed, dtype)


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


def resize(images: jax.Array, size: int) -> jax.Array:
  """[B, H, W, C] (any dtype) -> float32 [B, size, size, C], separable antialiased bilinear:
  two matrix products with resize_matrix, at full float32 precision (a GPU's default TF32
  would round uint16 values by several units)."""
  _, h, w, _ = images.shape
  images = images.astype(jnp.float32)
  if (h, w) == (size, size):
    return images
  highest = jax.lax.Precision.HIGHEST
  rows = jnp.einsum('oh,bhwc->bowc', resize_matrix(h, size), images, precision=highest)
  return jnp.einsum('pw,bowc->bopc', resize_matrix(w, size), rows, precision=highest)


def select_bands(images: jax.Array, bands: tuple[int, ...]) -> jax.Array:
  """The `bands` channels; a slice when they are consecutive (no gather)."""
  if bands == tuple(range(bands[0], bands[-1] + 1)):
    return images[..., bands[0]:bands[-1] + 1]
  return images[..., list(bands)]


def normalise(p: Preprocess, images: jax.Array) -> jax.Array:
  """float32 (x - mean) / std, as the host did it, then cast to the model's dtype."""
  mean, inv_std = np.asarray(p.mean, np.float32), np.asarray(p.inv_std, np.float32)
  return ((images.astype(jnp.float32) - mean) * inv_std).astype(p.dtype)


def example_keys(seed: int, step, positions: jax.Array) -> jax.Array:
  """One key per example: the seed folded with the global step, then with the example's
  position in the global batch."""
  key = jax.random.fold_in(jax.random.key(seed), step)
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(positions)


def draws(keys: jax.Array, chip_size: int, crop_size: int) -> tuple[jax.Array, jax.Array]:
  """Per example: the crop's top-left corner int32 [B, 2] (used by 'crop_flip') and whether
  to mirror it horizontally, bool [B] (probability 0.5)."""

  def one(key):
    crop_key, flip_key = jax.random.split(key)
    corner = jax.random.randint(crop_key, (2,), 0, max(chip_size - crop_size, 0) + 1)
    return corner, jax.random.bernoulli(flip_key)

  return jax.vmap(one)(keys)


def _mirror(images: jax.Array, flips: jax.Array) -> jax.Array:
  return jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)


def train_input(p: Preprocess, chips: jax.Array, step, positions: jax.Array) -> jax.Array:
  """Raw chips [B, S, S, 4] -> the training input [B, crop, crop, bands] (p.dtype).

  `positions`: each example's index in the global batch (with `step`, its draws).
  """
  corners, flips = draws(example_keys(p.seed, step, positions), chips.shape[1], p.crop_size)
  chips = select_bands(chips, p.bands)
  if p.train_transform == 'resize_flip':
    images = resize(chips, p.crop_size)
  else:  # crop_flip: crop the raw chips, so the float work is on the crop only
    c = p.crop_size
    crop = lambda chip, yx: jax.lax.dynamic_slice(chip, (yx[0], yx[1], 0),
                                                  (c, c, chip.shape[-1]))
    images = jax.vmap(crop)(chips, corners)
  return normalise(p, _mirror(images, flips))


def eval_input(p: Preprocess, chips: jax.Array) -> jax.Array:
  """Raw chips -> the evaluation input: the whole chip resized to eval_size, normalised."""
  return normalise(p, resize(select_bands(chips, p.bands), p.eval_size))

