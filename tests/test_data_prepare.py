"""prepared.prepare protecting real data: the test chips apart from training, every bad chip
named in one error, one build per prepared directory, the multi-process path, a dataset known
by its content wherever it lies."""

import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rf_jax import inputs
from rf_jax.data import pipeline
from rf_jax.data import planet
from rf_jax.data import prepared
from rf_jax.data import synthetic
from rf_jax.data import tfds_planet
from rf_jax.data.tfds_planet import chips
from rf_jax.workdir import Workdir
from tiny_configs import tiny

REPO = Path(__file__).resolve().parents[1]
SPLIT = dict(layout='auto', val_fraction=planet.STUDY_VAL_FRACTION,
             split_seed=planet.STUDY_SEED)


def _training_copy(source: Path, dest: Path) -> Path:
  """The training part of a Kaggle-layout directory (chips symlinked), no test chips."""
  (dest / 'train-tif-v2').mkdir(parents=True)
  shutil.copy(source / 'train_v2.csv', dest)
  for chip in (source / 'train-tif-v2').iterdir():
    (dest / 'train-tif-v2' / chip.name).symlink_to(chip)
  return dest


def _no_rebuild(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError('rebuilt the prepared training data')
  monkeypatch.setattr(tfds_planet.PlanetAmazon, '_split_items', refuse)


def _no_build_at_all(monkeypatch):
  """Neither prepared dataset (training, test chips) may be built again."""
  _no_rebuild(monkeypatch)

  def refuse(*args, **kwargs):
    raise AssertionError('rebuilt the prepared test chips')
  monkeypatch.setattr(tfds_planet.PlanetAmazonTest, '_split_items', refuse)


def _state_after(loader, steps: int) -> tuple[bytes, list]:
  """The loader's state after `steps` batches, and the 2 batches that follow."""
  for _ in range(steps):
    next(loader)
  state = loader.get_state()
  return state, [next(loader) for _ in range(2)]


def _assert_same_batches(got, want):
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['labels'], b['labels'])


def _prepared_configs(prepared_dir: Path) -> list[Path]:
  return sorted(prepared_dir.glob('planet_amazon*/*/1.0.0'))


def test_test_chips_leave_the_training_data_alone(synthetic_kaggle_dir, tmp_path, monkeypatch):
  raw = _training_copy(synthetic_kaggle_dir, tmp_path / 'raw')
  before = prepared.prepare(raw, tmp_path / 'prep', **SPLIT)
  assert not before.has_test and before.test is None and 'test' not in before.names
  shutil.copytree(synthetic_kaggle_dir / 'test-tif-v2', raw / 'test-tif-v2')
  (raw / tfds_planet.TEST_MAPPING_FILE).write_text(
      'old,new\ntest_0.tif,test_1.tif\ntest_1.tif,test_0.tif\n')
  _no_rebuild(monkeypatch)
  after = prepared.prepare(raw, tmp_path / 'prep', **SPLIT)
  # Same fingerprint and the same source description the train loader checks when it resumes.
  assert after.data_dir == before.data_dir
  assert repr(after.train) == repr(before.train)
  assert repr(after.validation) == repr(before.validation)
  np.testing.assert_array_equal(after.mean, before.mean)
  assert after.has_test and len(after.test_chips) == 7
  assert after.names['test'][:3] == ('test_1', 'test_0', 'test_2')
  np.testing.assert_array_equal(after.test[0]['image'],
                                planet.read_chip(raw / 'test-tif-v2' / 'test_0.tif'))
  assert '/planet_amazon_test/' in after.test_chips.split.data_dir
  assert sorted(after.names) == ['train', 'validation']  # what provenance iterates


def test_a_bad_test_chip_blocks_only_the_submission(synthetic_kaggle_dir, tmp_path):
  raw = _training_copy(synthetic_kaggle_dir, tmp_path / 'raw')
  shutil.copytree(synthetic_kaggle_dir / 'test-tif-v2', raw / 'test-tif-v2')
  bad = raw / 'test-tif-v2' / 'test_4.tif'
  good = bad.read_bytes()
  bad.write_bytes(good[:len(good) // 2])
  data = prepared.prepare(raw, tmp_path / 'prep', **SPLIT)
  assert len(data.train) == 40 and data.train[0]['image'].shape == (128, 128, 4)
  assert data.has_test
  with pytest.raises(planet.PlanetDataError) as error:
    data.test  # pylint: disable=pointless-statement
  assert re.match(re.escape(str(bad)) + ': truncated TIFF', str(error.value))
  assert 'training data is not affected' in str(error.value)
  assert not list((tmp_path / 'prep' / 'planet_amazon_test').glob('*/1.0.0'))
  bad.write_bytes(good)  # repaired: the same object prepares it now
  assert data.names['test'] == tuple(f'test_{i}' for i in range(7))
  np.testing.assert_array_equal(data.test[4]['image'], planet.read_chip(bad))


def _break(chip: Path, how: str) -> None:
  data = chip.read_bytes()
  if how == 'truncated':
    chip.write_bytes(data[:len(data) // 2])
  elif how == 'not a TIF':
    chip.write_bytes(b'<html>403 Forbidden</html>\n')
  elif how == 'wrong size':
    synthetic.write_tif(chip, np.zeros((8, 8, 4), np.uint16))
  else:
    assert how == 'missing', how
    chip.unlink()


def test_every_bad_chip_is_named_in_one_error(tmp_path, monkeypatch):
  raw = synthetic.write_dataset(tmp_path / 'raw', 40, 16, seed=3)
  kinds = ['truncated', 'not a TIF', 'wrong size', 'missing']
  broken = list(range(3, 40, 3)) + list(range(4, 40, 3))[:12]  # 25 chips, not in CSV order
  for n, i in enumerate(broken):
    _break(raw / 'train-tif-v2' / f'train_{i}.tif', kinds[n % len(kinds)])
  listing = tmp_path / 'prep' / 'planet_amazon' / (
      tfds_planet.make_config(raw, **SPLIT).name + '.bad_chips.txt')
  reads = []
  real_read_chip = planet.read_chip
  monkeypatch.setattr(planet, 'read_chip',
                      lambda path, *a, **k: reads.append(path) or real_read_chip(path, *a, **k))
  with pytest.raises(planet.PlanetDataError) as error:
    prepared.prepare(raw, tmp_path / 'prep', **SPLIT)
  lines = str(error.value).splitlines()
  first = raw / 'train-tif-v2' / f'train_{min(broken)}.tif'  # CSV order, broken first
  assert re.fullmatch(re.escape(str(first)) + r': truncated TIFF \(.*\)', lines[0]), lines[0]
  assert lines[1] == f'25 of 40 chips are bad (all listed in {listing}); nothing was prepared:'
  shown = lines[2:2 + chips.SHOWN_BAD_CHIPS]
  assert [re.search(r'train_(\d+)\.tif', s).group(1) for s in shown] == \
      [str(i) for i in sorted(broken)[:chips.SHOWN_BAD_CHIPS]]
  assert lines[2 + chips.SHOWN_BAD_CHIPS] == '  ... and 5 more'
  assert 'then run again' in lines[-1]
  listed = listing.read_text().splitlines()
  assert [re.search(r'train_(\d+)\.tif', s).group(1) for s in listed] == \
      [str(i) for i in sorted(broken)]
  assert [s.strip() for s in shown] == listed[:chips.SHOWN_BAD_CHIPS]
  # Each chip read once (and the first once more, for its layout and size).
  assert len(reads) == 41 and len(set(reads)) == 40
  assert not list((tmp_path / 'prep').rglob('1.0.0')) and not list(
      (tmp_path / 'prep').rglob('incomplete.*'))


def test_bad_chips_fixed_then_prepared_and_the_listing_gone(tmp_path):
  raw = synthetic.write_dataset(tmp_path / 'raw', 12, 16, seed=4)
  chip = raw / 'train-tif-v2' / 'train_5.tif'
  good = chip.read_bytes()
  _break(chip, 'missing')
  with pytest.raises(FileNotFoundError, match='train_5.tif: chip not found') as error:
    prepared.prepare(raw, tmp_path / 'prep', **SPLIT)
  listing = Path(re.search(r'all listed in (\S+)\)', str(error.value)).group(1))
  assert listing.read_text() == f'{chip}: chip not found\n'
  chip.write_bytes(good)
  data = prepared.prepare(raw, tmp_path / 'prep', **SPLIT)
  assert len(data.train) + len(data.validation) == 12 and not listing.exists()


_PREPARE_SCRIPT = textwrap.dedent('''
    import pathlib, sys, time
    from rf_jax.data import prepared, synthetic, tfds_planet
    root, me = pathlib.Path(sys.argv[1]), sys.argv[2]

    def slowly(function, label):  # widens each locked section: the other process arrives in it
      def run(*args, **kwargs):
        print(label, flush=True)
        time.sleep(2)
        return function(*args, **kwargs)
      return run

    synthetic.write_dataset = slowly(synthetic.write_dataset, 'GENERATED')
    tfds_planet.PlanetAmazon._split_items = slowly(tfds_planet.PlanetAmazon._split_items, 'BUILT')
    (root / f'ready_{me}').touch()
    while len(list(root.glob('ready_*'))) < 2:  # both start together
      time.sleep(0.05)
    data = prepared.prepare(root / 'synthetic', root / 'prepared', layout='auto',
                            val_fraction=0.33, split_seed=321,
                            synthetic=synthetic.Spec(num_chips=24, chip_size=16, num_test=3, seed=5))
    print('DATA', data.data_dir, len(data.train), data.train[0]['name'], flush=True)
''')


def test_two_processes_preparing_one_directory_build_once(tmp_path):
  script = tmp_path / 'prepare_once.py'
  script.write_text(_PREPARE_SCRIPT)
  env = dict(os.environ, PYTHONPATH=str(REPO))
  runs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), str(i)], cwd=tmp_path,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(2)]
  outputs = [run.communicate(timeout=300) for run in runs]
  for run, (out, err) in zip(runs, outputs):
    assert run.returncode == 0, err[-3000:]
  stdout = ''.join(out for out, _ in outputs)
  assert stdout.count('GENERATED') == 1 and stdout.count('BUILT') == 1, stdout
  assert len({line for line in stdout.splitlines() if line.startswith('DATA')}) == 1, stdout
  assert 'Waiting for another process' in ''.join(err for _, err in outputs)


def test_multiprocess_prepare_on_process_zero_first(synthetic_kaggle_dir, tmp_path, monkeypatch):
  """Process 0 prepares before the barrier; the others only after it, and a failure on
  process 0 reaches the others instead of leaving them waiting."""
  events = []
  real_prepare = prepared.prepare
  monkeypatch.setattr(inputs.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(prepared, 'prepare',
                      lambda *a, **k: events.append('prepare') or real_prepare(*a, **k))
  monkeypatch.setattr(inputs, 'wait_for_all_processes', lambda name, timeout_s: events.append(
      ('wait', timeout_s >= 3600)))
  monkeypatch.setattr(inputs.multihost_utils, 'broadcast_one_to_all',
                      lambda flag: events.append(('barrier', int(flag))) or flag)
  config = tiny('rgb', synthetic_kaggle_dir, tmp_path / 'prep')
  for index in (1, 0):
    monkeypatch.setattr(inputs.jax, 'process_index', lambda index=index: index)
    events.clear()
    data = inputs.prepare(config, Workdir(tmp_path / 'wd'))
    assert len(data.train) == 40
    waits = [('wait', True), ('barrier', 0)]  # long enough for a real dataset
    assert events == (['prepare', *waits] if index == 0 else [*waits, 'prepare'])
  # A broken dataset: process 0 raises its own error, the others a short one naming process 0.
  config.data.raw_dir = str(tmp_path / 'nowhere')
  with pytest.raises(planet.PlanetDataError, match='nowhere'):
    inputs.prepare(config, Workdir(tmp_path / 'wd'))
  assert events[-1] == ('barrier', 1)
  monkeypatch.setattr(inputs.multihost_utils, 'broadcast_one_to_all', lambda flag: np.int32(1))
  monkeypatch.setattr(inputs.jax, 'process_index', lambda: 1)
  with pytest.raises(planet.PlanetDataError, match='process 0 could not prepare'):
    inputs.prepare(config, Workdir(tmp_path / 'wd'))


_MULTIPROCESS_SCRIPT = textwrap.dedent('''
    import sys
    import jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    port, me, workdir = sys.argv[1:]
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                               process_id=int(me))
    from rf_jax import inputs
    from rf_jax.configs import rgb
    from rf_jax.workdir import Workdir
    config = rgb.get_config()
    config.data.raw_dir = ''  # as the demo: generated into the workdir
    config.data.synthetic.num_chips, config.data.synthetic.chip_size = 24, 16
    data = inputs.prepare(config, Workdir(workdir))
    print('DATA', data.data_dir, len(data.train), data.train[0]['name'], flush=True)
''')


def test_two_jax_processes_prepare_the_synthetic_demo_once(tmp_path):
  """The demo under --multihost: both processes end with one dataset, generated and
  prepared once (they used to generate into one folder at once, and one of them died)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  script = tmp_path / 'multiprocess.py'
  script.write_text(_MULTIPROCESS_SCRIPT)
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  runs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), str(tmp_path / 'wd')],
                           cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for i in range(2)]
  outputs = [run.communicate(timeout=300) for run in runs]
  for run, (_, err) in zip(runs, outputs):
    assert run.returncode == 0, err[-3000:]
  data_lines = {line for out, _ in outputs for line in out.splitlines() if line.startswith('DATA')}
  assert len(data_lines) == 1, outputs
  assert outputs[0][1].count('Preparing planet_amazon') >= 1
  assert 'Preparing' not in outputs[1][1] and 'Generating' not in outputs[1][1]


def test_a_moved_raw_dir_reuses_its_prepared_data_and_resumes(tmp_path, monkeypatch):
  """The identity is the content: after the raw folder moves (same files), nothing is prepared
  again (training or test chips) and the train loader's checkpointed state resumes exactly."""
  before = synthetic.write_dataset(tmp_path / 'a', 12, 16, seed=8, num_test=2)
  data = prepared.prepare(before, tmp_path / 'prep', **SPLIT)
  test_names = data.names['test']  # prepares the test chips too
  built = _prepared_configs(tmp_path / 'prep')
  assert len(built) == 2
  state, expected = _state_after(pipeline.train_loader(data, batch_size=2, seed=5), 3)
  after = before.rename(tmp_path / 'b')
  _no_build_at_all(monkeypatch)
  moved = prepared.prepare(after, tmp_path / 'prep', **SPLIT)
  assert moved.data_dir == data.data_dir and moved.names['test'] == test_names
  assert _prepared_configs(tmp_path / 'prep') == built
  assert moved.test_chips.split.data_dir == data.test_chips.split.data_dir
  loader = pipeline.train_loader(moved, batch_size=2, seed=5)
  loader.set_state(state)
  _assert_same_batches([next(loader) for _ in range(2)], expected)


def test_a_copied_workdir_reuses_its_data_and_resumes(tmp_path, monkeypatch):
  """`cp -r` of a synthetic run's workdir (chips in <workdir>/synthetic, prepared into
  <workdir>/prepared): the copy opens its own prepared copy, builds nothing, and resumes."""
  config = tiny('rgb', '', '')
  config.batch_size = 2
  config.data.synthetic.num_chips, config.data.synthetic.chip_size = 12, 16
  config.data.synthetic.num_test = 2
  data = inputs.prepare(config, Workdir(tmp_path / 'run'))
  test_names = data.names['test']  # prepares the test chips too
  state, expected = _state_after(inputs.train_loader(config, data), 4)
  shutil.copytree(tmp_path / 'run', tmp_path / 'copy')
  _no_build_at_all(monkeypatch)
  monkeypatch.setattr(synthetic, 'write_dataset', lambda *a, **k: pytest.fail('generated again'))
  copied = inputs.prepare(config, Workdir(tmp_path / 'copy'))
  assert copied.data_dir == data.data_dir.replace(str(tmp_path / 'run'), str(tmp_path / 'copy'))
  assert copied.names['test'] == test_names
  loader = inputs.train_loader(config, copied)
  loader.set_state(state)
  _assert_same_batches([next(loader) for _ in range(2)], expected)


def test_the_identity_changes_with_a_chip_size_or_the_labels(tmp_path):
  """(training config name, test config name): the content, not the folder."""
  raw = synthetic.write_dataset(tmp_path / 'raw', 6, 16, seed=9, num_test=2)

  def identity(folder=raw):
    return (tfds_planet.make_config(folder, **SPLIT).name,
            tfds_planet.make_test_config(folder, layout='kaggle', chip_size=16).name)

  base = identity()
  assert identity(shutil.copytree(raw, tmp_path / 'elsewhere')) == base
  chip = raw / 'train-tif-v2' / 'train_4.tif'
  good = chip.read_bytes()
  chip.write_bytes(good + b'\0')  # one byte more: seen without reading the chip
  bigger = identity()
  assert bigger[0] != base[0] and bigger[1] == base[1]
  chip.write_bytes(good)
  assert identity() == base
  labels = raw / 'train_v2.csv'
  labels.write_text(labels.read_text().replace('primary', 'primary road', 1))
  relabelled = identity()
  assert relabelled[0] not in (base[0], bigger[0]) and relabelled[1] == base[1]
  test_chip = raw / 'test-tif-v2' / 'test_1.tif'
  test_chip.write_bytes(test_chip.read_bytes()[:-1])
  assert identity()[0] == relabelled[0] and identity()[1] != base[1]


def test_label_names_with_a_tif_suffix_find_their_chips(tmp_path):
  """`train_0.tif,clear primary`: the chip train_0 is meant (it was looked up as
  train_0.tif.tif)."""
  raw = synthetic.write_dataset(tmp_path / 'raw', 6, 16, seed=10)
  labels = raw / 'train_v2.csv'
  lines = labels.read_text().splitlines()
  suffixed = [lines[0]] + [line.replace(',', ('.tif,', '.TIFF,')[i % 2], 1)
                           for i, line in enumerate(lines[1:])]
  labels.write_text('\n'.join(suffixed) + '\n')
  data = prepared.prepare(raw, tmp_path / 'prep', **SPLIT)
  assert sorted(data.names['train'] + data.names['validation']) == [f'train_{i}' for i in range(6)]
  for i in range(len(data.train)):
    record = data.train[i]
    np.testing.assert_array_equal(
        record['image'], planet.read_chip(raw / 'train-tif-v2' / f'{record["name"]}.tif'))


def test_preparing_says_what_it_prepares_and_nothing_of_downloads(tmp_path, capfd):
  raw = synthetic.write_dataset(tmp_path / 'raw', 6, 16, seed=11, num_test=2)
  capfd.readouterr()
  data = prepared.prepare(raw, tmp_path / 'prep', **SPLIT)
  data.test  # pylint: disable=pointless-statement
  out, err = capfd.readouterr()
  # TFDS's lines around a build: nothing is downloaded.
  assert 'Downloading and preparing' not in out + err, out + err
  assert 'downloaded and prepared' not in out + err, out + err
  assert out.splitlines() == [
      f'Preparing 6 chips from {raw} into {data.data_dir} (once; later runs reuse it)',
      f'Preparing 2 chips from {raw} into {data.test_chips.split.data_dir} '
      '(once; later runs reuse it)']
  again = prepared.prepare(raw, tmp_path / 'prep', **SPLIT)
  again.test  # pylint: disable=pointless-statement
  assert capfd.readouterr().out == ''

