"""Pre-emption: SIGTERM/SIGINT become a request the training loop honours at a step boundary."""

import contextlib
import signal


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
