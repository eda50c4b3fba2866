"""Pre-emption: SIGKILL at random moments and SIGTERM lose nothing; the resumed run is exact.

The smallest real run (rgb from scratch, 5 steps an epoch, 2 epochs, a checkpoint every 2
steps so that kills mid-epoch resume mid-epoch) is started as `python -m rf_jax.main` and
interrupted in one sequence: SIGKILL during start-up, SIGTERM mid-epoch (it must save, say
how to resume, and resume there), then SIGKILL at a random delay after each new checkpoint
(mid-step, mid-save, mid-evaluation). Each time it is restarted with the same command. The
finished run's history (without the timing keys) and every saved array equal an uninterrupted
run's exactly. The session's persistent compilation cache (tests/conftest.py) makes each
restart load the compiled steps instead of recompiling.
Set RF_JAX_KILL_SEED to draw other kill points.
"""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tiny_configs import cli_flags, tiny, train_recording_saves

from rf_jax import checkpoints
from rf_jax.workdir import Workdir

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMING_KEYS = ('train_images_per_s', 'epoch_seconds')
# Batches of 2 (20 steps an epoch on the 40 training chips) of the tiny network: enough steps
# and checkpoints that a kill lands before the run ends, which a step of a few ms would outrun.
BATCH, EPOCHS, STEPS_PER_EPOCH, EVERY = 2, 3, 20, 4
FINAL_STEP = EPOCHS * STEPS_PER_EPOCH
KILLS_AFTER_A_CHECKPOINT = 3


def small_run(raw_dir, prepared_dir):
  config = tiny('rgb', raw_dir, prepared_dir, num_epochs=EPOCHS)
  config.batch_size = BATCH
  config.checkpoint_every_steps = EVERY
  return config


def command(config, workdir) -> list[str]:
  return [sys.executable, '-m', 'rf_jax.main', '--mode', 'train', '--workdir', str(workdir),
          *cli_flags(config)]


def start(config, workdir) -> subprocess.Popen:
  return subprocess.Popen(command(config, workdir), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def saved_steps(workdir) -> list[int]:
  """Complete checkpoints only (orbax renames <step>.orbax-checkpoint-tmp into <step>)."""
  directory = Workdir(workdir).checkpoints
  return sorted(int(p.name) for p in directory.glob('*') if p.name.isdigit()) if directory.is_dir() else []


def wait_for_checkpoint_after(proc, workdir, step: int, timeout: float = 240) -> bool:
  """Waits until a checkpoint later than `step` exists; False if the process ended first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if any(s > step for s in saved_steps(workdir)):
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.02)
  raise TimeoutError(f'no checkpoint after step {step} in {workdir} within {timeout} s')


def strip(history) -> list:
  return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in history]


def history(workdir) -> list:
  return json.loads(Workdir(workdir).history.read_text())['epochs']


def final_arrays(workdir) -> list:
  restored = checkpoints.restore_for_evaluation(Workdir(workdir).checkpoints, FINAL_STEP)
  return jax.tree_util.tree_flatten_with_path(restored.state)[0]


def assert_same_run(workdir, reference_workdir) -> float:
  """History and every array of the final checkpoint (params, BatchNorm, momentum, step) equal."""
  got, want = history(workdir), history(reference_workdir)
  assert strip(got) == strip(want)
  assert saved_steps(workdir)[-1] == FINAL_STEP
  for (path, a), (path_b, b) in zip(final_arrays(workdir), final_arrays(reference_workdir),
                                    strict=True):
    assert path == path_b
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
  return got[-1]['val_map'] - want[-1]['val_map']


@pytest.fixture(scope='module')
def reference(tmp_path_factory, synthetic_kaggle_dir):
  """The uninterrupted run (in-process), and the steps it checkpointed."""
  config = small_run(synthetic_kaggle_dir, tmp_path_factory.mktemp('prepared'))
  workdir = tmp_path_factory.mktemp('uninterrupted')
  return config, workdir, train_recording_saves(config, workdir)


def test_checkpoint_every_n_steps(reference):
  _, workdir, steps = reference
  # Every EVERY steps, and each epoch's end (with its validation mAP).
  assert steps == sorted(set(range(EVERY, FINAL_STEP + 1, EVERY))
                         | set(range(STEPS_PER_EPOCH, FINAL_STEP + 1, STEPS_PER_EPOCH)))
  manager = checkpoints.create_manager(Workdir(workdir).checkpoints, read_only=True)
  assert manager.all_steps()[-1] == FINAL_STEP


def _sigterm_after_a_checkpoint(config, workdir) -> int:
  """SIGTERM once a mid-epoch checkpoint exists: one line saying the step saved and how to
  resume, exit status 0. Returns that step."""
  proc = start(config, workdir)
  try:
    assert wait_for_checkpoint_after(proc, workdir, 0)  # a mid-epoch checkpoint exists
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-3000:]
  assert 'Traceback' not in err
  stopped = [line for line in err.splitlines() if line.startswith('SIGTERM received')]
  assert len(stopped) == 1, err[-3000:]
  step = int(stopped[0].split('saved step ')[1].split()[0])
  assert EVERY <= step < FINAL_STEP
  assert 'Rerun the same command to resume exactly' in stopped[0]
  assert saved_steps(workdir)[-1] == step
  return step


def test_sigterm_then_sigkill_at_random_points_then_restart_is_exact(reference, tmp_path):
  """One run interrupted every way a scheduler or a crash interrupts it (each restart costs a
  process start-up, ~1 min on a small CPU, so the interruptions share one run)."""
  config, reference_workdir, _ = reference
  seed = int(os.environ.get('RF_JAX_KILL_SEED', '7'))
  rng = random.Random(seed)
  kills, log = 0, []

  # During start-up (imports, dataset, restore, compile): nothing saved yet.
  proc = start(config, tmp_path)
  delay = rng.uniform(1.0, 6.0)
  try:
    proc.wait(timeout=delay)
  except subprocess.TimeoutExpired:
    proc.kill()
    kills += 1
    log.append(f'start-up +{delay:.2f}s')
  proc.communicate()

  resumed_at = _sigterm_after_a_checkpoint(config, tmp_path)
  log.append(f'SIGTERM, saved step {resumed_at}')

  # A random moment after each new checkpoint: mid-step, mid-save or mid-validation.
  for i in range(KILLS_AFTER_A_CHECKPOINT):
    last = saved_steps(tmp_path)[-1]
    if last >= FINAL_STEP:
      break
    proc = start(config, tmp_path)
    try:
      if wait_for_checkpoint_after(proc, tmp_path, last):
        delay = rng.uniform(0.0, 1.5)
        time.sleep(delay)
        if proc.poll() is None:
          proc.kill()
          kills += 1
          log.append(f'after step {saved_steps(tmp_path)[-1]} +{delay:.2f}s')
    finally:
      if proc.poll() is None:
        proc.kill()
      out, err = proc.communicate()
    assert proc.returncode in (0, -signal.SIGKILL), err[-3000:]
    if i == 0:  # the restart after the SIGTERM resumed from the step it saved
      assert f'Resumed from step {resumed_at}' in out, (out[-2000:], err[-2000:])

  proc = start(config, tmp_path)  # and the last restart runs to the end
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert not list(Workdir(tmp_path).checkpoints.glob('*' + checkpoints.TMP_MARKER + '*'))

  difference = assert_same_run(tmp_path, reference_workdir)
  print(f'\nkill/restart (seed {seed}): {kills} SIGKILLs survived ({"; ".join(log)}); '
        f'final val mAP difference from the uninterrupted run: {difference}')
  assert kills >= 3, log  # 3-4 on 2 CPU cores; a much faster machine may outrun a kill
  assert difference == 0.0
