"""XLA:CPU flags that make ResNet training faster and leaner (measured in docs/performance.md).

* jaxlib 0.10 hands every convolution to YNNPACK by default; for ResNet-18 its
  kernel-gradient convolutions are 2-3.5x slower than XLA's own Eigen kernels, and the
  train step ~1.7x slower overall. Dropping that one fusion type keeps YNNPACK for the
  reductions and elementwise work, where it is fast.
* The concurrency-optimised scheduler runs independent ops side by side, which on a
  few cores buys no speed but keeps more activations alive: without it the train
  step's temporary buffers shrink by ~10% (rgb) to ~25% (dual).

Nothing happens on import: an entry point calls `set_default_flags()` (main.py where
config.cpu_tuning is on; tests/conftest.py; scripts/benchmark.py) before JAX creates its
first backend, the only moment XLA reads XLA_FLAGS. At that moment which backend JAX will
pick is not known yet (asking would create it), so the flags are added only when it must be
the CPU:

* JAX_PLATFORMS (or `jax.config.update('jax_platforms', ...)`) is set: its first platform
  is JAX's default backend, so the flags are added iff that is `cpu`;
* otherwise JAX picks an accelerator whenever a plugin for one is installed and finds a
  device, so the flags are added only where no such plugin is installed (no `jax_plugins`
  module or entry point: CUDA, ROCm and other PJRT plugins; no `libtpu`). A CPU-only run
  on a machine with a GPU plugin installed then goes without them: JAX_PLATFORMS=cpu
  gives them back.

XLA aborts on a flag it does not know, so they are added only for the jaxlib versions
they were measured on, and never over a user's own setting of the same flag. The model's
own CPU tuning is chosen after the backend exists (models/registry.tuned_ops).
"""

import importlib.metadata
import importlib.util
import os
import pkgutil

import jax
import jaxlib

# (flag name, value, first and first-excluded jaxlib version it applies to)
CPU_FLAGS = (
    ('xla_cpu_experimental_ynn_fusion_type', '-individual_convolution', (0, 10, 2), (0, 11)),
    ('xla_cpu_enable_concurrency_optimized_scheduler', 'false', (0, 10, 2), (0, 11)),
)


def _version(text: str) -> tuple[int, ...]:
  return tuple(int(part) for part in text.split('.')[:3] if part.isdigit())


def default_flags(jaxlib_version: str, xla_flags: str) -> str:
  """`xla_flags` with the CPU_FLAGS that apply to this jaxlib and are not set in it."""
  version = _version(jaxlib_version)
  added = [f'--{name}={value}' for name, value, first, end in CPU_FLAGS
           if first <= version < end and f'--{name}=' not in xla_flags]
  return ' '.join([xla_flags.strip(), *added]).strip()


def backend_is_cpu(jax_platforms: str | None, accelerator_plugins: tuple[str, ...]) -> bool:
  """Whether JAX's default backend will be the CPU: see the module's docstring."""
  if jax_platforms:
    return jax_platforms.split(',')[0].strip() == 'cpu'
  return not accelerator_plugins


def accelerator_plugins() -> tuple[str, ...]:
  """The installed modules through which JAX may find an accelerator (none imported)."""
  found = {entry.value for entry in importlib.metadata.entry_points(group='jax_plugins')}
  namespace = importlib.util.find_spec('jax_plugins')
  if namespace is not None and namespace.submodule_search_locations:
    found.update(f'jax_plugins.{module.name}'
                 for module in pkgutil.iter_modules(namespace.submodule_search_locations))
  if importlib.util.find_spec('libtpu') is not None:
    found.add('libtpu')
  return tuple(sorted(found))


def set_default_flags() -> None:
  """Adds the CPU_FLAGS to $XLA_FLAGS where JAX's backend will be the CPU; takes effect if
  JAX has not created a backend yet."""
  if backend_is_cpu(jax.config.jax_platforms, accelerator_plugins()):
    os.environ['XLA_FLAGS'] = default_flags(jaxlib.version.__version__,
                                            os.environ.get('XLA_FLAGS', ''))
