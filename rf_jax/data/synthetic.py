"""Seeded synthetic Planet datasets in the real on-disk layouts.

`write_dataset` writes `train_v2.csv` + `train-tif-v2/train_{i}.tif` (and
`test-tif-v2/test_{i}.tif`) exactly like the Kaggle download, so the same
reader, builder and pipeline serve synthetic and real data.

Chip content is a coarse grid of cells; each tag present lights a random
subset of cells with its own spectral signature (R, G, B, NIR). Some tags
change only the NIR band, so a model that sees NIR can beat one that sees RGB
only. Everything is vectorised over chunks of chips and fixed-size noise
tiles so that thousands of 256 px chips take seconds.

The bytes are the same on every CPU: each value is a draw from numpy's Generator, integer
arithmetic, an exact float32 sum of integer signatures, or one correctly rounded float32
multiply. Keep numpy's transcendental ufuncs and float reductions out of it: their AVX2 and
AVX-512 paths differ in the last bits, which can flip a rounding to uint16
(tests/test_data_synthetic.py generates with numpy's SIMD paths off and compares).
"""

from __future__ import annotations

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

# Real per-tag chip counts of train_v2.csv (40,479 chips; DESIGN.md §2).
REAL_TAG_COUNTS = {
    'clear': 28431, 'cloudy': 2089, 'haze': 2697, 'partly_cloudy': 7261,
    'agriculture': 12315, 'artisinal_mine': 339, 'bare_ground': 862,
    'blooming': 332, 'blow_down': 98, 'conventional_mine': 100,
    'cultivation': 4477, 'habitation': 3660, 'primary': 37513, 'road': 8071,
    'selective_logging': 340, 'slash_burn': 209, 'water': 7411,
}
REAL_NUM_CHIPS = 40479

# Per tag: (fraction of grid cells it lights, signature R, G, B, NIR) in
# uint16 units. Tags with a zero RGB signature are visible only in NIR.
SIGNATURES = {
    'clear': (0.0, (0, 0, 0, 0)),
    'cloudy': (0.9, (9000, 9000, 9000, 7000)),
    'haze': (1.0, (1500, 1500, 1500, 800)),
    'partly_cloudy': (0.3, (6000, 6000, 6000, 5000)),
    'agriculture': (0.3, (900, 700, 300, 1200)),
    'artisinal_mine': (0.12, (1500, 900, 400, -800)),
    'bare_ground': (0.15, (1200, 800, 500, 300)),
    'blooming': (0.2, (0, 0, 0, 2500)),           # NIR only
    'blow_down': (0.15, (0, 0, 0, -2000)),        # NIR only
    'conventional_mine': (0.15, (1800, 1500, 1200, 500)),
    'cultivation': (0.25, (0, 0, 0, 1800)),       # NIR only
    'habitation': (0.15, (1500, 1500, 1500, 400)),
    'primary': (0.6, (-600, 400, -300, 2000)),
    'road': (0.12, (1000, 1000, 1100, 200)),
    'selective_logging': (0.15, (0, 0, 0, -1500)),  # NIR only
    'slash_burn': (0.12, (-800, -800, -800, -1000)),
    'water': (0.2, (-500, 0, 800, -3000)),
}
NIR_ONLY_TAGS = tuple(t for t, (_, s) in SIGNATURES.items()
                      if s[3] and not any(s[:3]))
BASE_RGBN = (2800.0, 4300.0, 5200.0, 6500.0)
NOISE_STD = 150.0
GRID = 8            # cells per side
NUM_NOISE_TILES = 16
CHUNK = 64          # chips generated at once
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
  """Multi-hot labels [num, 17]: rows of a real CSV, else the real marginals.

  Without a CSV: one weather tag from the real weather frequencies; cloudy
  chips carry nothing else (as in the real data); the ground tags are drawn
  independently with their real frequency among non-cloudy chips.
  """
  if label_csv is not None:
    _, real = planet.read_labels(label_csv)
    return real[rng.integers(0, len(real), size=num)]
  counts = np.array([REAL_TAG_COUNTS[t] for t in planet.TAGS], np.float64)
  weather = counts[:4] / counts[:4].sum()
  labels = np.zeros((num, planet.NUM_TAGS), np.float32)
  labels[np.arange(num), rng.choice(4, size=num, p=weather)] = 1.0
  ground_p = counts[4:] / (REAL_NUM_CHIPS - REAL_TAG_COUNTS['cloudy'])
  ground = rng.random((num, len(ground_p))) < ground_p
  cloudy = labels[:, planet.TAG_INDEX['cloudy']] > 0
  labels[:, 4:] = ground & ~cloudy[:, None]
  return labels


def _noise_tiles(size: int, rng: np.random.Generator) -> np.ndarray:
  noise = rng.standard_normal((NUM_NOISE_TILES, size, size, 4), np.float32)
  return (noise * NOISE_STD).astype(np.int16)


def render_chips(labels: np.ndarray, size: int, rng: np.random.Generator,
                 noise: np.ndarray) -> np.ndarray:
  """Renders uint16 chips [N, size, size, 4] in R,G,B,NIR from labels."""
  n = len(labels)
  frac = np.array([SIGNATURES[t][0] for t in planet.TAGS], np.float32)
  sig = np.array([SIGNATURES[t][1] for t in planet.TAGS], np.float32)
  # Which cells each present tag lights: [N, 17, GRID, GRID].
  lit = rng.random((n, planet.NUM_TAGS, GRID, GRID)) < frac[None, :, None, None]
  lit &= labels[:, :, None, None] > 0
  cells = np.einsum('ntij,tb->nijb', lit.astype(np.float32), sig)
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


def _write_chips(root: Path, labels: dict, chip_size: int, layout: str,
                 rng: np.random.Generator, noise: np.ndarray, desc: str) -> None:
  """Renders and writes {'train': labels, 'test': labels} chips, in that order (the draws
  from `rng` follow it), as <prefix>-tif-v2/<prefix>_<i>.tif, showing progress."""
  total = sum(len(labs) for labs in labels.values())
  with tqdm.tqdm(total=total, unit='chip', desc=desc, file=sys.stderr,
                 mininterval=10.0) as progress:
    for prefix, labs in labels.items():
      if not len(labs):
        continue
      sub = root / f'{prefix}-tif-v2'
      sub.mkdir()
      for start in range(0, len(labs), CHUNK):
        chips = render_chips(labs[start:start + CHUNK], chip_size, rng, noise)
        if layout == 'course':
          chips = to_course(chips)
        for i, chip in enumerate(chips, start):
          write_tif(sub / f'{prefix}_{i}.tif', chip, layout)
        progress.update(len(chips))


def write_dataset(out_dir, num_chips: int, chip_size: int = 256, seed: int = 0,
                  layout: str = 'kaggle', label_csv=None,
                  num_test: int = 0) -> Path:
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
    num_test: unlabelled chips in test-tif-v2/ (test_0 ..).

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
    _write_chips(tmp, {'train': labels, 'test': test_labels}, chip_size, layout, rng,
                 noise, desc=f'Generating {out_dir.name}')
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
