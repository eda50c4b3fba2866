"""Shared data fixtures (data room). Reuse them instead of writing datasets.

* `real_planet_dir`: ../shared/data/planet beside the repository (the real
  train_v2.csv and two real chips); tests using it skip when it is absent.
* `synthetic_kaggle_dir`: a session-wide synthetic Kaggle-layout directory,
  SYNTHETIC_CHIPS chips of SYNTHETIC_SIZE px (>= 96 px, so models can run on
  it), SYNTHETIC_TEST test chips, seed 0. Read-only: do not modify it.
* `prepared_synthetic`: `pipeline.PlanetData` over it (TFDS built once per
  session in a temporary data_dir, default split 0.33 / seed 321).
"""

from pathlib import Path

import pytest

REAL_PLANET_DIR = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'planet'
SYNTHETIC_CHIPS = 60
SYNTHETIC_SIZE = 128
SYNTHETIC_TEST = 7


@pytest.fixture(scope='session')
def real_planet_dir() -> Path:
  if not (REAL_PLANET_DIR / 'train_v2.csv').is_file():
    pytest.skip(f'real Planet samples not found at {REAL_PLANET_DIR} '
                '(../shared/data/planet beside the repository)')
  return REAL_PLANET_DIR


@pytest.fixture(scope='session')
def synthetic_kaggle_dir(tmp_path_factory) -> Path:
  from rf_jax.data import synthetic
  out = tmp_path_factory.mktemp('data') / 'synthetic_kaggle'
  return synthetic.write_dataset(out, SYNTHETIC_CHIPS, SYNTHETIC_SIZE, seed=0,
                                 num_test=SYNTHETIC_TEST)


@pytest.fixture(scope='session')
def prepared_synthetic(synthetic_kaggle_dir, tmp_path_factory):
  import ml_collections
  from rf_jax.data import pipeline
  config = ml_collections.ConfigDict(dict(
      raw_dir=str(synthetic_kaggle_dir), layout='auto',
      prepared_dir=str(tmp_path_factory.mktemp('prepared')),
      val_fraction=0.33, split_seed=321,
      synthetic=dict(num_chips=0, chip_size=SYNTHETIC_SIZE, num_test=0,
                     seed=0)))
  return pipeline.prepare(config, tmp_path_factory.mktemp('workdir'))
