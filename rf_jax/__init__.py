"""rf_jax: multi-label ResNet-18 classifiers for the Planet Amazon chips.

Importing it changes nothing in the process: the CPU tunings are applied where a run asks for
them (config.cpu_tuning: rf_jax/xla_cpu.py's flags, models/registry.py's ops).
"""
