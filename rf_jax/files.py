"""Atomic file writes: a reader, or a crash half-way, never sees half a file."""

import json
import os
import pathlib

import numpy as np


def write_text(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)


def write_json(path: pathlib.Path, value) -> None:
  write_text(path, json.dumps(value, indent=1, allow_nan=False))


def write_npz(path: pathlib.Path, arrays: dict) -> None:
  tmp = path.with_name(path.stem + '.tmp.npz')
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
