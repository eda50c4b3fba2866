r"""rf_jax vs PyTorch: train/eval throughput, peak memory, input pipeline (benchmarks/).

One process per framework run, the frameworks alternating A B A B over `--rounds`.

  python scripts/benchmark.py                      # full: 256 px, batch 16/64, fp32
  python scripts/benchmark.py --quick              # smoke test, < 2 minutes
  python scripts/benchmark.py --variant dual --steps 8 --json out.json
  python scripts/benchmark.py --batch-sizes 16,256 --steps 20   # on a GPU: chips fed, bf16
  python scripts/benchmark.py --feed chips --dtype float32   # the GPU feeding path on the CPU
  python scripts/benchmark.py --conv-profile       # each ResNet-18 conv shape alone
  python scripts/benchmark.py --pipeline-only --workers 0   # host CPU ms per chip
  python scripts/benchmark.py --profile            # train step ms per op kind, both sides
  python scripts/benchmark.py --scale full --json scale.json   # every phase at 40,479 chips
  python scripts/benchmark.py --scale 300 --quick  # the same on 300 chips, tiny net: < 1 min

docs/performance.md says what is measured and how.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

from absl import app
from absl import flags

# benchmarks/ sits beside the rf_jax package, outside what is installed: importable from the
# repository, whatever the current directory.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import orchestrate  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import scale  # pylint: disable=g-import-not-at-top,wrong-import-position
from rf_jax import xla_cpu  # pylint: disable=g-import-not-at-top,wrong-import-position

_SETTINGS = {
    'variant': flags.DEFINE_list('variant', None, 'comma list of rgb,rgbir,dual (default all)'),
    'batch': flags.DEFINE_integer('batch', None, 'train batch (16; --quick 8)'),
    'eval_batch': flags.DEFINE_integer('eval-batch', None, 'eval batch (64; --quick 16)'),
    'size': flags.DEFINE_integer('size', None, 'image side in px (256; --quick 128); the '
                                 "chips' side with --feed chips, the input 224/256 of it"),
    'dtype': flags.DEFINE_enum('dtype', None, list(common.DTYPES),
                               'compute dtype: rf_jax model dtype, torch autocast (auto: '
                               'bfloat16 on a GPU, float32 on the CPU)'),
    'feed': flags.DEFINE_enum(
        'feed', None, list(common.FEEDS),
        'ready: the float32 model input uploaded inside each step; chips: uint16 chips as '
        'stored, the input made in the step, 2 batches placed on the device ahead (auto: '
        'chips on a GPU, ready on the CPU)'),
    'batch_sizes': flags.DEFINE_list(
        'batch-sizes', None, 'train batches measured in turn, e.g. 16,256 (instead of --batch)'),
    'torch_compile': flags.DEFINE_enum(
        'torch-compile', None, list(common.TORCH_COMPILE),
        'also time PyTorch under torch.compile (auto: on CUDA only; a failure is reported)'),
    'steps': flags.DEFINE_integer('steps', None, 'timed train steps per run (4; --quick 2)'),
    'eval_steps': flags.DEFINE_integer('eval-steps', None, 'timed eval steps per run (2)'),
    'warmup': flags.DEFINE_integer('warmup', None, 'untimed steps after the first call (1)'),
    'rounds': flags.DEFINE_integer('rounds', None, 'A B A B rounds (2; --quick 1)'),
    'torch_layouts': flags.DEFINE_list(
        'torch-layouts', None, 'channels_last and/or contiguous (NCHW) (default '
        "channels_last, PyTorch's fastest CPU layout)"),
    'frameworks': flags.DEFINE_list('frameworks', None, 'jax,torch (default both)'),
    'no_eval': flags.DEFINE_boolean('no-eval', None, 'train steps only'),
    'jax_patch': flags.DEFINE_multi_string(
        'jax-patch', None, 'speed experiment on the rf_jax runs (repeatable; '
        'benchmarks/jax_patches.py)'),
    'xla_flags': flags.DEFINE_string('xla-flags', None,
                                     'appended to XLA_FLAGS for the rf_jax runs'),
    'preload': flags.DEFINE_string(
        'preload', None, 'LD_PRELOAD for both sides\' processes, e.g. a caching malloc '
        '(libtcmalloc_minimal.so.4: docs/performance.md)'),
    'pipeline_chips': flags.DEFINE_integer('pipeline-chips', None,
                                           'synthetic chips for the pipeline (300; --quick 48)'),
    'pipeline_seconds': flags.DEFINE_float(
        'pipeline-seconds', None, 'timed seconds per pipeline measurement (10; --quick 2); '
        '0 skips the pipeline'),
    'pipeline_zero_workers': flags.DEFINE_boolean(
        'pipeline-zero-workers', None, 'also measure the pipeline reading in one thread'),
    'workers': flags.DEFINE_integer(
        'workers', None, "the pipeline's reader threads (configs/default.py data.num_workers)"),
}
_QUICK = flags.DEFINE_boolean('quick', False,
                              'smoke test (< 2 min): 128 px, batch 8/16, 2 steps, 1 round')
_JSON = flags.DEFINE_string('json', '', 'write the report here')
_SCALE = flags.DEFINE_string(
    'scale', None, "instead: every phase of the study (generate, prepare, loader epochs, train, "
    "SIGTERM and resume, evaluate, report, predict) on N synthetic 256 px training chips, or "
    f"'full' ({scale.REAL_TRAIN_CHIPS:,}, the real dataset); with --quick the tiny network "
    'at 96 px (benchmarks/scale.py)')
_SCALE_TEST = flags.DEFINE_integer(
    'scale-test', None, 'test chips for --scale (default: the real 61,191 in proportion)')
_SCALE_DIR = flags.DEFINE_string(
    'scale-dir', None, 'where --scale writes its data (default: a new folder in the current '
    'directory; about 1.05 MB of disk per chip, raw and prepared)')
_SCALE_STEPS = flags.DEFINE_integer(
    'scale-steps', 24, 'train steps before each SIGTERM (the checkpoint period) for --scale')
_SCALE_KEEP = flags.DEFINE_boolean('scale-keep', False, "keep --scale's data (else deleted)")
_CONV_PROFILE = flags.DEFINE_boolean(
    'conv-profile', False, 'instead: time each ResNet-18 conv shape alone (fwd, fwd+bwd)')
_PIPELINE_ONLY = flags.DEFINE_boolean(
    'pipeline-only', False, 'instead: only the input pipeline (batches/s, CPU ms per chip)')
_PROFILE = flags.DEFINE_boolean(
    'profile', False, "instead: each train step's time per op kind (convolution, "
    'transpose/copy, batchnorm, elementwise) in both frameworks, and the transposes XLA '
    'inserted')


def _settings() -> common.Settings:
  given = {field: holder.value for field, holder in _SETTINGS.items()}
  try:
    return common.create_settings(quick=_QUICK.value, **given)
  except ValueError as e:
    sys.exit(f'error: {e}')


def _print_header(report: dict, settings: common.Settings) -> None:
  print(f'\n{report["date"]}  load {report["load_before"]} -> {report.get("load_after")}  '
        f'{report["machine"]["cores"]} cores  '
        + '  '.join(f'{k} {v}' for k, v in report['versions'].items() if v))
  fed = sorted({f'{r.get("feed", "ready")} feed {r.get("dtype", settings.dtype)}'
                for runs in report['runs'].values() for r in runs})
  batches = ','.join(map(str, common.batch_sizes(settings)))
  print(f'size {settings.size}, batch {batches} train / {settings.eval_batch} eval, '
        f'{" / ".join(fed) or settings.dtype}, {settings.steps} train / '
        f'{settings.eval_steps} eval timed steps x '
        f'{settings.rounds} rounds; torch threads {common.cores()}; '
        f'LD_PRELOAD {settings.preload or "none"}; wall {report.get("wall_s", 0):.0f} s')


def _scale() -> dict:
  """--scale: the phases on generated data (benchmarks/scale.py); the report's `scale`."""
  value = _SCALE.value.strip().lower()
  if value != 'full' and not (value.isdigit() and int(value) >= 60):
    sys.exit(f"error: --scale={_SCALE.value}: give a number of training chips (60 or more) or "
             f"'full' ({scale.REAL_TRAIN_CHIPS:,})")
  train_chips = scale.REAL_TRAIN_CHIPS if value == 'full' else int(value)
  test_chips = (scale.default_test_chips(train_chips) if _SCALE_TEST.value is None
                else _SCALE_TEST.value)
  if _SCALE_DIR.value:
    root = pathlib.Path(_SCALE_DIR.value).expanduser().resolve()
    if root.exists() and any(root.iterdir()):
      sys.exit(f'error: --scale-dir={root} is not empty: give a new or empty folder')
  else:
    root = pathlib.Path.cwd() / f'scale_{train_chips}'
    if root.exists():
      sys.exit(f'error: {root} exists (an earlier --scale run kept it?): remove it or give '
               '--scale-dir')
  need_gb = (train_chips + test_chips) * 2 * scale.CHIP_SIZE ** 2 * 4 * 2 / 1e9
  existing = next(p for p in (root, *root.parents) if p.exists())
  free_gb = shutil.disk_usage(existing).free / 1e9
  if need_gb > 0.95 * free_gb:
    sys.exit(f'error: --scale {train_chips} with {test_chips} test chips needs about '
             f'{need_gb:.1f} GB of disk (raw and prepared), {free_gb:.1f} GB is free there: '
             'lower --scale-test (the test phase then extrapolates per chip) or --scale-dir '
             'elsewhere')
  print(f'--scale: {train_chips:,} training and {test_chips:,} test chips of '
        f'{scale.CHIP_SIZE} px in {root} (about {need_gb:.1f} GB, deleted at the end'
        f'{" unless --scale-keep" if not _SCALE_KEEP.value else ": no, --scale-keep"})',
        flush=True)
  result = scale.run(train_chips, test_chips, root, quick=_QUICK.value,
                     steps=_SCALE_STEPS.value, keep=_SCALE_KEEP.value)
  return {'scale': result, 'table': scale.table(result)}


def _speed() -> dict:
  """The benchmark against PyTorch, or the one measurement that replaces it."""
  settings = _settings()
  xla_cpu.set_default_flags()  # the flags training runs with; every child process inherits them
  if settings.size < 96:
    print('note: below 96 px XLA:CPU is pathologically slow (DESIGN.md section 4)',
          file=sys.stderr)
  try:
    if _CONV_PROFILE.value:
      return orchestrate.conv_profile(settings)
    if _PIPELINE_ONLY.value:
      return orchestrate.pipeline_only(settings)
    if _PROFILE.value:
      return orchestrate.profile(settings)
    report = orchestrate.benchmark(settings)
    _print_header(report, settings)
    return report
  except orchestrate.ChildError as e:
    sys.exit(f'error: {e}')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}: every option is a --flag')
  if (_SCALE.value is not None) + _CONV_PROFILE.value + _PIPELINE_ONLY.value + _PROFILE.value > 1:
    sys.exit('error: --scale, --conv-profile, --pipeline-only and --profile each replace the '
             'benchmark: give one')
  if _SCALE.value is not None:
    try:
      report = _scale()
    except scale.PhaseError as e:
      sys.exit(f'error: a --scale phase failed: {e}')
  else:
    report = _speed()
  print(report['table'])
  if _JSON.value:
    pathlib.Path(_JSON.value).write_text(json.dumps(report, indent=1))
    print(f'wrote {_JSON.value}')


if __name__ == '__main__':
  app.run(main)
