"""A run's directory: every path in it, and atomic writes of its files.

    <workdir>/
      checkpoints/        orbax: the latest (resume) and the best epoch (evaluation)
      config.json         the resolved config of the run
      provenance.json     the dataset (fingerprint, band statistics) and every invocation
                          (command, versions, commit)
      log.txt             what the run printed, and its library logs
      history.json        per epoch: losses, mAP, per-tag AP, learning rate, img/s
      parameters.txt      the model's parameter table
      tensorboard/        event files
      eval/               predictions.npz, metrics.json; test_predictions.npz (the submission's
                          test scores)
      report/             report.md and its figures
      submission.csv      Kaggle submission for the test chips (a run's, or an ensemble's:
                          --mode ensemble writes eval/, report/ and this, nothing else)
      chip_scores.csv     per-tag scores and tags of any chips (--mode predict --chips)
      export/             model.msgpack and model.safetensors of the best epoch (--mode export)
      synthetic/          a generated dataset (configs with data.synthetic.num_chips > 0)
      prepared/           its prepared TFDS copy

Nothing else in rf_jax spells these names. A reader, or a crash half-way, never sees half a
file: each write goes to a temporary name that is renamed over the target.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import pathlib
import shutil
import socket
import sys
import tempfile
import zipfile

import numpy as np

from rf_jax import errors


class WorkdirError(errors.UserError, OSError):
  """The workdir cannot be created or written."""


class MissingRunFileError(errors.UserError, FileNotFoundError):
  """A file of the run that an earlier mode writes is missing (or lacks what it should hold);
  the message names the mode to run first."""


class DamagedRunFileError(errors.UserError, ValueError):
  """A file of the run exists but cannot be read (edited by hand, cut short, overwritten)."""


class Workdir:
  """The paths of one run's directory (nothing is created until `create`)."""

  def __init__(self, root: str | os.PathLike):
    self.root = pathlib.Path(root)

  def __repr__(self) -> str:
    return f'Workdir({str(self.root)!r})'

  checkpoints = property(lambda self: self.root / 'checkpoints')
  config = property(lambda self: self.root / 'config.json')
  provenance = property(lambda self: self.root / 'provenance.json')
  log = property(lambda self: self.root / 'log.txt')
  lock_file = property(lambda self: self.root / '.lock')
  history = property(lambda self: self.root / 'history.json')
  parameters = property(lambda self: self.root / 'parameters.txt')
  tensorboard = property(lambda self: self.root / 'tensorboard')
  eval_dir = property(lambda self: self.root / 'eval')
  predictions = property(lambda self: self.eval_dir / 'predictions.npz')
  metrics = property(lambda self: self.eval_dir / 'metrics.json')
  test_predictions = property(lambda self: self.eval_dir / 'test_predictions.npz')
  report_dir = property(lambda self: self.root / 'report')
  report = property(lambda self: self.report_dir / 'report.md')
  submission = property(lambda self: self.root / 'submission.csv')
  export_dir = property(lambda self: self.root / 'export')
  chip_scores = property(lambda self: self.root / 'chip_scores.csv')
  synthetic = property(lambda self: self.root / 'synthetic')
  prepared = property(lambda self: self.root / 'prepared')

  def predictions_of_step(self, step: int) -> pathlib.Path:
    """Where saved predictions of another checkpoint are kept when the best one changes."""
    return self.eval_dir / f'predictions.step{step}.npz'

  def predictions_of_tta(self, step: int, tta: str) -> pathlib.Path:
    """Where saved predictions of the same checkpoint under another eval.tta are kept."""
    return self.eval_dir / f'predictions.step{step}.tta-{tta}.npz'

  @property
  def predictions_rerun(self) -> pathlib.Path:
    """A recomputation that did not reproduce the saved predictions (both are kept)."""
    return self.eval_dir / 'predictions.rerun.npz'

  def create(self) -> None:
    """Creates the workdir and checks that it can be written."""
    if self.root.exists() and not self.root.is_dir():
      raise WorkdirError(f'workdir {self.root} is a file, not a directory: choose another '
                         '--workdir.')
    try:
      probe_writable(self.root)  # once per process: a multi-host run's processes share it
    except OSError as e:
      raise WorkdirError(f'workdir {self.root} is not writable ({e.strerror or e}): choose '
                         'another --workdir or fix its permissions.') from None


def probe_writable(directory: pathlib.Path) -> None:
  """Creates `directory` and writes a file in it (removed at once), raising the OSError that
  says why it cannot: before any work whose result would go there."""
  directory.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=directory, prefix='.write_probe'):
    pass


class OutputDirError(errors.UserError, OSError):
  """A directory to write an output into (--output) cannot be created or written."""


def check_output_dir(directory: pathlib.Path, what: str, fix: str) -> None:
  """`probe_writable`, its failure an OutputDirError naming `directory` and `fix`: the run's
  workdir may be read-only (shared, archived), and the fix is then another --output."""
  try:
    probe_writable(directory)
  except OSError as e:
    raise OutputDirError(f'{directory}: cannot write {what} there ({e.strerror or e}): '
                         f'{fix}') from None


@contextlib.contextmanager
def removed_if_refused(wd: Workdir):
  """Removes the workdir this invocation creates if the run stops (refused: a missing dataset or
  weights file, an unwritable prepared_dir; or interrupted) before it wrote more than its lock,
  log and the records of its start: a mistyped path leaves no empty run behind. A workdir that
  existed, or one holding data, a checkpoint or any other file, is never touched."""
  existed = wd.root.exists()
  try:
    yield
  except BaseException:
    records = {path.name for path in (wd.lock_file, wd.log, wd.config, wd.provenance)}
    if (not existed and wd.root.is_dir()
        and {path.name for path in wd.root.iterdir()} <= records):
      shutil.rmtree(wd.root, ignore_errors=True)
    raise


@contextlib.contextmanager
def locked(wd: Workdir):
  """Holds the workdir for this process: a second process is refused with the holder's pid.

  An advisory lock (flock) that the kernel releases when the holder exits in any way, so a
  killed run leaves no stale lock behind; the file only says who holds it.
  """
  wd.create()
  with open(wd.lock_file, 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'another process'
      raise WorkdirError(f'workdir {wd.root} is in use by {holder}: wait for it to finish (a '
                         'second run would overwrite its checkpoints), or use another '
                         '--workdir.') from None
    f.truncate(0)
    f.write(f'rf_jax pid {os.getpid()} on {socket.gethostname()}\n')
    f.flush()
    try:
      yield
    finally:
      f.truncate(0)
      fcntl.flock(f, fcntl.LOCK_UN)


class _Tee(io.TextIOBase):
  """Writes to the terminal and to the run's log file."""

  def __init__(self, terminal, log):
    self.terminal, self.log = terminal, log

  def write(self, text: str) -> int:
    self.log.write(text)
    self.log.flush()
    return self.terminal.write(text)

  def flush(self) -> None:
    self.terminal.flush()

  def fileno(self) -> int:
    return self.terminal.fileno()


@contextlib.contextmanager
def logged_output(wd: Workdir):
  """Copies what the run prints (not the progress bars) into the workdir's log.txt."""
  wd.create()
  with open(wd.log, 'a') as log:
    terminal, sys.stdout = sys.stdout, _Tee(sys.stdout, log)
    try:
      yield
    finally:
      sys.stdout = terminal


def write_text(path: pathlib.Path, text: str) -> None:
  write_bytes(path, text.encode())


def write_bytes(path: pathlib.Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_bytes(data)
  os.replace(tmp, path)


def write_json(path: pathlib.Path, value) -> None:
  write_text(path, json.dumps(value, indent=1, allow_nan=False))


def write_csv(path: pathlib.Path, header, rows) -> None:
  """A CSV file written whole; the csv module quotes a field holding a comma, quote or line
  break (a chip's name can), so every row keeps its columns."""
  text = io.StringIO()
  writer = csv.writer(text, lineterminator='\n')
  writer.writerow(header)
  writer.writerows(rows)
  write_text(path, text.getvalue())


def read_json(path: pathlib.Path):
  """The JSON value in `path`; one that does not parse is a DamagedRunFileError naming the
  file and line (a FileNotFoundError is left to the caller, which knows what writes it)."""
  with open(path) as f:
    text = f.read()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise DamagedRunFileError(
        f'{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}): the file was edited '
        'or cut short. Restore it (rf_jax writes it whole, never in part), or run in a new '
        '--workdir.') from None


def write_npz(path: pathlib.Path, arrays: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.stem + '.tmp.npz')
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def read_npz(path: pathlib.Path) -> dict | None:
  """The arrays of an .npz file (never unpickled), or None when there is none."""
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as saved:
      return {k: saved[k] for k in saved.files}
  except (zipfile.BadZipFile, ValueError, EOFError) as e:  # cut short, or not rf_jax's arrays
    raise DamagedRunFileError(
        f'{path}: not readable ({e}): the file was cut short or replaced. Delete it and rerun '
        'the mode that writes it (--mode evaluate writes eval/).') from None
