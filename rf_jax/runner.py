"""The study's steps (steps.py) on chips as stored, laid over the devices (parallel.py).

A run builds its runner once and hands it to whatever steps it takes next (training, then
evaluation, then the submission): jit keeps the programs it compiled on the runner's functions.
"""

import functools

import jax
import ml_collections

from rf_jax import augment
from rf_jax import parallel
from rf_jax import steps


def create_runner(kind: str, tta: str, preprocess: augment.Preprocess | None = None,
                  devices=None) -> parallel.Runner:
  """The train and eval steps laid over `devices` (default: all) as `kind` (parallel.KINDS),
  taking raw chips made into the model's input by `preprocess` (None: batches are the model's
  input); evaluation averages the views of `tta` (steps.TTA_CHOICES)."""
  train = (steps.train_step if preprocess is None
           else functools.partial(steps.preprocessed_train_step, preprocess=preprocess))
  return parallel.create_runner(
      kind, train,
      functools.partial(steps.preprocessed_eval_step, preprocess=preprocess, tta=tta),
      devices)


def layout(config: ml_collections.ConfigDict) -> str:
  """config.parallel, where there are several devices to lay the steps over."""
  return config.parallel if jax.device_count() > 1 else 'jit'


def for_config(config: ml_collections.ConfigDict,
               preprocess: augment.Preprocess) -> parallel.Runner:
  """The runner of a run: its layout, its evaluation's views, its input's preprocessing."""
  return create_runner(layout(config), tta=config.eval.tta, preprocess=preprocess)
