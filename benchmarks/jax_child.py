"""The rf_jax side: the real train and eval steps of rf_jax.steps on a random-init study model.

Fed as training and evaluation feed them: numpy batch -> `runner.put_batch` -> compiled step
(the train state donated); a timed train step blocks on the loss, an eval step fetches its
outputs with `runner.get_outputs`.

  python -m benchmarks.jax_child job.json result.json   (spawned by orchestrate)
"""

from __future__ import annotations

import os

from absl import app

from benchmarks import common
from benchmarks import jax_patches


def train_state(variant: str, settings: common.Settings):
  """A fresh train state of the study model `variant`, with the study's optimiser."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from rf_jax import steps  # pylint: disable=g-import-not-at-top
  from rf_jax.models import registry  # pylint: disable=g-import-not-at-top

  optim = common.study_config().optim
  model = registry.create_model(variant, num_classes=common.NUM_TAGS,
                                dtype=jnp.dtype(settings.dtype))
  variables = steps.init_variables(model, jax.random.key(common.SEED), settings.size,
                                   channels=len(registry.input_bands(variant)))
  learning_rate = steps.create_learning_rate_fn(optim.lr, optim.decay_epochs, optim.decay_rate,
                                                steps_per_epoch=1000)
  return steps.create_train_state(variables, model,
                                  steps.create_optimizer(learning_rate, optim.momentum))


def run(settings: common.Settings, variant: str) -> dict:
  """Times `variant`'s train (then eval) step; peak memory after each phase."""
  patches = jax_patches.apply(settings.jax_patch)  # before anything is built
  import jax  # pylint: disable=g-import-not-at-top
  from rf_jax import runner as runner_lib  # pylint: disable=g-import-not-at-top
  from rf_jax.models import registry  # pylint: disable=g-import-not-at-top

  rss_imports = common.maxrss_mb()
  runner = runner_lib.create_runner('jit', flips=False)
  holder = {'state': runner.put_state(train_state(variant, settings))}

  def train_fn(batch):
    holder['state'], metrics = runner.train_step(holder['state'], runner.put_batch(batch))
    jax.block_until_ready(metrics)

  def eval_fn(batch):
    return runner.get_outputs(runner.eval_step(holder['state'], runner.put_batch(batch)))

  channels = len(registry.input_bands(variant))
  result = {'framework': 'rf_jax', 'layout': 'NHWC', 'patches': patches,
            'xla_flags': os.environ.get('XLA_FLAGS', ''), 'backend': jax.default_backend(),
            'device': str(jax.devices()[0]), 'rss_after_imports_mb': rss_imports}
  result['train'] = common.timed(
      train_fn, common.random_batches(2, settings.batch, settings.size, channels),
      settings.warmup, settings.steps)
  result['rss_peak_train_mb'] = common.maxrss_mb()
  if not settings.no_eval:
    result['eval'] = common.timed(
        eval_fn, common.random_batches(2, settings.eval_batch, settings.size, channels, seed=1),
        settings.warmup, settings.eval_steps)
  result['rss_peak_mb'] = common.maxrss_mb()
  peak = (jax.devices()[0].memory_stats() or {}).get('peak_bytes_in_use')
  if peak is not None:  # GPUs and TPUs report it; XLA:CPU does not
    result['device_peak_mb'] = peak / 2**20
  return result


if __name__ == '__main__':
  app.run(common.child_main(run))
