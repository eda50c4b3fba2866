"""scripts/benchmark.py --scale on a few hundred 256 px chips with the tiny network: every phase
runs rf_jax's real code in its own process, and the report's figures are checked against the
data they come from (chip counts, rates from their own seconds), never against a speed."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'scripts' / 'benchmark.py'
TRAIN, TEST, STEPS, BATCH = 200, 24, 2, 8  # --quick: batch 8


@pytest.fixture(scope='module')
def scale(tmp_path_factory):
  root = tmp_path_factory.mktemp('scale')
  out = root / 'scale.json'
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), '--scale', str(TRAIN), '--quick', '--scale-test', str(TEST),
       '--scale-steps', str(STEPS), '--scale-dir', str(root / 'data'), '--json', str(out)],
      capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return root, json.loads(out.read_text()), proc.stdout


def test_every_phase_measured(scale):
  root, report, stdout = scale
  s = report['scale']
  assert (s['train_chips'], s['test_chips'], s['chip_size']) == (TRAIN, TEST, 256)
  phases = s['phases']
  assert list(phases) == ['generate', 'prepare', 'loader_none', 'loader_host', 'loader_device',
                          'train', 'resume', 'evaluate', 'report', 'predict']
  for name, phase in phases.items():
    assert phase['exit'] == 0 and phase['seconds'] > 0 and phase['peak_rss_mb'] > 50, name
    assert 0 < phase['cpu_seconds'] < (os.cpu_count() + 0.5) * phase['seconds'], name
    assert phase['chips'] > 0, name
    seconds = phase.get('epoch_seconds', phase['seconds'])  # a loader's rate is its epoch's
    assert phase['chips_per_s'] == pytest.approx(phase['chips'] / seconds, rel=0.01,
                                                 abs=0.1), name
    if 'host_ms_per_chip' in phase:
      assert phase['host_ms_per_chip'] == pytest.approx(1000 * seconds / phase['chips'],
                                                        rel=0.01), name
  prepared = phases['prepare']
  assert phases['generate']['chips'] == TRAIN + TEST == prepared['chips']
  assert (prepared['train'] + prepared['validation'], prepared['test']) == (TRAIN, TEST)
  for cache in ('none', 'host', 'device'):  # one epoch of whole batches
    assert phases[f'loader_{cache}']['chips'] == prepared['train'] // BATCH * BATCH
  assert phases['loader_none']['fill_seconds'] < phases['loader_host']['fill_seconds']
  # SIGTERM after the first periodic checkpoint; the rerun resumed there and went on
  assert phases['train']['steps'] >= STEPS
  assert phases['resume']['resumed_from'] == phases['train']['steps']
  assert phases['resume']['steps'] >= 1
  assert phases['train']['chips'] == phases['train']['steps'] * BATCH
  assert phases['evaluate']['chips'] == phases['report']['chips'] == prepared['validation']
  assert phases['predict']['chips'] == TEST
  disk = s['disk_gb']
  chip_gb = 256 * 256 * 4 * 2 / 1e9
  assert disk['raw'] == pytest.approx((TRAIN + TEST) * chip_gb, rel=0.05)
  assert disk['prepared'] == pytest.approx((TRAIN + TEST) * chip_gb, rel=0.1)
  assert disk['total'] == pytest.approx(disk['raw'] + disk['prepared'] + disk['run'], abs=0.002)
  assert not (root / 'data').exists()  # generated data deleted
  logs = pathlib.Path(s['logs'])
  assert (logs / 'predict.log').is_file() and 'SIGTERM received' in (
      logs / 'resume.log').read_text()
  for name in phases:
    assert f'| {name} |' in report['table'] and f'| {name} |' in stdout


def test_a_refused_cache_is_a_row_of_its_own():
  from benchmarks import scale  # pylint: disable=g-import-not-at-top
  refusal = "config.data.cache='device' holds the whole train split: ..."
  text = scale.table({'phases': {
      'loader_device': {'refused': refusal},
      'evaluate': {'seconds': 2.0, 'peak_rss_mb': 300.0, 'chips': 10, 'chips_per_s': 5.0}},
                      'disk_gb': {'raw': 1, 'prepared': 1, 'run': 0, 'total': 2}})
  assert f'| loader_device | | | | | | refused before any work: {refusal} |' in text
  assert '| evaluate | 2.0 |  | 10 | 5.0 | 300.0 |  |' in text


@pytest.mark.parametrize('value', ['10', 'all', '-5'])
def test_bad_scale_is_one_error_line(value, tmp_path):
  proc = subprocess.run([sys.executable, str(SCRIPT), '--scale', value, '--scale-dir',
                         str(tmp_path / 'd')], capture_output=True, text=True, timeout=60,
                        check=False)
  assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
      f"error: --scale={value}: give a number of training chips (60 or more) or 'full' "
      '(40,479)'], proc.stderr
  assert not (tmp_path / 'd').exists()
