"""The study's `rgb` model with the Table 1 recipe (configs/default.py)."""

from rf_jax.configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'rgb'
  return config
