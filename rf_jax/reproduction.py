"""Does a recomputation reproduce the scores saved earlier? The study's reproduction step, as numbers.

Pure functions of two score arrays of the same chips: the largest score difference, the study's
mean relative error, the largest per-tag AP difference, and a verdict line.
"""

from __future__ import annotations

import numpy as np

from rf_jax import metrics
from rf_jax.data import planet

# Scores must match to about float32 rounding of a probability: bit-exact on the same
# machine and software, within this on another (different XLA kernels sum differently).
TOLERANCE = 1e-6


def compare(reference: np.ndarray, current: np.ndarray, labels: np.ndarray) -> dict:
  """How far `current` scores are from `reference` ones (same chips, same order, same labels)."""
  reference = np.asarray(reference, np.float64)
  current = np.asarray(current, np.float64)
  if reference.shape != current.shape:
    return {'reproduces': False, 'exact': False,
            'reason': f'the saved scores are for {reference.shape[0]} chips, this evaluation '
                      f'scored {current.shape[0]}'}
  diff = np.abs(current - reference)
  ap_diff = (metrics.average_precision(labels, current)
             - metrics.average_precision(labels, reference))
  return {
      'max_abs_score_difference': float(diff.max()),
      # The study's own figure: the mean over chips and tags of |new - old| / |old|.
      'mean_relative_error': float(np.mean(diff / np.maximum(np.abs(reference), 1e-12))),
      'max_abs_ap_difference': (float(np.nanmax(np.abs(ap_diff)))
                                if np.isfinite(ap_diff).any() else 0.0),
      'ap_difference': {t: (float(d) if np.isfinite(d) else None)
                        for t, d in zip(planet.TAGS, ap_diff)},
      'exact': bool(diff.max() == 0),
      'reproduces': bool(diff.max() <= TOLERANCE),
  }


def verdict(result: dict, step: int, against: str) -> str:
  """One line: REPRODUCED (exactly | within float rounding) or NOT REPRODUCED, with the figures."""
  if 'reason' in result:
    return f'NOT REPRODUCED: step {step}: {result["reason"]} ({against}).'
  figures = (f'max |score difference| {result["max_abs_score_difference"]:.3g}, mean relative '
             f'error {result["mean_relative_error"]:.3g}, max |AP difference| '
             f'{result["max_abs_ap_difference"]:.3g}')
  if not result['reproduces']:
    return f'NOT REPRODUCED: step {step} now scores differently from {against} ({figures}).'
  how = 'exactly' if result['exact'] else 'within float rounding'
  return f'REPRODUCED {how}: step {step} against {against}: {figures}.'
