"""The Planet "Understanding the Amazon from Space" domain: tags, labels, chips, split.

Pure and small: no TFDS. Everything here raises `PlanetDataError`
(a `ValueError`) for bad input, with a message that names the file (and the
line for CSV files), so that a user with a broken download knows what to fix.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import tifffile

from rf_jax import errors

# The label vector's order everywhere (the course's order, DESIGN.md §2).
TAGS: tuple[str, ...] = (
    'clear', 'cloudy', 'haze', 'partly_cloudy',
    'agriculture', 'artisinal_mine', 'bare_ground', 'blooming', 'blow_down',
    'conventional_mine', 'cultivation', 'habitation', 'primary', 'road',
    'selective_logging', 'slash_burn', 'water',
)
NUM_TAGS = len(TAGS)
TAG_INDEX = {t: i for i, t in enumerate(TAGS)}

LABELS_HEADER = ('image_name', 'tags')
# A label file may name the chip's file (train_0.tif): the chip's name is the bare stem.
_TIF_SUFFIX = re.compile(r'\.tiff?$', re.IGNORECASE)
# Kaggle stores B,G,R,NIR; we keep R,G,B,NIR in memory.
KAGGLE_TO_RGBN = (2, 1, 0, 3)
LAYOUT_DTYPES = {'kaggle': np.dtype(np.uint16), 'course': np.dtype(np.uint8)}
LAYOUTS = ('auto', 'kaggle', 'course')
# The course's normalisation of its 8-bit R,G,B,IR chips: (x / 255 - mean) / std.
COURSE_PIXEL_MAX = 255.0
COURSE_MEAN = (0.7476, 0.6534, 0.4757, 0.0960)
COURSE_STD = (0.1677, 0.1828, 0.2137, 0.0284)


class PlanetDataError(errors.UserError, ValueError):
  """Bad input data: the message names the file (and line)."""


class PlanetFileNotFoundError(PlanetDataError, FileNotFoundError):
  """A file the data layer needs is missing."""


def _location(path, line: int | None = None) -> str:
  return f'{os.fspath(path)}:{line}' if line is not None else os.fspath(path)


def _line_of_offset(raw: bytes, offset: int) -> int:
  return raw.count(b'\n', 0, offset) + 1


def _decode_csv(path, raw: bytes) -> str:
  try:
    # utf-8-sig drops a leading byte order mark (harmless, Excel writes it).
    return raw.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    raise PlanetDataError(
        f'{_location(path, _line_of_offset(raw, e.start))}: not UTF-8 text '
        f'(byte 0x{raw[e.start]:02x} at offset {e.start}); save the label '
        'file as UTF-8') from None


def parse_tags(tag_string: str, where: str) -> np.ndarray:
  """Space-separated tags -> multi-hot float32[17]; repeats count once."""
  tags = tag_string.split()
  if not tags:
    raise PlanetDataError(f'{where}: empty tags')
  unknown = sorted({t for t in tags if t not in TAG_INDEX})
  if unknown:
    raise PlanetDataError(
        f'{where}: unknown tag(s) {", ".join(map(repr, unknown))}; '
        f'known tags: {" ".join(TAGS)}')
  row = np.zeros(NUM_TAGS, np.float32)
  row[[TAG_INDEX[t] for t in tags]] = 1.0
  return row


def read_labels(csv_path) -> tuple[list[str], np.ndarray]:
  """Reads a Kaggle `train_v2.csv`: (names, multi-hot labels float32[N, 17]).

  Accepts the real file's quirks (repeated and unsorted tags, a row without
  a weather tag), harmless encodings (CRLF line ends, UTF-8 BOM) and names
  given as file names (`train_0.tif`, `.tiff`, any case: read as `train_0`). Rejects
  unknown or empty tags, duplicate names, a wrong header, non-UTF-8 text.
  """
  path = Path(csv_path)
  if not path.is_file():
    raise PlanetFileNotFoundError(f'{path}: label file not found')
  raw = path.read_bytes()
  text = _decode_csv(path, raw)
  reader = csv.reader(io.StringIO(text, newline=''))
  header = next(reader, None)
  if header is None or tuple(h.strip() for h in header) != LABELS_HEADER:
    raise PlanetDataError(
        f'{_location(path, 1)}: header must be "{",".join(LABELS_HEADER)}", '
        f'got {",".join(header) if header else "an empty file"!r}')
  names, rows, first_line = [], [], {}
  for fields in reader:
    line = reader.line_num
    if not fields or (len(fields) == 1 and not fields[0].strip()):
      continue  # Blank line (e.g. trailing newline twice): nothing to read.
    where = _location(path, line)
    if len(fields) != 2:
      raise PlanetDataError(
          f'{where}: expected 2 fields "image_name,tags", got {len(fields)}')
    name = _TIF_SUFFIX.sub('', fields[0].strip())
    if not name:
      raise PlanetDataError(f'{where}: empty image name')
    if name in first_line:
      raise PlanetDataError(
          f'{where}: duplicate image name {name!r} '
          f'(first seen on line {first_line[name]})')
    first_line[name] = line
    rows.append(parse_tags(fields[1], where))
    names.append(name)
  if not names:
    raise PlanetDataError(f'{path}: no label rows')
  return names, np.stack(rows)



TEST_MAPPING_HEADER = ('old', 'new')
# Kaggle's renaming of the test-tif-v2 TIFs, beside the label file.
TEST_MAPPING_FILE = 'test_v2_file_mapping.csv'


def read_test_mapping(csv_path) -> dict[str, str]:
  """Kaggle's `test_v2_file_mapping.csv`: {tif stem: true chip name}.

  Some `file_*` TIFs of test-tif-v2 were published under another chip's name;
  row `file_4158.tif,file_18830.tif` says the TIF `file_4158` is chip
  `file_18830`, the name a submission must use.
  """
  path = Path(csv_path)
  raw = path.read_bytes()
  reader = csv.reader(io.StringIO(_decode_csv(path, raw), newline=''))
  header = next(reader, None)
  if header is None or tuple(h.strip() for h in header) != TEST_MAPPING_HEADER:
    raise PlanetDataError(f'{_location(path, 1)}: header must be "old,new", got '
                          f'{",".join(header) if header else "an empty file"!r}')
  mapping = {}
  for fields in reader:
    if not any(f.strip() for f in fields):
      continue
    where = _location(path, reader.line_num)
    if len(fields) != 2 or not all(f.strip().endswith('.tif') for f in fields):
      raise PlanetDataError(f'{where}: expected "old.tif,new.tif", got {",".join(fields)!r}')
    old, new = (Path(f.strip()).stem for f in fields)
    if old in mapping:
      raise PlanetDataError(f'{where}: {old}.tif is mapped twice')
    mapping[old] = new
  if sorted(mapping) != sorted(mapping.values()):
    raise PlanetDataError(f'{path}: not a renaming of the same files (old and new differ as sets)')
  return mapping

def _check_tiff_complete(path, tif: tifffile.TiffFile) -> None:
  # Uncompressed chips read past EOF as garbage/zeros in some readers: check
  # that every strip of the first page lies inside the file.
  if not len(tif.pages):
    raise PlanetDataError(
        f'{path}: no readable image directory (truncated or not a TIFF)')
  page = tif.pages.first
  size = tif.filehandle.size
  for offset, count in zip(page.dataoffsets, page.databytecounts):
    if offset + count > size:
      raise PlanetDataError(
          f'{path}: truncated TIFF (image data ends at byte {offset + count}, '
          f'file has {size} bytes)')


def read_chip(path, layout: str = 'auto', *,
              expected_size: int | None = None) -> np.ndarray:
  """Reads one chip as [H, W, 4] in R, G, B, NIR order, in the file's dtype.

  Args:
    path: a Kaggle TIF (uint16 B,G,R,NIR) or a course TIF (uint8 R,G,B,IR).
    layout: 'kaggle', 'course' or 'auto' (decided from the dtype).
    expected_size: if given, the chip must be expected_size x expected_size.
  """
  if layout not in LAYOUTS:
    raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}')
  path = Path(path)
  if not path.is_file():
    raise PlanetFileNotFoundError(f'{path}: chip not found')
  try:
    with tifffile.TiffFile(path) as tif:
      _check_tiff_complete(path, tif)
      page = tif.pages.first
      image = page.asarray()
      planar_separate = page.planarconfig == tifffile.PLANARCONFIG.SEPARATE
  except PlanetDataError:
    raise
  except Exception as e:  # tifffile raises many types on corrupt input.
    raise PlanetDataError(
        f'{path}: not a readable TIFF ({type(e).__name__}: {e})') from None
  if planar_separate and image.ndim == 3:
    image = np.moveaxis(image, 0, -1)
  if image.ndim != 3 or image.shape[-1] != 4:
    bands = 1 if image.ndim == 2 else image.shape[-1]
    raise PlanetDataError(
        f'{path}: expected 4 bands (H, W, 4), got shape {image.shape} '
        f'({bands} band(s))')
  height, width = image.shape[:2]
  if height != width or (expected_size is not None and height != expected_size):
    want = (f'{expected_size}x{expected_size}' if expected_size is not None
            else 'a square chip')
    raise PlanetDataError(f'{path}: expected {want}, got {height}x{width}')
  if layout == 'auto':
    layout = {v: k for k, v in LAYOUT_DTYPES.items()}.get(image.dtype, '')
    if not layout:
      raise PlanetDataError(
          f'{path}: dtype {image.dtype} is neither uint16 (Kaggle layout) nor '
          'uint8 (course layout)')
  elif image.dtype != LAYOUT_DTYPES[layout]:
    raise PlanetDataError(
        f'{path}: {layout} layout expects {LAYOUT_DTYPES[layout]}, got '
        f'{image.dtype}')
  if layout == 'kaggle':
    image = image[..., KAGGLE_TO_RGBN]
  return np.ascontiguousarray(image)


# The study's split: sklearn's train_test_split(rows, test_size=0.33, random_state=321).
STUDY_VAL_FRACTION = 0.33
STUDY_SEED = 321
# Bumped whenever `split` assigns rows differently: it is part of the prepared
# dataset's fingerprint, so a changed rule never reuses an old split's data.
# 1: PCG64 permutation, round(n f) validation rows; 2: scikit-learn's rule.
SPLIT_RULE_VERSION = 2


def split(names: Sequence[str], val_fraction: float = STUDY_VAL_FRACTION,
          seed: int = STUDY_SEED) -> tuple[np.ndarray, np.ndarray]:
  """Seeded train/validation split: (train_idx, val_idx), each sorted.

  The same sets as sklearn's `train_test_split(range(n), test_size=
  val_fraction, random_state=seed)` (the study's split): numpy's legacy
  `RandomState(seed).permutation(n)`, whose first ceil(val_fraction * n)
  entries are validation (13,359 of 40,479 for the study). Depends only on
  len(names), val_fraction and seed; numpy keeps this stream stable.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f'val_fraction must be in [0, 1), got {val_fraction}')
  n = len(names)
  num_val = math.ceil(val_fraction * n)  # sklearn's float product, same rounding
  perm = np.random.RandomState(seed).permutation(n)
  val_idx = np.sort(perm[:num_val]).astype(np.int64)
  train_idx = np.sort(perm[num_val:]).astype(np.int64)
  return train_idx, val_idx
