"""Pre-emption: SIGTERM/SIGINT become a request the training loop honours at a step boundary."""

import contextlib
import signal

import jax
from jax.experimental import multihost_utils
import numpy as np


class TrainingStopped(Exception):
  """SIGTERM/SIGINT arrived; a checkpoint was saved at the step boundary."""


@contextlib.contextmanager
def stop_requests():
  """Yields a list that holds the signal's name once SIGTERM/SIGINT arrived.

  A second signal raises KeyboardInterrupt: the user (or the scheduler) insists, so stop now,
  losing only the work since the last checkpoint.
  """
  requested = []

  def handler(signum, frame):
    del frame
    if requested:
      raise KeyboardInterrupt
    requested.append(signal.Signals(signum).name)

  previous = {}
  for sig in (signal.SIGTERM, signal.SIGINT):
    try:
      previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
      pass
  try:
    yield requested
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)


def agreed(requested: list, step: int, every: int) -> str | None:
  """The stop request as every process sees it: a signal's name if any process got one.

  A scheduler signals every process of a job, but not at the same step; asking all of them at
  the same steps makes them stop, and save one consistent checkpoint, at the same step. Each
  asking is a host round trip, so several processes ask only at every `every`-th step
  (config.log_every_steps): a stop waits for at most that many steps. One process needs no one.
  """
  if jax.process_count() == 1:
    return requested[0] if requested else None
  if step % every:
    return None
  if not anyone_requested(bool(requested)):
    return None
  return requested[0] if requested else 'SIGTERM (received by another process)'


def anyone_requested(requested: bool) -> bool:
  """Whether any process got a stop request (a collective: every process must call it)."""
  return bool(multihost_utils.process_allgather(np.asarray(requested)).any())
