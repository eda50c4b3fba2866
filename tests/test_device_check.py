"""scripts/device_check.sh, the GPU check, as a dry run on the CPU; its checker; device_wheels.sh
without network.

The dry run is the GPU check's own script with a reduced matrix (one model: bf16 with
data.cache none and float32 with data.cache device, one epoch of the width-8 network on 60
synthetic chips of 96 px, two processes at a time), the wheel install and the benchmark skipped
(the venv has everything; tests/test_benchmark.py runs the benchmark): every kind of step it
runs on the GPU runs here, the separate-process `--mode evaluate` must say REPRODUCED and the
SIGTERM-stopped run must resume where it saved. The checker's failures are tested on copies of
the dry run's outputs with one thing broken.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CHECK = REPO / 'scripts' / 'device_check.sh'
SUMMARY = REPO / 'scripts' / 'device_check_summary.py'
WHEELS = REPO / 'scripts' / 'device_wheels.sh'
RUNS = ['rgb_bfloat16_none', 'rgb_float32_device']  # both dtypes, both caches: 2 compiles
RESUME_EPOCHS, STEPS_PER_EPOCH = 3, 5  # 40 training chips of the 60, batch 8

DRY_RUN_ENV = {
    'JAX_PLATFORMS': 'cpu', 'EXPECT_BACKEND': 'cpu', 'SKIP_INSTALL': '1', 'BENCH': '0',
    'MODELS': 'rgb', 'RUNS': ' '.join(RUNS), 'MODE': 'train',
    'EPOCHS': '1', 'CHIPS': '60', 'TEST_CHIPS': '0', 'CHIP_SIZE': '96', 'CROP': '96',
    'WIDTH': '8', 'BATCH': '8', 'EVAL_BATCH': '16', 'PARALLEL': '2',
    'RESUME_EPOCHS': str(RESUME_EPOCHS), 'DEADLINE_S': '600', 'EXTRA_FLAGS': '', 'KEEP_WORK': '0',
}


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory):
  out = tmp_path_factory.mktemp('device_check') / 'out'
  work = tmp_path_factory.mktemp('device_check_work')
  # The session's compilation cache (tests/conftest.py) comes with os.environ.
  env = {**os.environ, **DRY_RUN_ENV, 'PYTHON': sys.executable, 'WORK_DIR': str(work)}
  proc = subprocess.run(['bash', str(CHECK), str(out)], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900, check=False)
  return proc, out, work


def test_dry_run_passes(dry_run):
  proc, out, _ = dry_run
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  assert 'device check passed' in proc.stdout
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['ok'] and summary['failures'] == []
  assert summary['backend'] == 'cpu'
  assert (out / 'summary.md').read_text().startswith('# Device check: PASSED')


def test_every_run_of_the_matrix(dry_run):
  _, out, _ = dry_run
  summary = json.loads((out / 'summary.json').read_text())
  assert sorted(r['name'] for r in summary['runs']) == sorted(RUNS)
  for run in summary['runs']:
    name = run['name']
    assert run['exit'] == '0' and run['epochs'] == 1, run
    assert run['last_epoch_img_per_s'] > 0 and 0 <= run['val_map'] <= 1, run
    config = json.loads((out / 'runs' / name / 'config.json').read_text())
    _, dtype, cache = name.split('_')
    assert (config['model']['name'], config['dtype'], config['data']['cache']) == (
        'rgb', dtype, cache)
    assert config['model']['width'] == 8 and config['data']['crop_size'] == 96
    history = json.loads((out / 'runs' / name / 'history.json').read_text())
    assert [e['step'] for e in history['epochs']] == [STEPS_PER_EPOCH]
    assert (out / 'logs' / f'train_{name}.log').stat().st_size > 0


def test_evaluate_in_a_new_process_reproduces(dry_run):
  _, out, _ = dry_run
  summary = json.loads((out / 'summary.json').read_text())
  assert sorted(e['name'] for e in summary['evaluations']) == sorted(RUNS)
  for evaluation in summary['evaluations']:
    assert evaluation['exit'] == '0'
    assert evaluation['line'].startswith('REPRODUCED exactly'), evaluation
    log = (out / 'logs' / f'evaluate_{evaluation["name"]}.log').read_text()
    assert evaluation['line'] in log and 'NOT REPRODUCED' not in log
    metrics = json.loads((out / 'runs' / evaluation['name'] / 'eval' / 'metrics.json').read_text())
    assert 'map' in metrics


def test_sigterm_then_rerun_resumes(dry_run):
  _, out, _ = dry_run
  resume = json.loads((out / 'summary.json').read_text())['resume']
  assert resume['saved_step'] == resume['resumed_step']
  # Stopped after the first epoch was written, before the last step. The signal may land
  # between the epoch's history.json write and that step's stop check: a stop at the epoch's
  # own step is then right.
  assert STEPS_PER_EPOCH <= resume['saved_step'] < RESUME_EPOCHS * STEPS_PER_EPOCH, resume
  stopped = (out / 'logs' / 'resume_sigterm.log').read_text()
  assert f'SIGTERM received: saved step {resume["saved_step"]}' in stopped
  rerun = (out / 'logs' / 'resume_rerun.log').read_text()
  assert f'Resumed from step {resume["saved_step"]}' in rerun
  history = json.loads((out / 'runs' / 'resume' / 'history.json').read_text())
  assert [e['step'] for e in history['epochs']] == [
      STEPS_PER_EPOCH * (i + 1) for i in range(RESUME_EPOCHS)]


def test_outputs_and_clean_up(dry_run):
  _, out, work = dry_run
  for path in ('steps.tsv', 'settings.env', 'elapsed_s', 'env/machine.txt',
               'env/nvidia-smi.txt', 'logs/jax_devices.log', 'logs/distributions.log'):
    assert (out / path).stat().st_size > 0, path
  assert 'rf-jax ' in (out / 'logs' / 'version.log').read_text()
  assert 'jax==' in (out / 'logs' / 'distributions.log').read_text()
  assert 'MODELS=rgb' in (out / 'settings.env').read_text().splitlines()
  assert not list(out.rglob('*checkpoint*'))  # the workdirs' small files only
  assert not work.exists()  # WORK_DIR (checkpoints, dataset) removed without KEEP_WORK=1


def _summarise(out) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(SUMMARY), str(out)], capture_output=True,
                        text=True, check=False)


def _break_evaluation(out):
  log = out / 'logs' / f'evaluate_{RUNS[1]}.log'
  log.write_text(re.sub(r'^REPRODUCED.*$', 'NOT REPRODUCED: step 5 now scores differently.',
                        log.read_text(), flags=re.M))
  return f'evaluate_{RUNS[1]}'


def _break_resume(out):
  log = out / 'logs' / 'resume_rerun.log'
  log.write_text(log.read_text().replace('Resumed from step', 'Started at step'))
  return 'resume: the rerun resumed from step None'


def _fail_a_step(out):
  steps = out / 'steps.tsv'
  steps.write_text(re.sub(rf'^(train_{RUNS[1]}\ttrain\t)0\t', r'\g<1>1\t', steps.read_text(),
                          flags=re.M))
  return f'train_{RUNS[1]}: exit 1'


def _lose_an_epoch(out):
  path = out / 'runs' / RUNS[0] / 'history.json'
  history = json.loads(path.read_text())
  history['epochs'] = []
  path.write_text(json.dumps(history))
  return f'train_{RUNS[0]}: history.json has 0 epochs, not 1'


@pytest.mark.parametrize('damage', [_break_evaluation, _break_resume, _fail_a_step,
                                    _lose_an_epoch])
def test_the_checker_fails_on_a_broken_output(dry_run, tmp_path, damage):
  _, out, _ = dry_run
  copy = tmp_path / 'out'
  shutil.copytree(out, copy)
  assert _summarise(copy).returncode == 0  # the copy as it is passes
  expected = damage(copy)
  proc = _summarise(copy)
  assert proc.returncode == 1
  summary = json.loads((copy / 'summary.json').read_text())
  assert not summary['ok']
  assert any(expected in failure for failure in summary['failures']), summary['failures']
  assert (copy / 'summary.md').read_text().startswith('# Device check: FAILED')


def test_the_checker_fails_on_the_wrong_backend(dry_run, tmp_path):
  _, out, _ = dry_run
  copy = tmp_path / 'out'
  shutil.copytree(out, copy)
  settings = copy / 'settings.env'
  settings.write_text(settings.read_text().replace('EXPECT_BACKEND=cpu', 'EXPECT_BACKEND=gpu'))
  proc = _summarise(copy)
  assert proc.returncode == 1 and 'backend cpu, expected gpu' in proc.stderr + proc.stdout


def test_the_check_refuses_to_run_on_the_wrong_backend(tmp_path):
  """On a machine whose JAX has no GPU the check stops after its environment steps."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'SKIP_INSTALL': '1', 'PYTHON': sys.executable,
         'WORK_DIR': str(tmp_path / 'work'), 'EXPECT_BACKEND': 'gpu'}
  proc = subprocess.run(['bash', str(CHECK), str(tmp_path / 'out')], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 1
  assert "JAX's backend is 'cpu', not EXPECT_BACKEND=gpu" in proc.stdout
  assert not (tmp_path / 'out' / 'logs' / 'bench.log').exists()
  assert not list((tmp_path / 'out' / 'logs').glob('train_*'))


def test_missing_wheels_lists_only_what_this_python_lacks(tmp_path):
  for name in ('numpy-1.0-py3-none-any.whl', 'protobuf-1.0-py3-none-any.whl',
               'no_such_distribution_here-1.0-py3-none-any.whl'):
    (tmp_path / name).write_bytes(b'')
  proc = subprocess.run([sys.executable, str(SUMMARY), '--missing-wheels', str(tmp_path)],
                        capture_output=True, text=True, check=True)
  assert proc.stdout.split() == [str(tmp_path / 'no_such_distribution_here-1.0-py3-none-any.whl')]


def test_device_wheels_list_without_network():
  proc = subprocess.run(['bash', str(WHEELS), '--list'], capture_output=True, text=True,
                        check=True)
  listed = {}
  for line in proc.stdout.splitlines()[:-1]:
    group, requirement = line.split()
    listed[requirement.split('==')[0].lower().replace('_', '-')] = group
  # what the GPU machine lacks (DESIGN.md section 6) and what rf_jax imports of tfds' own
  for name in ('tensorflow-datasets', 'array-record', 'clu', 'ml-collections', 'tensorboardx',
               'tensorflow-metadata', 'dm-tree', 'promise', 'immutabledict', 'toml'):
    assert listed.get(name) == 'missing', name
  assert listed['protobuf'] == 'fallback' and listed['matplotlib'] == 'maybe'
  assert 'CPython 3.12' in proc.stdout.splitlines()[-1]


def _wheels_check(directory) -> subprocess.CompletedProcess:
  return subprocess.run(['bash', str(WHEELS), '--check'], capture_output=True, text=True,
                        env={**os.environ, 'WHEELS_DIR': str(directory)}, check=False)


def test_device_wheels_size_limit(tmp_path):
  assert _wheels_check(tmp_path / 'none').returncode == 1
  tmp_path.joinpath('empty').mkdir()
  assert _wheels_check(tmp_path / 'empty').returncode == 1
  wheels = tmp_path / 'wheels'
  wheels.mkdir()
  with open(wheels / 'a-1.0-py3-none-any.whl', 'wb') as f:
    f.truncate(40 * 2**20)  # sparse: no disk used
  proc = _wheels_check(wheels)
  assert proc.returncode == 0, proc.stderr
  assert '40.00 MiB  total, 1 wheels' in proc.stdout
  with open(wheels / 'b-1.0-py3-none-any.whl', 'wb') as f:
    f.truncate(24 * 2**20 + 1)
  proc = _wheels_check(wheels)
  assert proc.returncode == 1 and 'more than 64 MiB' in proc.stderr
