"""The errors of weight loading, and the listing that reports every mismatch in one of them."""

from __future__ import annotations

from typing import Any

from rf_jax import errors


class WeightsMismatchError(errors.UserError, ValueError):
  """A state dict / weights file / study model pair whose names or shapes do not match."""


class WeightsFileError(errors.UserError, ValueError):
  """A weights file that cannot be trusted (no or wrong SHA-256, unknown format)."""


class UnsafeCheckpointError(errors.UserError, ValueError):
  """A .pth file holding more than tensors (a pickle that would run code)."""


class WeightsFileNotFoundError(errors.UserError, FileNotFoundError):
  """A weights file named by the config or the command line is missing."""


class MissingPackageError(errors.UserError, ModuleNotFoundError):
  """Reading a weights source of this format needs a package that is not installed."""


def _describe(shape: Any) -> str:
  if shape is None:
    return 'none'
  return shape if isinstance(shape, str) else str(tuple(shape))


class Mismatches:
  """Collects mismatches (one row per name) and raises them as one WeightsMismatchError."""

  def __init__(self):
    self.rows: list[tuple[str, str, str, str]] = []

  def add(self, kind: str, name: str, expected: Any, found: Any) -> None:
    """Adds a row; a name already listed keeps its first row (the most specific one)."""
    if all(row[1] != name for row in self.rows):
      self.rows.append((kind, name, _describe(expected), _describe(found)))

  def raise_if_any(self, what: str) -> None:
    if not self.rows:
      return
    width = max(len(row[1]) for row in self.rows)
    lines = [f'{kind:<10} {name:<{width}}  expected {expected}, found {found}'
             for kind, name, expected, found in self.rows]
    kinds = dict.fromkeys(row[0] for row in self.rows)
    counts = ', '.join(f'{sum(row[0] == k for row in self.rows)} {k}' for k in kinds)
    raise WeightsMismatchError(
        f'{what}: {len(self.rows)} mismatch(es) ({counts}):\n  ' + '\n  '.join(lines))
