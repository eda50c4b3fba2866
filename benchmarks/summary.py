"""From the children's runs to the report's figures: images/s, ratios, the markdown table."""

from __future__ import annotations

import statistics

from benchmarks import common

PHASES = ('train', 'eval')
SHORT_LAYOUT = {'channels_last': 'CL', 'contiguous': 'NCHW'}


COMPILED = 'torch_compiled'  # torch.compile on the reference layout (orchestrate adds it)
TARGET_RATIO = 1.2  # rf_jax / PyTorch training, on a GPU
TARGET_HOST_SHARE = 0.05  # the host input's share of the step, on a GPU
TARGET_STUDY_MIN = 10.0  # the dual 35-epoch study, on an H200


def sides(settings: common.Settings) -> list[str]:
  """The columns: 'rf_jax', then one 'torch_<layout>' per PyTorch layout measured."""
  return ['rf_jax'] + [f'torch_{layout}' for layout in settings.torch_layouts]


def side_label(side: str, settings: common.Settings) -> str:
  if side == COMPILED:
    return f'torch {SHORT_LAYOUT[settings.torch_layouts[0]]} compiled'
  return side.replace('torch_', 'torch ').replace('channels_last', 'CL').replace(
      'contiguous', 'NCHW')


def study_minutes(train_ips: float, eval_ips: float | None) -> float:
  """The 35-epoch study at these speeds: every epoch trains on the 27,120 training chips and
  (where eval was measured) evaluates the 13,359 validation chips."""
  seconds = common.STUDY_EPOCHS * common.STUDY_TRAIN_CHIPS / train_ips
  if eval_ips:
    seconds += common.STUDY_EPOCHS * common.STUDY_VAL_CHIPS / eval_ips
  return seconds / 60


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


def _fed(runs: list[dict], phase: str) -> dict:
  """The median step in ms and, on the chips feed, the host input's (pooled over rounds)."""
  runs = [r for r in runs if phase in r]
  if not runs:
    return {}
  out = {'step_ms': statistics.median(t for r in runs for t in r[phase]['step_s']) * 1e3}
  if all('host_input_s' in r[phase] for r in runs):
    host = [t for r in runs for t in r[phase]['host_input_s']]
    out['host_input_ms'] = statistics.median(host) * 1e3
    out['host_input_share'] = sum(host) / sum(t for r in runs for t in r[phase]['step_s'])
  return out


def _side(runs: list[dict], settings: common.Settings) -> dict:
  side = {'train': images_per_s(runs, 'train', settings.batch),
          'eval': images_per_s(runs, 'eval', settings.eval_batch)}
  for phase in PHASES:
    if side[phase]:
      side[phase].update(_fed(runs, phase))
  for key in ('rss_peak_train_mb', 'rss_peak_mb', 'rss_after_imports_mb'):
    side[key] = max(r[key] for r in runs)
  if any('device_peak_mb' in r for r in runs):
    side['device_peak_mb'] = max(r.get('device_peak_mb', 0) for r in runs)
  last = runs[-1]
  for key in ('feed', 'dtype', 'device', 'device_kind', 'input_size', 'compile_error'):
    if key in last:
      side[key] = last[key]
  side['accelerator'] = (last.get('backend') or last.get('device', 'cpu')) != 'cpu'
  if side['train']:
    side['study_min'] = study_minutes(side['train']['images_per_s'],
                                      (side['eval'] or {}).get('images_per_s'))
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
    compiled = row.get(COMPILED, {}).get(phase)
    if compiled:
      ratios[f'ratio_{phase}_vs_compiled'] = (jax_phase['images_per_s']
                                              / compiled['images_per_s'])
  return ratios


def summarise(runs: dict[tuple[str, str], list[dict]], settings: common.Settings) -> dict:
  """variant -> {side: pooled figures, ratio_*: rf_jax / PyTorch}; `runs` by (variant, side)."""
  rows = {}
  for variant in settings.variant:
    row = {side: _side(runs[(variant, side)], settings) for side in sides(settings) + [COMPILED]
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


def _pct(x) -> str:
  return '-' if x is None else f'{x * 100:.1f}%'


def per_side_table(results: dict, settings: common.Settings) -> str:
  """Markdown: per variant and side, how it was fed and what its train step took (img/s, ms,
  the host's input time and share of the step), eval img/s, rf_jax's speed over this side's in
  training, and the 35-epoch study projected from its speeds."""
  head = ['variant', 'side', 'device', 'feed', 'dtype', 'train img/s', 'train step ms',
          'host input ms', 'host input share', 'eval img/s', 'rf_jax / side (train)',
          'study min (35 epochs)']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for variant, row in results.items():
    for side in sides(settings) + [COMPILED]:
      figures = row.get(side)
      if not figures:
        continue
      train, evaluation = figures['train'] or {}, figures['eval'] or {}
      jax_train = (row.get('rf_jax', {}).get('train') or {}).get('images_per_s')
      ratio = (jax_train / train['images_per_s']) if jax_train and train else None
      fed = figures.get('feed') == 'chips'
      cells = [variant, side_label(side, settings),
               figures.get('device_kind', '') if figures['accelerator'] else 'cpu',
               figures.get('feed', ''), figures.get('dtype', ''),
               _fmt(train.get('images_per_s')), _fmt(train.get('step_ms')),
               _fmt(train.get('host_input_ms'), '.2f') if fed else 'in step',
               _pct(train.get('host_input_share')) if fed else 'in step',
               _fmt(evaluation.get('images_per_s')), f'{ratio:.2f}x' if ratio else '-',
               _fmt(figures.get('study_min'))]
      if 'compile_error' in figures:  # at the train phase's first call, or the eval's
        cells[5 if not train else 9] = f'torch.compile failed: {figures["compile_error"]}'
      lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def targets(results: dict, settings: common.Settings) -> dict:
  """The GPU targets, from this batch size's results: rf_jax / PyTorch training (its faster
  eager layout) >= 1.2x for every variant, rf_jax's host input <= 5% of every chips-fed train
  step, rf_jax's dual 35-epoch study projected under 10 minutes. `on_accelerator`: whether
  rf_jax ran on one (the targets are not for the CPU)."""
  jax_sides = [row['rf_jax'] for row in results.values() if row.get('rf_jax')]
  out = {'on_accelerator': bool(jax_sides) and all(s['accelerator'] for s in jax_sides),
         'device': jax_sides[0].get('device_kind', '') if jax_sides else '',
         'batch': settings.batch}
  ratios = {v: row['ratio_train_vs_best'] for v, row in results.items()
            if 'ratio_train_vs_best' in row}
  if ratios:
    out['train_ratio'] = ratios
    out['train_ratio_met'] = min(ratios.values()) >= TARGET_RATIO
  shares = {v: row['rf_jax']['train']['host_input_share'] for v, row in results.items()
            if (row.get('rf_jax', {}).get('train') or {}).get('host_input_share') is not None}
  if shares:
    out['host_input_share'] = shares
    out['host_input_met'] = max(shares.values()) <= TARGET_HOST_SHARE
  dual = results.get('dual', {}).get('rf_jax', {}).get('study_min')
  if dual is not None:
    out['dual_study_min'] = dual
    out['dual_study_met'] = dual < TARGET_STUDY_MIN
  return out


def describe_targets(found: dict) -> str:
  """Two sentences: the projection's formula and rf_jax's dual study, then the targets."""
  text = (f'Projected {common.STUDY_EPOCHS}-epoch study = {common.STUDY_EPOCHS} x '
          f'{common.STUDY_TRAIN_CHIPS:,} training chips / train img/s + {common.STUDY_EPOCHS} '
          f'x {common.STUDY_VAL_CHIPS:,} validation chips / eval img/s (train batch '
          f'{found["batch"]})')
  if 'dual_study_min' in found:
    text += f': rf_jax dual {found["dual_study_min"]:.1f} min'
  text += '.'
  if not found['on_accelerator']:
    return text + (' The GPU targets (rf_jax >= 1.2x PyTorch in training, host input <= 5% of '
                   'the step, the dual study < 10 min on an H200) apply to a GPU run only.')
  met = lambda ok: 'met' if ok else 'NOT met'
  parts = []
  if 'train_ratio' in found:
    parts.append(f'rf_jax / PyTorch train >= {TARGET_RATIO}x: '
                 + ', '.join(f'{v} {r:.2f}x' for v, r in found['train_ratio'].items())
                 + f' ({met(found["train_ratio_met"])})')
  if 'host_input_share' in found:
    worst = max(found['host_input_share'], key=found['host_input_share'].get)
    parts.append(f'rf_jax host input <= {TARGET_HOST_SHARE:.0%} of the step: at most '
                 f'{found["host_input_share"][worst]:.1%} ({worst}; '
                 f'{met(found["host_input_met"])})')
  if 'dual_study_min' in found:
    elsewhere = '' if 'H200' in found['device'] else '; the target is for an H200'
    parts.append(f'dual study < {TARGET_STUDY_MIN:.0f} min: {found["dual_study_min"]:.1f} min '
                 f'({met(found["dual_study_met"])}{elsewhere})')
  return text + f' GPU targets ({found["device"]}): ' + '; '.join(parts) + '.'
