"""The prepared Planet dataset: generated (synthetic) and prepared once, then opened.

`prepare` turns a raw directory into `PlanetData`: random-access sources per
split, the chip names in source order and the training split's band statistics.
An already prepared dataset is reused, never rebuilt; one prepared from another
source or split lives under another TFDS config name (data/tfds_planet).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

from rf_jax.data import planet
from rf_jax.data import synthetic as synthetic_lib
from rf_jax.data import tfds_planet

SPLITS = ('train', 'validation', 'test')


@dataclasses.dataclass(frozen=True)
class PlanetData:
  """The prepared dataset: random-access sources and normalisation stats."""
  train: Any
  validation: Any
  test: Any | None
  mean: np.ndarray  # float32[4], R,G,B,NIR, raw units, training split only.
  std: np.ndarray
  chip_size: int
  layout: str = 'kaggle'
  # Chip names per split, in source order (for predictions files).
  names: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
  data_dir: str = ''


class PlanetSource:
  """A TFDS ArrayRecord source whose records carry `name` as str.

  Picklable (grain ships it to worker processes). Its repr names the TFDS
  config (which fingerprints the source and the split) and the split: grain
  checks it when restoring an iterator state, so a state saved on another
  dataset is refused instead of silently continuing elsewhere.
  """

  def __init__(self, source, description: str = ''):
    self._source = source
    self._description = description or repr(source)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index) -> dict:
    record = self._source[index]
    name = record['name']
    return {'image': record['image'], 'labels': record['labels'],
            'name': name.decode() if isinstance(name, bytes) else name}

  def __repr__(self) -> str:
    return f'PlanetSource({self._description}, len={len(self)})'


def prepare(raw_dir, prepared_dir, *, layout: str, val_fraction: float,
            split_seed: int,
            synthetic: synthetic_lib.Spec | None = None) -> PlanetData:
  """Generates (synthetic), builds (once) and opens the Planet dataset.

  Args:
    raw_dir: the Kaggle- or course-layout directory; with `synthetic`, where
      the synthetic chips are generated (once).
    prepared_dir: the TFDS data_dir of the prepared dataset.
    layout: 'auto', 'kaggle' or 'course' (synthetic 'auto' is Kaggle).
    val_fraction, split_seed: the split (`planet.split`).
    synthetic: what to generate into raw_dir; None reads raw_dir as it is.

  An already prepared dataset is reused, never rebuilt; one prepared from
  another source or split lives under another TFDS config name.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not os.fspath(raw_dir):
    raise planet.PlanetDataError(
        'config.data.raw_dir is empty and config.data.synthetic.num_chips is '
        '0: point raw_dir at a Kaggle-layout directory (train_v2.csv, '
        'train-tif-v2/)')
  raw_dir = Path(raw_dir).expanduser()
  prepared_dir = Path(prepared_dir).expanduser()
  if synthetic is not None:
    synthetic_lib.ensure(raw_dir, synthetic,
                         'kaggle' if layout == 'auto' else layout)
  config = tfds_planet.make_config(raw_dir, layout=layout,
                                   val_fraction=val_fraction,
                                   split_seed=split_seed)
  builder = tfds_planet.load_builder(prepared_dir, config)
  if not builder.is_prepared():
    # A killed build leaves TFDS's incomplete.* directory (never read as
    # prepared); it may hold gigabytes, so say where it is.
    stale = sorted(builder.data_path.parent.glob('incomplete.*'))
    if stale:
      logging.warning('Ignoring interrupted builds (delete to free disk): %s',
                      ', '.join(map(str, stale)))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(raw_dir)),
        file_format='array_record')
    builder = tfds_planet.load_builder(prepared_dir, config)
  return open_prepared(builder)


def open_prepared(builder) -> PlanetData:
  """PlanetData over a prepared `tfds_planet.PlanetAmazon` builder."""
  meta = builder.info.metadata
  sources = {
      s: PlanetSource(builder.as_data_source(s),
                      f'{builder.name}/{builder.builder_config.name}/{s}')
      for s in SPLITS if s in builder.info.splits}
  stats = meta['train_stats']
  return PlanetData(
      train=sources['train'], validation=sources.get('validation'),
      test=sources.get('test'),
      mean=np.asarray(stats['mean'], np.float32),
      std=np.asarray(stats['std'], np.float32),
      chip_size=int(meta['chip_size']), layout=meta['layout'],
      names={s: tuple(meta['names'][s]) for s in sources},
      data_dir=str(builder.data_dir))


def steps_per_epoch(data: PlanetData, batch_size: int) -> int:
  """Whole global batches per epoch (the last partial batch is dropped)."""
  return len(data.train) // batch_size
