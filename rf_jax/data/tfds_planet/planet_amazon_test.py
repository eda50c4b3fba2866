"""`planet_amazon_test`: the test chips (`test-tif-v2/`) as their own dataset.

Apart from `planet_amazon` so that adding, removing or damaging test chips
never changes the training dataset's fingerprint, never rebuilds it and never
blocks training: this one is prepared only when a submission needs it. One
split, `test`, in natural file order (test_9 before test_10), labels all
zero (Kaggle keeps them), names after `test_v2_file_mapping.csv`. Its config
name fingerprints the listed files' names and byte sizes and the mapping, not
the folder (as planet_amazon's).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from rf_jax.data import planet
from rf_jax.data.tfds_planet import chips
from rf_jax.data.tfds_planet import planet_amazon

TEST_DIR = 'test-tif-v2'
TEST_MAPPING_FILE = planet.TEST_MAPPING_FILE


@dataclasses.dataclass(eq=False, kw_only=True)
class TestConfig(tfds.core.BuilderConfig):
  """Which test chips, read as the training chips are (see make_test_config)."""
  layout: str
  chip_size: int
  num_chips: int
  listing_sha256: str  # planet_amazon.listing_sha256 of the listed files
  test_mapping_sha256: str  # '' when there is no test_v2_file_mapping.csv


def _natural_key(path: Path):
  # test_10 after test_9 (natural order); Kaggle's file_* sort before test_*.
  match = re.fullmatch(r'(.*?)(\d+)', path.stem)
  return (match.group(1), int(match.group(2))) if match else (path.stem, -1)


def list_test_chips(raw_dir) -> list[Path]:
  """The raw directory's test chips in natural order (cheap: no reading)."""
  test_dir = Path(raw_dir) / TEST_DIR
  return sorted(test_dir.glob('*.tif'), key=_natural_key) \
      if test_dir.is_dir() else []


def make_test_config(raw_dir, *, layout: str, chip_size: int) -> TestConfig:
  """The config of raw_dir's test chips, which must have the training chips'
  `layout` ('kaggle' or 'course') and `chip_size`."""
  raw_dir = Path(raw_dir).expanduser().resolve()
  files = list_test_chips(raw_dir)
  mapping = raw_dir / TEST_MAPPING_FILE
  fields = dict(layout=layout, chip_size=int(chip_size), num_chips=len(files),
                listing_sha256=planet_amazon.listing_sha256(files),
                test_mapping_sha256=(planet_amazon.sha256(mapping)
                                     if mapping.is_file() else ''))
  name = f'{layout}{chip_size}_{planet_amazon.fingerprint(fields)}'
  return TestConfig(name=name, version='1.0.0', **fields)


def config_record(config: TestConfig) -> dict:
  """The config fields stored in the dataset metadata (checked on load)."""
  keys = ('layout', 'chip_size', 'num_chips', 'listing_sha256',
          'test_mapping_sha256')
  return dict(format_version=planet_amazon.FORMAT_VERSION,
              config_name=config.name,
              **{k: getattr(config, k) for k in keys})


class PlanetAmazonTest(planet_amazon.NoDownloadLines, chips.ChipBuilder):
  """Planet: the unlabelled test chips of the Kaggle competition."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'The test chips apart from the training chips.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Point manual_dir at the folder holding {TEST_DIR}/ (optionally '
      f'{TEST_MAPPING_FILE}) beside the training chips.')
  BAD_CHIPS_FIX = (f'Replace these chips with good copies from the '
                   f'download ({TEST_DIR}/), then run again; the training '
                   'data is not affected.')

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    if not isinstance(config, TestConfig):
      raise ValueError('planet_amazon_test needs a TestConfig: use '
                       'make_test_config()')
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__,
        features=chips.chip_features(config.layout, config.chip_size),
        supervised_keys=None,
        homepage='https://www.kaggle.com/c/planet-understanding-the-amazon-from-space',
        disable_shuffling=True,  # File order on disk: the submission's order.
        metadata=tfds.core.MetadataDict())

  def _split_items(self, raw_dir: Path) -> dict[str, list]:
    config = self.builder_config
    raw_dir = raw_dir.expanduser().resolve()
    if make_test_config(raw_dir, layout=config.layout,
                        chip_size=config.chip_size).name != config.name:
      raise planet.PlanetDataError(
          f'{raw_dir / TEST_DIR}: changed since the config was made')
    paths = list_test_chips(raw_dir)
    mapping = (planet.read_test_mapping(raw_dir / TEST_MAPPING_FILE)
               if config.test_mapping_sha256 else {})
    names = [mapping.get(p.stem, p.stem) for p in paths]
    self.info.metadata.update(config_record(config), source_dir=str(raw_dir))
    self.info.metadata['names'] = {'test': names}
    no_labels = np.zeros(planet.NUM_TAGS, np.float32)
    return {'test': [(i, p, no_labels, n)
                     for i, (p, n) in enumerate(zip(paths, names))]}


def load_test_builder(data_dir, config: TestConfig) -> PlanetAmazonTest:
  """The builder for `config` under `data_dir` (a prepared dataset's
  recorded config checked)."""
  builder = PlanetAmazonTest(config=config, data_dir=str(data_dir))
  chips.check_recorded(builder, config_record(config))
  return builder
