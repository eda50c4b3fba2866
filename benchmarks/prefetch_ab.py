"""A/B, alternated in one process: rf_jax's batches placed ahead of the step (prefetch.Prefetched)
against placed at the step, in the train loop and in predict (before: each batch placed, run
and read back in turn). The ResNet-18 rgb at 96 px, batch 8 train / 16 eval, synthetic chips.

    python -m benchmarks.prefetch_ab [--rounds 8] [--steps 20]
"""

import argparse
import tempfile
import time

from rf_jax import xla_cpu

xla_cpu.set_default_flags()  # pylint: disable=wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-order
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-order

from rf_jax import inputs  # pylint: disable=g-import-not-at-top
from rf_jax import predict  # pylint: disable=g-import-not-at-top
from rf_jax import prefetch  # pylint: disable=g-import-not-at-top
from rf_jax import runner as runner_lib  # pylint: disable=g-import-not-at-top
from rf_jax import steps  # pylint: disable=g-import-not-at-top
from rf_jax import train  # pylint: disable=g-import-not-at-top
from rf_jax.configs import rgb  # pylint: disable=g-import-not-at-top
from rf_jax.models import registry  # pylint: disable=g-import-not-at-top
from rf_jax.workdir import Workdir  # pylint: disable=g-import-not-at-top


def _config():
  config = rgb.get_config()
  config.model.weights, config.data.raw_dir = '', ''
  config.data.synthetic.num_chips, config.data.synthetic.chip_size = 240, 128
  config.data.synthetic.num_test = 0
  config.data.crop_size = config.data.eval_size = 96
  config.batch_size, config.eval_batch_size, config.data.num_workers = 8, 16, 0
  return config


def _predict_in_turn(runner, state, batches):
  """predict's loop before prefetching: place, run and read back each batch in turn."""
  return [np.asarray(runner.get_outputs(runner.eval_step(state, runner.put_batch(b)))['scores'])
          for b in batches]


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--rounds', type=int, default=8)
  parser.add_argument('--steps', type=int, default=20)
  args = parser.parse_args()
  config = _config()
  with tempfile.TemporaryDirectory() as root:
    wd = Workdir(root)
    wd.create()
    data = inputs.prepare(config, wd)
    model = registry.create_model('rgb', num_classes=17)
    schedule = steps.create_learning_rate_fn(0.01, 10, 0.3, 10)
    runner = runner_lib.for_config(config, inputs.preprocess(config, data))
    state = runner.put_state(train.create_train_state(config, model, schedule,
                                                      jax.random.key(0)))
    validation = inputs.eval_batches(config, data, 'validation')

    def train_ms(ahead: bool, n: int) -> float:
      nonlocal state
      loader = inputs.train_loader(config, data)
      feed = (prefetch.Prefetched(loader, runner.put_batch) if ahead else
              (runner.put_batch(b) for b in loader))
      start = time.perf_counter()
      for _ in range(n):
        state, metrics = runner.train_step(state, next(feed))
      jax.block_until_ready(metrics)
      return (time.perf_counter() - start) / n * 1e3

    def eval_ms(ahead: bool) -> float:
      start = time.perf_counter()
      if ahead:
        predict.predict(runner, state, validation)
      else:
        _predict_in_turn(runner, state, validation)
      return (time.perf_counter() - start) * 1e3

    for ahead in (False, True):  # compile both paths first
      train_ms(ahead, 2)
      eval_ms(ahead)
    found = {k: [] for k in ('train at the step', 'train ahead', 'eval in turn', 'eval ahead')}
    for _ in range(args.rounds):
      found['train at the step'].append(train_ms(False, args.steps))
      found['train ahead'].append(train_ms(True, args.steps))
      found['eval in turn'].append(eval_ms(False))
      found['eval ahead'].append(eval_ms(True))
  median = {k: float(np.median(v)) for k, v in found.items()}
  for key, values in found.items():
    print(f'{key:18s} median {median[key]:7.1f} ms  ({", ".join(f"{v:.0f}" for v in values)})')
  print(f'train step ahead / at the step: {median["train ahead"] / median["train at the step"]:.3f}'
        f'; eval pass ahead / in turn: {median["eval ahead"] / median["eval in turn"]:.3f} '
        f'({len(data.validation)} validation chips, jax {jax.__version__}, '
        f'{jax.default_backend()})')


if __name__ == '__main__':
  main()
