"""rf_jax.data.planet: labels, chips, split; real files and every bad input."""

import hashlib

import numpy as np
import pytest
import tifffile

from rf_jax.data import planet
from rf_jax.data import synthetic



def test_tags_order():
  assert planet.NUM_TAGS == 17
  assert planet.TAGS[:4] == ('clear', 'cloudy', 'haze', 'partly_cloudy')
  assert planet.TAGS[-1] == 'water' and planet.TAGS[12] == 'primary'


# --- the real files ----------------------------------------------------------


def test_real_labels(real_planet_dir):
  names, labels = planet.read_labels(real_planet_dir / 'train_v2.csv')
  assert len(names) == len(labels) == 40479
  assert labels.dtype == np.float32 and labels.shape == (40479, 17)
  assert dict(zip(planet.TAGS, labels.sum(0).astype(int).tolist())) == (
      synthetic.REAL_TAG_COUNTS)  # the generator's built-in table is the real one
  counts = labels.sum(0)  # DESIGN.md §2: primary 92.7% down to blow_down's 98 chips
  assert round(counts[planet.TAG_INDEX['primary']] / 40479, 3) == 0.927
  assert counts[planet.TAG_INDEX['blow_down']] == 98 == counts.min()
  assert names[0] == 'train_0' and labels[0].nonzero()[0].tolist() == [2, 12]
  # The row without a weather tag, and cloudy never co-occurs.
  row = labels[names.index('train_24448')]
  assert row[:4].sum() == 0 and row[planet.TAG_INDEX['water']] == 1
  cloudy = labels[:, planet.TAG_INDEX['cloudy']] == 1
  assert (labels[cloudy].sum(1) == 1).all()
  assert set(labels.sum(1).astype(int)) == set(range(1, 10))


@pytest.mark.parametrize('name', ['train_0.tif', 'train_1.tif'])
def test_real_chip_equals_tifffile(real_planet_dir, name):
  path = real_planet_dir / name
  chip = planet.read_chip(path)
  np.testing.assert_array_equal(chip, tifffile.imread(path)[..., [2, 1, 0, 3]])
  assert chip.dtype == np.uint16 and chip.shape == (256, 256, 4)
  np.testing.assert_array_equal(planet.read_chip(path, 'kaggle'), chip)


def test_real_split_golden(real_planet_dir):
  names, _ = planet.read_labels(real_planet_dir / 'train_v2.csv')
  train, val = planet.split(names)
  assert len(train) == 27120 and len(val) == 13359
  # Golden values (scikit-learn's split of the study): the split must not
  # change across runs, machines, versions.
  assert val[:8].tolist() == [0, 1, 2, 9, 11, 16, 18, 19]
  assert hashlib.sha256(val.astype('<i8').tobytes()).hexdigest()[:16] == \
      GOLDEN_VAL_SHA


GOLDEN_VAL_SHA = '2f47aab0555a073a'


# --- split -------------------------------------------------------------------


def test_split_deterministic_and_disjoint():
  names = [f'n{i}' for i in range(1000)]
  train, val = planet.split(names, 0.33, 321)
  t2, v2 = planet.split(names, 0.33, 321)
  np.testing.assert_array_equal(train, t2)
  np.testing.assert_array_equal(val, v2)
  assert len(val) == 330 and len(train) == 670
  assert not set(train) & set(val)
  assert sorted(np.concatenate([train, val]).tolist()) == list(range(1000))
  _, v3 = planet.split(names, 0.33, 322)
  assert not np.array_equal(val, v3)


def _sklearn_split(n, val_fraction, seed):
  model_selection = pytest.importorskip('sklearn.model_selection')
  train, val = model_selection.train_test_split(
      list(range(n)), test_size=val_fraction, random_state=seed)
  return sorted(train), sorted(val)


@pytest.mark.parametrize('val_fraction', [0.33, 0.2, 0.5, 0.07])
@pytest.mark.parametrize('seed', [321, 0, 7, 2**31 - 1])
def test_split_equals_sklearn(val_fraction, seed):
  # n from tiny to odd sizes; 0.07 * 100 rounds up to 7.000000000000001 in
  # floating point, and sklearn takes 8 rows there: so must we.
  for n in (2, 3, 10, 97, 100, 200, 1001, 4096):
    train, val = planet.split([f'n{i}' for i in range(n)], val_fraction, seed)
    want_train, want_val = _sklearn_split(n, val_fraction, seed)
    assert val.tolist() == want_val, (n, val_fraction, seed)
    assert train.tolist() == want_train, (n, val_fraction, seed)
    assert train.dtype == val.dtype == np.int64


def test_study_split_size_equals_sklearn():
  n = 40479  # rows of train_v2.csv
  train, val = planet.split(range(n))
  assert len(val) == 13359 and len(train) == 27120
  want_train, want_val = _sklearn_split(n, 0.33, 321)
  assert val.tolist() == want_val and train.tolist() == want_train


def test_split_bad_fraction():
  for bad in (-0.1, 1.0, 1.5):
    with pytest.raises(ValueError, match='val_fraction'):
      planet.split(['a', 'b'], bad)
  train, val = planet.split(['a', 'b', 'c'], 0.0)
  assert train.tolist() == [0, 1, 2] and val.tolist() == []


# --- read_labels: bad and quirky input ---------------------------------------


def _write(tmp_path, content: bytes, name='labels.csv'):
  path = tmp_path / name
  path.write_bytes(content)
  return path


GOOD = b'image_name,tags\ntrain_0,haze primary\ntrain_1,clear water water\n'


def test_labels_quirks_repeat_unsorted(tmp_path):
  path = _write(tmp_path, GOOD + b'train_2,water clear primary\n')
  names, labels = planet.read_labels(path)
  assert names == ['train_0', 'train_1', 'train_2']
  assert labels[1].sum() == 2  # the repeated tag counts once
  assert labels[2].nonzero()[0].tolist() == [0, 12, 16]


@pytest.mark.parametrize('content', [
    GOOD.replace(b'\n', b'\r\n'),   # CRLF
    b'\xef\xbb\xbf' + GOOD,          # UTF-8 BOM
    b'\xef\xbb\xbf' + GOOD.replace(b'\n', b'\r\n'),
    GOOD + b'\n',                   # trailing blank line
])
def test_labels_harmless_encodings(tmp_path, content):
  names, labels = planet.read_labels(_write(tmp_path, content))
  ref_names, ref_labels = planet.read_labels(_write(tmp_path, GOOD, 'ref.csv'))
  assert names == ref_names
  np.testing.assert_array_equal(labels, ref_labels)


@pytest.mark.parametrize('content, line, words', [
    (GOOD + b'train_2,clear jungle\n', 4, 'unknown tag'),
    (GOOD + b'train_2,\n', 4, 'empty tags'),
    (GOOD + b'train_2,   \n', 4, 'empty tags'),
    (GOOD + b'train_0,clear\n', 4, 'duplicate image name'),
    (b'name,tags\ntrain_0,clear\n', 1, 'header'),
    (b'', 1, 'header'),
    (GOOD + b'train_2,clear,extra\n', 4, 'expected 2 fields'),
    (GOOD + b',clear\n', 4, 'empty image name'),
    (GOOD + b'train_2,cl\xe9ar\n', 4, 'not UTF-8'),
    (GOOD.replace(b'\n', b'\r\n') + b'train_2,hazy\r\n', 4, 'unknown tag'),
])
def test_labels_errors_name_file_and_line(tmp_path, content, line, words):
  path = _write(tmp_path, content)
  with pytest.raises(planet.PlanetDataError, match=words) as info:
    planet.read_labels(path)
  assert f'{path}:{line}:' in str(info.value)
  assert isinstance(info.value, ValueError)


def test_labels_names_as_file_names_are_the_chip_names(tmp_path):
  path = _write(tmp_path, b'image_name,tags\ntrain_0.tif,clear primary\n'
                b'train_1.TIFF,haze\ntrain_2.Tif,water clear\ntrain_3,cloudy\n')
  names, labels = planet.read_labels(path)
  assert names == ['train_0', 'train_1', 'train_2', 'train_3']
  assert labels[0].nonzero()[0].tolist() == [0, 12]
  with pytest.raises(planet.PlanetDataError, match=r":3: duplicate image name 'train_0'"):
    planet.read_labels(_write(tmp_path, GOOD.replace(b'train_1', b'train_0.tif'), 'dup.csv'))


def test_labels_duplicate_names_first_line(tmp_path):
  path = _write(tmp_path, GOOD + b'train_1,clear\n')
  with pytest.raises(planet.PlanetDataError, match='first seen on line 3'):
    planet.read_labels(path)


def test_labels_missing_file(tmp_path):
  path = tmp_path / 'nope.csv'
  with pytest.raises(FileNotFoundError, match='nope.csv'):
    planet.read_labels(path)
  with pytest.raises(planet.PlanetDataError):
    planet.read_labels(path)


# --- read_chip: layouts and bad input ----------------------------------------


def _chip(size=16, dtype=np.uint16, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, np.iinfo(dtype).max, (size, size, 4), dtype=dtype)


def test_read_chip_layouts(tmp_path):
  rgbn = _chip()
  synthetic.write_tif(tmp_path / 'k.tif', rgbn, 'kaggle')
  np.testing.assert_array_equal(planet.read_chip(tmp_path / 'k.tif'), rgbn)
  # On disk it is B,G,R,NIR, as in the real files.
  np.testing.assert_array_equal(tifffile.imread(tmp_path / 'k.tif'),
                                rgbn[..., [2, 1, 0, 3]])
  course = _chip(dtype=np.uint8)
  synthetic.write_tif(tmp_path / 'c.tif', course, 'course')
  for layout in ('auto', 'course'):
    got = planet.read_chip(tmp_path / 'c.tif', layout)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, course)


def _raises_naming(path, words, **kwargs):
  with pytest.raises(planet.PlanetDataError, match=words) as info:
    planet.read_chip(path, **kwargs)
  assert str(path) in str(info.value)


def test_chip_truncated(tmp_path):
  synthetic.write_tif(tmp_path / 'a.tif', _chip(64))
  raw = (tmp_path / 'a.tif').read_bytes()
  (tmp_path / 'cut.tif').write_bytes(raw[:len(raw) // 2])  # data cut short
  _raises_naming(tmp_path / 'cut.tif', 'truncated')
  (tmp_path / 'head.tif').write_bytes(raw[:6])             # header only
  _raises_naming(tmp_path / 'head.tif', 'TIFF')


def test_chip_truncated_real_layout(real_planet_dir, tmp_path):
  # Real files keep the image directory at the end: cutting loses it.
  raw = (real_planet_dir / 'train_0.tif').read_bytes()
  (tmp_path / 'cut.tif').write_bytes(raw[:len(raw) - 1000])
  _raises_naming(tmp_path / 'cut.tif', 'truncated|TIFF')


def test_chip_corrupt(tmp_path):
  (tmp_path / 'x.tif').write_bytes(b'this is not a tiff at all' * 10)
  _raises_naming(tmp_path / 'x.tif', 'not a readable TIFF')
  (tmp_path / 'y.tif').write_bytes(b'II*\x00' + b'\xff' * 100)
  _raises_naming(tmp_path / 'y.tif', 'TIFF')


def test_chip_wrong_band_count(tmp_path):
  tifffile.imwrite(tmp_path / 'rgb.tif', _chip()[..., :3], photometric='rgb')
  _raises_naming(tmp_path / 'rgb.tif', 'expected 4 bands')
  tifffile.imwrite(tmp_path / 'gray.tif', _chip()[..., 0])
  _raises_naming(tmp_path / 'gray.tif', 'expected 4 bands')


def test_chip_wrong_size(tmp_path):
  synthetic.write_tif(tmp_path / 'a.tif', _chip(32))
  _raises_naming(tmp_path / 'a.tif', 'expected 64x64', expected_size=64)
  tifffile.imwrite(tmp_path / 'r.tif', _chip(32)[:16], photometric='rgb',
                   extrasamples=['unassalpha'])
  _raises_naming(tmp_path / 'r.tif', 'square')


def test_chip_wrong_dtype(tmp_path):
  tifffile.imwrite(tmp_path / 'f.tif', _chip().astype(np.float32),
                   photometric='rgb', extrasamples=['unassalpha'])
  _raises_naming(tmp_path / 'f.tif', 'dtype float32')
  synthetic.write_tif(tmp_path / 'k.tif', _chip())
  _raises_naming(tmp_path / 'k.tif', 'course layout expects uint8',
                 layout='course')
  synthetic.write_tif(tmp_path / 'c.tif', _chip(dtype=np.uint8), 'course')
  _raises_naming(tmp_path / 'c.tif', 'kaggle layout expects uint16',
                 layout='kaggle')


def test_chip_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match='gone.tif'):
    planet.read_chip(tmp_path / 'gone.tif')
