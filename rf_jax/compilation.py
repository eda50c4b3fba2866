"""XLA's compiled programs kept between invocations, and the compile time each one reports.

Every invocation (a resume, `--mode evaluate`, `--mode predict`) builds the same jitted steps
again; compiling the ResNet-18 train steps takes 10-30 s on a small CPU. JAX's persistent
compilation cache keeps each compiled program on disk under a key of its HLO, the compile
options (XLA_FLAGS included), the devices and the jax/jaxlib versions, so a later invocation
loads it instead of compiling it: `configure(config)` points JAX at `config.compilation_cache`
before anything is compiled. The cache is trusted code: keep it where only you can write.

The rule for the environment: a JAX_* variable that sets one of the options rf_jax sets
(JAX_COMPILATION_CACHE_DIR, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS) is the user's own
choice and wins over the config, '' included (tests/conftest.py gives the processes the tests
start one cache for the session this way).

`reported()` counts what JAX compiled while it is open, from JAX's own monitoring events, and
prints one line at its end: as big_vision logs its first step's time (compilation included,
`z/secs/update0`) beside the program's uptime, the compile seconds beside the wall time.
"""

import contextlib
import dataclasses
import os
import threading
import time

import jax
import ml_collections

# JAX's monitoring events (jax/_src/dispatch.py, jax/_src/compiler.py): every program that
# reaches the backend, with the seconds it took (compiled, or loaded from the cache), and each
# program loaded from the persistent cache.
COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'


def settings(config: ml_collections.ConfigDict, environ=os.environ) -> dict[str, object]:
  """The jax.config options `config` asks for, less those a JAX_* variable in `environ` sets."""
  directory = os.path.expanduser(config.compilation_cache)  # expanded here, not in the saved
  # config.json: a run shared between users puts each one's programs in their own cache
  wanted = {
      'jax_compilation_cache_dir': directory or None,  # None: no persistent cache
      # JAX's default (1 s) leaves out the small programs: a demo run's 30 of them cost seconds
      # compiled, a fraction loaded (docs/performance.md).
      'jax_persistent_cache_min_compile_time_secs': 0.0,
  }
  return {name: value for name, value in wanted.items() if name.upper() not in environ}


def configure(config: ml_collections.ConfigDict) -> None:
  """Applies `settings(config)`: before JAX compiles anything (it opens the cache once)."""
  for name, value in settings(config).items():
    jax.config.update(name, value)


@dataclasses.dataclass
class Compiles:
  """What JAX compiled while `reported()` was open."""
  programs: int = 0
  seconds: float = 0.0  # compiling, or loading from the cache
  from_cache: int = 0

  def line(self, wall_seconds: float) -> str:
    directory = jax.config.jax_compilation_cache_dir
    where = (f'{self.from_cache} from the cache in {directory}'
             if directory and jax.config.jax_enable_compilation_cache else 'no persistent cache')
    return (f'compiled {self.programs} program{"s" if self.programs != 1 else ""} in '
            f'{self.seconds:.1f} s ({where}); wall time {wall_seconds:.1f} s')


@contextlib.contextmanager
def reported():
  """Yields the `Compiles` of the block, counted as JAX compiles; prints its line at the end
  of a block that did not raise (process 0 only, as the run's other lines)."""
  compiles, lock = Compiles(), threading.Lock()  # input threads may compile too

  def on_duration(event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event == COMPILE_EVENT:
      with lock:
        compiles.programs += 1
        compiles.seconds += duration

  def on_event(event: str, **kwargs) -> None:
    del kwargs
    if event == CACHE_HIT_EVENT:
      with lock:
        compiles.from_cache += 1

  started = time.monotonic()
  jax.monitoring.register_event_duration_secs_listener(on_duration)
  jax.monitoring.register_event_listener(on_event)
  try:
    yield compiles
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)
    jax.monitoring.unregister_event_listener(on_event)
  if jax.process_index() == 0:
    print(compiles.line(time.monotonic() - started), flush=True)
