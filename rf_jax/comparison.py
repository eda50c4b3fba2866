"""The study's comparison of several workdirs: per-tag AP side by side, overlaid curves, and
bootstrap intervals of every metric and of every difference (rf_jax/bootstrap.py).

Reads each workdir's history.json, eval/metrics.json (rf_jax/report.py documents them),
eval/predictions.npz and config.json (the seed); `--mode compare` writes ``comparison.md``,
``comparison.json`` and three PNGs into its --workdir. Only runs evaluated on the same
validation chips are compared (eval/predictions.npz, else provenance.json, tells); the
intervals need every workdir's eval/predictions.npz.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rf_jax import bootstrap
from rf_jax import errors
from rf_jax import history
from rf_jax import report
from rf_jax import workdir as workdir_lib


class ComparisonError(errors.UserError, ValueError):
  """The --compare workdirs cannot be compared (the same one twice, other tags, other chips)."""


class WorkdirNotFoundError(errors.UserError, FileNotFoundError):
  """A --compare workdir does not exist (or is not a directory)."""


def check_workdirs(workdirs: Sequence[Path], flag: str = '--compare') -> None:
  """Each workdir exists, and each is given once: a mistyped path or a repeated one would
  otherwise surface as 'train first' or as two identical columns. `flag` names the list in
  the messages (--compare, --members)."""
  seen = {}
  for wd in workdirs:
    if not wd.is_dir():
      raise WorkdirNotFoundError(
          f'{flag}: workdir {wd} ' + ('is a file, not a directory' if wd.exists() else
                                      'does not exist')
          + ': check the path (give the --workdir each run was trained in).')
    first = seen.setdefault(wd.resolve(), wd)
    if first is not wd:
      same = f'{wd}' if str(first) == str(wd) else f'{first} and {wd}, the same directory,'
      raise ComparisonError(f'{flag} names {same} twice: give each workdir once.')


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


def same_chips(a: dict, b: dict, key: str) -> bool:
  """Whether two runs' chips (`_evaluated_chips`) are the same by `key` (names and labels, or
  the dataset fingerprint)."""
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
      and all(same_chips(chips[0], c, key) for c in chips[1:])):
    return
  each = '; '.join(f'{w}: {m["num_chips"]} chips'
                   + (f' (dataset {c["fingerprint"]})' if c.get('fingerprint') else '')
                   for w, m, c in zip(workdirs, mets, chips))
  raise ComparisonError(
      f'--compare: the workdirs were evaluated on different validation chips, so their scores '
      f'cannot be compared: {each}. Evaluate them on the same chips (--mode evaluate with the '
      'same --config.data.raw_dir; runs of another data.val_fraction or data.split_seed have '
      'another validation split), then compare.')


def _aligned_predictions(workdirs: Sequence[Path],
                         num_tags: int) -> tuple[np.ndarray, list[np.ndarray]] | None:
  """(labels, [scores of each workdir]) with every workdir's rows in the first one's chip order
  (_check_same_chips has checked that they hold the same chips); None when a workdir has no
  eval/predictions.npz."""
  saved = [workdir_lib.read_npz(workdir_lib.Workdir(w).predictions) for w in workdirs]
  if any(s is None for s in saved):
    return None
  for w, s in zip(workdirs, saved):
    if np.shape(s.get('scores')) != (len(s['names']), num_tags):
      raise ComparisonError(
          f'{workdir_lib.Workdir(w).predictions}: scores of shape {np.shape(s.get("scores"))}, '
          f'not one row of {num_tags} tags per chip: run --mode evaluate --workdir {w} again.')
  first = np.argsort(saved[0]['names'], kind='stable')
  scores = []
  for s in saved:
    rows = np.empty(len(first), np.int64)
    rows[first] = np.argsort(s['names'], kind='stable')  # the row of each first-workdir chip
    scores.append(np.asarray(s['scores'], np.float64)[rows])
  return np.asarray(saved[0]['labels']), scores


def _seed_groups(workdirs: Sequence[Path], models: Sequence[str],
                 names: Sequence[str]) -> tuple[dict[str, list[str]], dict[str, list], list[str]]:
  """The runs of each model that differ only in config.seed: ({model: [run names]},
  {model: [seeds]}, notes on the models whose runs cannot be grouped)."""
  groups, seeds, notes = {}, {}, []
  for model in dict.fromkeys(models):
    runs = [i for i, m in enumerate(models) if m == model]
    if len(runs) < 2:
      continue
    configs = [workdir_lib.read_json(workdir_lib.Workdir(workdirs[i]).config)
               if workdir_lib.Workdir(workdirs[i]).config.is_file() else None for i in runs]
    if not all(isinstance(c, dict) and 'seed' in c for c in configs):
      notes.append(f'{model}: a run has no config.json with a seed, so its runs are not '
                   'grouped by seed.')
      continue
    run_seeds = [c['seed'] for c in configs]
    if len(set(run_seeds)) < len(run_seeds):
      notes.append(f'{model}: two runs have the same seed ({run_seeds}), so its runs are not '
                   'grouped by seed.')
      continue
    other = _other_differences(configs)
    if other:
      notes.append(f'{model}: the runs differ in {", ".join(other)} besides the seed, so they '
                   'are not grouped by seed.')
      continue
    groups[model] = [names[i] for i in runs]
    seeds[model] = run_seeds
  return groups, seeds, notes


def _other_differences(configs: Sequence[dict]) -> list[str]:
  """The config keys besides the seed in which the saved configs differ (those that change
  what was trained: config_checks.changed_keys)."""
  # Imported here: config_checks pulls in JAX and the data pipeline, which a comparison of
  # runs without seed groups does without.
  import ml_collections  # pylint: disable=g-import-not-at-top
  from rf_jax import config_checks  # pylint: disable=g-import-not-at-top
  first = ml_collections.ConfigDict(config_checks.with_defaults(configs[0]))
  return sorted({f'config.{k}' for c in configs[1:]
                 for k in config_checks.changed_keys(c, first) if k != 'seed'})


_METRIC_LABELS = {'map': 'mAP', 'f2_at_0.5': 'F2 at 0.5',
                  'f2_tuned': 'F2 tuned (in-sample)', 'f2_tuned_crossfit': 'F2 cross-fitted'}


def _json_ready(tree):
  """The bootstrap's results with NaN as null (JSON has no NaN)."""
  if isinstance(tree, dict):
    return {k: _json_ready(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_json_ready(v) for v in tree]
  if isinstance(tree, float):
    return report.json_number(tree)
  return tree


def _ci(x: Mapping, signed: bool = False) -> str:
  """'value [lo, hi]' of one estimate or difference (n/a where not finite)."""
  fmt = '{:+.4f}' if signed else '{:.4f}'
  v, (lo, hi) = x['value'], x['ci']
  if not np.isfinite(v):
    return 'n/a'
  return fmt.format(v) + (f' [{fmt.format(lo)}, {fmt.format(hi)}]' if np.isfinite(lo)
                          else ' [n/a]')


def _p(p: float) -> str:
  return f'{p:.3f}' if np.isfinite(p) else 'n/a'


def plot_differences(rows: Sequence[Mapping], path: Path, title: str) -> Path:
  """Forest plot: each difference (a - b, one metric) with its 95% interval; 0 marked."""
  fig = report.new_figure(figsize=(9, 0.32 * len(rows) + 1.6), layout='constrained')
  ax = fig.add_subplot()
  for i, d in enumerate(rows):
    metric = d['metric']
    colour = f'C{list(_METRIC_LABELS).index(metric)}'
    lo, hi = d['ci']
    if np.isfinite(lo):
      ax.plot([lo, hi], [i, i], '-', color=colour, lw=2)
    ax.plot(d['value'], i, 'o', color=colour)
  ax.axvline(0.0, color='k', lw=1, ls='--')
  ax.set_yticks(np.arange(len(rows)),
                [f'{d["label"]}: {_METRIC_LABELS[d["metric"]]}' for d in rows], fontsize=8)
  ax.set_ylim(len(rows) - 0.5, -0.5)
  ax.set(xlabel='difference a - b, 95% bootstrap interval', title=title)
  ax.grid(alpha=0.3, axis='x')
  return report.save_figure(fig, path)


_P_VALUE = ('p: two-sided bootstrap p-value, twice the share of resampled differences on the '
            'other side of 0, (1 + count) / (resamples + 1), at most 1; not adjusted for the '
            'number of comparisons.')


def _differences_md(diffs: Sequence[Mapping], tags: Sequence[str]) -> list[str]:
  """A table of the summary metrics' differences, then one of the per-tag AP differences (a
  column per pair)."""
  md = ['| a - b | metric | difference [95% interval] | p |', '|---|---|---:|---:|']
  md += [f'| {d["a"]} - {d["b"]} | {_METRIC_LABELS[d["metric"]]} | {_ci(d, signed=True)} | '
         f'{_p(d["p"])} |' for d in diffs if d['metric'] in bootstrap.METRICS]
  by_key = {(d['a'], d['b'], d['metric']): d for d in diffs}
  pairs = list(dict.fromkeys((d['a'], d['b']) for d in diffs))
  md += ['', '### Per-tag AP differences', '',
         'a - b with 95% intervals, over the resamples in which the tag has a positive; n/a: '
         'the tag has no positives among these chips.', '',
         '| tag | ' + ' | '.join(f'{a} - {b}' for a, b in pairs) + ' |',
         '|---|' + '---:|' * len(pairs)]
  md += [f'| {t} | ' + ' | '.join(_ci(by_key[a, b, f'ap/{t}'], signed=True) for a, b in pairs)
         + ' |' for t in tags]
  return md + ['']


def _uncertainty_section(result: Mapping, names: Sequence[str], tags: Sequence[str],
                         seeds: Mapping[str, list], notes: Sequence[str], out: Path) -> list[str]:
  """Markdown of comparison.json: intervals, seed groups, and the differences between models
  where runs form seed groups, else between runs (the others are in comparison.json)."""
  md = ['## Intervals', '',
        f'95% percentile intervals from {result["resamples"]} bootstrap resamples of the '
        f'{result["chips"]} validation chips (seed {result["seed"]}; config.compare). '
        '*F2 tuned (in-sample)*: per-tag thresholds tuned on these same chips (optimistic); '
        f'*F2 cross-fitted*: each chip scored at thresholds tuned on the other '
        f'{result["folds"] - 1} of {result["folds"]} folds. A resample holds ~63% distinct '
        'chips, so tuning on it overfits more: the tuned F2s\' intervals lean (in-sample up, '
        'cross-fitted down). mAP\'s intervals lean up: a rare tag (a few positives) drops out of '
        'the resamples that miss all its positives, and a resampled positive counted twice '
        'raises its AP. Both effects are the same for every run on a resample, so the paired '
        'differences between runs, where they cancel, are the numbers to read. All numbers in '
        'comparison.json.', '',
        '| metric | ' + ' | '.join(names) + ' |', '|---|' + '---:|' * len(names)]
  for m in bootstrap.METRICS:
    md.append(f'| {_METRIC_LABELS[m]} | '
              + ' | '.join(_ci(result['runs'][n][m]) for n in names) + ' |')
  md.append('')
  if result['models']:
    md += ['## Seeds', '',
           'Runs of one model that differ only in config.seed: mean ± standard deviation over '
           'the seeds (ddof 1), and the 95% interval of the mean from a two-level bootstrap '
           '(the seeds resampled within each model, then the chips).', '',
           '| model | seeds | ' + ' | '.join(_METRIC_LABELS[m] for m in bootstrap.METRICS)
           + ' |', '|---|---|' + '---:|' * len(bootstrap.METRICS)]
    for model, summary in result['models'].items():
      cells = [f'{summary["mean"][m]:.4f} ± {summary["sd"][m]:.4f} '
               f'[{summary["ci"][m][0]:.4f}, {summary["ci"][m][1]:.4f}]'
               for m in bootstrap.METRICS]
      md.append(f'| {model} | {", ".join(map(str, seeds[model]))} | ' + ' | '.join(cells) + ' |')
    md.append('')
  md += [f'- {note}' for note in notes] + ([''] if notes else [])
  # Where seed groups exist, a model's difference is over its seeds; the many single-run pairs
  # would bury it (comparison.json keeps them).
  diffs, label = result['model_differences'], 'model '
  if diffs:
    md += ['## Differences between models', '',
           'Means over the seeds; a two-level bootstrap: seeds resampled within each model, '
           'chips resampled (the same chips for both models). ' + _P_VALUE
           + ' The differences between single runs, paired over the chips, are in '
           'comparison.json.', '']
  elif result['differences']:
    diffs, label = result['differences'], ''
    md += ['## Differences', '',
           'a - b on the same resampled chips (paired: what the chips share cancels). '
           + _P_VALUE, '']
  if diffs:
    md += _differences_md(diffs, tags)
    rows = [{**d, 'label': f'{label}{d["a"]} - {d["b"]}'} for d in diffs
            if d['metric'] in bootstrap.METRICS]
    plot_differences(rows, out / 'comparison_differences.png',
                     'Differences between models (over seeds and chips)' if label else
                     'Differences between runs (paired over chips)')
    md += ['![differences with 95% intervals](comparison_differences.png)', '']
  return md


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


def write_comparison(workdirs: Sequence, out_dir, *, resamples: int = 2000, seed: int = 0,
                     folds: int = 5) -> Path:
  """Side-by-side table (per-tag AP, mAP, F2, loss; best per row in bold), overlaid curves, and
  bootstrap intervals of every run's metrics and of every difference.

  Reads each workdir's history.json, eval/metrics.json, eval/predictions.npz and config.json;
  writes ``out_dir/comparison.md``, ``comparison.json`` (rf_jax/bootstrap.py's ``compare``),
  ``comparison_curves.png``, ``comparison_ap.png`` and ``comparison_differences.png``; returns
  the path of comparison.md. ``resamples``, ``seed``: the chip resamples (config.compare);
  ``folds``: those of the cross-fitted tuned F2 (config.eval.crossfit_folds).
  """
  if not workdirs:
    raise ValueError('write_comparison needs at least one workdir')
  workdirs = [Path(w) for w in workdirs]
  check_workdirs(workdirs)
  histories, mets, names = [], [], []
  for wd in workdirs:
    histories.append(history.read(workdir_lib.Workdir(wd).history))
    mets.append(report.read_metrics(workdir_lib.Workdir(wd).metrics))
    names.append(str(mets[-1].get('model') or histories[-1].get('model') or wd.name))
  models = list(names)
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
  predictions = _aligned_predictions(workdirs, len(tags))
  if predictions is not None and len(predictions[0]) < folds:
    raise ComparisonError(
        f'--compare: {len(predictions[0])} validation chips cannot be split into '
        f'config.eval.crossfit_folds={folds} folds: give --config.eval.crossfit_folds '
        f'{len(predictions[0])} or fewer.')
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
             ('F2 tuned (in-sample)', [m['f2_tuned'] for m in mets], True),
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
  if predictions is None:  # compared by dataset fingerprint: no scores to resample
    missing = next(w for w in workdirs if not workdir_lib.Workdir(w).predictions.is_file())
    md += ['## Intervals', '',
           f'No intervals: {workdir_lib.Workdir(missing).predictions} does not exist (run '
           f'--mode evaluate --workdir {missing} again, then compare).', '']
    result = {'runs': {n: {k: {'value': met.get(k), 'ci': None} for k in bootstrap.METRICS}
                       for n, met in zip(names, mets)},
              'differences': [], 'models': {}, 'model_differences': [],
              'resamples': resamples, 'seed': seed, 'folds': folds}
  else:
    labels, scores = predictions
    groups, seeds, notes = _seed_groups(workdirs, models, names)
    result = bootstrap.compare(labels, dict(zip(names, scores)), tags, resamples=resamples,
                               seed=seed, folds=folds, groups=groups)
    for model, group in result['models'].items():
      group['seeds'] = seeds[model]
    md += _uncertainty_section(result, names, tags, seeds, notes, out)
  workdir_lib.write_json(out / 'comparison.json', _json_ready(result))
  path = out / 'comparison.md'
  workdir_lib.write_text(path, '\n'.join(md))
  return path
