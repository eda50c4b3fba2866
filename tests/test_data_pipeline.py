"""rf_jax.data.pipeline: raw batches, global order, process slices, cache modes, state."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import numpy_transforms
from rf_jax import augment
from rf_jax import errors
from rf_jax import parallel
from rf_jax import runner as runner_lib
from rf_jax.data import pipeline
from rf_jax.data import planet
from rf_jax.data import prepared
from rf_jax.data import synthetic

CACHES = pipeline.CACHES


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
  """16 px course-layout (8-bit) chips."""
  root = tmp_path_factory.mktemp('tiny')
  raw = synthetic.write_dataset(root / 'raw', 30, 16, seed=9, layout='course')
  return prepared.prepare(raw, root / 'prep', layout='auto',
                          val_fraction=planet.STUDY_VAL_FRACTION,
                          split_seed=planet.STUDY_SEED)


def _loader(data, **kwargs):
  args = dict(batch_size=8, seed=0, cache='none', to_device=parallel.replicate)
  args.update(kwargs)
  return pipeline.train_loader(data, **args)


def _take(loader, n, state=None):
  if state is not None:
    loader.set_state(state)
  return [_host(next(loader)) for _ in range(n)]


def _host(batch):
  """A batch as numpy {'image', 'labels'(, 'mask')}: a device-cache batch gathered here
  (index len(split) -> zeros, as the step's gather gives)."""
  if 'cache' not in batch:
    return batch
  images, labels = (np.asarray(batch['cache'][k]) for k in ('image', 'labels'))
  index, n = batch['index'], len(images)
  pick = lambda a: np.where((index < n).reshape((-1,) + (1,) * (a.ndim - 1)),
                            a[np.minimum(index, n - 1)], 0)
  out = {'image': pick(images), 'labels': pick(labels)}
  if 'mask' in batch:
    out['mask'] = batch['mask']
  return out


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize('fixture', ['prepared_synthetic', 'tiny'])
def test_train_batches_are_the_stored_chips_reshuffled_each_epoch(fixture, request):
  """Every chip comes back as stored (dtype, all bands, full size) with its labels, once per
  epoch (the remainder of an epoch left out), in a fresh order each epoch. Both layouts."""
  data = request.getfixturevalue(fixture)
  records = _written(data, 'train')
  n, batch_size = len(records), 5
  by_bytes = {r['image'].tobytes(): i for i, r in enumerate(records)}
  per_epoch = n // batch_size
  batches = _take(_loader(data, batch_size=batch_size), 2 * per_epoch)
  seen = []
  for batch in batches:
    assert batch['image'].shape == (batch_size, data.chip_size, data.chip_size, 4)
    assert batch['image'].dtype == records[0]['image'].dtype
    assert batch['labels'].dtype == np.float32
    for image, labels in zip(batch['image'], batch['labels']):
      i = by_bytes[image.tobytes()]
      np.testing.assert_array_equal(labels, records[i]['labels'])
      seen.append(i)
  epoch1, epoch2 = seen[:per_epoch * batch_size], seen[per_epoch * batch_size:]
  assert len(set(epoch1)) == len(set(epoch2)) == per_epoch * batch_size
  assert epoch1 != epoch2


def test_global_batch_is_a_seeded_shuffle_per_epoch():
  n, b = 23, 4
  epoch = np.concatenate([pipeline.global_batch(7, n, b, s) for s in range(5)])
  assert len(set(epoch.tolist())) == 20 and set(epoch.tolist()) <= set(range(n))
  again = np.concatenate([pipeline.global_batch(7, n, b, s) for s in range(5)])
  np.testing.assert_array_equal(epoch, again)
  assert not np.array_equal(pipeline.global_batch(7, n, b, 5), epoch[:4])  # next epoch
  assert not np.array_equal(pipeline.global_batch(8, n, b, 0), epoch[:4])  # other seed


def test_loader_reads_the_global_order(prepared_synthetic):
  data = prepared_synthetic
  batches = _take(_loader(data, seed=3), 9)  # past the first epoch (40 chips / 8)
  for step, batch in enumerate(batches):
    want = [data.train[i]['image'] for i in pipeline.global_batch(3, len(data.train), 8, step)]
    np.testing.assert_array_equal(batch['image'], np.stack(want))


@pytest.mark.parametrize('cache', CACHES)
def test_process_slices_concatenate_to_the_global_batches(prepared_synthetic, cache):
  """Process p of P reads positions [p*B/P, (p+1)*B/P) of every global batch."""
  data = prepared_synthetic
  whole = _take(_loader(data, cache=cache), 7)
  for count in (2, 4):
    parts = [_take(_loader(data, cache=cache, shard_index=p, shard_count=count), 7)
             for p in range(count)]
    joined = [{k: np.concatenate([part[s][k] for part in parts]) for k in whole[s]}
              for s in range(7)]
    _assert_same(joined, whole)


@pytest.mark.parametrize('cache', CACHES)
def test_cache_modes_give_identical_batches(prepared_synthetic, cache):
  data = prepared_synthetic
  want = _take(_loader(data, cache='none', seed=2), 12)
  _assert_same(_take(_loader(data, cache=cache, seed=2), 12), want)
  evals = lambda c: [_host(b) for b in pipeline.eval_batches(
      data, 'validation', batch_size=8, cache=c, to_device=parallel.replicate)]
  _assert_same(evals(cache), evals('none'))


def test_host_cache_holds_the_split_in_one_array(prepared_synthetic):
  images, labels = pipeline.read_split(prepared_synthetic.train, threads=2)
  assert images.shape == (len(prepared_synthetic.train), 128, 128, 4)
  assert images.dtype == np.uint16 and labels.shape == (len(images), 17)
  for i in (0, len(images) - 1):
    np.testing.assert_array_equal(images[i], prepared_synthetic.train[i]['image'])
  batch = next(_loader(prepared_synthetic, cache='device'))
  assert set(batch) == {'index', 'cache'} and batch['index'].dtype == np.int32
  assert isinstance(batch['cache']['image'], jax.Array)
  np.testing.assert_array_equal(np.asarray(batch['cache']['image']), images)


@pytest.mark.parametrize('cache', CACHES)
def test_resume_continues_exactly_on_any_process_count(prepared_synthetic, cache):
  data = prepared_synthetic
  loader = _loader(data, cache=cache, seed=4)
  _take(loader, 7)
  state = loader.get_state()
  assert json.loads(state.decode())['step'] == 7  # JSON, for checkpoints
  expected = _take(loader, 3)
  _assert_same(_take(_loader(data, cache=cache, seed=4), 3, state=state), expected)
  halves = [_take(_loader(data, cache=cache, seed=4, shard_index=p, shard_count=2), 3,
                  state=state) for p in range(2)]
  for s in range(3):
    np.testing.assert_array_equal(
        np.concatenate([h[s]['image'] for h in halves]), expected[s]['image'])


@pytest.mark.parametrize('cache', ('none', 'host'))
def test_batches_reach_the_cpu_device_without_a_copy(prepared_synthetic, cache):
  """Batches are 64-byte aligned, so XLA:CPU adopts them as they are; the host cache hands an
  evaluation batch over as a read-only view of the held split (no copy either)."""
  runner = runner_lib.create_runner('jit', tta='none')  # only its put_batch is used
  train = next(_loader(prepared_synthetic, cache=cache))
  evaluation = next(iter(pipeline.eval_batches(prepared_synthetic, 'validation', batch_size=8,
                                               cache=cache)))
  for batch in (train, evaluation):
    placed = runner.put_batch(batch)[0]['image']
    first = placed.addressable_shards[0]
    assert first.index[0].start in (0, None)
    assert first.data.unsafe_buffer_pointer() == batch['image'].ctypes.data
  held_view = not evaluation['image'].flags.owndata and not evaluation['image'].flags.writeable
  assert held_view == (cache == 'host')


def test_reader_threads_read_the_same_batches(prepared_synthetic):
  _assert_same(_take(_loader(prepared_synthetic, threads=3), 6),
               _take(_loader(prepared_synthetic, threads=0), 6))


def test_state_from_other_dataset_or_order_is_refused(prepared_synthetic, tiny):
  """Each a user's error (one line from the CLI), naming what differs and what to do."""
  loader = _loader(tiny, batch_size=2)
  next(loader)
  state = loader.get_state()
  assert 'planet_amazon/course16_' in state.decode()
  with pytest.raises(ValueError, match='in checkpoint does not match') as raised:
    _loader(prepared_synthetic, batch_size=2).set_state(state)
  message = str(raised.value)
  for data in (tiny, prepared_synthetic):  # both datasets named
    assert f'planet_amazon/{Path(data.data_dir).parent.name}/train' in message
  assert 'config.data.raw_dir' in message and '--workdir' in message
  with pytest.raises(ValueError, match='in checkpoint does not match') as raised:
    _loader(tiny, batch_size=2, seed=1).set_state(state)
  assert 'config.seed was 0, is 1' in str(raised.value) and '--workdir' in str(raised.value)
  with pytest.raises(ValueError, match='older version') as raised:
    _loader(tiny, batch_size=2).set_state(b'{"last_seen_indices": {"0": 3}}')
  assert isinstance(raised.value, errors.UserError)


@pytest.mark.parametrize('fixture', ['prepared_synthetic', 'tiny'])
def test_eval_round_trip_order_mask_padding(fixture, request):
  data = request.getfixturevalue(fixture)
  records = _written(data, 'validation')
  size = data.chip_size
  batches = list(pipeline.eval_batches(data, 'validation', batch_size=8))
  assert len(batches) == -(-len(records) // 8)
  for b in batches:
    assert b['image'].shape == (8, size, size, 4) and b['mask'].shape == (8,)
    assert b['labels'].shape == (8, 17) and b['image'].dtype == records[0]['image'].dtype
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == len(records) and (mask[:len(records)] == 1).all()
  images = np.concatenate([b['image'] for b in batches])
  labels = np.concatenate([b['labels'] for b in batches])
  for i, r in enumerate(records):
    np.testing.assert_array_equal(images[i], r['image'])
    np.testing.assert_array_equal(labels[i], r['labels'])
  assert not images[len(records):].any() and not labels[len(records):].any()


@pytest.mark.parametrize('cache', CACHES)
def test_eval_process_slices_concatenate_to_the_global_batches(prepared_synthetic, cache):
  """20 validation chips in batches of 8: process 1 of 2's slice of the last batch (positions
  20..23 past 16..19) is padding only, and still comes, so that every process steps together."""
  data = prepared_synthetic
  assert len(data.validation) == 20
  run = lambda p, count: [_host(b) for b in pipeline.eval_batches(
      data, 'validation', batch_size=8, cache=cache, shard_index=p, shard_count=count,
      to_device=parallel.replicate)]
  whole, parts = run(0, 1), [run(p, 2) for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole) == 3
  assert not parts[1][-1]['mask'].any()
  joined = [{k: np.concatenate([part[s][k] for part in parts]) for k in whole[s]}
            for s in range(3)]
  _assert_same(joined, whole)


def test_cache_that_does_not_fit_is_one_clear_error(tiny, monkeypatch):
  monkeypatch.setattr(pipeline, 'available_host_bytes', lambda: 1000)
  n = len(tiny.validation)
  # device on CPU: the first device adopts the staged array, each further one copies it
  for cache, needed in (('host', 1), ('device', jax.local_device_count())):
    with pytest.raises(planet.PlanetDataError) as raised:
      pipeline.eval_batches(tiny, 'validation', batch_size=4, cache=cache,
                            to_device=parallel.replicate)
    message = str(raised.value)
    assert f"config.data.cache='{cache}'" in message and f'{n:,} chips x 16x16x4 uint8' in message
    assert f'{n * 16 * 16 * 4 * needed / 1e9:.3g} GB of host RAM, 1e-06 GB available' in message
    assert '--config.data.cache=' in message


def test_a_run_is_refused_when_its_splits_do_not_fit_together(tiny, monkeypatch, tmp_path):
  """Each split alone fits, both do not: a training run is refused before its model is built
  and before the training split is read, not when the validation split comes after it."""
  from rf_jax import train  # pylint: disable=g-import-not-at-top
  import tiny_configs  # pylint: disable=g-import-not-at-top
  chip = tiny.train[0]['image'].nbytes
  monkeypatch.setattr(pipeline, 'available_host_bytes',
                      lambda: chip * (len(tiny.train) + len(tiny.validation) // 2))
  config = tiny_configs.tiny('rgb', tmp_path, tmp_path)
  config.batch_size, config.data.crop_size = 4, tiny.chip_size
  config.data.cache = 'host'
  with pytest.raises(planet.PlanetDataError) as raised:
    train._check_data_fits(config, tiny)
  assert (f'whole train ({len(tiny.train):,} chips) and validation ({len(tiny.validation):,} '
          'chips) splits') in str(raised.value)
  config.data.cache = 'none'
  train._check_data_fits(config, tiny)  # nothing held: nothing to check
  pipeline.eval_batches(tiny, 'validation', batch_size=4, cache='host')  # alone it fits


def test_bad_arguments(prepared_synthetic):
  with pytest.raises(ValueError, match='cache'):
    _loader(prepared_synthetic, cache='disk')
  with pytest.raises(ValueError, match='shard_count'):
    _loader(prepared_synthetic, batch_size=6, shard_count=4)
  with pytest.raises(errors.UserError, match=r'config\.batch_size=41 exceeds the 40 training '
                     r'chips .*: lower --config\.batch_size') as raised:
    _loader(prepared_synthetic, batch_size=41)
  assert isinstance(raised.value, ValueError)
  with pytest.raises(ValueError, match='split'):
    pipeline.eval_batches(prepared_synthetic, 'nope', batch_size=2)


def test_steps_per_epoch(prepared_synthetic):
  assert prepared.steps_per_epoch(prepared_synthetic, 8) == len(prepared_synthetic.train) // 8


@pytest.mark.parametrize('size, out', [(256, 224), (128, 112), (64, 100), (50, 37)])
def test_resize_matches_torchvision_antialias(size, out):
  """The host resize the loaders ran and the device resize the steps run now."""
  torch = pytest.importorskip('torch')
  tf = pytest.importorskip('torchvision.transforms.functional')
  x = np.random.default_rng(0).uniform(0, 5000, (size, size, 4)).astype(np.float32)
  ref = tf.resize(torch.from_numpy(x).permute(2, 0, 1), [out, out],
                  antialias=True).permute(1, 2, 0).numpy()
  np.testing.assert_allclose(numpy_transforms.resize(x, out), ref, rtol=0, atol=0.1)
  np.testing.assert_allclose(augment.resize(x[None], out)[0], ref, rtol=0, atol=0.1)
