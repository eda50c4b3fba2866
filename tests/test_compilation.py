"""The persistent compilation cache (config.compilation_cache) and the compile time reported
(rf_jax/compilation.py). Nothing is trained: a tiny jitted function stands for the steps."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from rf_jax import compilation
from rf_jax import config_checks
from rf_jax.configs import default

REPO = pathlib.Path(__file__).resolve().parents[1]
OPTIONS = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')
ENV_VARS = tuple(name.upper() for name in OPTIONS)


def _config(directory: str):
  config = default.get_config()
  config.compilation_cache = directory
  return config


@pytest.fixture
def jax_options(monkeypatch):
  """No JAX_* cache variable in the environment; the session's cache options restored after
  (nothing compiles in between, so the cache JAX opened for the session is untouched)."""
  for name in ENV_VARS:
    monkeypatch.delenv(name, raising=False)
  saved = {name: getattr(jax.config, name) for name in OPTIONS}
  yield
  for name, value in saved.items():
    jax.config.update(name, value)


@pytest.mark.usefixtures('jax_options')
def test_the_key_sets_jax_cache_directory_with_home_expanded():
  compilation.configure(_config('~/some/cache'))
  assert jax.config.jax_compilation_cache_dir == os.path.expanduser('~/some/cache')
  assert not jax.config.jax_compilation_cache_dir.startswith('~')
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0


@pytest.mark.usefixtures('jax_options')
def test_an_empty_key_turns_the_cache_off():
  compilation.configure(_config('/somewhere'))
  compilation.configure(_config(''))
  assert jax.config.jax_compilation_cache_dir is None


def test_the_default_is_a_cache_in_the_home_directory():
  assert compilation.settings(default.get_config(), environ={}) == {
      'jax_compilation_cache_dir': os.path.expanduser('~/.cache/rf_jax/xla'),
      'jax_persistent_cache_min_compile_time_secs': 0.0}


@pytest.mark.parametrize('directory', ['~/.cache/rf_jax/xla', ''])
def test_a_jax_variable_in_the_environment_wins_over_the_key(directory):
  """The user's JAX_COMPILATION_CACHE_DIR stays in force, even over ''; each variable only
  keeps its own option."""
  environ = {'JAX_COMPILATION_CACHE_DIR': '/users/own'}
  assert compilation.settings(_config(directory), environ) == {
      'jax_persistent_cache_min_compile_time_secs': 0.0}
  assert compilation.settings(_config(directory), {**environ, ENV_VARS[1]: '2'}) == {}


def test_the_tests_child_processes_keep_the_sessions_cache():
  """tests/conftest.py's cache reaches a child rf_jax through the environment; the default key
  would otherwise send its programs to ~/.cache."""
  session_cache = os.environ['JAX_COMPILATION_CACHE_DIR']
  script = ('import jax; from rf_jax import compilation; from rf_jax.configs import default; '
            'compilation.configure(default.get_config()); '
            'print(jax.config.jax_compilation_cache_dir)')
  done = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                        text=True, timeout=120, check=True)
  assert done.stdout.strip() == session_cache


def test_the_key_must_be_a_string():
  with pytest.raises(config_checks.ConfigError, match=r"config\.compilation_cache=None.*''"):
    config_checks.check(_config(None))


def test_the_key_is_free_to_change_between_invocations():
  saved = _config('~/.cache/rf_jax/xla').to_dict()
  assert config_checks.changed_keys(saved, _config('')) == {}


def test_reported_counts_the_programs_and_seconds_compiled(capsys):
  x = np.arange(3, dtype=np.float32)  # on the device only inside the jitted calls
  with compilation.reported() as compiles:
    jax.jit(lambda v: v * 3 - 1)(x).block_until_ready()
    jax.jit(lambda v: v.sum())(x).block_until_ready()
  assert compiles.programs == 2
  assert compiles.seconds > 0
  out = capsys.readouterr().out
  line = re.fullmatch(r'compiled 2 programs in ([\d.]+) s \((?:\d from the cache in .+|no '
                      r'persistent cache)\); wall time ([\d.]+) s\n', out)
  assert line, out
  assert line.group(1) == f'{compiles.seconds:.1f}'
  assert float(line.group(2)) >= round(compiles.seconds, 1) - 0.1


# Compiles one function, clears JAX's in-memory caches, compiles it again: each time inside
# its own reported() block, whose line is printed.
_TWICE = """
import sys
import jax
import numpy as np
from rf_jax import compilation
from rf_jax.configs import default
config = default.get_config()
config.compilation_cache = sys.argv[1]
compilation.configure(config)
f = jax.jit(lambda v: v * 2 + 1)
x = np.arange(4, dtype=np.float32)
for _ in range(2):
  jax.clear_caches()
  with compilation.reported():
    f(x).block_until_ready()
"""
_LINE = re.compile(r'compiled 1 program in ([\d.]+) s \((.*)\); wall time ([\d.]+) s$')


def _compile_twice(directory: str) -> list[str]:
  env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
  done = subprocess.run([sys.executable, '-c', _TWICE, directory], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.strip().splitlines()
  assert len(lines) == 2 and all(_LINE.match(line) for line in lines), done.stdout
  return [_LINE.match(line).group(2) for line in lines]


def test_the_second_compile_comes_from_the_cache(tmp_path):
  cache = tmp_path / 'cache'
  assert _compile_twice(str(cache)) == [f'0 from the cache in {cache}',
                                        f'1 from the cache in {cache}']
  assert any(cache.iterdir())


def test_without_the_cache_both_compile():
  assert _compile_twice('') == ['no persistent cache'] * 2
