"""rf_jax.augment: the model's input made on device equals the host's numpy transforms
(tests/numpy_transforms.py) for the same draws; the draws depend only on (seed, step,
position in the global batch)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_transforms
from rf_jax import augment
from rf_jax.data import planet

STATS = dict(mean=np.array([1000, 1200, 900, 3000], np.float32),
             std=np.array([300, 250, 280, 800], np.float32))


@dataclasses.dataclass
class _Data:
  """The fields of prepared.PlanetData that preprocessing reads."""
  layout: str
  chip_size: int = 128
  mean: np.ndarray = dataclasses.field(default_factory=lambda: STATS['mean'])
  std: np.ndarray = dataclasses.field(default_factory=lambda: STATS['std'])
  data_dir: str = '/prepared/planet'


def _preprocess(transform='crop_flip', bands=(0, 1, 2, 3), crop=96, size=112, layout='kaggle',
                normalisation='dataset', dtype='float32', seed=5):
  return augment.create(_Data(layout), bands=bands, normalisation_name=normalisation,
                        train_transform=transform, crop_size=crop, eval_size=size, seed=seed,
                        dtype=dtype)


def _chips(n=8, size=128, dtype=np.uint16, seed=0):
  high = 256 if dtype == np.uint8 else 20000
  return np.random.default_rng(seed).integers(0, high, (n, size, size, 4)).astype(dtype)


def _train_input(p, chips, step, positions):
  return jax.jit(augment.train_input, static_argnums=0)(p, chips, step, positions)


def _reference_train(p, chips, step, positions):
  keys = augment.example_keys(p.seed, step, jnp.asarray(positions))
  corners, flips = map(np.asarray, augment.draws(keys, chips.shape[1], p.crop_size))
  return np.stack([numpy_transforms.train_input(p, chip, corner, flip)
                   for chip, corner, flip in zip(chips, corners, flips)]), corners, flips


@pytest.mark.parametrize('bands', [(0, 1, 2, 3), (0, 1, 2), (3, 0)])
@pytest.mark.parametrize('dtype', [np.uint16, np.uint8])
def test_crop_flip_equals_numpy_reference(bands, dtype):
  p = _preprocess('crop_flip', bands=bands, layout='course' if dtype == np.uint8 else 'kaggle')
  chips, positions = _chips(dtype=dtype), np.arange(8)
  got = np.asarray(_train_input(p, chips, 3, positions))
  want, corners, flips = _reference_train(p, chips, 3, positions)
  assert got.shape == (8, 96, 96, len(bands)) and got.dtype == np.float32
  np.testing.assert_array_equal(got, want)
  assert 0 < flips.sum() < 8 and len({tuple(c) for c in corners}) > 4
  assert corners.min() >= 0 and corners.max() <= 128 - 96


@pytest.mark.parametrize('bands', [(0, 1, 2, 3), (3, 0)])
def test_resize_flip_equals_numpy_reference_within_rounding(bands):
  """The resize is two matrix products on device, gathered taps on the host: the same sums
  in another order, so equal within float32 rounding (~1e-7 relative to the raw values)."""
  p = _preprocess('resize_flip', bands=bands, crop=112)
  chips, positions = _chips(), np.arange(8)
  got = np.asarray(_train_input(p, chips, 11, positions))
  want, _, flips = _reference_train(p, chips, 11, positions)
  assert 0 < flips.sum() < 8
  # 20000 raw units * 4e-7 = 0.008 raw units, / std (>= 250) in normalised units.
  np.testing.assert_allclose(got, want, rtol=0, atol=4e-5)
  mirrored = np.asarray(_train_input(dataclasses.replace(p, seed=6), chips, 11, positions))
  assert not np.allclose(mirrored, got)  # the seed draws other flips


def test_resize_flip_is_the_eval_input_flipped_or_not():
  """The study's training input: the evaluation resize of the same chip, mirrored where the
  draw says so, so training and evaluation see the same scale."""
  p = _preprocess('resize_flip', crop=112, size=112)
  chips, positions = _chips(), np.arange(8)
  got = np.asarray(_train_input(p, chips, 4, positions))
  evaluated = np.asarray(jax.jit(augment.eval_input, static_argnums=0)(p, chips))
  _, flips = augment.draws(augment.example_keys(p.seed, 4, jnp.asarray(positions)), 128, 112)
  flips = np.asarray(flips)
  assert 0 < flips.sum() < 8
  np.testing.assert_array_equal(got[~flips], evaluated[~flips])
  np.testing.assert_array_equal(got[flips], evaluated[flips][:, :, ::-1])


def test_draws_depend_on_seed_step_and_global_position_only():
  """A device holding positions 4..7 of the global batch draws what a single device draws for
  them; another step or seed draws otherwise."""
  p = _preprocess('crop_flip')
  chips = _chips()
  whole = np.asarray(_train_input(p, chips, 7, np.arange(8)))
  second_half = np.asarray(_train_input(p, chips[4:], 7, np.arange(4, 8)))
  np.testing.assert_array_equal(second_half, whole[4:])
  assert not np.array_equal(np.asarray(_train_input(p, chips, 8, np.arange(8))), whole)
  assert not np.array_equal(np.asarray(_train_input(p, chips[4:], 7, np.arange(4))), whole[4:])


def test_flips_are_fair_and_corners_cover_the_chip():
  keys = augment.example_keys(321, 0, jnp.arange(4000))
  corners, flips = map(np.asarray, augment.draws(keys, 256, 224))
  assert abs(flips.mean() - 0.5) < 0.03
  assert corners.min() == 0 and corners.max() == 32
  assert abs(corners.mean() - 16) < 0.5


@pytest.mark.parametrize('size', [112, 128])
def test_eval_input_equals_numpy_reference(size):
  p = _preprocess(bands=(3, 0, 1), size=size)
  chips = _chips(4)
  got = np.asarray(jax.jit(augment.eval_input, static_argnums=0)(p, chips))
  want = np.stack([numpy_transforms.eval_input(p, chip) for chip in chips])
  assert got.shape == (4, size, size, 3)
  np.testing.assert_allclose(got, want, rtol=0, atol=4e-5)


@pytest.mark.parametrize('size, out', [(256, 224), (128, 96), (64, 100)])
def test_device_resize_equals_host_resize(size, out):
  x = _chips(2, size)
  got = np.asarray(jax.jit(augment.resize, static_argnums=1)(x, out))
  want = np.stack([numpy_transforms.resize(chip, out) for chip in x])
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-3)  # raw units up to 20000


def test_bfloat16_input_is_the_float32_input_cast():
  chips = _chips(4)
  f32 = _train_input(_preprocess(), chips, 0, np.arange(4))
  bf16 = _train_input(_preprocess(dtype='bfloat16'), chips, 0, np.arange(4))
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(bf16), np.asarray(f32.astype(jnp.bfloat16)))


# The course's constants (R, G, B, NIR), written out independently of planet.py.
COURSE_MEAN = np.array([0.7476, 0.6534, 0.4757, 0.0960])
COURSE_STD = np.array([0.1677, 0.1828, 0.2137, 0.0284])


@pytest.mark.parametrize('bands', [(0, 1, 2, 3), (3, 0)])
def test_course_normalisation(bands):
  """'course': 8-bit chips / 255, minus the course's mean, over its std."""
  p = _preprocess(bands=bands, size=128, layout='course', normalisation='course')
  chips = _chips(3, dtype=np.uint8)
  want = (chips[..., list(bands)] / 255.0 - COURSE_MEAN[list(bands)]) / COURSE_STD[list(bands)]
  got = jax.jit(augment.eval_input, static_argnums=0)(p, chips)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dataset_normalisation_uses_the_training_split_statistics():
  p = _preprocess(bands=(3, 1), size=128)
  chips = _chips(2)
  want = (chips[..., [3, 1]] - STATS['mean'][[3, 1]]) / STATS['std'][[3, 1]]
  got = jax.jit(augment.eval_input, static_argnums=0)(p, chips)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_course_normalisation_of_kaggle_chips_is_refused():
  fix = r"config.data.normalisation='course'.*set config.data.normalisation='dataset'"
  with pytest.raises(planet.PlanetDataError, match=fix):
    _preprocess(normalisation='course', layout='kaggle')


def test_bad_arguments():
  with pytest.raises(ValueError, match='bands'):
    _preprocess(bands=(0, 4))
  with pytest.raises(ValueError, match='image_size'):
    _preprocess(crop=129)
  with pytest.raises(ValueError, match='transform'):
    _preprocess(transform='zoom')
  with pytest.raises(ValueError, match='normalisation'):
    _preprocess(normalisation='imagenet')
