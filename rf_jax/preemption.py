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


def agreed(requested: list) -> str | None:
  """The stop request as every process sees it: a signal's name if any process got one.

  A scheduler signals every process of a job, but not at the same step; asking all of them at
  each step boundary makes them stop, and save one consistent checkpoint, at the same step.
  """
  if jax.process_count() == 1:
    return requested[0] if requested else None
  anyone = multihost_utils.process_allgather(np.asarray(bool(requested))).any()
  if not anyone:
    return None
  return requested[0] if requested else 'SIGTERM (received by another process)'
