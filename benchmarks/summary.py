"""From the children's runs to the report's figures: images/s, ratios, the markdown table."""

from __future__ import annotations

import statistics

from benchmarks import common

PHASES = ('train', 'eval')
SHORT_LAYOUT = {'channels_last': 'CL', 'contiguous': 'NCHW'}


def sides(settings: common.Settings) -> list[str]:
  """The columns: 'rf_jax', then one 'torch_<layout>' per PyTorch layout measured."""
  return ['rf_jax'] + [f'torch_{layout}' for layout in settings.torch_layouts]


def images_per_s(runs: list[dict], phase: str, batch: int) -> dict | None:
  """Pools the timed steps of every round; images/s from the pooled median."""
  runs = [r for r in runs if phase in r]
  if not runs:
    return None
  pooled = [t for r in runs for t in r[phase]['step_s']]
  return {
      'images_per_s': batch / statistics.median(pooled),
      # The least-disturbed step: on a shared machine, contention only ever slows a step down.
      'best_step_images_per_s': batch / min(pooled),
      'per_round_images_per_s': [batch / r[phase]['median_s'] for r in runs],
      'first_call_s': statistics.median(r[phase]['first_call_s'] for r in runs),
      'steps_timed': len(pooled),
  }


def _side(runs: list[dict], settings: common.Settings) -> dict:
  side = {'train': images_per_s(runs, 'train', settings.batch),
          'eval': images_per_s(runs, 'eval', settings.eval_batch)}
  for key in ('rss_peak_train_mb', 'rss_peak_mb', 'rss_after_imports_mb'):
    side[key] = max(r[key] for r in runs)
  if any('device_peak_mb' in r for r in runs):
    side['device_peak_mb'] = max(r.get('device_peak_mb', 0) for r in runs)
  return side


def _ratios(row: dict, settings: common.Settings) -> dict:
  """rf_jax / PyTorch per layout, and against PyTorch's fastest layout (the honest reference)."""
  ratios = {}
  for phase in PHASES:
    jax_phase = row['rf_jax'][phase]
    refs = {layout: row[f'torch_{layout}'][phase] for layout in settings.torch_layouts
            if row.get(f'torch_{layout}', {}).get(phase)}
    if not jax_phase or not refs:
      continue
    for layout, ref in refs.items():
      ratios[f'ratio_{phase}_vs_{layout}'] = jax_phase['images_per_s'] / ref['images_per_s']
    best = max(refs, key=lambda layout: refs[layout]['images_per_s'])
    ratios[f'ratio_{phase}_vs_best'] = jax_phase['images_per_s'] / refs[best]['images_per_s']
    ratios[f'best_torch_layout_{phase}'] = best
    ratios[f'best_step_ratio_{phase}'] = (
        jax_phase['best_step_images_per_s']
        / max(ref['best_step_images_per_s'] for ref in refs.values()))
  return ratios


def summarise(runs: dict[tuple[str, str], list[dict]], settings: common.Settings) -> dict:
  """variant -> {side: pooled figures, ratio_*: rf_jax / PyTorch}; `runs` by (variant, side)."""
  rows = {}
  for variant in settings.variant:
    row = {side: _side(runs[(variant, side)], settings) for side in sides(settings)
           if runs.get((variant, side))}
    if 'rf_jax' in row:
      row.update(_ratios(row, settings))
    rows[variant] = row
  return rows


def _fmt(x, spec: str = '.1f') -> str:
  return '-' if x is None else format(x, spec)


def _table_row(variant: str, phase: str, row: dict, settings: common.Settings) -> list[str]:
  def ips(side):
    figures = row.get(side, {}).get(phase)
    return figures['images_per_s'] if figures else None

  layouts = settings.torch_layouts
  best = row.get(f'best_torch_layout_{phase}')
  cells = [variant, phase] + [_fmt(ips(side)) for side in sides(settings)]
  cells.append(_fmt(row.get(f'ratio_{phase}_vs_best'), '.2f') + 'x'
               + (f' (vs {SHORT_LAYOUT[best]})' if best and len(layouts) > 1 else ''))
  cells.append(_fmt(row.get(f'best_step_ratio_{phase}'), '.2f') + 'x')
  cells.append(_fmt((row.get('rf_jax', {}).get(phase) or {}).get('first_call_s')))
  cells.append(' / '.join(_fmt(row.get(side, {}).get('rss_peak_train_mb'), '.0f')
                          for side in sides(settings)) if phase == 'train' else '')
  return cells


def table(results: dict, settings: common.Settings) -> str:
  """Markdown: per variant and phase, images/s of each side and rf_jax / PyTorch (its faster
  layout), from the pooled median step and from the best step."""
  torch_names = [f'torch {SHORT_LAYOUT[layout]}' for layout in settings.torch_layouts]
  head = (['variant', 'phase', 'rf_jax img/s'] + [f'{n} img/s' for n in torch_names]
          + ['rf_jax / torch (median)', 'rf_jax / torch (best step)', 'rf_jax first call s',
             'peak RSS train MB rf_jax / ' + ' / '.join(torch_names)])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for variant, row in results.items():
    for phase in PHASES:
      if any(row.get(side, {}).get(phase) for side in sides(settings)):
        lines.append('| ' + ' | '.join(_table_row(variant, phase, row, settings)) + ' |')
  return '\n'.join(lines)
