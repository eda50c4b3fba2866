"""How the train and eval steps are laid over devices.

`jit`: one `jax.jit` over a 1-D `Mesh` ('data'): state replicated, batch
sharded; XLA inserts the cross-device reductions, so BatchNorm sees the global
batch. On one device this is plain `jax.jit`.
`pmap`: replicated state, per-device batch shards; the step averages gradients
and the loss with `lax.pmean` and the model's BatchNorm synchronises its
statistics over `AXIS_NAME`.
Either way the numbers equal one device's on the same global batch.

A batch's numpy arrays are this process's rows of the global batch (sharded over the
devices); its jax.Arrays are already on device (a split held there, data/pipeline.py
cache='device') and the mesh passes them as they are, replicated: every device gathers its rows
from its own copy, so a step moves no chips between devices, at the cost of the split's size on
each device (`replicate`). pmap would copy such an array to every device at every call, so it
refuses them.
"""

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

import flax.jax_utils
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from rf_jax import errors

AXIS_NAME = 'batch'
KINDS = ('jit', 'pmap')  # config.parallel


class DeviceCountError(errors.UserError, ValueError):
  """A batch size that the devices cannot share evenly."""


@dataclasses.dataclass(frozen=True)
class Runner:
  """Compiled steps plus the moves between host and device layouts."""
  train_step: Callable[[Any, Any], tuple[Any, dict]]  # (state, batch) -> (state, metrics)
  eval_step: Callable[[Any, Any], Any]  # (state, batch) -> per-example outputs
  put_state: Callable[[Any], Any]  # one host copy -> device layout
  get_state: Callable[[Any], Any]  # device layout -> one copy (checkpoints)
  put_batch: Callable[[Any], Any]  # this process's batch -> what the steps take
  get_outputs: Callable[[Any], Any]  # device outputs -> global numpy arrays [B, ...]


def check_batch_sizes(config) -> None:
  """Each global batch must split evenly over every device."""
  n = jax.device_count()
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] % n:
      raise DeviceCountError(
          f'config.{key}={config[key]} does not divide by the {n} devices: use a multiple '
          f'of {n} (e.g. --config.{key}={max(n, config[key] // n * n)}).')


def replicate(array: np.ndarray) -> jax.Array:
  """`array` (the same on every process) copied to every device, as the runners take it."""
  sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ('data',)), P())
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _split(batch: dict) -> tuple[dict, dict]:
  """(this process's rows: numpy arrays, the entries already on device: jax.Arrays)."""
  on_device = lambda v: all(isinstance(x, jax.Array) for x in jax.tree.leaves(v))
  return ({k: v for k, v in batch.items() if not on_device(v)},
          {k: v for k, v in batch.items() if on_device(v)})


def _joined(step: Callable) -> Callable:
  """step(state, batch) as step(state, (rows, resident))."""
  return lambda state, placed, **kwargs: step(state, {**placed[0], **placed[1]}, **kwargs)


def create_runner(kind: str, train_step: Callable, eval_step: Callable,
                  devices=None) -> Runner:
  """`train_step(state, batch, axis_name=None)`, `eval_step(state, batch)` laid out as `kind`.

  `devices` (default: all) is for the mesh; pmap uses every local device.
  """
  if kind == 'pmap':
    return _pmap_runner(train_step, eval_step)
  return _mesh_runner(train_step, eval_step, devices or jax.devices())


def _mesh_runner(train_step, eval_step, devices) -> Runner:
  mesh = Mesh(np.asarray(devices), ('data',))
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P('data'))
  batch_shardings = ((sharded, replicated),)  # (rows, resident), see _split

  def put_batch(batch):
    rows, resident = _split(batch)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharded, x),
                        rows), resident

  return Runner(
      train_step=jax.jit(_joined(train_step), in_shardings=(replicated,) + batch_shardings,
                         out_shardings=(replicated, replicated), donate_argnums=0),
      eval_step=jax.jit(_joined(eval_step), in_shardings=(replicated,) + batch_shardings,
                        out_shardings=sharded),
      # Through host memory: a restored state sits on this process's devices only, and
      # device_put cannot move such arrays onto a mesh that spans processes.
      put_state=lambda state: jax.device_put(jax.device_get(state), replicated),
      get_state=lambda state: state,
      put_batch=put_batch,
      get_outputs=lambda outputs: multihost_utils.process_allgather(outputs, tiled=True),
  )


def _pmap_runner(train_step, eval_step) -> Runner:
  n = jax.local_device_count()
  pmapped_train = jax.pmap(functools.partial(_joined(train_step), axis_name=AXIS_NAME),
                           axis_name=AXIS_NAME, donate_argnums=0)

  def train(state, batch):
    state, metrics = pmapped_train(state, batch)
    return state, jax.tree.map(lambda x: x[0], metrics)  # identical on every device (pmean)

  def unshard(outputs):
    outputs = multihost_utils.process_allgather(outputs, tiled=True)
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), outputs)

  return Runner(
      train_step=train,
      eval_step=jax.pmap(_joined(eval_step), axis_name=AXIS_NAME),
      put_state=flax.jax_utils.replicate,
      get_state=flax.jax_utils.unreplicate,
      put_batch=lambda batch: _pmap_batch(n, batch),
      get_outputs=unshard,
  )


def _pmap_batch(n: int, batch: dict):
  rows, resident = _split(batch)
  if resident:
    raise ValueError(f'the pmap layout takes batches from the host only, got {list(resident)} '
                     "on device: hold the split with cache='host', or lay out with 'jit'")
  return jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), rows), resident
