"""The whole study loop on a small synthetic dataset, sized for a laptop CPU.

The dataset (Planet format, with tag signal in RGB and NIR-only tags) is
generated into the workdir on first use; models start from random init since
no weights can be assumed on a fresh machine. Choose the model with
`--config.model.name=rgb|rgbir|dual`.
"""

from rf_jax.configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'dual'
  config.model.weights = ''

  config.data.raw_dir = ''  # generated into <workdir>/synthetic
  config.data.synthetic.num_chips = 1200
  config.data.synthetic.chip_size = 128
  config.data.synthetic.num_test = 100
  config.data.crop_size = 112
  config.data.eval_size = 112
  config.data.num_workers = 0  # on 2 cores, loading in-process costs less CPU than workers

  config.optim.lr = 0.05  # random init learns too slowly at the fine-tuning rate
  config.optim.decay_epochs = 3
  config.num_epochs = 4
  config.eval.top_n = 30
  return config
