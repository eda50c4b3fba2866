"""The study's comparison of several workdirs: per-tag AP side by side, overlaid curves.

Reads each workdir's history.json and eval/metrics.json (rf_jax/report.py documents them);
`--mode compare` writes ``comparison.md`` and two PNGs into its --workdir. Only runs evaluated
on the same validation chips are compared (eval/predictions.npz, else provenance.json, tells).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rf_jax import errors
from rf_jax import history
from rf_jax import report
from rf_jax import workdir as workdir_lib


class ComparisonError(errors.UserError, ValueError):
  """The --compare workdirs cannot be compared (the same one twice, other tags, other chips)."""


class WorkdirNotFoundError(errors.UserError, FileNotFoundError):
  """A --compare workdir does not exist (or is not a directory)."""


def _check_workdirs(workdirs: Sequence[Path]) -> None:
  """Each workdir exists, and each is given once: a mistyped path or a repeated one would
  otherwise surface as 'train first' or as two identical columns."""
  seen = {}
  for wd in workdirs:
    if not wd.is_dir():
      raise WorkdirNotFoundError(
          f'--compare: workdir {wd} ' + ('is a file, not a directory' if wd.exists() else
                                         'does not exist')
          + ': check the path (give the --workdir each run was trained in).')
    first = seen.setdefault(wd.resolve(), wd)
    if first is not wd:
      same = f'{wd}' if str(first) == str(wd) else f'{first} and {wd}, the same directory,'
      raise ComparisonError(f'--compare names {same} twice: give each workdir once.')


def _evaluated_chips(wd: workdir_lib.Workdir) -> dict:
  """What identifies the validation chips a workdir was evaluated on: their names and labels
  (eval/predictions.npz), and the prepared dataset's fingerprint (provenance.json)."""
  found = {}
  saved = workdir_lib.read_npz(wd.predictions)
  if saved is not None and 'names' in saved and 'labels' in saved:
    order = np.argsort(saved['names'], kind='stable')
    found['names'], found['labels'] = saved['names'][order], saved['labels'][order]
  if wd.provenance.is_file():
    found['fingerprint'] = (workdir_lib.read_json(wd.provenance).get('dataset') or {}).get(
        'fingerprint')
  return found


def _same_chips(a: dict, b: dict, key: str) -> bool:
  if key == 'fingerprint':
    return a['fingerprint'] == b['fingerprint']
  # Names alone are not enough: synthetic datasets of other seeds name their chips alike.
  return np.array_equal(a['names'], b['names']) and np.array_equal(a['labels'], b['labels'])


def _check_same_chips(workdirs: Sequence[Path], mets: Sequence[Mapping]) -> None:
  """Refuses workdirs evaluated on different validation chips: their scores (and the best of
  each row) would compare other data, not other models. The chip names and labels decide
  where every workdir's saved predictions hold them, else the dataset fingerprint."""
  chips = [_evaluated_chips(workdir_lib.Workdir(w)) for w in workdirs]
  key = next((k for k in ('names', 'fingerprint') if all(c.get(k) is not None for c in chips)),
             None)
  if key is None:  # some lack the chip names: name first one that records no dataset either
    _, i = min((chips[i].get('fingerprint') is not None, i) for i in range(len(chips))
               if 'names' not in chips[i])
    wd = workdir_lib.Workdir(workdirs[i])
    raise ComparisonError(
        f'--compare: cannot tell which validation chips {wd.root} was evaluated on (no chip '
        f'names in {wd.predictions}'
        + ('' if chips[i].get('fingerprint') else f', no dataset in {wd.provenance}')
        + f'): run --mode evaluate --workdir {wd.root} again, then compare.')
  if (len({m['num_chips'] for m in mets}) == 1
      and all(_same_chips(chips[0], c, key) for c in chips[1:])):
    return
  each = '; '.join(f'{w}: {m["num_chips"]} chips'
                   + (f' (dataset {c["fingerprint"]})' if c.get('fingerprint') else '')
                   for w, m, c in zip(workdirs, mets, chips))
  raise ComparisonError(
      f'--compare: the workdirs were evaluated on different validation chips, so their scores '
      f'cannot be compared: {each}. Evaluate them on the same chips (--mode evaluate with the '
      'same --config.data.raw_dir; runs of another data.val_fraction or data.split_seed have '
      'another validation split), then compare.')


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
  workdirs = [Path(w) for w in workdirs]
  _check_workdirs(workdirs)
  histories, mets, names = [], [], []
  for wd in workdirs:
    histories.append(history.read(workdir_lib.Workdir(wd).history))
    mets.append(report.read_metrics(workdir_lib.Workdir(wd).metrics))
    names.append(str(mets[-1].get('model') or histories[-1].get('model') or wd.name))
  if len(set(names)) < len(names):  # same model twice: tell the columns apart by directory
    names = [f'{n} ({w.name})' for n, w in zip(names, workdirs)]
  if len(set(names)) < len(names):  # directories of the same name: by the path as given
    names = [f'{n} ({w})' for n, w in zip(names, workdirs)]
  tags = list(mets[0]['ap'])
  for m, wd in zip(mets, workdirs):
    if list(m['ap']) != tags:
      raise ComparisonError(
          f'{workdir_lib.Workdir(wd).metrics}: tags {list(m["ap"])} differ from {tags} in '
          f'{workdir_lib.Workdir(workdirs[0]).metrics}: run --mode evaluate on both workdirs '
          'with this rf_jax, then compare.')
  _check_same_chips(workdirs, mets)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
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
         'Workdirs: ' + ', '.join(f'{n} = `{w}`' for n, w in zip(names, workdirs)), '']
  plot_comparison_curves(histories, names, out / 'comparison_curves.png')
  plot_comparison_ap(ap_rows, names, tags, out / 'comparison_ap.png')
  md += ['![loss and mAP per epoch](comparison_curves.png)', '',
         '![per-tag AP by model](comparison_ap.png)', '']
  path = out / 'comparison.md'
  workdir_lib.write_text(path, '\n'.join(md))
  return path
