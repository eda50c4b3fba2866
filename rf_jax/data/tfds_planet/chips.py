"""What the Planet builders share: chip features, uncompressed ArrayRecord
shards, and a build that validates every chip and names all the bad ones.

`ChipBuilder` reads each chip once (`planet.read_chip` checks it while the
shards are written). A bad chip does not stop the build: the remaining chips
are still read and checked (no longer written), and at the end one
`PlanetDataError` names them all. TFDS builds inside an `incomplete.*`
directory that it deletes on that error, so nothing half-built is left and
nothing already prepared is touched.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Sequence

from array_record.python import array_record_module
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters
from tensorflow_datasets.core import writer as writer_lib
import tqdm

from rf_jax.data import planet

# How many bad chips the error message names (the listing file has them all).
SHOWN_BAD_CHIPS = 20
# Seconds between progress updates (a log file gets one per interval).
PROGRESS_INTERVAL_S = 10.0


class ArrayRecordWriter(writer_lib.ExampleWriter):
  """ArrayRecord without compression: TFDS's default (zstd) reads a chip in
  ~1.1 ms, uncompressed in ~0.3 ms, for ~30% more disk on real chips (they
  compress to ~77%). Reading is the pipeline's largest per-record cost."""

  OPTIONS = 'group_size:1,uncompressed'

  def write(self, path, examples):
    writer = array_record_module.ArrayRecordWriter(os.fspath(path),
                                                   self.OPTIONS)
    try:
      for _, serialized in examples:
        writer.write(serialized)
    finally:
      writer.close()
    return None


def chip_features(layout: str, size: int) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      # Raw bytes decode ~4x faster than the default tensor encoding.
      'image': tfds.features.Tensor(shape=(size, size, 4),
                                    dtype=planet.LAYOUT_DTYPES[layout],
                                    encoding='bytes'),
      'labels': tfds.features.Tensor(shape=(planet.NUM_TAGS,),
                                     dtype=np.float32),
      'name': tfds.features.Text(),
  })


def bad_chips_error(errors: Sequence[planet.PlanetDataError], total: int,
                    listing: Path, fix: str) -> planet.PlanetDataError:
  """One error for all bad chips (in source order): the first line is the
  first chip's own message; then the count, the first SHOWN_BAD_CHIPS, where
  all are listed, and the fix. Missing chips only: a FileNotFoundError."""
  shown = [f'  {e}' for e in errors[:SHOWN_BAD_CHIPS]]
  if len(errors) > SHOWN_BAD_CHIPS:
    shown.append(f'  ... and {len(errors) - SHOWN_BAD_CHIPS} more')
  message = '\n'.join([
      str(errors[0]),
      f'{len(errors)} of {total} chips are bad (all listed in {listing}); '
      'nothing was prepared:', *shown, fix])
  missing_only = all(isinstance(e, FileNotFoundError) for e in errors)
  return (planet.PlanetFileNotFoundError if missing_only
          else planet.PlanetDataError)(message)


def check_recorded(builder, wanted: dict) -> None:
  """Refuses a prepared dataset whose recorded config (metadata) is not
  `wanted`: it was prepared from another source or split."""
  if not builder.is_prepared():
    return
  recorded = {k: builder.info.metadata.get(k) for k in wanted}
  if recorded != wanted:
    raise planet.PlanetDataError(
        f'{builder.data_dir}: prepared from another source or split '
        f'(recorded {recorded}, wanted {wanted}); delete it or use another '
        'prepared_dir')


def shards(items: list, size: int) -> list[list]:
  return [items[i:i + size] for i in range(0, len(items), size)]


class ChipBuilder(tfds.core.ShardBasedBuilder, skip_registration=True):
  """A ShardBasedBuilder over chip files (see PlanetAmazon for why not
  GeneratorBasedBuilder) whose build checks every chip, with progress.

  Subclasses list their chips per split (`_split_items`), may watch the
  good ones (`_on_chip`), and give the fix the error ends with
  (BAD_CHIPS_FIX).
  """

  # TFDS keeps a shard's examples in memory while writing it: cap the shard.
  SHARD_BYTES = 128 << 20
  BAD_CHIPS_FIX = ''

  def _example_writer(self) -> writer_lib.ExampleWriter:
    if self.info.file_format == file_adapters.FileFormat.ARRAY_RECORD:
      return ArrayRecordWriter(self.info.file_format)
    return super()._example_writer()

  def _chip_shards(self, items: list, on_chip=None) -> list:
    """Shard generators over `items` [(position, path, labels, name)];
    `on_chip(chip)` sees each good chip (statistics)."""
    config = self.builder_config
    chip_bytes = config.chip_size ** 2 * 4 * planet.LAYOUT_DTYPES[
        config.layout].itemsize
    return [functools.partial(self._generate_examples, shard, on_chip)
            for shard in shards(items, max(1, self.SHARD_BYTES // chip_bytes))]

  def _generate_examples(self, items, on_chip):
    config = self.builder_config
    for position, path, labels, name in items:
      try:
        chip = planet.read_chip(path, config.layout,
                                expected_size=config.chip_size)
      except planet.PlanetDataError as e:
        self._failures.append((position, e))
        continue
      finally:
        self._progress.update()
      if on_chip is not None:
        on_chip(chip)
      if not self._failures:  # After a bad chip the rest is only checked.
        yield position, {'image': chip, 'labels': labels, 'name': name}

  def _download_and_prepare(self, dl_manager, download_config=None):
    self._failures, self._progress = [], None
    try:
      super()._download_and_prepare(dl_manager, download_config)
    finally:
      if self._progress is not None:
        self._progress.close()
    listing = self.bad_chips_listing()
    if self._failures:
      errors = [e for _, e in sorted(self._failures, key=lambda f: f[0])]
      listing.write_text(''.join(f'{e}\n' for e in errors))
      raise bad_chips_error(errors, self._progress.total, listing,
                            self.BAD_CHIPS_FIX)
    listing.unlink(missing_ok=True)  # Left by an earlier build: now fixed.

  def _shard_iterators_per_split(self, dl_manager):
    split_items = self._split_items(Path(dl_manager.manual_dir))
    self._progress = tqdm.tqdm(
        total=sum(map(len, split_items.values())), desc=f'Preparing {self.name}',
        unit='chip', file=sys.stderr, mininterval=PROGRESS_INTERVAL_S,
        smoothing=0.05)
    return {split: self._chip_shards(items, self._on_chip(split))
            for split, items in split_items.items() if items}

  def _split_items(self, raw_dir: Path) -> dict[str, list]:
    """{split: [(position, path, labels, name)]} of the raw directory, where
    position orders the chips as the raw directory lists them (CSV rows,
    files); sets the metadata."""
    raise NotImplementedError

  def _on_chip(self, split: str):
    """What sees each good chip of `split` (statistics); None: nothing."""
    del split
    return None

  def beside(self, suffix: str) -> Path:
    """A file beside this config's dataset directory: `<config name><suffix>`
    (its lock, its list of bad chips)."""
    config_dir = Path(self.data_path).parent
    return config_dir.parent / f'{config_dir.name}{suffix}'

  def bad_chips_listing(self) -> Path:
    """Where a build that met bad chips lists them all."""
    return self.beside('.bad_chips.txt')
