"""The study's report of one workdir: matplotlib PNGs + markdown.

Inputs, per workdir (written by training and by ``--mode evaluate``):

* ``history.json``: ``{"model": str, "epochs": [{"epoch", "step", "train_loss", "val_loss",
  "val_map", "val_ap": [17 floats or null], "lr", ...}, ...]}``
* ``eval/predictions.npz``: ``names`` str [N], ``labels`` float32 [N, 17], ``scores`` float32 [N, 17].
* ``eval/metrics.json``, one JSON object with these keys (build it with :func:`metrics_summary`):

  ===================  ======================================================================
  ``model``            str, the study model (``config.model.name``, see models/registry.py)
  ``split``            str, the split evaluated (``"validation"``)
  ``num_chips``        int, chips evaluated
  ``loss``             float or null, mean sigmoid BCE over chips and tags (as in training)
  ``map``              float or null, mean AP over the tags with positives
  ``mean_precision_at_0.5``  float, mean over tags of the precision at 0.5 (the study code's "mAP")
  ``ap``               {tag: float or null}, every tag in TAGS order; null = no positives
  ``excluded_tags``    [tag, ...], the tags with null AP (left out of ``map``)
  ``f2_at_0.5``        float, Kaggle F2 (samples average) of ``scores > 0.5``
  ``f2_tuned``         float, Kaggle F2 of ``scores > thresholds`` (tuned on this same data)
  ``f2_tuned_crossfit``  float or null, Kaggle F2 at thresholds tuned on the other folds of
                       ``crossfit_folds`` (:func:`rf_jax.metrics.f2_tuned_crossfit`); null when
                       there are fewer chips than folds. Absent from files of earlier rf_jax
  ``crossfit_folds``   int, the folds of ``f2_tuned_crossfit``
  ``thresholds``       {tag: float}, per-tag thresholds of :func:`rf_jax.metrics.tune_thresholds`
  ===================  ======================================================================

  Extra keys (``step``, ``tta``, ...) are allowed and ignored here.

Output: :func:`write_report` -> ``workdir/report/report.md`` + PNGs (the comparison of several
workdirs is rf_jax/comparison.py). Figures are drawn on ``matplotlib.figure.Figure`` (Agg, no
pyplot, no display, no global state).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from rf_jax import metrics as M
from rf_jax import workdir as workdir_lib

METRICS_JSON_KEYS = ('model', 'split', 'num_chips', 'loss', 'map', 'ap', 'excluded_tags',
                     'f2_at_0.5', 'f2_tuned', 'thresholds')
DPI = 100


# --------------------------------------------------------------------------- metrics.json

def json_number(x) -> float | None:
  """JSON-safe float: NaN/inf/None -> None."""
  if x is None:
    return None
  x = float(x)
  return x if math.isfinite(x) else None


def metrics_summary(labels, scores, tags: Sequence[str], *, model: str, loss: float | None = None,
                    split: str = 'validation', thresholds=None, crossfit_folds: int = 5,
                    **extra) -> dict[str, Any]:
  """The ``eval/metrics.json`` dict (keys: module docstring) of one evaluation.

  ``thresholds`` default: tuned here with :func:`rf_jax.metrics.tune_thresholds`.
  ``crossfit_folds``: the folds of ``f2_tuned_crossfit`` (config.eval.crossfit_folds).
  """
  labels = np.asarray(labels)
  scores = np.asarray(scores)
  if labels.shape[1] != len(tags):
    raise ValueError(f'{labels.shape[1]} label columns but {len(tags)} tags')
  ap = M.average_precision(labels, scores)
  if thresholds is None:
    thresholds = M.tune_thresholds(labels, scores)
  thresholds = np.broadcast_to(np.asarray(thresholds, np.float64), (len(tags),))
  out = {
      'model': model,
      'split': split,
      'num_chips': int(labels.shape[0]),
      'loss': json_number(loss),
      'map': json_number(M.mean_average_precision(labels, scores)),
      'mean_precision_at_0.5': json_number(M.mean_precision_at(labels, scores, 0.5)),
      'ap': {t: json_number(a) for t, a in zip(tags, ap)},
      'excluded_tags': [tags[i] for i in M.tags_without_positives(labels)],
      'f2_at_0.5': json_number(M.f2_at(labels, scores, M.DEFAULT_THRESHOLD)),
      'f2_tuned': json_number(M.f2_at(labels, scores, thresholds)),
      'f2_tuned_crossfit': _crossfit(labels, scores, crossfit_folds),
      'crossfit_folds': crossfit_folds,
      'thresholds': {t: float(v) for t, v in zip(tags, thresholds)},
  }
  out.update(extra)
  return out


def _crossfit(labels, scores, folds: int) -> float | None:
  """:func:`rf_jax.metrics.f2_tuned_crossfit`; None when there are fewer chips than folds."""
  return json_number(M.f2_tuned_crossfit(labels, scores, folds)) if len(labels) >= folds else None


def read_metrics(path) -> dict[str, Any]:
  """Parses an ``eval/metrics.json``; a clear error when a key is missing."""
  path = Path(path)
  if not path.is_file():
    raise workdir_lib.MissingRunFileError(
        f'{path}: no metrics file (run --mode evaluate on that workdir first)')
  data = workdir_lib.read_json(path)
  missing = [k for k in METRICS_JSON_KEYS if k not in data] if isinstance(data, dict) else None
  if missing is None or missing:
    raise workdir_lib.DamagedRunFileError(
        f'{path}: ' + (f'missing keys {missing}' if missing else 'not a JSON object')
        + f' (expected the keys {list(METRICS_JSON_KEYS)}): the file was edited or written by '
        f'another rf_jax; run --mode evaluate --workdir {path.parent.parent} again to rewrite it.')
  return data


def series(history: Mapping | None, key: str) -> tuple[np.ndarray, np.ndarray]:
  """(epochs, values) of one history key; missing/null values are NaN."""
  rows = (history or {}).get('epochs') or []
  ep = np.array([r.get('epoch', i + 1) for i, r in enumerate(rows)], dtype=np.float64)
  val = np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=np.float64)
  return ep, val


# --------------------------------------------------------------------------- figures (one workdir)

def new_figure(**kwargs) -> 'matplotlib.figure.Figure':
  """A matplotlib Figure. These helpers import matplotlib when first drawing, so that the
  commands that draw nothing (train, a config error) start ~10 s sooner on a small CPU."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  return Figure(**kwargs)


def integer_ticks(axis) -> None:
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top
  axis.set_major_locator(MaxNLocator(integer=True))


def save_figure(fig: 'matplotlib.figure.Figure', path: Path) -> Path:
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=DPI)
  return path


def plot_loss(history: Mapping, path: Path, title: str = '') -> Path:
  """Train and validation loss per epoch."""
  fig = new_figure(figsize=(6, 4), layout='constrained')
  ax = fig.add_subplot()
  for key, label, style in (('train_loss', 'train', 'o-'), ('val_loss', 'validation', 's-')):
    ep, v = series(history, key)
    ax.plot(ep, v, style, label=label)
  ax.set(xlabel='epoch', ylabel='loss (mean sigmoid BCE)', title=title or 'Loss per epoch')
  integer_ticks(ax.xaxis)
  ax.grid(alpha=0.3)
  ax.legend()
  return save_figure(fig, path)


def plot_map(history: Mapping, path: Path, title: str = '') -> Path:
  """Validation mAP per epoch, best epoch marked."""
  fig = new_figure(figsize=(6, 4), layout='constrained')
  ax = fig.add_subplot()
  ep, v = series(history, 'val_map')
  ax.plot(ep, v, 'o-', color='tab:green', label='validation mAP')
  if np.isfinite(v).any():
    b = int(np.nanargmax(v))
    ax.plot(ep[b], v[b], '*', ms=16, color='tab:red', label=f'best: epoch {ep[b]:g}, {v[b]:.4f}')
  ep, p = series(history, 'val_mean_precision_at_0.5')
  if np.isfinite(p).any():  # what the study's code printed as "mAP"
    ax.plot(ep, p, 's--', color='tab:gray', label='mean precision at 0.5 (study code)')
  ax.set(xlabel='epoch', ylabel='mAP', title=title or 'Validation mAP per epoch')
  integer_ticks(ax.xaxis)
  ax.grid(alpha=0.3)
  ax.legend()
  return save_figure(fig, path)


def plot_ap_bars(ap: np.ndarray, tags: Sequence[str], num_pos: np.ndarray, path: Path,
                 title: str = '') -> Path:
  """Per-tag AP as horizontal bars (TAGS order); tags without positives marked 'excluded'."""
  fig = new_figure(figsize=(7, 0.35 * len(tags) + 1.5), layout='constrained')
  ax = fig.add_subplot()
  y = np.arange(len(tags))
  ax.barh(y, np.nan_to_num(ap), color='tab:blue')
  for i, (a, n) in enumerate(zip(ap, num_pos)):
    txt = f'{a:.3f}  (n={int(n)})' if np.isfinite(a) else 'excluded: no positives'
    ax.text((a if np.isfinite(a) else 0) + 0.01, i, txt, va='center', fontsize=8)
  ax.set_yticks(y, [str(t) for t in tags])
  ax.invert_yaxis()
  ax.set_xlim(0, 1.25)
  mean = np.nanmean(ap) if np.isfinite(ap).any() else np.nan
  ax.axvline(mean, color='k', ls='--', lw=1, label=f'mAP {mean:.3f}')
  ax.set(xlabel='average precision', title=title or 'Per-tag average precision')
  ax.legend(loc='lower right')
  return save_figure(fig, path)


def plot_tail_accuracy(labels: np.ndarray, scores: np.ndarray, tag: str, path: Path, *,
                       top_n: int, threshold: float, title: str = '') -> Path:
  """Tail accuracy of one tag against t (0.5 .. 1) over its top_n chips, + chips above t."""
  t = np.linspace(0.5, 1.0, 201)
  acc = M.tail_accuracy(labels, scores, t, top_n)
  top = np.sort(np.asarray(scores, np.float64))[::-1][:top_n]
  count = (top[None, :] > t[:, None]).sum(1)
  fig = new_figure(figsize=(6.5, 4), layout='constrained')
  ax = fig.add_subplot()
  ax.plot(t, acc, '-', color='tab:blue', lw=2, label='tail accuracy')
  ax.set_ylim(-0.02, 1.05)
  ax.set(xlabel='threshold t', ylabel='tail accuracy',
         title=title or f'Tail accuracy, tag "{tag}", top {min(top_n, len(scores))} chips')
  ax.set_xlim(0.49, 1.01)
  if threshold > 0.5:
    ax.axvline(threshold, color='tab:red', ls='--', lw=1, label=f'tuned F2 threshold {threshold:.2f}')
  else:  # the tuned threshold is off this axis (t >= 0.5): say so in the legend
    ax.plot([], [], ' ', label=f'tuned F2 threshold {threshold:.2f} (not > 0.5)')
  ax2 = ax.twinx()
  ax2.plot(t, count, color='tab:orange', alpha=0.6, lw=1, label='chips with f > t')
  ax2.set_ylabel('chips with f > t', color='tab:orange')
  ax2.set_ylim(0, max(1, count.max()) * 1.05)
  h1, l1 = ax.get_legend_handles_labels()
  h2, l2 = ax2.get_legend_handles_labels()
  ax.legend(h1 + h2, l1 + l2, loc='lower left', fontsize=8)
  ax.grid(alpha=0.3)
  return save_figure(fig, path)


def stretch(rgb, low: float = 2.0, high: float = 98.0) -> np.ndarray:
  """Per-band percentile stretch of an [H, W, 3] image (any dtype) to float [0, 1]."""
  x = np.asarray(rgb, dtype=np.float64)
  if x.ndim != 3 or x.shape[-1] != 3:
    raise ValueError(f'expected an RGB image [H, W, 3], got shape {x.shape}')
  lo = np.percentile(x, low, axis=(0, 1))
  hi = np.percentile(x, high, axis=(0, 1))
  span = np.where(hi > lo, hi - lo, 1.0)
  return np.clip((x - lo) / span, 0.0, 1.0)


def _tag_names(row: np.ndarray, tags: Sequence[str]) -> str:
  return ' '.join(tags[i] for i in np.flatnonzero(row > 0.5)) or '(no tags)'


def plot_chip_grid(names, labels: np.ndarray, scores: np.ndarray, tags: Sequence[str], tag_index: int,
                   load_rgb: Callable[[str], np.ndarray], path: Path, *, count: int = 10,
                   cols: int = 5) -> Path:
  """The ``count`` highest- and ``count`` lowest-scored chips for one tag, score and true tags below."""
  s = np.asarray(scores)[:, tag_index]
  order = np.argsort(-s, kind='stable')
  groups = [('highest', order[:count]), ('lowest', order[::-1][:count])]
  rows = math.ceil(count / cols)
  # Fixed layout in inches: title (name, score) above each chip, up to 9 true tags below it.
  cell_w, img, above, below, header = 2.6, 2.2, 0.45, 0.8, 0.5
  cell_h = above + img + below
  width, height = cell_w * cols, 2 * (header + rows * cell_h)
  fig = new_figure(figsize=(width, height))
  top = height
  for which, idx in groups:
    fig.text(0.5, (top - header / 2) / height, f'{len(idx)} {which}-scored chips for '
             f'"{tags[tag_index]}"', ha='center', va='center', fontsize=13, fontweight='bold')
    top -= header
    for n, i in enumerate(idx):
      r, c = divmod(n, cols)
      x0 = c * cell_w + (cell_w - img) / 2
      y0 = top - r * cell_h - above - img
      ax = fig.add_axes((x0 / width, y0 / height, img / width, img / height))
      ax.imshow(stretch(load_rgb(str(names[i]))), interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      truth = labels[i, tag_index] > 0.5
      ax.set_title(f'{names[i]}\nscore {s[i]:.3f} ({"true" if truth else "false"})', fontsize=8,
                   color='tab:green' if truth else 'tab:red')
      ax.text(0.5, -0.03, textwrap.fill(_tag_names(labels[i], tags), 34), transform=ax.transAxes,
              ha='center', va='top', fontsize=7)
    top -= rows * cell_h
  return save_figure(fig, path)


# --------------------------------------------------------------------------- report.md

def _fmt(x, digits: int = 4) -> str:
  return 'n/a' if x is None or not np.isfinite(x) else f'{x:.{digits}f}'


def _curves_section(history: Mapping | None, out: Path, model: str) -> list[str]:
  if not (history and history.get('epochs')):
    return ['## Training curves', '', 'No training history given.', '']
  md = []
  for key, what in (('val_map', 'validation mAP'),
                    ('val_mean_precision_at_0.5', 'mean precision at 0.5 (the number the '
                     "study's code printed as mAP and chose its best epoch by)")):
    ep, v = series(history, key)
    if np.isfinite(v).any():
      b = int(np.nanargmax(v))
      md += [f'Best {what} during training: {v[b]:.4f} at epoch {ep[b]:g} (of {len(ep)}).', '']
  plot_loss(history, out / 'loss.png', f'Loss per epoch ({model})')
  plot_map(history, out / 'map.png', f'Validation mAP per epoch ({model})')
  return md + ['## Training curves', '', '![loss per epoch](loss.png)', '',
               '![mAP per epoch](map.png)', '']


def _ap_section(labels, scores, tags, thresholds, crossfit: float | None, folds: int, out: Path,
                model: str) -> list[str]:
  ap = M.average_precision(labels, scores)
  num_pos = labels.sum(0)
  plot_ap_bars(ap, tags, num_pos, out / 'ap_per_tag.png', f'Per-tag AP ({model})')
  md = ['## Per-tag average precision', '', '![per-tag AP](ap_per_tag.png)', '',
        '| tag | positives | AP | F2 threshold |', '|---|---:|---:|---:|']
  for t, n, a, th in zip(tags, num_pos, ap, thresholds):
    md.append(f'| {t} | {int(n)} | {_fmt(a) if np.isfinite(a) else "n/a (excluded)"} | {th:.2f} |')
  return md + [f'| **mAP** | | **{_fmt(M.mean_average_precision(labels, scores))}** | |',
               f'| **F2 at 0.5** | | {_fmt(M.f2_at(labels, scores, 0.5))} | |',
               f'| **F2 tuned** (on these same chips, optimistic) | | '
               f'{_fmt(M.f2_at(labels, scores, thresholds))} | |',
               f'| **F2 tuned, cross-fitted** ({folds} folds) | | {_fmt(crossfit)} | |', '']


def _best_tag_section(names, labels, scores, tags, thresholds, load_rgb, top_n: int,
                      out: Path) -> list[str]:
  ap = M.average_precision(labels, scores)
  if not np.isfinite(ap).any():
    return ['## Best tag', '', 'No tag has positives: no tail accuracy, no chip grid.', '']
  best = int(np.nanargmax(ap))
  tag, threshold = tags[best], float(thresholds[best])
  plot_tail_accuracy(labels[:, best], scores[:, best], tag, out / 'tail_accuracy.png',
                     top_n=top_n, threshold=threshold)
  acc = M.tail_accuracy(labels[:, best], scores[:, best], [0.5, threshold], top_n)
  md = ['## Best tag', '',
        f'Best tag (highest AP): **{tag}** (AP {ap[best]:.4f}, {int(labels[:, best].sum())} '
        'positives).', '',
        f'Tail accuracy over its top {min(top_n, len(names))} chips, '
        r'`sum_i 1[f_i > t] 1[pred_i == y_i] / sum_i 1[f_i > t]` with `pred_i = 1[f_i > 0.5]`, '
        f'against t from 0.5 to 1 (NaN, not drawn, where no chip scores above t): '
        f'{_fmt(acc[0], 3)} at t = 0.5'
        + (f', {_fmt(acc[1], 3)} at the tuned F2 threshold {threshold:.2f}.' if threshold > 0.5
           else f' (the tuned F2 threshold, {threshold:.2f}, is not above 0.5).'),
        '', '![tail accuracy](tail_accuracy.png)', '']
  if load_rgb is None:
    return md + ['(No chip loader given: chip grid not drawn.)', '']
  plot_chip_grid(names, labels, scores, tags, best, load_rgb, out / 'best_tag_chips.png')
  return md + [f'The 10 highest- and 10 lowest-scored chips for "{tag}" (RGB, 2-98 percentile '
               'stretch per band; title green when the tag is true, red when not; true tags '
               'below):', '', '![best tag chips](best_tag_chips.png)', '']


def write_report(workdir, *, history: Mapping | None, predictions: Mapping, tags: Sequence[str],
                 load_rgb: Callable[[str], np.ndarray] | None, top_n: int = 50,
                 excluded_tags: Sequence[str] | None = None, thresholds=None,
                 loss: float | None = None, model: str | None = None,
                 crossfit_folds: int = 5) -> Path:
  """Writes ``workdir/report/`` (PNGs + report.md) and returns the path of report.md.

  ``history``: parsed history.json (None: no curves). ``predictions``: names, labels, scores as in
  predictions.npz. ``load_rgb(name)`` -> [H, W, 3] RGB of a chip (None: no chip grid).
  ``thresholds``: per-tag F2 thresholds (default: tuned here on ``predictions``).
  ``excluded_tags``: tags left out of mAP (default: those without positives in ``predictions``).
  ``crossfit_folds``: the folds of the cross-fitted tuned F2 (config.eval.crossfit_folds).
  """
  wd = workdir_lib.Workdir(workdir)
  out = wd.report_dir
  out.mkdir(parents=True, exist_ok=True)
  names = np.asarray(predictions['names'])
  labels = np.asarray(predictions['labels'])
  scores = np.asarray(predictions['scores'])
  tags = list(tags)
  if labels.shape != scores.shape or labels.shape != (len(names), len(tags)):
    raise ValueError(f'predictions: names {names.shape}, labels {labels.shape}, scores '
                     f'{scores.shape} do not match {len(tags)} tags')
  model = model or (history or {}).get('model') or wd.root.name
  if excluded_tags is None:
    excluded_tags = [tags[i] for i in M.tags_without_positives(labels)]
  if thresholds is None:
    thresholds = M.tune_thresholds(labels, scores)
  thresholds = np.broadcast_to(np.asarray(thresholds, np.float64), (len(tags),))
  crossfit = _crossfit(labels, scores, crossfit_folds)
  md = [f'# Report: {model}', '',
        f'Evaluated chips: {len(names)}. '
        + (f'Loss (mean sigmoid BCE): {_fmt(loss)}. ' if loss is not None else '')
        + f'mAP (mean AP over tags with positives): '
        f'**{_fmt(M.mean_average_precision(labels, scores))}**. Kaggle F2 (samples): '
        f'{_fmt(M.f2_at(labels, scores, 0.5))} at 0.5, {_fmt(M.f2_at(labels, scores, thresholds))}'
        ' at per-tag thresholds tuned on these same chips (optimistic), '
        f'{_fmt(crossfit)} cross-fitted, {crossfit_folds} folds (each chip scored at thresholds '
        'tuned on the other folds).', '',
        'Excluded from mAP (no positives among these chips): '
        + (', '.join(excluded_tags) if excluded_tags else 'none') + '.', '']
  md += _curves_section(history, out, model)
  md += _ap_section(labels, scores, tags, thresholds, crossfit, crossfit_folds, out, model)
  md += _best_tag_section(names, labels, scores, tags, thresholds, load_rgb, top_n, out)
  workdir_lib.write_text(wd.report, '\n'.join(md))
  return wd.report
