"""The rf_jax side: the real train and eval steps of rf_jax.steps on a random-init study model.

Fed as training and evaluation feed them (common.resolve picks the feed from the device):

* `ready` (the CPU default): the model's float32 input, numpy batch -> `runner.put_batch` ->
  compiled step (the train state donated); a timed train step blocks on the loss, an eval step
  fetches its outputs with `runner.get_outputs`.
* `chips` (the GPU default): chips as stored (uint16, 4 bands) made into the model's input in
  the step (`runner.create_runner(..., preprocess=...)`: steps.preprocessed_train_step /
  preprocessed_eval_step, rf_jax/augment.py: the study's resize_flip to 224/256 of the chips'
  side, normalised, in the compute dtype), common.IN_FLIGHT batches put on the device ahead of
  their step (common.timed_fed), in bfloat16 on a GPU.

  python -m benchmarks.jax_child job.json result.json   (spawned by orchestrate)
"""

from __future__ import annotations

import os

from absl import app

from benchmarks import common
from benchmarks import jax_patches


def _accelerator() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.default_backend() != 'cpu'


def train_state(variant: str, settings: common.Settings, dtype: str | None = None,
                size: int | None = None):
  """A fresh train state of the study model `variant`, with the study's optimiser, in `dtype`
  (default: --dtype, 'auto' resolved for this backend) for `size` px inputs (default --size)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from rf_jax import steps  # pylint: disable=g-import-not-at-top
  from rf_jax.models import registry  # pylint: disable=g-import-not-at-top

  dtype = dtype or common.resolve(settings, _accelerator())[1]
  optim = common.study_config().optim
  model = registry.create_model(variant, num_classes=common.NUM_TAGS, dtype=jnp.dtype(dtype))
  variables = steps.init_variables(model, jax.random.key(common.SEED), size or settings.size,
                                   channels=len(registry.input_bands(variant)))
  learning_rate = steps.create_learning_rate_fn(optim.lr, optim.decay_epochs, optim.decay_rate,
                                                steps_per_epoch=1000)
  return steps.create_train_state(variables, model,
                                  steps.create_optimizer(learning_rate, optim.momentum))


def preprocess(variant: str, settings: common.Settings, dtype: str):
  """The chips feed's augment.Preprocess: the study's train transform (the whole chip resized,
  flipped) and evaluation resize to common.input_size, normalised with the synthetic chips'
  moments."""
  from rf_jax import augment  # pylint: disable=g-import-not-at-top
  from rf_jax.models import registry  # pylint: disable=g-import-not-at-top
  bands = registry.input_bands(variant)
  size = common.input_size(settings)
  return augment.Preprocess(bands=bands, mean=(common.CHIP_MEAN,) * len(bands),
                            inv_std=(1 / common.CHIP_STD,) * len(bands),
                            train_transform='resize_flip', crop_size=size, eval_size=size,
                            seed=common.SEED, dtype=dtype)


def _ready(settings: common.Settings, variant: str, runner, holder: dict) -> dict:
  """The model's input uploaded synchronously inside each timed step."""
  import jax  # pylint: disable=g-import-not-at-top
  from rf_jax.models import registry  # pylint: disable=g-import-not-at-top

  def train_fn(batch):
    holder['state'], metrics = runner.train_step(holder['state'], runner.put_batch(batch))
    jax.block_until_ready(metrics)

  def eval_fn(batch):
    return runner.get_outputs(runner.eval_step(holder['state'], runner.put_batch(batch)))

  channels = len(registry.input_bands(variant))
  out = {'train': common.timed(
      train_fn, common.random_batches(2, settings.batch, settings.size, channels),
      settings.warmup, settings.steps)}
  out['rss_peak_train_mb'] = common.maxrss_mb()
  if not settings.no_eval:
    out['eval'] = common.timed(
        eval_fn, common.random_batches(2, settings.eval_batch, settings.size, channels, seed=1),
        settings.warmup, settings.eval_steps)
  return out


def _chips(settings: common.Settings, runner, holder: dict) -> dict:
  """Chips as stored, placed common.IN_FLIGHT batches ahead, the input made in the step."""
  import jax  # pylint: disable=g-import-not-at-top

  def train(placed):
    holder['state'], metrics = runner.train_step(holder['state'], placed)
    return metrics

  def evaluate(placed):
    return runner.eval_step(holder['state'], placed)

  distinct = common.IN_FLIGHT + 1  # batches generated, cycled
  out = {'train': common.timed_fed(
      train, jax.block_until_ready, runner.put_batch,
      common.random_chips(distinct, settings.batch, settings.size), settings.warmup,
      settings.steps)}
  out['rss_peak_train_mb'] = common.maxrss_mb()
  if not settings.no_eval:
    out['eval'] = common.timed_fed(
        evaluate, runner.get_outputs, runner.put_batch,
        common.random_chips(distinct, settings.eval_batch, settings.size, seed=1),
        settings.warmup, settings.eval_steps)
  return out


def run(settings: common.Settings, variant: str) -> dict:
  """Times `variant`'s train (then eval) step; peak memory after each phase."""
  patches = jax_patches.apply(settings.jax_patch)  # before anything is built
  import jax  # pylint: disable=g-import-not-at-top
  from rf_jax import runner as runner_lib  # pylint: disable=g-import-not-at-top

  rss_imports = common.maxrss_mb()
  feed, dtype = common.resolve(settings, _accelerator())
  size = common.input_size(settings) if feed == 'chips' else settings.size
  runner = runner_lib.create_runner(
      'jit', tta='none', preprocess=preprocess(variant, settings, dtype) if feed == 'chips'
      else None)
  holder = {'state': runner.put_state(train_state(variant, settings, dtype, size))}
  device = jax.devices()[0]
  result = {'framework': 'rf_jax', 'layout': 'NHWC', 'patches': patches,
            'xla_flags': os.environ.get('XLA_FLAGS', ''), 'backend': jax.default_backend(),
            'device': str(device), 'device_kind': device.device_kind, 'feed': feed,
            'dtype': dtype, 'input_size': size, 'rss_after_imports_mb': rss_imports}
  if feed == 'chips':
    result.update(_chips(settings, runner, holder))
  else:
    result.update(_ready(settings, variant, runner, holder))
  result['rss_peak_mb'] = common.maxrss_mb()
  peak = (device.memory_stats() or {}).get('peak_bytes_in_use')
  if peak is not None:  # GPUs and TPUs report it; XLA:CPU does not
    result['device_peak_mb'] = peak / 2**20
  return result


if __name__ == '__main__':
  app.run(common.child_main(run))
