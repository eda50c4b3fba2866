"""rf_jax.data.synthetic: layout, tags, determinism, tag-dependent content."""

import collections
import json
import os
from pathlib import Path
import re
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from rf_jax import errors
from rf_jax.data import planet
from rf_jax.data import synthetic


def _tiff_tags(path):
  with tifffile.TiffFile(path) as tif:
    page = tif.pages.first
    return dict(photometric=page.photometric, planar=page.planarconfig,
                compression=page.compression, extrasamples=page.extrasamples,
                samples=page.samplesperpixel)


def test_kaggle_layout_and_tags(synthetic_kaggle_dir):
  d = synthetic_kaggle_dir
  names, labels = planet.read_labels(d / 'train_v2.csv')
  assert names == [f'train_{i}' for i in range(len(names))]
  assert labels.sum(1).min() >= 1
  tif = d / 'train-tif-v2' / 'train_0.tif'
  with tifffile.TiffFile(tif) as t:
    assert t.pages.first.dtype == np.uint16
  tags = _tiff_tags(tif)
  assert tags == dict(photometric=tifffile.PHOTOMETRIC.RGB,
                      planar=tifffile.PLANARCONFIG.CONTIG,
                      compression=tifffile.COMPRESSION.NONE,
                      extrasamples=(tifffile.EXTRASAMPLE.UNASSALPHA,),
                      samples=4)
  assert sorted(p.name for p in (d / 'test-tif-v2').iterdir()) == sorted(
      f'{n}.tif' for n in synthetic.test_names(7))


def test_tags_like_real(real_planet_dir, synthetic_kaggle_dir):
  assert _tiff_tags(synthetic_kaggle_dir / 'train-tif-v2' / 'train_0.tif') == \
      _tiff_tags(real_planet_dir / 'train_0.tif')


def test_seeded(tmp_path):
  a = synthetic.write_dataset(tmp_path / 'a', 12, 32, seed=5, num_test=2)
  b = synthetic.write_dataset(tmp_path / 'b', 12, 32, seed=5, num_test=2)
  c = synthetic.write_dataset(tmp_path / 'c', 12, 32, seed=6)
  for rel in ('train_v2.csv', 'train-tif-v2/train_11.tif',
              'test-tif-v2/test_1.tif'):
    assert (a / rel).read_bytes() == (b / rel).read_bytes()
  assert (a / 'train-tif-v2/train_0.tif').read_bytes() != \
      (c / 'train-tif-v2/train_0.tif').read_bytes()
  assert not (c / 'test-tif-v2').exists()
  assert synthetic.read_spec(a)['seed'] == 5


# Writes a small dataset of each layout (64 px: the broadcast upsampling; 36 px: the indexed
# one) and prints the SHA-256 of every file with the numpy SIMD targets still active.
_HASH_DATASETS = r"""
import hashlib, json, sys
from pathlib import Path
try:
  from numpy._core import _multiarray_umath as umath
except ImportError:  # numpy < 2
  from numpy.core import _multiarray_umath as umath
from rf_jax.data import synthetic

out = Path(sys.argv[1])
synthetic.write_dataset(out / 'kaggle', 24, 64, seed=3, num_test=3)
synthetic.write_dataset(out / 'course', 8, 36, seed=4, layout='course')
files = {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
         for p in sorted(out.rglob('*')) if p.is_file()}
active = [t for t in umath.__cpu_dispatch__ if umath.__cpu_features__.get(t)]
print(json.dumps(dict(files=files, active=active)))
"""


def _numpy_dispatch_targets() -> list[str]:
  """numpy's SIMD targets above its baseline that this CPU runs (e.g. X86_V3, X86_V4)."""
  try:
    from numpy._core import _multiarray_umath as umath
  except ImportError:  # numpy < 2
    from numpy.core import _multiarray_umath as umath
  return [t for t in umath.__cpu_dispatch__ if umath.__cpu_features__.get(t)]


def test_bytes_do_not_depend_on_the_cpu(tmp_path):
  """The chips are the same on every x86 CPU: generated once as this CPU runs numpy and once
  with numpy's SIMD targets (AVX2, AVX-512 ...) and glibc's FMA/AVX2 libm variants off, as an
  older CPU would run them, every file's bytes agree."""
  targets = _numpy_dispatch_targets()
  if not targets:
    pytest.skip('numpy runs only its baseline code on this CPU: nothing to turn off')

  def generate(name, **env):
    result = subprocess.run([sys.executable, '-c', _HASH_DATASETS, str(tmp_path / name)],
                            env={**os.environ, **env}, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], check=True)
    return json.loads(result.stdout)

  native = generate('native')
  baseline = generate('baseline', NPY_DISABLE_CPU_FEATURES=' '.join(targets),
                      GLIBC_TUNABLES='glibc.cpu.hwcaps=-AVX2,-FMA')
  assert native['active'] == targets and baseline['active'] == []  # the switch took effect
  assert len(native['files']) == 24 + 3 + 8 + 2 + 2
  assert baseline['files'] == native['files']


def test_course_layout(tmp_path):
  kaggle = synthetic.write_dataset(tmp_path / 'k', 6, 32, seed=1)
  course = synthetic.write_dataset(tmp_path / 'c', 6, 32, seed=1,
                                   layout='course')
  chip = planet.read_chip(course / 'train-tif-v2' / 'train_3.tif')
  assert chip.dtype == np.uint8
  # Same content, 8-bit R,G,B,IR.
  ref = planet.read_chip(kaggle / 'train-tif-v2' / 'train_3.tif')
  np.testing.assert_array_equal(chip, synthetic.to_course(ref))
  raw = tifffile.imread(course / 'train-tif-v2' / 'train_3.tif')
  np.testing.assert_array_equal(raw, chip)  # stored R,G,B,IR, not B,G,R


def test_labels_from_csv_keep_real_rows(real_planet_dir):
  _, real = planet.read_labels(real_planet_dir / 'train_v2.csv')
  rows = synthetic.sample_labels(500, np.random.default_rng(0),
                                 real_planet_dir / 'train_v2.csv')
  real_rows = {r.tobytes() for r in real}
  assert all(r.tobytes() in real_rows for r in rows)


def test_builtin_labels_are_the_real_tag_combinations(real_planet_dir):
  """At the real size the labels are the real file's rows (as a multiset) exactly; a smaller
  dataset draws them without replacement."""
  _, real = planet.read_labels(real_planet_dir / 'train_v2.csv')
  labels = synthetic.sample_labels(len(real), np.random.default_rng(0))
  count = lambda rows: collections.Counter(map(bytes, rows.astype(np.uint8)))
  assert count(labels) == count(real)
  assert not np.array_equal(labels, real)  # a seeded order, not the file's
  sample = synthetic.sample_labels(10000, np.random.default_rng(1))
  assert set(count(sample)) <= set(count(real))
  want = real.mean(0)
  assert np.abs(sample.mean(0) - want).max() < 0.015
  beyond = synthetic.sample_labels(len(real) + 7, np.random.default_rng(2))
  assert count(beyond[:len(real)]) == count(real)


def test_test_names_and_threads(tmp_path, monkeypatch):
  """Test chips are named as Kaggle's (test_*, then file_* renamed by a mapping file), and the
  bytes do not depend on how many threads write them."""
  names = synthetic.test_names(61191)
  assert names[40668:40670] == ['test_40668', 'file_0'] and names[-1] == 'file_20521'
  assert synthetic.test_names(5) == [f'test_{i}' for i in range(5)]
  # file_* chips after 3 test_* chips, as a dataset larger than Kaggle's 40,669 test_* has
  monkeypatch.setattr(synthetic, 'REAL_TEST_PREFIXES', (('test', 3), ('file', 20522)))
  one = synthetic.write_dataset(tmp_path / 'one', 70, 16, seed=2, num_test=40, threads=1)
  two = synthetic.write_dataset(tmp_path / 'two', 70, 16, seed=2, num_test=40, threads=2)
  files = sorted(p.relative_to(one) for p in one.rglob('*') if p.is_file())
  assert files == sorted(p.relative_to(two) for p in two.rglob('*') if p.is_file())
  assert len(files) == 1 + 70 + 1 + 40 + 1  # labels, chips, mapping, test chips, spec
  for rel in files:
    assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel
  tests = sorted(p.stem for p in (one / 'test-tif-v2').iterdir())
  assert tests == sorted(synthetic.test_names(40)) and 'file_36' in tests
  mapping = planet.read_test_mapping(one / planet.TEST_MAPPING_FILE)
  assert sorted(mapping) == sorted(n for n in tests if n.startswith('file_'))
  assert sum(k != v for k, v in mapping.items()) == 3  # a tenth of the 37 moved


def test_weather_tags_overlap():
  """The faintest haze is fainter than the thickest haze a clear chip carries, and partly
  cloudy covers as much cloud as the least cloudy of the cloudy chips: weather is not
  separable from one band mean, as in the real data."""
  rng = np.random.default_rng(0)
  noise = synthetic._noise_tiles(32, rng)
  means = {}
  for tag in ('clear', 'haze', 'partly_cloudy', 'cloudy'):
    row = np.zeros((400, planet.NUM_TAGS), np.float32)
    row[:, [planet.TAG_INDEX[tag], planet.TAG_INDEX['primary']]] = 1
    means[tag] = synthetic.render_chips(row, 32, rng, noise)[..., 1].mean((1, 2))
  assert means['haze'].min() < means['clear'].max()
  assert means['cloudy'].min() < means['partly_cloudy'].max()
  assert np.median(means['haze']) > np.median(means['clear'])
  assert np.median(means['cloudy']) > np.median(means['partly_cloudy'])


def _render(tags, seed=0, size=32):
  row = np.zeros((1, planet.NUM_TAGS), np.float32)
  row[0, [planet.TAG_INDEX[t] for t in tags]] = 1
  rng = np.random.default_rng(seed)
  noise = synthetic._noise_tiles(size, np.random.default_rng(1))
  return synthetic.render_chips(row, size, rng, noise)[0].astype(np.int64)


@pytest.mark.parametrize('tag', synthetic.NIR_ONLY_TAGS)
def test_nir_only_tags(tag):
  base = _render(['clear', 'primary'])
  with_tag = _render(['clear', 'primary', tag])
  np.testing.assert_array_equal(with_tag[..., :3], base[..., :3])
  assert np.abs(with_tag[..., 3] - base[..., 3]).mean() > 100


def test_nir_only_tags_exist_and_rgb_tags_show_in_rgb():
  assert {'blooming', 'cultivation'} <= set(synthetic.NIR_ONLY_TAGS)
  base = _render(['clear', 'primary'])
  water = _render(['clear', 'primary', 'water'])
  assert np.abs(water[..., :3] - base[..., :3]).mean() > 50


def test_refuses_nonempty_and_leaves_nothing_when_interrupted(tmp_path,
                                                              monkeypatch):
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'x').write_text('mine')
  with pytest.raises(FileExistsError, match='full') as raised:
    synthetic.write_dataset(tmp_path / 'full', 3, 16)
  assert isinstance(raised.value, errors.UserError)  # the CLI's one line, not a traceback
  assert str(raised.value).startswith(f'{tmp_path / "full"}: not empty')
  assert 'config.data.raw_dir' in str(raised.value)
  calls = []

  def fail_late(*args, **kwargs):
    calls.append(1)
    if len(calls) > 2:
      raise KeyboardInterrupt
  monkeypatch.setattr(synthetic, 'write_tif', fail_late)
  with pytest.raises(KeyboardInterrupt):
    synthetic.write_dataset(tmp_path / 'new', 5, 16)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['full']


def test_a_damaged_spec_file_is_named(tmp_path):
  (tmp_path / 'raw').mkdir()
  (tmp_path / 'raw' / synthetic.SPEC_FILE).write_text('{"num_chips": 3,')
  with pytest.raises(planet.PlanetDataError,
                     match=re.escape(f'{tmp_path / "raw" / synthetic.SPEC_FILE}: not JSON')):
    synthetic.ensure(tmp_path / 'raw', synthetic.Spec(3, 16, 0, 0), 'kaggle')


def test_nir_helps_a_linear_probe():
  """IR-aware models can beat rgb: band statistics with NIR predict the
  NIR-only tags far better than RGB statistics alone."""
  linear_model = pytest.importorskip('sklearn.linear_model')
  metrics = pytest.importorskip('sklearn.metrics')
  rng = np.random.default_rng(0)
  labels = synthetic.sample_labels(1200, rng)
  chips = synthetic.render_chips(labels, 16, rng,
                                 synthetic._noise_tiles(16, rng))
  x = chips.reshape(len(chips), -1, 4).astype(np.float64)
  feats = np.concatenate([x.mean(1), x.std(1)], axis=1) / 1000.0
  rgb = [0, 1, 2, 4, 5, 6]
  for tag in ('cultivation',):  # the common NIR-only tag (11% of chips)
    y = labels[:, planet.TAG_INDEX[tag]]
    ap = {}
    for name, cols in (('rgb', rgb), ('rgbir', list(range(8)))):
      clf = linear_model.LogisticRegression(max_iter=2000)
      clf.fit(feats[:800, cols], y[:800])
      ap[name] = metrics.average_precision_score(
          y[800:], clf.decision_function(feats[800:, cols]))
    assert ap['rgbir'] > ap['rgb'] + 0.2, (tag, ap)
