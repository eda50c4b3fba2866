"""Shared fixtures: the session's compilation cache and the data. Reuse them.

* `real_planet_dir`: ../shared/data/planet beside the repository (the real
  train_v2.csv and two real chips); tests using it skip when it is absent.
* `synthetic_kaggle_dir`: a session-wide synthetic Kaggle-layout directory,
  SYNTHETIC_CHIPS chips of SYNTHETIC_SIZE px (>= 96 px, so models can run on
  it), SYNTHETIC_TEST test chips, seed 0. Read-only: do not modify it.
* `prepared_synthetic`: `prepared.PlanetData` over it (TFDS built once per
  session in a temporary data_dir, the study's split 0.33 / seed 321).
"""

import os
from pathlib import Path
import shutil
import tempfile

import pytest

# One persistent XLA compilation cache for the session, shared with the child
# processes the tests start (they inherit the environment): every train_and_evaluate
# builds fresh jitted steps, and on 2 cores a ResNet-18 compile costs 20-40 s. Set before
# anything imports jax, which reads these variables once, at its import.
_JIT_CACHE = tempfile.mkdtemp(prefix='rf_jax_test_jit_cache_')
os.environ['JAX_COMPILATION_CACHE_DIR'] = _JIT_CACHE
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'

# XLA:CPU's LLVM code generation at a lower effort (level 1 of 0-3): the tests' programs are
# small, so compiling them, not running them, is much of the suite's time (the whole suite on 2
# cores: 9 min 37 s, against 10 min 25 s without the flag). The HLO passes that decide what is
# computed are the same; only the machine code differs. Level 0 would compile faster still, but
# runs float64 ResNets 3x slower.
# TEST_XLA_FLAGS: the processes the tests start take it too, beside flags of their own.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=1'
os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), TEST_XLA_FLAGS]).strip()

from rf_jax import xla_cpu  # pylint: disable=g-import-not-at-top,wrong-import-position

# The XLA:CPU flags training runs with (config.cpu_tuning's default), before any test creates
# JAX's backend; the processes the tests start inherit them.
xla_cpu.set_default_flags()


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  shutil.rmtree(_JIT_CACHE, ignore_errors=True)


# Under pytest-xdist (`-n 2 --dist loadgroup`, the README's command): one group per file, so a
# file's module fixtures are built once, on one worker. The files that start several rf_jax
# processes of their own (2-process jobs, kill/restart timing) share a group, so they never
# run at the same time and starve each other of the two cores. The slowest groups are queued
# first (measured per file on 2 cores, `--durations=0`), so the other worker is not left alone
# with one at the end; the rest keep their order. pytest-xdist would otherwise queue the groups
# by their number of tests: pyproject.toml's addopts turn that off (--no-loadscope-reorder).
_GROUPS = {'test_multihost': 'processes', 'test_kill_restart': 'processes',
           'test_device_check': 'processes'}
# Queued alternately to the two workers: the groups that start processes of their own
# ('processes', test_bad_inputs) each beside in-process ones (test_train, test_train_fidelity).
_SLOWEST_FIRST = ('test_multihost', 'test_kill_restart', 'test_device_check', 'test_train', 'test_bad_inputs',
                  'test_train_fidelity', 'test_fusion', 'test_evaluate', 'test_scale',
                  'test_benchmark',
                  'test_resnet', 'test_device_cache', 'test_data_prepare', 'test_augment',
                  'test_op_profile')


@pytest.hookimpl(tryfirst=True)  # the groups must be marked before pytest-xdist reads them
def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_SLOWEST_FIRST)}
  file_of = lambda item: item.path.stem
  items.sort(key=lambda item: rank.get(file_of(item), len(rank)))  # stable: order kept
  for item in items:
    item.add_marker(pytest.mark.xdist_group(_GROUPS.get(file_of(item), file_of(item))))


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
  """On a pytest-xdist worker with --dist loadgroup: every item's node id carries its group, or
  the groups (and the module fixtures they keep on one worker) were silently lost."""
  if getattr(session.config.option, 'loadgroup', False):
    lost = [item.nodeid for item in session.items if '@' not in item.nodeid]
    if lost:
      raise pytest.UsageError(f'pytest-xdist did not group {lost[0]} (and {len(lost) - 1} more): '
                              'this pytest and pytest-xdist do not work together; install '
                              "the versions pyproject.toml's test extra asks for.")


REAL_PLANET_DIR = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'planet'
SYNTHETIC_CHIPS = 60
SYNTHETIC_SIZE = 128
SYNTHETIC_TEST = 7


@pytest.fixture(scope='session')
def real_planet_dir() -> Path:
  if not (REAL_PLANET_DIR / 'train_v2.csv').is_file():
    pytest.skip(f'real Planet samples not found at {REAL_PLANET_DIR} '
                '(../shared/data/planet beside the repository)')
  return REAL_PLANET_DIR


@pytest.fixture(scope='session')
def synthetic_kaggle_dir(tmp_path_factory) -> Path:
  from rf_jax.data import synthetic
  out = tmp_path_factory.mktemp('data') / 'synthetic_kaggle'
  return synthetic.write_dataset(out, SYNTHETIC_CHIPS, SYNTHETIC_SIZE, seed=0,
                                 num_test=SYNTHETIC_TEST)


@pytest.fixture(scope='session')
def prepared_synthetic(synthetic_kaggle_dir, tmp_path_factory):
  from rf_jax.data import planet
  from rf_jax.data import prepared
  return prepared.prepare(
      synthetic_kaggle_dir, tmp_path_factory.mktemp('prepared'), layout='auto',
      val_fraction=planet.STUDY_VAL_FRACTION, split_seed=planet.STUDY_SEED)
