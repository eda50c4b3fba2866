"""preemption.agreed: when the processes of a run ask each other about stopping.

The real thing (SIGTERM to both processes of a 2-process run, one checkpoint at one step) is
tests/test_multihost.py's; here the collective is counted.
"""

import pytest

from rf_jax import preemption


def _run_until_stopped(monkeypatch, processes: int, signalled_at: int, others: bool = False,
                       every: int = 10) -> tuple[int, str, list[int]]:
  """Steps 1, 2, ... as train.py asks at each; (the step it stops at, why, the steps that
  asked the other processes)."""
  asked = []

  def anyone_requested(mine: bool) -> bool:
    asked.append(step)
    return mine or others

  monkeypatch.setattr(preemption.jax, 'process_count', lambda: processes)
  monkeypatch.setattr(preemption, 'anyone_requested', anyone_requested)
  requested = []
  for step in range(1, 100):
    if step == signalled_at:
      requested.append('SIGTERM')
    stop = preemption.agreed(requested, step, every)
    if stop:
      return step, stop, asked
  pytest.fail('never stopped')


def test_one_process_stops_at_once_and_asks_no_one(monkeypatch):
  assert _run_until_stopped(monkeypatch, processes=1, signalled_at=12) == (12, 'SIGTERM', [])


def test_several_processes_ask_each_other_every_log_every_steps(monkeypatch):
  assert _run_until_stopped(monkeypatch, processes=2, signalled_at=12) == (
      20, 'SIGTERM', [10, 20])
  assert _run_until_stopped(monkeypatch, processes=2, signalled_at=3, every=4) == (
      4, 'SIGTERM', [4])


def test_a_stop_another_process_received_stops_this_one(monkeypatch):
  assert _run_until_stopped(monkeypatch, processes=2, signalled_at=0, others=True) == (
      10, 'SIGTERM (received by another process)', [10])
