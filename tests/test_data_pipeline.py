"""rf_jax.data.pipeline: train/eval batches, round trip, determinism, state."""

import json
from pathlib import Path

import numpy as np
import pytest

from rf_jax.data import pipeline
from rf_jax.data import prepared
from rf_jax.data import planet
from rf_jax.data import synthetic

ALL = (0, 1, 2, 3)


def _denormalise(data, image, bands=ALL):
  raw = image / (1.0 / data.std[list(bands)]) + data.mean[list(bands)]
  return np.rint(raw).astype(np.int64)


def _chips(data, split):
  source = getattr(data, split)
  return [source[i] for i in range(len(source))]


def _written(data, split):
  """The chips and labels as written on disk (not via the prepared data)."""
  meta = json.loads((Path(data.data_dir) / 'metadata.json').read_text())
  raw = Path(meta['source_dir'])
  names, labels = planet.read_labels(raw / 'train_v2.csv')
  row = {n: i for i, n in enumerate(names)}
  return [{'image': planet.read_chip(raw / 'train-tif-v2' / f'{n}.tif'),
           'labels': labels[row[n]]} for n in data.names[split]]


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """16 px course-layout chips: crops can be located by brute force."""
  root = tmp_path_factory.mktemp('tiny')
  raw = synthetic.write_dataset(root / 'raw', 30, 16, seed=9, layout='course')
  return prepared.prepare(raw, root / 'prep', layout='auto',
                          val_fraction=planet.STUDY_VAL_FRACTION,
                          split_seed=planet.STUDY_SEED)


def _take(loader, n, state=None):
  it = iter(loader)
  if state is not None:
    it.set_state(state)
  return [next(it) for _ in range(n)]


def _loader(data, **kwargs):
  args = dict(batch_size=8, image_size=data.chip_size, bands=ALL, seed=0,
              transform='crop_flip', normalisation='dataset', num_workers=0)
  args.update(kwargs)
  return pipeline.train_loader(data, **args)


@pytest.mark.parametrize('fixture', ['prepared_synthetic', 'tiny'])
def test_train_round_trip_exact_chips_and_epochs(fixture, request):
  """Full-size crops: every chip comes back (maybe flipped) with its labels,
  once per epoch, in a fresh order each epoch. Both layouts."""
  data = request.getfixturevalue(fixture)
  records = _written(data, 'train')
  n = len(records)
  by_key = {}
  for i, r in enumerate(records):
    by_key[r['image'].astype(np.int64).tobytes()] = (i, False)
    by_key[r['image'][:, ::-1].astype(np.int64).tobytes()] = (i, True)
  batches = _take(_loader(data, batch_size=5), 2 * n // 5)
  seen = []
  for batch in batches:
    assert batch['image'].shape == (5, data.chip_size, data.chip_size, 4)
    assert batch['image'].dtype == np.float32
    for image, labels in zip(batch['image'], batch['labels']):
      i, flipped = by_key[_denormalise(data, image).tobytes()]
      np.testing.assert_array_equal(labels, records[i]['labels'])
      seen.append((i, flipped))
  epoch1, epoch2 = [i for i, _ in seen[:n]], [i for i, _ in seen[n:]]
  assert sorted(epoch1) == sorted(epoch2) == list(range(n))
  assert epoch1 != epoch2  # reshuffled each epoch
  flips = [f for _, f in seen]
  assert any(flips) and not all(flips)


def test_train_crops_are_windows_of_the_chip(tiny):
  records = _chips(tiny, 'train')
  batches = _take(_loader(tiny, image_size=12, bands=(3, 0)), 4)
  offsets = set()
  for image in np.concatenate([b['image'] for b in batches]):
    assert image.shape == (12, 12, 2)
    crop = _denormalise(tiny, image, (3, 0))
    found = [(y, x, f) for r in records for f in (False, True)
             for y in range(5) for x in range(5)
             if np.array_equal(
                 (r['image'][:, ::-1] if f else r['image'])[y:y + 12, x:x + 12]
                 [..., [3, 0]], crop)]
    assert found
    offsets.add(found[0][:2])
  assert len(offsets) > 3


def _eval_images(data, split, image_size, bands=ALL, normalisation='dataset'):
  batches = pipeline.eval_batches(data, split, batch_size=8,
                                  image_size=image_size, bands=bands,
                                  normalisation=normalisation)
  images = np.concatenate([b['image'] for b in batches])
  return images[:len(getattr(data, split))]


def test_train_resize_flip_is_the_eval_resize_maybe_flipped(prepared_synthetic):
  """'resize_flip' (the study's train transform): every image is exactly the
  evaluation input of one training chip, mirrored or not, with its labels."""
  data = prepared_synthetic
  resized = _eval_images(data, 'train', 112, bands=(3, 0, 1))
  labels = [data.train[i]['labels'] for i in range(len(data.train))]
  by_key = {}
  for i, image in enumerate(resized):
    by_key[image.tobytes()] = (i, False)
    by_key[np.ascontiguousarray(image[:, ::-1]).tobytes()] = (i, True)
  batches = _take(_loader(data, batch_size=8, image_size=112, bands=(3, 0, 1),
                          transform='resize_flip'), 5)
  flips = []
  for batch in batches:
    assert batch['image'].shape == (8, 112, 112, 3)
    for image, label in zip(batch['image'], batch['labels']):
      i, flipped = by_key[np.ascontiguousarray(image).tobytes()]
      np.testing.assert_array_equal(label, labels[i])
      flips.append(flipped)
  assert any(flips) and not all(flips)


@pytest.mark.parametrize('transform', pipeline.TRAIN_TRANSFORMS)
def test_train_deterministic_and_seeded(prepared_synthetic, transform):
  a = _take(_loader(prepared_synthetic, image_size=96, seed=1,
                    transform=transform), 6)
  b = _take(_loader(prepared_synthetic, image_size=96, seed=1,
                    transform=transform), 6)
  c = _take(_loader(prepared_synthetic, image_size=96, seed=2,
                    transform=transform), 6)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['labels'], y['labels'])
  assert not np.array_equal(a[0]['image'], c[0]['image'])


def test_restored_iterator_continues_with_next_batch(prepared_synthetic):
  loader = _loader(prepared_synthetic, image_size=96, bands=(0, 1, 2), seed=4)
  it = iter(loader)
  for _ in range(7):  # past the first epoch boundary (40 chips / 8)
    next(it)
  state = it.get_state()
  assert isinstance(json.loads(state.decode()), dict)  # JSON, for checkpoints
  expected = [next(it) for _ in range(3)]
  restored = _take(loader, 3, state=state)
  for x, y in zip(expected, restored):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['labels'], y['labels'])


def test_shards_are_disjoint(prepared_synthetic):
  data = prepared_synthetic
  seen = []
  for shard in range(2):
    loader = _loader(data, batch_size=4, shard_index=shard, shard_count=2)
    batches = _take(loader, len(data.train) // 2 // 4)
    seen.append({_denormalise(data, im).tobytes()
                 for b in batches for im in b['image']})
  assert not seen[0] & seen[1]


@pytest.mark.parametrize('fixture', ['prepared_synthetic', 'tiny'])
def test_eval_round_trip_order_mask_padding(fixture, request):
  data = request.getfixturevalue(fixture)
  records = _written(data, 'validation')
  size = data.chip_size
  batches = list(pipeline.eval_batches(data, 'validation', batch_size=8,
                                       image_size=data.chip_size, bands=ALL,
                                       normalisation='dataset'))
  assert len(batches) == -(-len(records) // 8)
  for b in batches:
    assert b['image'].shape == (8, size, size, 4) and b['mask'].shape == (8,)
    assert b['labels'].shape == (8, 17) and b['image'].dtype == np.float32
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == len(records) and (mask[:len(records)] == 1).all()
  images = np.concatenate([b['image'] for b in batches])
  labels = np.concatenate([b['labels'] for b in batches])
  for i, r in enumerate(records):
    np.testing.assert_array_equal(_denormalise(data, images[i]), r['image'])
    np.testing.assert_array_equal(labels[i], r['labels'])
  assert not images[len(records):].any() and not labels[len(records):].any()


def test_eval_resizes_and_selects_bands(prepared_synthetic):
  data = prepared_synthetic
  batch = next(pipeline.eval_batches(data, 'test', batch_size=4, image_size=112,
                                     bands=(3,), normalisation='dataset'))
  assert batch['image'].shape == (4, 112, 112, 1)
  chip = data.test[0]['image'][..., 3:].astype(np.float32)
  want = (pipeline.resize(chip, 112) - data.mean[3]) / data.std[3]
  np.testing.assert_allclose(batch['image'][0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('size, out', [(256, 224), (128, 112), (64, 100),
                                       (50, 37)])
def test_resize_matches_torchvision_antialias(size, out):
  torch = pytest.importorskip('torch')
  tf = pytest.importorskip('torchvision.transforms.functional')
  x = np.random.default_rng(0).uniform(0, 5000, (size, size, 4))
  x = x.astype(np.float32)
  ref = tf.resize(torch.from_numpy(x).permute(2, 0, 1), [out, out],
                  antialias=True).permute(1, 2, 0).numpy()
  np.testing.assert_allclose(pipeline.resize(x, out), ref, rtol=0, atol=0.1)


def test_resize_identity_and_constant():
  x = np.random.default_rng(0).uniform(0, 100, (20, 20, 2)).astype(np.float32)
  np.testing.assert_array_equal(pipeline.resize(x, 20), x)
  np.testing.assert_allclose(pipeline.resize(np.full((50, 50, 1), 7.0), 13),
                             7.0, rtol=1e-6)


def test_bad_arguments(prepared_synthetic):
  with pytest.raises(ValueError, match='bands'):
    _loader(prepared_synthetic, bands=(0, 4))
  with pytest.raises(ValueError, match='image_size'):
    _loader(prepared_synthetic, image_size=129)
  with pytest.raises(ValueError, match='transform'):
    _loader(prepared_synthetic, transform='zoom')
  with pytest.raises(ValueError, match='normalisation'):
    _loader(prepared_synthetic, normalisation='imagenet')
  with pytest.raises(ValueError, match='split'):
    next(pipeline.eval_batches(prepared_synthetic, 'nope', batch_size=2,
                               image_size=8, bands=ALL,
                               normalisation='dataset'))


# The course's constants (R, G, B, NIR), written out independently of planet.py.
COURSE_MEAN = np.array([0.7476, 0.6534, 0.4757, 0.0960])
COURSE_STD = np.array([0.1677, 0.1828, 0.2137, 0.0284])


@pytest.mark.parametrize('bands', [ALL, (3, 0)])
def test_course_normalisation(tiny, bands):
  """'course': 8-bit chips / 255, minus the course's mean, over its std."""
  bands = list(bands)
  want = [(r['image'][..., bands] / 255.0 - COURSE_MEAN[bands])
          / COURSE_STD[bands] for r in _written(tiny, 'validation')]
  got = _eval_images(tiny, 'validation', tiny.chip_size, bands, 'course')
  np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-5)
  assert got.dtype == np.float32
  # Training normalises the same way (full-size resize: the chip itself).
  written = _written(tiny, 'train')
  want = [(r['image'][..., bands] / 255.0 - COURSE_MEAN[bands])
          / COURSE_STD[bands] for r in written]
  batch = _take(_loader(tiny, bands=bands, transform='resize_flip',
                        normalisation='course', batch_size=len(written)), 1)[0]
  for image in batch['image']:
    assert any(np.allclose(image, w[:, ::-1] if flip else w, rtol=1e-5,
                           atol=1e-5) for w in want for flip in (False, True))


def test_course_normalisation_of_kaggle_chips_is_refused(prepared_synthetic):
  data = prepared_synthetic
  assert data.layout == 'kaggle'
  fix = r"config.data.normalisation='course'.*set config.data.normalisation='dataset'"
  with pytest.raises(planet.PlanetDataError, match=fix):
    _loader(data, normalisation='course')
  with pytest.raises(planet.PlanetDataError, match=fix):
    next(pipeline.eval_batches(data, 'validation', batch_size=2, image_size=96,
                               bands=ALL, normalisation='course'))


def test_steps_per_epoch(prepared_synthetic):
  assert prepared.steps_per_epoch(prepared_synthetic, 8) == \
      len(prepared_synthetic.train) // 8


def _records(batches):
  return sorted(im.tobytes() for b in batches for im in b['image'])


def test_workers_deterministic_same_records_and_restore(prepared_synthetic):
  """2 worker processes: batches depend only on the seed (and the worker
  count, which decides how grain groups records into batches); per-record
  crops are the same as without workers; state restores exactly."""
  data = prepared_synthetic
  kwargs = dict(image_size=96, seed=5, batch_size=4)
  loader = _loader(data, num_workers=2, **kwargs)
  it = iter(loader)
  first = [next(it) for _ in range(10)]
  state = it.get_state()
  expected = next(it)
  restored = _take(loader, 1, state=state)[0]
  np.testing.assert_array_equal(expected['image'], restored['image'])
  again = _take(loader, 10)
  for x, y in zip(first, again):
    np.testing.assert_array_equal(x['image'], y['image'])
  serial = _take(_loader(data, num_workers=0, **kwargs), 10)
  assert _records(first) == _records(serial)


def test_workers_resize_flip_same_records(prepared_synthetic):
  """The study's transform flips each record as without workers too."""
  kwargs = dict(image_size=96, seed=5, batch_size=4, transform='resize_flip')
  parallel = _take(_loader(prepared_synthetic, num_workers=2, **kwargs), 10)
  serial = _take(_loader(prepared_synthetic, num_workers=0, **kwargs), 10)
  assert _records(parallel) == _records(serial)


def test_state_from_other_dataset_is_refused(prepared_synthetic, tiny):
  it = iter(_loader(tiny, batch_size=2))
  next(it)
  state = it.get_state()
  assert 'planet_amazon/course16_' in state.decode()
  with pytest.raises(ValueError, match='in checkpoint does not match'):
    iter(_loader(prepared_synthetic, batch_size=2)).set_state(state)
