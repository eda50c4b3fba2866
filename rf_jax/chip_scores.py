"""Scores any Planet chips with a trained run: `--mode predict --chips DIR_OR_GLOB`.

The chips (either layout, the run's) are read by name, fed through the same evaluation batches
and step as the validation split, normalised with the run's own band statistics (recorded in
its workdir, so no prepared dataset is needed), and written as a CSV of per-tag scores plus the
tags predicted at the thresholds that `--mode evaluate` tuned.
"""

from __future__ import annotations

import glob
import os
import pathlib
import re

import jax
import ml_collections
import numpy as np

from rf_jax import config_checks
from rf_jax import errors
from rf_jax import evaluate
from rf_jax import inputs
from rf_jax import metrics
from rf_jax import provenance
from rf_jax import submission
from rf_jax import workdir as workdir_lib
from rf_jax.data import planet
from rf_jax.data import prepared


# Chips are TIFs; cameras and other tools write the suffix in either case, and either spelling.
CHIP_SUFFIXES = ('.tif', '.tiff')


class OutputExistsError(errors.UserError, FileExistsError):
  """The predictions file to write exists already (a second run would silently replace it)."""


def _is_chip(path: pathlib.Path) -> bool:
  return path.suffix.lower() in CHIP_SUFFIXES and path.is_file()


def chip_paths(pattern: str) -> list[pathlib.Path]:
  """The .tif/.tiff chips (any case) of a directory, or of the files a glob names, in natural
  name order."""
  path = pathlib.Path(pattern).expanduser()
  matched = list(path.iterdir()) if path.is_dir() else [
      pathlib.Path(p) for p in glob.glob(os.path.expanduser(pattern))]
  natural = lambda p: [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', p.name)]
  found = sorted(filter(_is_chip, matched), key=natural)
  if not found:
    seen = f' ({len(matched)} other files or folders)' if matched else ''
    raise planet.PlanetFileNotFoundError(
        f'--chips={pattern}: no .tif or .tiff chips found{seen}; give a directory of chips or a '
        'glob such as "/data/planet/test-tif-v2/test_1*.tif".')
  by_name = {}
  for p in found:  # a row of the CSV is named by the chip's file name without its suffix
    if p.stem in by_name:
      raise planet.PlanetDataError(
          f'--chips={pattern}: {by_name[p.stem]} and {p} would both be named "{p.stem}" in the '
          'scores: rename one, or score them in separate runs with separate --output files.')
    by_name[p.stem] = p
  return found


class ChipSource:
  """Chips read from their files on access, as records of the prepared dataset's shape."""

  def __init__(self, paths, layout: str, chip_size: int):
    self._paths, self._layout, self._chip_size = list(paths), layout, chip_size

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> dict:
    path = self._paths[index]
    image = planet.read_chip(path, self._layout, expected_size=self._chip_size)
    return {'image': image, 'labels': np.zeros(planet.NUM_TAGS, np.float32), 'name': path.stem}

  def read_into(self, index: int, image: np.ndarray) -> np.ndarray:
    """Chip `index` copied into `image`; its labels (zeros: the chips are unlabelled)."""
    record = self[index]
    image[...] = record['image']
    return record['labels']


def _chips_as_data(paths, wd: workdir_lib.Workdir) -> prepared.PlanetData:
  """The chips in the place of a validation split, with the run's statistics and layout."""
  stats = provenance.saved_statistics(wd)
  if stats is None:
    raise workdir_lib.MissingRunFileError(
        f'{wd.provenance}: no dataset statistics recorded; train this run with this version '
        'of rf_jax first.')
  dataset = workdir_lib.read_json(wd.provenance)['dataset']
  source = ChipSource(paths, dataset['layout'], dataset['chip_size'])
  return prepared.PlanetData(
      train=None, validation=source, mean=stats[0], std=stats[1],
      chip_size=dataset['chip_size'], layout=dataset['layout'],
      names={'validation': tuple(p.stem for p in paths)}, data_dir=str(paths[0].parent))


def write_scores(path: pathlib.Path, names, scores: np.ndarray, predicted: np.ndarray) -> None:
  """`image_name`, one column of scores per tag (float32, round-trip precision), `tags`."""
  workdir_lib.write_csv(path, ['image_name', *planet.TAGS, 'tags'], (
      [name, *(f'{float(v):.9g}' for v in row), submission.predicted_tags(tags)]
      for name, row, tags in zip(names, scores, predicted)))


def predict_chips(config: ml_collections.ConfigDict, workdir, pattern: str,
                  output=None) -> pathlib.Path:
  """Scores the chips `pattern` names with the run's best checkpoint; writes them to `output`
  (a CSV file; default the workdir's chip_scores.csv), which must not exist yet."""
  config_checks.check(config)
  wd = workdir_lib.Workdir(workdir)
  output = wd.chip_scores if output is None else pathlib.Path(output).expanduser()
  if output.exists():  # checked before the model is restored: nothing is computed in vain
    raise OutputExistsError(
        f'{output} exists already: give --output OTHER.csv for these chips\' scores, or '
        'delete it to replace it.')
  workdir_lib.check_output_dir(output.parent, output.name,
                               'give --output DIR/NAME.csv in a directory you can write.')
  paths = chip_paths(pattern)
  state, restored = evaluate.restore_model(config, wd)
  thresholds = submission.tuned_thresholds(wd, restored.step)
  data = _chips_as_data(paths, wd)
  scores, _, _ = evaluate.make_predict_fn(config, data, state)(
      inputs.eval_batches(config, data, 'validation'))
  if jax.process_index() == 0:
    write_scores(output, data.names['validation'], scores, metrics.binarize(scores, thresholds))
    print(f'{output}: {len(paths)} chips scored by step {restored.step}, tags at the '
          f'thresholds tuned in {wd.metrics}.')
  return output
