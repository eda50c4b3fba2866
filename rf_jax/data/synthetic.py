"""Seeded synthetic Planet datasets in the real on-disk layouts.

`write_dataset` writes `train_v2.csv` + `train-tif-v2/train_{i}.tif` (and
`test-tif-v2/test_{i}.tif`) exactly like the Kaggle download, so the same
reader, builder and pipeline serve synthetic and real data.

Labels follow the real `train_v2.csv`: its 431 tag combinations with their chip counts
(`planet_tag_combinations.csv`), so a dataset of the real size carries the real tags, with
their co-occurrence, exactly. Chip content is a coarse grid of cells; each tag present lights
a random subset of cells with its own spectral signature (R, G, B, NIR). Some tags change only
the NIR band, so a model that sees NIR can beat one that sees RGB only. The weather tags
overlap as the real ones do: a clear chip carries a thin haze, a hazy one a haze of any
strength down to that, and partly cloudy and cloudy chips cover overlapping shares of the chip
with cloud. Everything is vectorised over chunks of chips and fixed-size noise tiles, and the
chunks are written by several threads: the real size (40,479 chips of 256 px, 21 GB) takes
minutes.

The bytes are the same on every CPU and for any number of threads: each chunk draws from
its own generator (the seed and the chunk's index), and each value is a draw, integer
arithmetic, an exact float32 sum of integer signatures, or one correctly rounded float32
multiply (and its rounding to an integer). Keep numpy's transcendental ufuncs and float reductions out of it: their AVX2 and
AVX-512 paths differ in the last bits, which can flip a rounding to uint16
(tests/test_data_synthetic.py generates with numpy's SIMD paths off and compares).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile
import tqdm

from rf_jax.data import planet

# The real train_v2.csv's tag combinations: {tags (planet.TAGS order, space-separated): chips}.
_COMBINATIONS_FILE = Path(__file__).with_name('planet_tag_combinations.csv')


def _read_combinations() -> dict[str, int]:
  with open(_COMBINATIONS_FILE, encoding='utf-8', newline='') as f:
    rows = csv.reader(line for line in f if not line.startswith('#'))
    next(rows)  # header
    return {tags: int(chips) for tags, chips in rows}


REAL_TAG_COMBINATIONS = _read_combinations()
REAL_NUM_CHIPS = sum(REAL_TAG_COMBINATIONS.values())  # 40,479 (DESIGN.md §2)
REAL_TAG_COUNTS = {t: sum(n for tags, n in REAL_TAG_COMBINATIONS.items() if t in tags.split())
                   for t in planet.TAGS}
# Kaggle's test-tif-v2: test_0 .. test_40668, then file_0 .. file_20521 (61,191 chips).
REAL_TEST_PREFIXES = (('test', 40669), ('file', 20522))

# Per tag: (share of grid cells it lights, low, high), (strength low, high), signature R, G, B,
# NIR in uint16 units: each chip draws its share and strength uniformly. Tags with a zero RGB
# signature are visible only in NIR.
_CLOUD = (9000, 9000, 9000, 7000)
_HAZE = (1500, 1500, 1500, 800)
SIGNATURES = {
    # The weather overlaps: a clear chip's thin haze reaches a hazy chip's faintest, and partly
    # cloudy covers up to 60% of a chip with cloud, cloudy from 50%.
    'clear': ((1.0, 1.0), (0.0, 0.35), _HAZE),
    'cloudy': ((0.5, 1.0), (0.8, 1.0), _CLOUD),
    'haze': ((1.0, 1.0), (0.25, 1.0), _HAZE),
    'partly_cloudy': ((0.1, 0.6), (0.6, 1.0), _CLOUD),
    'agriculture': ((0.3, 0.3), (1.0, 1.0), (900, 700, 300, 1200)),
    'artisinal_mine': ((0.12, 0.12), (1.0, 1.0), (1500, 900, 400, -800)),
    'bare_ground': ((0.15, 0.15), (1.0, 1.0), (1200, 800, 500, 300)),
    'blooming': ((0.2, 0.2), (1.0, 1.0), (0, 0, 0, 2500)),           # NIR only
    'blow_down': ((0.15, 0.15), (1.0, 1.0), (0, 0, 0, -2000)),       # NIR only
    'conventional_mine': ((0.15, 0.15), (1.0, 1.0), (1800, 1500, 1200, 500)),
    'cultivation': ((0.25, 0.25), (1.0, 1.0), (0, 0, 0, 1800)),      # NIR only
    'habitation': ((0.15, 0.15), (1.0, 1.0), (1500, 1500, 1500, 400)),
    'primary': ((0.6, 0.6), (1.0, 1.0), (-600, 400, -300, 2000)),
    'road': ((0.12, 0.12), (1.0, 1.0), (1000, 1000, 1100, 200)),
    'selective_logging': ((0.15, 0.15), (1.0, 1.0), (0, 0, 0, -1500)),  # NIR only
    'slash_burn': ((0.12, 0.12), (1.0, 1.0), (-800, -800, -800, -1000)),
    'water': ((0.2, 0.2), (1.0, 1.0), (-500, 0, 800, -3000)),
}
NIR_ONLY_TAGS = tuple(t for t, (_, _, s) in SIGNATURES.items()
                      if s[3] and not any(s[:3]))
BASE_RGBN = (2800.0, 4300.0, 5200.0, 6500.0)
NOISE_STD = 150.0
GRID = 8            # cells per side
NUM_NOISE_TILES = 16
CHUNK = 64          # chips generated at once, from their own generator
COURSE_SCALE = 64.0  # uint16 -> uint8 for the course layout
SPEC_FILE = 'synthetic.json'


class NotEmptyError(planet.PlanetDataError, FileExistsError):
  """The folder to generate into holds other files."""


@dataclasses.dataclass(frozen=True)
class Spec:
  """What to generate: `num_chips` training and `num_test` test chips of
  chip_size x chip_size px, everything following from `seed`."""
  num_chips: int
  chip_size: int
  num_test: int
  seed: int


def sample_labels(num: int, rng: np.random.Generator,
                  label_csv=None) -> np.ndarray:
  """Multi-hot labels [num, 17]: rows of a real CSV, else the real tag combinations.

  Without a CSV: the real file's rows as a multiset (REAL_TAG_COMBINATIONS) in a seeded order,
  the first `num` of them (again, shuffled anew, beyond 40,479): at the real size exactly the
  real tags and their co-occurrence, at a smaller size a sample of them without replacement.
  """
  if label_csv is not None:
    _, real = planet.read_labels(label_csv)
    return real[rng.integers(0, len(real), size=num)]
  rows = np.zeros((len(REAL_TAG_COMBINATIONS), planet.NUM_TAGS), np.float32)
  for i, tags in enumerate(REAL_TAG_COMBINATIONS):
    rows[i, [planet.TAG_INDEX[t] for t in tags.split()]] = 1.0
  multiset = np.repeat(np.arange(len(rows)), list(REAL_TAG_COMBINATIONS.values()))
  order = np.concatenate([rng.permutation(multiset)
                          for _ in range(-(-num // len(multiset)))] or [multiset[:0]])[:num]
  return rows[order]


def _noise_tiles(size: int, rng: np.random.Generator) -> np.ndarray:
  noise = rng.standard_normal((NUM_NOISE_TILES, size, size, 4), np.float32)
  return (noise * NOISE_STD).astype(np.int16)


def render_chips(labels: np.ndarray, size: int, rng: np.random.Generator,
                 noise: np.ndarray) -> np.ndarray:
  """Renders uint16 chips [N, size, size, 4] in R,G,B,NIR from labels."""
  n = len(labels)
  shares = np.array([SIGNATURES[t][0] for t in planet.TAGS], np.float32)
  strengths = np.array([SIGNATURES[t][1] for t in planet.TAGS], np.float32)
  sig = np.array([SIGNATURES[t][2] for t in planet.TAGS], np.float32)
  share = rng.uniform(shares[:, 0], shares[:, 1], size=(n, planet.NUM_TAGS)).astype(np.float32)
  strength = rng.uniform(strengths[:, 0], strengths[:, 1],
                         size=(n, planet.NUM_TAGS)).astype(np.float32)
  # Which cells each present tag lights: [N, 17, GRID, GRID].
  lit = rng.random((n, planet.NUM_TAGS, GRID, GRID)) < share[:, :, None, None]
  lit &= labels[:, :, None, None] > 0
  # Integer signatures per chip (one rounded multiply each), so the sum over tags is exact.
  chip_sig = np.rint(strength[:, :, None] * sig[None])
  cells = np.einsum('ntij,ntb->nijb', lit.astype(np.float32), chip_sig)
  cells += np.asarray(BASE_RGBN, np.float32)
  cells *= rng.uniform(0.9, 1.1, size=(n, 1, 1, 4)).astype(np.float32)
  cells = cells.astype(np.int32)
  tiles = noise[rng.integers(0, len(noise), size=n)]
  if size % GRID == 0:
    # Nearest upsampling as a broadcast over [N, GRID, k, GRID, k, 4] views:
    # one pass over the pixels instead of two fancy-index copies.
    k = size // GRID
    chips = (cells[:, :, None, :, None, :]
             + tiles.reshape(n, GRID, k, GRID, k, 4)).reshape(n, size, size, 4)
  else:
    idx = np.arange(size) * GRID // size
    chips = cells[:, idx][:, :, idx] + tiles
  return np.clip(chips, 0, 65535).astype(np.uint16)


def to_course(chips_rgbn: np.ndarray) -> np.ndarray:
  """uint16 R,G,B,NIR -> the course's 8-bit R,G,B,IR."""
  return np.clip(chips_rgbn / COURSE_SCALE, 0, 255).astype(np.uint8)


def write_tif(path, chip_rgbn: np.ndarray, layout: str = 'kaggle') -> None:
  """Writes one chip tagged like the real files (Photometric RGB + 4th band
  as unassociated alpha, uncompressed, pixel-interleaved)."""
  data = chip_rgbn[..., list(planet.KAGGLE_TO_RGBN)] if layout == 'kaggle' \
      else chip_rgbn
  tifffile.imwrite(path, data, photometric='rgb', planarconfig='contig',
                   extrasamples=['unassalpha'], rowsperstrip=4,
                   compression=None, metadata=None)


def _tags_string(row: np.ndarray) -> str:
  return ' '.join(t for t, v in zip(planet.TAGS, row) if v > 0)


def test_names(num: int) -> list[str]:
  """The first `num` names of Kaggle's test-tif-v2 (test_0 .. test_40668, then file_0 ..
  file_20521): all 61,191 at the real size; beyond it, more file_* names."""
  first, count = REAL_TEST_PREFIXES[0]
  return ([f'{first}_{i}' for i in range(min(num, count))]
          + [f'{REAL_TEST_PREFIXES[1][0]}_{i}' for i in range(max(0, num - count))])


def _write_test_mapping(path: Path, names: list[str], rng: np.random.Generator) -> None:
  """A `test_v2_file_mapping.csv` like Kaggle's: every file_* TIF with the chip name a
  submission must use, a seeded tenth of them published under another one's name."""
  files = [n for n in names if n.startswith(REAL_TEST_PREFIXES[1][0])]
  moved = rng.permutation(len(files))[:len(files) // 10]
  published = list(files)
  for i, j in zip(moved, np.roll(moved, 1)):
    published[i] = files[j]
  with open(path, 'w', encoding='utf-8', newline='') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(planet.TEST_MAPPING_HEADER)
    writer.writerows([f'{old}.tif', f'{new}.tif'] for old, new in zip(published, files))


def _write_chunk(sub: Path, names: list[str], labels: np.ndarray, chip_size: int,
                 layout: str, seed: int, key: tuple[int, int], noise: np.ndarray) -> int:
  """Renders and writes one chunk of chips from the generator of (seed, key)."""
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))
  chips = render_chips(labels, chip_size, rng, noise)
  if layout == 'course':
    chips = to_course(chips)
  for name, chip in zip(names, chips):
    write_tif(sub / f'{name}.tif', chip, layout)
  return len(chips)


def _write_chips(root: Path, splits: dict, chip_size: int, layout: str, seed: int,
                 noise: np.ndarray, threads: int, desc: str) -> None:
  """Renders and writes {'train': (names, labels), 'test': (names, labels)} as
  <prefix>-tif-v2/<name>.tif, chunk by chunk in `threads` threads (numpy and the file writes
  release the GIL; threads, not processes, so that no caller needs a `__main__` guard),
  showing progress."""
  jobs = []
  for split_index, (prefix, (names, labels)) in enumerate(splits.items()):
    if not len(names):
      continue
    sub = root / f'{prefix}-tif-v2'
    sub.mkdir()
    jobs += [(sub, names[i:i + CHUNK], labels[i:i + CHUNK], chip_size, layout, seed,
              (split_index, i // CHUNK), noise) for i in range(0, len(names), CHUNK)]
  with tqdm.tqdm(total=sum(len(j[1]) for j in jobs), unit='chip', desc=desc, file=sys.stderr,
                 mininterval=10.0) as progress:
    if threads <= 1:
      for job in jobs:
        progress.update(_write_chunk(*job))
      return
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      for written in pool.map(lambda job: _write_chunk(*job), jobs):
        progress.update(written)


def write_dataset(out_dir, num_chips: int, chip_size: int = 256, seed: int = 0,
                  layout: str = 'kaggle', label_csv=None,
                  num_test: int = 0, threads: int | None = None) -> Path:
  """Writes a seeded synthetic dataset in the Kaggle directory layout.

  Args:
    out_dir: directory to create (must not exist or be empty). Written via a
      temporary sibling and renamed, so an interrupted run leaves no partial
      dataset under this name.
    num_chips: training chips (train_0 .. train_{n-1}).
    chip_size: chips are chip_size x chip_size.
    seed: everything (labels, content) follows from it.
    layout: 'kaggle' (uint16 B,G,R,NIR) or 'course' (uint8 R,G,B,IR).
    label_csv: a real train_v2.csv to sample label rows from (keeps the real
      tag co-occurrence); None uses the built-in frequency table.
    num_test: unlabelled chips in test-tif-v2/ (`test_names`: test_0 .., then file_0 ..,
      as Kaggle's, with a test_v2_file_mapping.csv when there are file_* chips).
    threads: threads writing chunks (default: the CPUs; the bytes do not depend on it).

  Returns:
    Path of out_dir.
  """
  if layout not in ('kaggle', 'course'):
    raise ValueError(f"layout must be 'kaggle' or 'course', got {layout!r}")
  if num_chips < 1 or num_test < 0 or chip_size < 1:
    raise ValueError('need num_chips >= 1, num_test >= 0, chip_size >= 1')
  out_dir = Path(out_dir)
  if out_dir.exists() and any(out_dir.iterdir()):
    raise NotEmptyError(
        f'{out_dir}: not empty and not a synthetic dataset to reuse; synthetic chips are '
        'generated only into an empty or missing folder: set config.data.raw_dir to one '
        '(with raw_dir empty, they go into <workdir>/synthetic: use another --workdir) or '
        f'empty {out_dir}')
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.incomplete.',
                              dir=out_dir.parent))
  try:
    rng = np.random.Generator(np.random.PCG64(seed))
    labels = sample_labels(num_chips, rng, label_csv)
    test_labels = sample_labels(num_test, rng, label_csv)
    noise = _noise_tiles(chip_size, rng)
    names = [f'train_{i}' for i in range(num_chips)]
    with open(tmp / 'train_v2.csv', 'w', encoding='utf-8', newline='\n') as f:
      f.write('image_name,tags\n')
      f.writelines(f'{n},{_tags_string(r)}\n' for n, r in zip(names, labels))
    tests = test_names(num_test)
    if any(n.startswith(REAL_TEST_PREFIXES[1][0]) for n in tests):
      _write_test_mapping(tmp / planet.TEST_MAPPING_FILE, tests, rng)
    _write_chips(tmp, {'train': (names, labels), 'test': (tests, test_labels)}, chip_size,
                 layout, seed, noise, threads or os.cpu_count() or 1,
                 desc=f'Generating {out_dir.name}')
    spec = dict(num_chips=num_chips, chip_size=chip_size, seed=seed,
                layout=layout, num_test=num_test,
                label_csv=os.path.basename(label_csv) if label_csv else None)
    (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=1))
    if out_dir.exists():
      out_dir.rmdir()  # Empty (checked above).
    tmp.rename(out_dir)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
  return out_dir


def read_spec(out_dir) -> dict | None:
  """The parameters a synthetic dataset was written with (None if absent)."""
  path = Path(out_dir) / SPEC_FILE
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise planet.PlanetDataError(
        f'{path}: not JSON ({e}); delete {out_dir} to generate the synthetic data again') from None


def ensure(out_dir, spec: Spec, layout: str) -> None:
  """Writes the dataset of `spec` into out_dir once; refuses a directory
  written with other parameters (it would silently train on other data).
  Not safe to call from two processes at once: prepared.prepare holds a
  lock around it."""
  out_dir = Path(out_dir)
  want = dict(num_chips=int(spec.num_chips), chip_size=int(spec.chip_size),
              seed=int(spec.seed), layout=layout, num_test=int(spec.num_test),
              label_csv=None)
  have = read_spec(out_dir)
  if have is None:
    write_dataset(out_dir, want['num_chips'], want['chip_size'],
                  seed=want['seed'], layout=layout, num_test=want['num_test'])
  elif have != want:
    raise planet.PlanetDataError(
        f'{out_dir / SPEC_FILE}: synthetic data written with {have}, asked '
        f'for {want}; delete {out_dir} or use another workdir')
