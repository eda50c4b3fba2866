"""prefetch.Prefetched: batches placed ahead of use, and the state of the consumed ones.

That training with it resumes exactly is tests/test_kill_restart.py's (SIGKILL at random steps,
bit-identical results) and test_train.py's.
"""

import json

from rf_jax import prefetch


class _Loader:
  """An endless, resumable loader like pipeline.TrainBatches: batch i is i."""

  def __init__(self):
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self) -> int:
    self.step += 1
    return self.step - 1

  def get_state(self) -> bytes:
    return json.dumps({'step': self.step}).encode()


def test_two_batches_are_placed_ahead_of_the_step():
  placed = []
  batches = prefetch.Prefetched(_Loader(), lambda b: placed.append(b) or f'on device {b}')
  assert [next(batches) for _ in range(3)] == ['on device 0', 'on device 1', 'on device 2']
  assert placed == [0, 1, 2, 3, 4]  # while step 2 runs, batches 3 and 4 are on their way


def test_the_state_is_the_consumed_batches_not_the_ones_read_ahead():
  loader = _Loader()
  batches = prefetch.Prefetched(loader, lambda b: b)
  assert json.loads(batches.get_state()) == {'step': 0}
  for _ in range(3):
    next(batches)
  assert loader.step == 5
  assert json.loads(batches.get_state()) == {'step': 3}  # a resume starts at batch 3


def test_a_finite_source_ends_after_its_last_batch():
  assert list(prefetch.Prefetched(iter([1, 2, 3]), lambda b: -b)) == [-1, -2, -3]
  assert list(prefetch.Prefetched(iter([]), lambda b: b)) == []
