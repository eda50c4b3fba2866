"""Batches placed on the devices ahead of their step.

`runner.put_batch` starts a batch's copy to the devices and returns at once (JAX dispatches
asynchronously); placing the next batches while the device computes the current step hides
the host's reading and the copy behind it. Two in flight beside the batch in use: one being
copied while one waits, the device never idle for want of input.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from typing import Any

IN_FLIGHT = 2


class Prefetched(Iterator):
  """`put(batch)` of each batch of `batches`, `size` of them placed ahead of use.

  For a resumable loader (one with get_state / set_state, pipeline.TrainBatches) `get_state()`
  is the loader's state before the next batch this iterator yields, not before the batches it
  has read ahead: a checkpoint of the consumed steps resumes exactly.
  """

  def __init__(self, batches: Iterable[Any], put: Callable[[Any], Any], size: int = IN_FLIGHT):
    self._batches, self._put, self._size = iter(batches), put, size
    self._stateful = hasattr(self._batches, 'get_state')
    self._ahead = collections.deque()  # (the loader's state before the batch, the placed batch)

  def __next__(self):
    self._fill()
    if not self._ahead:
      raise StopIteration
    batch = self._ahead.popleft()[1]
    self._fill()  # the next ones start their copies before this one's step is dispatched
    return batch

  def _fill(self) -> None:
    while len(self._ahead) < self._size:
      state = self._batches.get_state() if self._stateful else None
      try:
        batch = next(self._batches)
      except StopIteration:
        return
      self._ahead.append((state, self._put(batch)))

  def get_state(self) -> bytes:
    if self._ahead:
      return self._ahead[0][0]
    return self._batches.get_state()
