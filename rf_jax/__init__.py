"""rf_jax: multi-label ResNet-18 classifiers for the Planet Amazon chips."""

from rf_jax import xla_cpu

# Before any backend exists: every entry point (CLI, scripts, tests, notebooks) imports rf_jax first.
xla_cpu.set_default_flags()
