"""The files a run writes for the user (chip_scores.csv, submission.csv, export/), without a
model: CSV quoting, which chips --chips finds, and the output checks made before any model work."""

import csv

import numpy as np
import pytest

from rf_jax import checkpoints
from rf_jax import chip_scores
from rf_jax import errors
from rf_jax import export
from rf_jax import submission
from rf_jax.data import planet
from rf_jax import workdir as workdir_lib
from rf_jax.workdir import Workdir
from tiny_configs import tiny

# A comma and a quote: unquoted, the first shifts every score one column to the right.
ODD_NAMES = ['site A, 2017', 'say "yes", then', 'train_7']


def _read_csv(path):
  with open(path, newline='') as f:
    return list(csv.reader(f))


def _pandas_rows(path):
  """The rows as pandas reads them (None where pandas is not installed)."""
  try:
    import pandas  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return pandas.read_csv(path, dtype={'image_name': str, 'tags': str}, keep_default_na=False)


def test_chip_scores_csv_keeps_names_with_commas_and_quotes(tmp_path):
  rng = np.random.default_rng(0)
  scores = rng.random((len(ODD_NAMES), planet.NUM_TAGS)).astype(np.float32)
  predicted = scores > 0.5
  path = tmp_path / 'chip_scores.csv'
  chip_scores.write_scores(path, ODD_NAMES, scores, predicted)
  rows = _read_csv(path)
  assert rows[0] == ['image_name', *planet.TAGS, 'tags']
  assert [r[0] for r in rows[1:]] == ODD_NAMES
  for row, want, on in zip(rows[1:], scores, predicted):
    assert len(row) == 1 + planet.NUM_TAGS + 1, row
    np.testing.assert_array_equal(np.asarray(row[1:-1], np.float32), want)  # round trip
    assert row[-1].split() == [t for t, o in zip(planet.TAGS, on) if o]
  table = _pandas_rows(path)
  if table is not None:
    assert list(table['image_name']) == ODD_NAMES
    np.testing.assert_array_equal(table[list(planet.TAGS)].to_numpy(np.float32), scores)


def test_submission_csv_keeps_names_with_commas_and_quotes(tmp_path):
  predicted = np.zeros((len(ODD_NAMES), planet.NUM_TAGS), bool)
  predicted[0, [0, 12]] = True  # clear primary
  path = tmp_path / 'submission.csv'
  submission.write_submission(path, ODD_NAMES, predicted)
  assert _read_csv(path) == [['image_name', 'tags'], [ODD_NAMES[0], 'clear primary'],
                             [ODD_NAMES[1], ''], [ODD_NAMES[2], '']]
  table = _pandas_rows(path)
  if table is not None:
    assert list(table['image_name']) == ODD_NAMES


def test_chip_paths_finds_tif_and_tiff_in_any_case(tmp_path):
  chips = ['a_2.TIF', 'a_10.tiff', 'b.Tif', 'c.TIFF', 'd.tif']
  for name in [*chips, 'notes.txt', 'e.tif.bak']:
    (tmp_path / name).write_bytes(b'')
  (tmp_path / 'folder.tif').mkdir()  # a directory is no chip, whatever its name
  want = [tmp_path / n for n in chips]  # natural order: a_2 before a_10
  assert chip_scores.chip_paths(str(tmp_path)) == want
  assert chip_scores.chip_paths(str(tmp_path / '*')) == want  # a glob: the same chips
  assert chip_scores.chip_paths(str(tmp_path / '*.TIF*')) == [tmp_path / 'a_2.TIF',
                                                               tmp_path / 'c.TIFF']
  with pytest.raises(planet.PlanetFileNotFoundError, match=r'no \.tif or \.tiff chips found '
                     r'\(1 other files or folders\)'):
    chip_scores.chip_paths(str(tmp_path / 'notes*'))


def test_chip_paths_refuses_two_chips_of_one_name(tmp_path):
  for name in ('x.tif', 'x.TIF'):
    (tmp_path / name).write_bytes(b'')
  with pytest.raises(planet.PlanetDataError, match=r'x\.TIF and .*x\.tif would both be named '
                     r'"x".*--output'):
    chip_scores.chip_paths(str(tmp_path))


@pytest.fixture
def untrained(tmp_path):
  """A valid config and a workdir without a checkpoint: any model work fails 'train first'."""
  config = tiny('rgb', tmp_path / 'raw', tmp_path / 'prepared')
  workdir = tmp_path / 'run'
  workdir.mkdir()
  chips = tmp_path / 'chips'
  chips.mkdir()
  (chips / 'test_0.tif').write_bytes(b'')
  return config, workdir, str(chips)


def test_predict_chips_never_replaces_a_predictions_file(untrained, tmp_path):
  config, workdir, chips = untrained
  with pytest.raises(checkpoints.CheckpointError, match='train first'):  # the model work
    chip_scores.predict_chips(config, workdir, chips)
  for output in (None, tmp_path / 'mine.csv'):
    existing = Workdir(workdir).chip_scores if output is None else output
    existing.write_text('image_name,tags\nkeep_me,\n')
    with pytest.raises(chip_scores.OutputExistsError) as raised:  # before the model work
      chip_scores.predict_chips(config, workdir, chips, output=output)
    assert isinstance(raised.value, errors.UserError)
    assert f'{existing} exists already' in str(raised.value)
    assert '--output OTHER.csv' in str(raised.value) and 'delete it' in str(raised.value)
    assert existing.read_text() == 'image_name,tags\nkeep_me,\n'


def _export_refused(config, workdir, output, named):
  with pytest.raises(workdir_lib.OutputDirError) as raised:  # before the model work
    export.export(config, workdir, output=output)
  assert isinstance(raised.value, errors.UserError) and isinstance(raised.value, OSError)
  assert str(raised.value).startswith(f'{named}: cannot write the export there')
  assert 'give --output DIR' in str(raised.value)


def test_export_names_an_output_it_cannot_write(untrained, tmp_path):
  config, workdir, _ = untrained
  with pytest.raises(checkpoints.CheckpointError, match='train first'):  # the model work
    export.export(config, workdir, output=tmp_path / 'exported')
  (tmp_path / 'a_file').write_text('')
  _export_refused(config, workdir, tmp_path / 'a_file' / 'export', tmp_path / 'a_file' / 'export')
  Workdir(workdir).export_dir.write_text('')  # the workdir's export/ cannot be created
  _export_refused(config, workdir, None, Workdir(workdir).export_dir)
