"""The prepared Planet dataset: generated (synthetic) and prepared once, then opened.

`prepare` turns a raw directory into `PlanetData`: random-access sources of
the training and validation splits, their chip names in source order and the
training split's band statistics. The test chips are another dataset,
prepared only when first used (`PlanetData.test`, `prepare_test`), so a new,
missing or bad test chip never changes, rebuilds or blocks the training data.

An already prepared dataset is reused, never rebuilt, wherever its raw
directory has moved (its TFDS config name fingerprints the chips, labels and
split, not the folder: data/tfds_planet); other chips, labels or a split
live under another config name. Each is built by one process at a time: a
lock file beside it makes another process (another job or user, another JAX
process on the same file system) wait for the build and then open it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from rf_jax.data import example_wire
from rf_jax.data import planet
from rf_jax.data import synthetic as synthetic_lib
from rf_jax.data import tfds_planet

SPLITS = ('train', 'validation', 'test')


class PlanetSource:
  """A TFDS ArrayRecord source whose records carry `name` as str.

  Its repr names the TFDS config (which fingerprints the chips, labels and
  split) and the split: the train loader's state carries it
  (pipeline.TrainBatches), so a state saved on another dataset is refused
  on restore instead of silently continuing elsewhere.
  """

  def __init__(self, source, description: str = '', data_dir: str = ''):
    self._source = source
    self._description = description or repr(source)
    self._data_dir = data_dir

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index) -> dict:
    record = self._source[index]
    name = record['name']
    return {'image': record['image'], 'labels': record['labels'],
            'name': name.decode() if isinstance(name, bytes) else name}

  def read_into(self, index: int, image: np.ndarray) -> np.ndarray:
    """Copies record `index`'s chip into `image` (a buffer of the chip's stored dtype and
    shape) straight from the record's bytes, undecoded; returns its labels, float32 [17]."""
    serialized = self._source.data_source[index]
    try:
      spans = example_wire.feature_spans(serialized)
      chip, labels = spans['image'], spans['labels']
      if chip.end - chip.start != image.nbytes:
        raise example_wire.WireError(f'its image holds {chip.end - chip.start} bytes, not '
                                     f'{image.nbytes} ({image.dtype} {image.shape})')
    except (example_wire.WireError, KeyError) as e:
      raise planet.PlanetDataError(
          f'{self!r}: record {index} is not a prepared chip ({e}): the prepared dataset '
          f'{self._data_dir or "(its data_dir)"} is damaged; delete it and run again to '
          'rebuild it') from e
    image[...] = np.frombuffer(serialized, image.dtype, image.size,
                               chip.start).reshape(image.shape)
    return np.frombuffer(serialized, '<f4', (labels.end - labels.start) // 4,
                         labels.start).astype(np.float32)

  def __repr__(self) -> str:
    return f'PlanetSource({self._description}, len={len(self)})'


@dataclasses.dataclass(frozen=True)
class TestSplit:
  """The prepared test chips: their source and names, in source order."""
  source: PlanetSource
  names: tuple[str, ...]
  data_dir: str


class TestChips:
  """A raw directory's test chips: counted now, prepared (once) and opened on
  first use of `split`."""

  def __init__(self, raw_dir: Path, prepared_dir: Path, *, layout: str,
               chip_size: int, count: int):
    self._args = (raw_dir, prepared_dir)
    self._kwargs = dict(layout=layout, chip_size=chip_size)
    self._count = count

  def __len__(self) -> int:
    return self._count

  @functools.cached_property
  def split(self) -> TestSplit:
    return prepare_test(*self._args, **self._kwargs)


class SplitNames(Mapping):
  """Chip names per split, in source order. Iterates the prepared splits
  (train, validation); 'test' is there when the raw directory holds test
  chips, and reading it prepares them (once)."""

  def __init__(self, names: Mapping[str, Sequence[str]],
               test_chips: TestChips | None):
    self._names, self._test_chips = dict(names), test_chips

  def __getitem__(self, split: str) -> Sequence[str]:
    if split == 'test' and self._test_chips is not None:
      return self._test_chips.split.names
    return self._names[split]

  def __contains__(self, split) -> bool:
    return split in self._names or (
        split == 'test' and self._test_chips is not None)

  def __iter__(self) -> Iterator[str]:
    return iter(self._names)

  def __len__(self) -> int:
    return len(self._names)


@dataclasses.dataclass(frozen=True)
class PlanetData:
  """The prepared dataset: random-access sources and normalisation stats."""
  train: Any
  validation: Any
  mean: np.ndarray  # float32[4], R,G,B,NIR, raw units, training split only.
  std: np.ndarray
  chip_size: int
  layout: str = 'kaggle'
  names: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
  data_dir: str = ''
  test_chips: TestChips | None = None

  @property
  def has_test(self) -> bool:
    """Whether the raw directory holds test chips (cheap: nothing is read)."""
    return self.test_chips is not None

  @property
  def test(self) -> PlanetSource | None:
    """The test chips, prepared (once) on first use; None without them."""
    return None if self.test_chips is None else self.test_chips.split.source


@contextlib.contextmanager
def exclusive(lock_path: Path, what: str) -> Iterator[None]:
  """Holds an exclusive lock on `lock_path` (flock: released by the kernel
  however the holder ends), waiting while another process holds it."""
  lock_path.parent.mkdir(parents=True, exist_ok=True)
  with open(lock_path, 'a', encoding='utf-8') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.warning('Waiting for another process to finish %s (lock %s)',
                      what, lock_path)
      fcntl.flock(f, fcntl.LOCK_EX)
    yield


def _prepared_once(load: Callable[[], Any], raw_dir: Path):
  """The builder `load()` gives, built from raw_dir first unless prepared,
  by one process at a time (the others wait, then open its build)."""
  builder = load()
  if builder.is_prepared():
    return builder
  with exclusive(builder.beside('.lock'), f'preparing {builder.data_dir}'):
    builder = load()  # Built by another process while this one waited?
    if not builder.is_prepared():
      # A killed build leaves TFDS's incomplete.* directory (never read as
      # prepared); it may hold gigabytes, so say where it is.
      stale = sorted(builder.data_path.parent.glob('incomplete.*'))
      if stale:
        logging.warning('Ignoring interrupted builds (delete to free disk): %s',
                        ', '.join(map(str, stale)))
      print(f'Preparing {builder.builder_config.num_chips:,} chips from {raw_dir} '
            f'into {builder.data_dir} (once; later runs reuse it)', flush=True)
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(
              manual_dir=str(raw_dir)),
          file_format='array_record')
      _remove_fixed_listings(builder, raw_dir)
      builder = load()
  return builder


def _remove_fixed_listings(builder, raw_dir: Path) -> None:
  """A build that met bad chips lists them beside its dataset, named after the
  content it saw; fixing them changes that content, so the listing is not this
  build's. This build has just read every chip of raw_dir it needs and found
  them good: listings that name only raw_dir's chips are stale."""
  prefix = f'{Path(raw_dir).resolve()}{os.sep}'
  for listing in builder.bad_chips_listing().parent.glob('*.bad_chips.txt'):
    if all(line.startswith(prefix) for line in listing.read_text().splitlines()):
      listing.unlink(missing_ok=True)


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

  Every training chip is checked while the shards are written; bad ones are
  all named in one PlanetDataError, and nothing is prepared. The test chips
  are only counted here (see PlanetData.test).
  """
  if not os.fspath(raw_dir):
    raise planet.PlanetDataError(
        'config.data.raw_dir is empty and config.data.synthetic.num_chips is '
        '0: point raw_dir at a Kaggle-layout directory (train_v2.csv, '
        'train-tif-v2/)')
  raw_dir = Path(raw_dir).expanduser()
  prepared_dir = Path(prepared_dir).expanduser()
  if synthetic is not None:
    with exclusive(raw_dir.parent / f'.{raw_dir.name}.lock',
                   f'generating {raw_dir}'):
      synthetic_lib.ensure(raw_dir, synthetic,
                           'kaggle' if layout == 'auto' else layout)
  config = tfds_planet.make_config(raw_dir, layout=layout,
                                   val_fraction=val_fraction,
                                   split_seed=split_seed)
  builder = _prepared_once(
      functools.partial(tfds_planet.load_builder, prepared_dir, config),
      raw_dir)
  num_test = len(tfds_planet.list_test_chips(raw_dir))
  test_chips = TestChips(
      raw_dir, prepared_dir, layout=config.layout, chip_size=config.chip_size,
      count=num_test) if num_test else None
  return open_prepared(builder, test_chips)


def prepare_test(raw_dir, prepared_dir, *, layout: str,
                 chip_size: int) -> TestSplit | None:
  """Builds (once) and opens raw_dir's test chips; None without test chips.

  `layout` ('kaggle' or 'course') and `chip_size` are the training chips'
  (PlanetData.layout, .chip_size). Every test chip is checked while the
  shards are written; bad ones are all named in one PlanetDataError.
  """
  raw_dir = Path(raw_dir).expanduser()
  if not tfds_planet.list_test_chips(raw_dir):
    return None
  config = tfds_planet.make_test_config(raw_dir, layout=layout,
                                        chip_size=chip_size)
  builder = _prepared_once(
      functools.partial(tfds_planet.load_test_builder,
                        Path(prepared_dir).expanduser(), config), raw_dir)
  return TestSplit(source=_sources(builder)['test'],
                   names=tuple(builder.info.metadata['names']['test']),
                   data_dir=str(builder.data_dir))


def _sources(builder) -> dict[str, PlanetSource]:
  """{split: PlanetSource} of a prepared builder, every shard file checked
  (array_record would fail at the first read of a missing one)."""
  sources = {}
  for split, info in builder.info.splits.items():
    missing = [Path(p).name for p in info.filepaths if not os.path.exists(p)]
    if missing:
      raise planet.PlanetDataError(
          f'{builder.data_dir}: prepared dataset is incomplete ({len(missing)} '
          f'shard file(s) missing, e.g. {missing[0]}: a copy cut short?); '
          f'delete {builder.data_dir} and run again to rebuild it')
    sources[split] = PlanetSource(
        builder.as_data_source(split),
        f'{builder.name}/{builder.builder_config.name}/{split}',
        str(builder.data_dir))
  return sources


def open_prepared(builder, test_chips: TestChips | None = None) -> PlanetData:
  """PlanetData over a prepared `tfds_planet.PlanetAmazon` builder."""
  meta = builder.info.metadata
  sources = _sources(builder)
  stats = meta['train_stats']
  names = {s: tuple(meta['names'][s]) for s in sources}
  return PlanetData(
      train=sources['train'], validation=sources.get('validation'),
      mean=np.asarray(stats['mean'], np.float32),
      std=np.asarray(stats['std'], np.float32),
      chip_size=int(meta['chip_size']), layout=meta['layout'],
      names=SplitNames(names, test_chips), data_dir=str(builder.data_dir),
      test_chips=test_chips)


def steps_per_epoch(data: PlanetData, batch_size: int) -> int:
  """Whole global batches per epoch (the last partial batch is dropped)."""
  return len(data.train) // batch_size
