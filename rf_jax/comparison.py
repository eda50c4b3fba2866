"""The study's comparison of several workdirs: per-tag AP side by side, overlaid curves.

Reads each workdir's history.json and eval/metrics.json (rf_jax/report.py documents them);
`--mode compare` writes ``comparison.md`` and two PNGs into its --workdir.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rf_jax import history
from rf_jax import report
from rf_jax import workdir as workdir_lib


def _best_marks(values: Sequence[float | None], higher_is_better: bool = True) -> list[str]:
  v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
  if not np.isfinite(v).any():
    return ['n/a'] * len(values)
  best = np.nanmax(v) if higher_is_better else np.nanmin(v)
  return [('n/a' if not np.isfinite(x) else f'**{x:.4f}**' if x == best else f'{x:.4f}')
          for x in v]


def plot_comparison_curves(histories: Sequence[Mapping], names: Sequence[str], path: Path) -> Path:
  """Overlaid loss (train dashed, validation solid) and validation mAP per epoch, one colour a model."""
  fig = report.new_figure(figsize=(12, 4.5), layout='constrained')
  ax_loss, ax_map = fig.subplots(1, 2)
  for i, (h, n) in enumerate(zip(histories, names)):
    c = f'C{i}'
    ep, tr = report.series(h, 'train_loss')
    ax_loss.plot(ep, tr, '--', color=c, label=f'{n} train')
    ep, va = report.series(h, 'val_loss')
    ax_loss.plot(ep, va, 'o-', color=c, label=f'{n} validation')
    ep, vm = report.series(h, 'val_map')
    ax_map.plot(ep, vm, 'o-', color=c, label=n)
  ax_loss.set(xlabel='epoch', ylabel='loss', title='Loss per epoch')
  ax_map.set(xlabel='epoch', ylabel='validation mAP', title='Validation mAP per epoch')
  for ax in (ax_loss, ax_map):
    report.integer_ticks(ax.xaxis)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  return report.save_figure(fig, path)


def plot_comparison_ap(ap_rows: Sequence[Sequence[float | None]], names: Sequence[str],
                       tags: Sequence[str], path: Path) -> Path:
  """Grouped bars: per-tag AP of every model."""
  fig = report.new_figure(figsize=(13, 4.5), layout='constrained')
  ax = fig.add_subplot()
  x = np.arange(len(tags))
  width = 0.8 / max(1, len(names))
  for i, (row, n) in enumerate(zip(ap_rows, names)):
    v = np.array([np.nan if a is None else a for a in row], np.float64)
    ax.bar(x + (i - (len(names) - 1) / 2) * width, np.nan_to_num(v), width, label=n, color=f'C{i}')
  ax.set_xticks(x, tags, rotation=45, ha='right')
  ax.set(ylabel='average precision', ylim=(0, 1.05), title='Per-tag AP by model')
  ax.grid(alpha=0.3, axis='y')
  ax.legend()
  return report.save_figure(fig, path)


def write_comparison(workdirs: Sequence, out_dir) -> Path:
  """Side-by-side table (per-tag AP, mAP, F2, loss; best per row in bold) and overlaid curves.

  Reads each workdir's history.json and eval/metrics.json; writes ``out_dir/comparison.md``,
  ``comparison_curves.png`` and ``comparison_ap.png``; returns the path of comparison.md.
  """
  if not workdirs:
    raise ValueError('write_comparison needs at least one workdir')
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  histories, mets, names = [], [], []
  for wd in map(Path, workdirs):
    histories.append(history.read(workdir_lib.Workdir(wd).history))
    mets.append(report.read_metrics(workdir_lib.Workdir(wd).metrics))
    names.append(str(mets[-1].get('model') or histories[-1].get('model') or wd.name))
  if len(set(names)) < len(names):  # same model twice: tell the columns apart by directory
    names = [f'{n} ({Path(w).name})' for n, w in zip(names, workdirs)]
  tags = list(mets[0]['ap'])
  for m, wd in zip(mets, workdirs):
    if list(m['ap']) != tags:
      raise ValueError(f'{wd}: tags {list(m["ap"])} differ from {tags}')
  ap_rows = [[m['ap'][t] for t in tags] for m in mets]

  md = ['# Comparison', '',
        'Per-tag average precision on the validation split; **bold** = best of the row. '
        'n/a = the tag has no positives in that evaluation (excluded from its mAP).', '',
        '| tag | ' + ' | '.join(names) + ' |', '|---|' + '---:|' * len(names)]
  for j, t in enumerate(tags):
    md.append(f'| {t} | ' + ' | '.join(_best_marks([r[j] for r in ap_rows])) + ' |')
  best_hist = []
  for h in histories:
    ep, vm = report.series(h, 'val_map')
    best_hist.append(float(np.nanmax(vm)) if np.isfinite(vm).any() else None)
  summary = [('**mAP**', [m['map'] for m in mets], True),
             ('F2 at 0.5', [m['f2_at_0.5'] for m in mets], True),
             ('F2 tuned', [m['f2_tuned'] for m in mets], True),
             ('loss', [m['loss'] for m in mets], False),
             ('best val mAP in training', best_hist, True)]
  for label, vals, hib in summary:
    md.append(f'| {label} | ' + ' | '.join(_best_marks(vals, hib)) + ' |')
  md.append('')
  excl = [f'{n}: {", ".join(m["excluded_tags"])}' for n, m in zip(names, mets) if m['excluded_tags']]
  md += ['Excluded tags: ' + ('; '.join(excl) if excl else 'none') + '.', '',
         'Workdirs: ' + ', '.join(f'{n} = `{Path(w).name}`' for n, w in zip(names, workdirs)), '']
  plot_comparison_curves(histories, names, out / 'comparison_curves.png')
  plot_comparison_ap(ap_rows, names, tags, out / 'comparison_ap.png')
  md += ['![loss and mAP per epoch](comparison_curves.png)', '',
         '![per-tag AP by model](comparison_ap.png)', '']
  path = out / 'comparison.md'
  path.write_text('\n'.join(md))
  return path
