"""XLA:CPU flags that make ResNet training faster and leaner (measured in docs/performance.md).

* jaxlib 0.10 hands every convolution to YNNPACK by default; for ResNet-18 its
  kernel-gradient convolutions are 2-3.5x slower than XLA's own Eigen kernels, and the
  train step ~1.7x slower overall. Dropping that one fusion type keeps YNNPACK for the
  reductions and elementwise work, where it is fast.
* The concurrency-optimised scheduler runs independent ops side by side, which on a
  few cores buys no speed but keeps more activations alive: without it the train
  step's temporary buffers shrink by ~10% (rgb) to ~25% (dual).

The flags only touch the CPU compiler, so they are harmless on GPU. XLA reads
XLA_FLAGS once, when JAX creates its first backend, and aborts on a flag it does
not know: they are added only for the jaxlib versions they were measured on, and
never over a user's own setting of the same flag.
"""

import os

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


def set_default_flags() -> None:
  """Adds the CPU_FLAGS to $XLA_FLAGS; takes effect if JAX has not created a backend yet."""
  os.environ['XLA_FLAGS'] = default_flags(jaxlib.version.__version__,
                                          os.environ.get('XLA_FLAGS', ''))
