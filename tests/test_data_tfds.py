"""The planet_amazon TFDS builder and prepared.prepare: round trip, stored
statistics, no rebuild, atomic builds, recorded source and split."""

import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from rf_jax.data import pipeline
from rf_jax.data import prepared
from rf_jax.data import planet
from rf_jax.data import synthetic
from rf_jax.data import tfds_planet


SPLIT = dict(val_fraction=planet.STUDY_VAL_FRACTION, split_seed=planet.STUDY_SEED)


def _prepare(raw_dir, prepared_dir, **overrides):
  args = dict(layout='auto', **SPLIT)
  args.update(overrides)
  return prepared.prepare(raw_dir, prepared_dir, **args)


def _make_config(raw_dir, **overrides):
  args = dict(layout='auto', **SPLIT)
  args.update(overrides)
  return tfds_planet.make_config(raw_dir, **args)


def _check_round_trip(data, raw_dir, layout):
  names, labels = planet.read_labels(raw_dir / 'train_v2.csv')
  train_idx, val_idx = planet.split(names)
  expected = {'train': train_idx, 'validation': val_idx}
  for split, idx in expected.items():
    source = getattr(data, split)
    assert len(source) == len(idx)
    assert list(data.names[split]) == [names[i] for i in idx]
    for pos, i in enumerate(idx):
      record = source[pos]
      assert record['name'] == names[i]
      np.testing.assert_array_equal(record['labels'], labels[i])
      chip = planet.read_chip(raw_dir / 'train-tif-v2' / f'{names[i]}.tif',
                              layout)
      assert record['image'].dtype == chip.dtype
      np.testing.assert_array_equal(record['image'], chip)
  return names, labels, train_idx


def test_round_trip_kaggle(prepared_synthetic, synthetic_kaggle_dir):
  data = prepared_synthetic
  assert data.layout == 'kaggle' and data.chip_size == 128
  _check_round_trip(data, synthetic_kaggle_dir, 'kaggle')
  tests = data.test
  assert [tests[i]['name'] for i in range(len(tests))] == \
      [f'test_{i}' for i in range(7)] == list(data.names['test'])
  for i in range(len(tests)):
    np.testing.assert_array_equal(
        tests[i]['image'],
        planet.read_chip(synthetic_kaggle_dir / 'test-tif-v2' / f'test_{i}.tif'))
    assert not tests[i]['labels'].any()


def test_round_trip_course(tmp_path):
  raw = synthetic.write_dataset(tmp_path / 'raw', 20, 32, seed=3,
                                layout='course')
  data = _prepare(raw, tmp_path / 'prep')
  assert data.layout == 'course' and data.test is None
  _check_round_trip(data, raw, 'course')


def test_train_stats_are_training_split_only(prepared_synthetic,
                                             synthetic_kaggle_dir):
  data = prepared_synthetic
  names, _ = planet.read_labels(synthetic_kaggle_dir / 'train_v2.csv')
  train_idx, _ = planet.split(names)
  pixels = np.concatenate([
      planet.read_chip(synthetic_kaggle_dir / 'train-tif-v2' /
                       f'{names[i]}.tif').reshape(-1, 4)
      for i in train_idx]).astype(np.float64)
  np.testing.assert_allclose(data.mean, pixels.mean(0), rtol=1e-6)
  np.testing.assert_allclose(data.std, pixels.std(0), rtol=1e-5)
  assert data.mean.dtype == np.float32 and data.mean.shape == (4,)


def test_no_tensorflow():
  assert importlib.util.find_spec('tensorflow') is None, \
      'TensorFlow must not be installed: the data layer works without it'
  assert 'tensorflow' not in sys.modules


def test_prepared_is_reused_not_rebuilt(prepared_synthetic,
                                        synthetic_kaggle_dir, monkeypatch):
  # data_dir = <prepared_dir>/planet_amazon/<config>/<version>
  prepared_dir = Path(prepared_synthetic.data_dir).parents[2]

  def no_rebuild(*args, **kwargs):
    raise AssertionError('rebuilt a prepared dataset')
  monkeypatch.setattr(tfds_planet.PlanetAmazon, '_shard_iterators_per_split',
                      no_rebuild)
  data = _prepare(synthetic_kaggle_dir, prepared_dir)
  assert data.data_dir == prepared_synthetic.data_dir
  np.testing.assert_array_equal(data.mean, prepared_synthetic.mean)


def test_interrupted_build_leaves_nothing_complete(tmp_path):
  raw = synthetic.write_dataset(tmp_path / 'raw', 16, 16, seed=2)
  names, _ = planet.read_labels(raw / 'train_v2.csv')
  _, val_idx = planet.split(names)
  bad = raw / 'train-tif-v2' / f'{names[val_idx[-1]]}.tif'  # built late
  good = bad.read_bytes()
  bad.write_bytes(good[:100])
  with pytest.raises(planet.PlanetDataError, match=str(bad)):
    _prepare(raw, tmp_path / 'prep')
  cfg = _make_config(raw)
  builder = tfds_planet.load_builder(tmp_path / 'prep', cfg)
  assert not builder.is_prepared()
  version_dirs = list((tmp_path / 'prep').rglob('1.0.0'))
  assert version_dirs == []
  # A hard kill leaves TFDS's incomplete.* directory: not prepared either.
  stale = builder.data_path.parent / 'incomplete.ABCDEF_1.0.0'
  stale.mkdir(parents=True)
  (stale / 'dataset_info.json').write_text('{}')
  assert not tfds_planet.load_builder(tmp_path / 'prep', cfg).is_prepared()
  bad.write_bytes(good)
  data = _prepare(raw, tmp_path / 'prep')
  assert len(data.train) + len(data.validation) == 16


def test_other_split_or_content_is_not_reused_but_a_copy_is(tmp_path, synthetic_kaggle_dir):
  base = _make_config(synthetic_kaggle_dir)
  assert _make_config(synthetic_kaggle_dir).name == base.name
  other_seed = _make_config(synthetic_kaggle_dir, split_seed=1)
  other_frac = _make_config(synthetic_kaggle_dir, val_fraction=0.2)
  assert len({base.name, other_seed.name, other_frac.name}) == 3
  assert 'seed1' in other_seed.name and 'val0p2' in other_frac.name
  # The same files in another folder are the same dataset: its identity is its content.
  copy = shutil.copytree(synthetic_kaggle_dir, tmp_path / 'copy')
  assert _make_config(copy).name == base.name
  # Changed labels in place: another config.
  csv = copy / 'train_v2.csv'
  csv.write_text(csv.read_text().replace('primary', 'primary road', 1))
  assert _make_config(copy).name != base.name


def test_other_split_rule_is_not_reused(prepared_synthetic,
                                       synthetic_kaggle_dir, monkeypatch):
  """A dataset prepared with an older split rule (other chips in validation)
  is never opened for the current rule: it has another config name."""
  current = _make_config(synthetic_kaggle_dir)
  assert current.split_rule == planet.SPLIT_RULE_VERSION
  assert f'/{current.name}/' in prepared_synthetic.data_dir
  prepared_dir = Path(prepared_synthetic.data_dir).parents[2]
  monkeypatch.setattr(planet, 'SPLIT_RULE_VERSION', planet.SPLIT_RULE_VERSION - 1)
  older = _make_config(synthetic_kaggle_dir)
  assert older.name != current.name
  assert not tfds_planet.load_builder(prepared_dir, older).is_prepared()


def test_recorded_metadata_checked(tmp_path):
  raw = synthetic.write_dataset(tmp_path / 'raw', 8, 16, seed=4)
  data = _prepare(raw, tmp_path / 'prep')
  meta_path = tmp_path.joinpath(data.data_dir, 'metadata.json')
  meta = json.loads(meta_path.read_text())
  assert meta['source_dir'] == str(raw.resolve())
  assert meta['val_fraction'] == 0.33 and meta['split_seed'] == 321
  assert meta['split_rule'] == planet.SPLIT_RULE_VERSION
  meta['split_seed'] = 999
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(planet.PlanetDataError, match='another source or split'):
    _prepare(raw, tmp_path / 'prep')


def test_prepare_generates_synthetic_once(tmp_path):
  spec = synthetic.Spec(num_chips=10, chip_size=16, num_test=2, seed=7)
  raw, prepared = tmp_path / 'synthetic', tmp_path / 'prepared'
  data = _prepare(raw, prepared, synthetic=spec)
  assert synthetic.read_spec(raw)['num_chips'] == 10
  assert data.data_dir.startswith(str(prepared))
  assert len(data.test) == 2
  again = _prepare(raw, prepared, synthetic=spec)
  assert again.data_dir == data.data_dir
  other = dataclasses.replace(spec, seed=8)
  with pytest.raises(planet.PlanetDataError, match='synthetic.json'):
    _prepare(raw, prepared, synthetic=other)
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('not chips')
  with pytest.raises(planet.PlanetDataError, match='not a synthetic dataset'):
    _prepare(tmp_path / 'mine', prepared, synthetic=spec)


def test_prepare_wrong_size_chip_named(tmp_path):
  raw = synthetic.write_dataset(tmp_path / 'raw', 6, 16, seed=5)
  odd = raw / 'train-tif-v2' / 'train_4.tif'
  synthetic.write_tif(odd, np.zeros((20, 20, 4), np.uint16))
  with pytest.raises(planet.PlanetDataError, match='expected 16x16') as info:
    _prepare(raw, tmp_path / 'prep')
  assert str(odd) in str(info.value)


def test_prepare_missing_chip_named(tmp_path):
  raw = synthetic.write_dataset(tmp_path / 'raw', 6, 16, seed=5)
  (raw / 'train-tif-v2' / 'train_3.tif').unlink()
  with pytest.raises(FileNotFoundError, match='train_3.tif'):
    _prepare(raw, tmp_path / 'prep')


def test_prepare_without_raw_dir():
  with pytest.raises(planet.PlanetDataError, match='config.data.raw_dir'):
    _prepare('', '/nonexistent-prepared')


def test_many_shards_keep_order(tmp_path, monkeypatch):
  # Real-size splits are written in many shards (TFDS holds a shard in memory).
  monkeypatch.setattr(tfds_planet.PlanetAmazon, 'SHARD_BYTES', 3 * 16 * 16 * 8)
  raw = synthetic.write_dataset(tmp_path / 'raw', 20, 16, seed=6, num_test=4)
  data = _prepare(raw, tmp_path / 'prep')
  shards = list(Path(data.data_dir).glob('planet_amazon-train.array_record-*'))
  assert len(shards) == -(-len(data.train) // 3)
  # Stored uncompressed (reads ~4x faster than TFDS's default zstd).
  assert sum(p.stat().st_size for p in shards) >= len(data.train) * 16 * 16 * 8
  _check_round_trip(data, raw, 'kaggle')
  assert [data.test[i]['name'] for i in range(4)] == [f'test_{i}' for i in range(4)]


def test_real_chips_through_builder_and_pipeline(real_planet_dir, tmp_path):
  """The two real chips (with their real CSV rows) in a Kaggle-layout dir."""
  raw = tmp_path / 'raw'
  (raw / 'train-tif-v2').mkdir(parents=True)
  lines = (real_planet_dir / 'train_v2.csv').read_text().splitlines()[:3]
  (raw / 'train_v2.csv').write_text('\n'.join(lines) + '\n')
  for name in ('train_0', 'train_1'):
    (raw / 'train-tif-v2' / f'{name}.tif').symlink_to(
        real_planet_dir / f'{name}.tif')
  data = _prepare(raw, tmp_path / 'prep', val_fraction=0.5)
  assert data.layout == 'kaggle' and data.chip_size == 256
  _, labels = planet.read_labels(real_planet_dir / 'train_v2.csv')
  for split in ('train', 'validation'):
    record = getattr(data, split)[0]
    i = int(record['name'].split('_')[1])
    np.testing.assert_array_equal(
        record['image'],
        planet.read_chip(real_planet_dir / f'{record["name"]}.tif'))
    np.testing.assert_array_equal(record['labels'], labels[i])
  # The loaders hand the chips on as stored (the steps resize and normalise).
  batch = next(iter(pipeline.eval_batches(data, 'validation', batch_size=2)))
  assert batch['image'].shape == (2, 256, 256, 4) and batch['image'].dtype == np.uint16
  np.testing.assert_array_equal(batch['image'][0], data.validation[0]['image'])
  assert not batch['image'][1].any()
  assert batch['mask'].tolist() == [1.0, 0.0]


def test_test_mapping_renames_test_chips(tmp_path, synthetic_kaggle_dir):
  raw = tmp_path / 'raw'
  shutil.copytree(synthetic_kaggle_dir, raw)
  (raw / tfds_planet.TEST_MAPPING_FILE).write_text(
      'old,new\ntest_0.tif,test_1.tif\ntest_1.tif,test_0.tif\n')
  data = _prepare(raw, tmp_path / 'prepared')
  names = list(data.names['test'])
  assert names[:2] == ['test_1', 'test_0'] and names[2:] == [f'test_{i}' for i in range(2, 7)]
  first = data.test[0]
  assert first['name'] == 'test_1'  # the TIF published as test_0 is chip test_1
  np.testing.assert_array_equal(
      first['image'], planet.read_chip(raw / 'test-tif-v2' / 'test_0.tif'))


@pytest.mark.parametrize('text,message', [
    ('old;new\n', r'test_v2_file_mapping.csv:1: header must be "old,new"'),
    ('old,new\ntest_0.tif\n', r'test_v2_file_mapping.csv:2: expected "old.tif,new.tif"'),
    ('old,new\ntest_0.tif,test_5.tif\n', r'test_v2_file_mapping.csv: not a renaming'),
])
def test_bad_test_mapping_is_named(tmp_path, text, message):
  path = tmp_path / tfds_planet.TEST_MAPPING_FILE
  path.write_text(text)
  with pytest.raises(planet.PlanetDataError, match=message):
    planet.read_test_mapping(path)


def test_test_chips_have_their_own_fingerprint(tmp_path, synthetic_kaggle_dir):
  """The training config never sees the test chips; the test config sees their listing and
  mapping (not their content: a damaged chip is found when they are prepared)."""
  raw = tmp_path / 'raw'
  shutil.copytree(synthetic_kaggle_dir, raw)
  train_name = _make_config(raw).name

  def test_name():
    return tfds_planet.make_test_config(raw, layout='kaggle', chip_size=128).name

  names = [test_name()]
  (raw / 'test-tif-v2' / 'test_6.tif').unlink()
  names.append(test_name())
  (raw / tfds_planet.TEST_MAPPING_FILE).write_text('old,new\ntest_0.tif,test_1.tif\n'
                                                   'test_1.tif,test_0.tif\n')
  names.append(test_name())
  shutil.rmtree(raw / 'test-tif-v2')
  assert len(set(names)) == 3
  assert _make_config(raw).name == train_name
  truncated = raw / 'test-tif-v2' / 'test_0.tif'
  shutil.copytree(synthetic_kaggle_dir / 'test-tif-v2', raw / 'test-tif-v2')
  truncated.write_bytes(truncated.read_bytes()[:100])
  assert _make_config(raw).name == train_name
  assert tfds_planet.make_test_config(raw, layout='kaggle', chip_size=128).num_chips == 7
