"""Multi-host training on JAX's multi-controller runtime: 2 processes on 127.0.0.1 (gloo).

Each process is `python -m rf_jax.main --multihost` with explicit coordinator flags, one CPU
device each, sharing one workdir. One 2-process run goes through everything a job on a cluster
meets: from a fresh workdir (the synthetic dataset generated and prepared once) to SIGTERM to
both processes mid-epoch (one consistent checkpoint), then the rerun to the end. It must equal
an uninterrupted 1-process run over 2 devices up to float reordering (the same global batches,
BatchNorm over the same global batch), and a single process must evaluate its checkpoint.
(Exact single-process resume is tests/test_kill_restart.py's; each launch here costs minutes
of start-up and compilation on a small CPU, hence one 2-process run.) A second, tiny 2-process
run has one process SIGKILLed mid-training: the other must stop with one error line at once.
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tiny_configs import cli_flags, tiny, xla_flags_with_devices

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMING_KEYS = ('train_images_per_s', 'epoch_seconds')
# The tiny config, generating its 60 synthetic chips into the workdir: 3 epochs of 5 steps, a
# checkpoint every 2, so that the SIGTERM sent after the step-2 save lands mid-run.
EPOCHS = 3


def _config(**changes):
  config = tiny('rgb', raw_dir='', prepared_dir='', num_epochs=EPOCHS)
  config.data.synthetic.num_chips, config.data.synthetic.chip_size = 60, 128
  config.data.synthetic.num_test = 0
  config.optim.lr = 0.05
  config.checkpoint_every_steps = 2
  for key, value in changes.items():
    setattr(config, key, value)
  return config


CONFIG = _config()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', PYTHONFAULTHANDLER='1',
              XLA_FLAGS=xla_flags_with_devices(devices))


def _train_command(workdir, *extra, config=CONFIG) -> list[str]:
  return [sys.executable, '-m', 'rf_jax.main', *cli_flags(config), '--workdir', str(workdir),
          '--mode', 'train', *extra]


def start_two_processes(workdir, config=CONFIG) -> list[subprocess.Popen]:
  port = _free_port()
  return [subprocess.Popen(
      _train_command(workdir, '--multihost', f'--coordinator_address=127.0.0.1:{port}',
                     '--num_processes=2', f'--process_id={i}', config=config),
      cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(2)]


def finish(processes, timeout=1500) -> list[tuple[int, str, str]]:
  """Each process's (exit status, stdout, stderr); none is left running."""
  out = []
  try:
    for p in processes:
      stdout, stderr = p.communicate(timeout=timeout)
      out.append((p.returncode, stdout, stderr))
  finally:
    for p in processes:
      p.kill()
  return out


def history(workdir) -> list[dict]:
  epochs = json.loads((pathlib.Path(workdir) / 'history.json').read_text())['epochs']
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in epochs]


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  """From a fresh workdir: SIGTERM to both processes after the step-2 save, then the rerun.

  Returns the workdir, the interrupted launch's results and the rerun's."""
  workdir = tmp_path_factory.mktemp('two_processes')
  processes = start_two_processes(workdir)
  deadline = time.monotonic() + 1500
  while not (workdir / 'checkpoints' / '2').is_dir():  # mid-epoch: after the step-2 save
    assert time.monotonic() < deadline and all(p.poll() is None for p in processes), (
        [p.communicate() for p in processes if p.poll() is not None])
    time.sleep(0.2)
  for p in processes:
    p.send_signal(signal.SIGTERM)
  interrupted = finish(processes)
  for rc, _, stderr in interrupted:
    assert rc == 0, stderr[-4000:]
  rerun = finish(start_two_processes(workdir))
  for rc, _, stderr in rerun:
    assert rc == 0, stderr[-4000:]
  return workdir, interrupted, rerun


@pytest.fixture(scope='module')
def two_device_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('two_devices')
  done = subprocess.run(_train_command(workdir), cwd=REPO, env=_env(2), capture_output=True,
                        text=True, timeout=1500)
  assert done.returncode == 0, done.stderr[-4000:]
  return workdir


def test_two_processes_prepare_once_and_train(two_process_run):
  workdir, interrupted, rerun = two_process_run
  assert (workdir / 'synthetic' / 'train_v2.csv').is_file()
  assert sum('(once; later runs reuse it)' in out + err for _, out, err in interrupted) == 1
  assert [r['epoch'] for r in history(workdir)] == list(range(1, EPOCHS + 1))
  assert sum(f'epoch {EPOCHS}/{EPOCHS}' in stdout for _, stdout, _ in rerun) == 1  # process 0


def test_sigterm_to_both_processes_saves_one_step_and_the_rerun_resumes_there(two_process_run):
  _, interrupted, rerun = two_process_run
  saved = [int(s) for s in stderr_steps(interrupted)]
  assert len(set(saved)) == 1 and 2 <= saved[0] < 5 * EPOCHS, interrupted  # one step, mid-run
  assert all(f'Resumed from step {saved[0]}' in out for _, out, _ in rerun), rerun


def test_two_processes_equal_one_process_on_two_devices(two_process_run, two_device_run):
  got, want = history(two_process_run[0]), history(two_device_run)
  assert [r['step'] for r in got] == [r['step'] for r in want]
  # The same global batches and the same global BatchNorm: only the order of float32 sums
  # differs (gloo's all-reduce vs XLA's in-process one), ~1e-6 relative after 15 steps from
  # random init at lr 0.05; 1e-4 leaves room without hiding a different batch (~1e-1), nor
  # a resume that skipped or repeated one, or lost the epoch's running loss.
  for g, w in zip(got, want):
    for key in ('train_loss', 'val_loss', 'val_map', 'val_mean_precision_at_0.5', 'lr'):
      np.testing.assert_allclose(g[key], w[key], rtol=1e-4, err_msg=key)


def test_one_process_evaluates_the_two_process_checkpoint(two_process_run):
  workdir = two_process_run[0]
  done = subprocess.run(
      [sys.executable, '-m', 'rf_jax.main', '--mode', 'evaluate', '--workdir', str(workdir)],
      cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=1500)
  assert done.returncode == 0, done.stderr[-4000:]
  assert 'REPRODUCED' in done.stdout and 'NOT REPRODUCED' not in done.stdout, done.stdout
  metrics = json.loads((workdir / 'eval' / 'metrics.json').read_text())
  best = max(history(workdir), key=lambda r: r['val_map'])
  assert metrics['step'] == best['step'] and metrics['num_chips'] == 20


def stderr_steps(results) -> list[str]:
  """The step each process said it saved at ('SIGTERM ... saved step N ...')."""
  steps = []
  for _, _, stderr in results:
    line = next(l for l in stderr.splitlines() if 'saved step' in l)
    steps.append(line.split('saved step ')[1].split()[0])
  return steps


# Epochs of 20 steps (one chip per process per step): the kill lands in the collectives of
# training, not in a checkpoint's barrier.
DEAD_PEER = _config(batch_size=2, eval_batch_size=2, num_epochs=100, checkpoint_every_steps=0)
# The survivor must stop well before jax.distributed's heartbeat timeout (100 s), after which
# the coordination service would have stopped it anyway (with an abort, not one line).
SURVIVOR_EXIT_S = 30


def _epochs_done(workdir) -> int:
  path = pathlib.Path(workdir) / 'history.json'  # written before epoch 1 too (no epochs)
  return len(json.loads(path.read_text())['epochs']) if path.is_file() else 0


def test_a_killed_process_makes_the_other_exit_with_one_error_line(tmp_path):
  """Process 1 SIGKILLed mid-training: process 0's next collective fails, and it exits 1 with
  one error line at once, instead of a traceback and then waiting in jax.distributed's
  shutdown barrier for the heartbeat timeout."""
  workdir = tmp_path / 'dead_peer'
  processes = start_two_processes(workdir, DEAD_PEER)
  survivor, victim = processes
  try:
    deadline = time.monotonic() + 1500
    while not _epochs_done(workdir):  # both trained, validated and saved epoch 1 together
      assert time.monotonic() < deadline and all(p.poll() is None for p in processes), (
          [p.communicate() for p in processes if p.poll() is not None])
      time.sleep(0.2)
    victim.kill()
    try:
      _, stderr = survivor.communicate(timeout=SURVIVOR_EXIT_S)
    except subprocess.TimeoutExpired:
      survivor.send_signal(signal.SIGABRT)  # faulthandler prints where each thread waits
      raise AssertionError(f'process 0 still runs {SURVIVOR_EXIT_S} s after process 1 died:\n'
                           + survivor.communicate()[1][-6000:]) from None
  finally:
    for p in processes:
      p.kill()
  assert survivor.returncode == 1, (survivor.returncode, stderr[-4000:])
  assert 'Traceback' not in stderr, stderr[-4000:]
  lines = [line for line in stderr.splitlines() if line.startswith('error: ')]
  assert len(lines) == 1, stderr[-4000:]
  assert lines[0].startswith('error: process 0 of 2 stops: another process of this run has '
                             'stopped ('), lines[0]
  assert re.search(rf'checkpoint in {re.escape(str(workdir))} \(step \d+\) is intact', lines[0])
  assert 'rerun the whole job' in lines[0], lines[0]
