"""A run's directory: every path in it, and atomic writes of its files.

    <workdir>/
      checkpoints/        orbax: the latest (resume) and the best epoch (evaluation)
      history.json        per epoch: losses, mAP, per-tag AP, learning rate, img/s
      parameters.txt      the model's parameter table
      tensorboard/        event files
      eval/               predictions.npz, metrics.json
      report/             report.md and its figures
      submission.csv      Kaggle submission for the test chips
      synthetic/          a generated dataset (configs with data.synthetic.num_chips > 0)
      prepared/           its prepared TFDS copy

Nothing else in rf_jax spells these names. A reader, or a crash half-way, never sees half a
file: each write goes to a temporary name that is renamed over the target.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np


class WorkdirError(OSError):
  """The workdir cannot be created or written."""


class Workdir:
  """The paths of one run's directory (nothing is created until `create`)."""

  def __init__(self, root: str | os.PathLike):
    self.root = pathlib.Path(root)

  def __repr__(self) -> str:
    return f'Workdir({str(self.root)!r})'

  checkpoints = property(lambda self: self.root / 'checkpoints')
  history = property(lambda self: self.root / 'history.json')
  parameters = property(lambda self: self.root / 'parameters.txt')
  tensorboard = property(lambda self: self.root / 'tensorboard')
  eval_dir = property(lambda self: self.root / 'eval')
  predictions = property(lambda self: self.eval_dir / 'predictions.npz')
  metrics = property(lambda self: self.eval_dir / 'metrics.json')
  report_dir = property(lambda self: self.root / 'report')
  report = property(lambda self: self.report_dir / 'report.md')
  submission = property(lambda self: self.root / 'submission.csv')
  synthetic = property(lambda self: self.root / 'synthetic')
  prepared = property(lambda self: self.root / 'prepared')

  def predictions_of_step(self, step: int) -> pathlib.Path:
    """Where saved predictions of another checkpoint are kept when the best one changes."""
    return self.eval_dir / f'predictions.step{step}.npz'

  @property
  def predictions_rerun(self) -> pathlib.Path:
    """A recomputation that did not reproduce the saved predictions (both are kept)."""
    return self.eval_dir / 'predictions.rerun.npz'

  def create(self) -> None:
    """Creates the workdir and checks that it can be written."""
    try:
      self.root.mkdir(parents=True, exist_ok=True)
      probe = self.root / '.write_probe'
      probe.write_text('')
      probe.unlink()
    except OSError as e:
      raise WorkdirError(f'workdir {self.root} is not writable ({e.strerror or e}): choose '
                         'another --workdir or fix its permissions.') from None


def write_text(path: pathlib.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)


def write_json(path: pathlib.Path, value) -> None:
  write_text(path, json.dumps(value, indent=1, allow_nan=False))


def read_json(path: pathlib.Path):
  with open(path) as f:
    return json.load(f)


def write_npz(path: pathlib.Path, arrays: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.stem + '.tmp.npz')
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def read_npz(path: pathlib.Path) -> dict | None:
  """The arrays of an .npz file (never unpickled), or None when there is none."""
  if not path.is_file():
    return None
  with np.load(path, allow_pickle=False) as saved:
    return {k: saved[k] for k in saved.files}
