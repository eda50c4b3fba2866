"""scripts/benchmark.py --quick end to end (tiny sizes; the figures checked against the times
they come from, never against a speed)."""

import json
import pathlib
import statistics
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'scripts' / 'benchmark.py'


def test_quick_benchmark_end_to_end(tmp_path):
  """The report's figures are the children's timed steps, pooled as documented: each side timed
  the steps asked for, images/s and the ratios follow from those times, the pipeline's demand
  from the rf_jax train step, and each side's memory grew by more than the model."""
  pytest.importorskip('torch')
  pytest.importorskip('torchvision')
  from benchmarks import orchestrate  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_models  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'bench.json'
  batch, eval_batch, steps, eval_steps = 4, 2, 2, 1  # all different: a swap of two shows
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), '--quick', '--variant', 'rgb', '--size', '96',
       '--batch', str(batch), '--eval-batch', str(eval_batch), '--steps', str(steps),
       '--eval-steps', str(eval_steps), '--warmup', '0', '--pipeline-chips', '24',
       '--pipeline-seconds', '0.2', '--json', str(out)],
      capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads(out.read_text())
  settings = report['settings']
  assert (settings['variant'], settings['batch'], settings['eval_batch'], settings['steps'],
          settings['eval_steps'], settings['rounds']) == (['rgb'], batch, eval_batch, steps,
                                                          eval_steps, 1)
  assert set(report['versions']) == {'python', *orchestrate.PACKAGES}
  assert report['versions']['jax'] and report['versions']['torch']
  sides = ('rf_jax', 'torch_channels_last')
  assert report['order'] == [f'r1 rgb {side}' for side in sides]
  assert set(report['runs']) == {f'rgb/{side}' for side in sides}
  assert set(report['results']) == {'rgb'}
  row = report['results']['rgb']
  params_mb = sum(p.numel() for p in torch_models.torch_model('rgb').parameters()) * 4 / 2**20
  step_s = {}
  for side in sides:
    (run,) = report['runs'][f'rgb/{side}']  # one round
    for phase, size, count in (('train', batch, steps), ('eval', eval_batch, eval_steps)):
      times = step_s[side, phase] = run[phase]['step_s']
      figures = row[side][phase]
      assert len(times) == figures['steps_timed'] == count, (side, phase)
      assert figures['images_per_s'] == pytest.approx(size / statistics.median(times))
      assert figures['best_step_images_per_s'] == pytest.approx(size / min(times))
    # The parameters and their momentum live through every step, the gradients at its peak.
    assert run['rss_peak_train_mb'] - run['rss_after_imports_mb'] > 2 * params_mb, side
    assert row[side]['rss_peak_train_mb'] == run['rss_peak_train_mb']
  for phase in ('train', 'eval'):
    jax_s, torch_s = step_s['rf_jax', phase], step_s['torch_channels_last', phase]
    ratio = row[f'ratio_{phase}_vs_channels_last']
    assert ratio == pytest.approx(statistics.median(torch_s) / statistics.median(jax_s))
    assert row[f'ratio_{phase}_vs_best'] == ratio
    assert row[f'best_step_ratio_{phase}'] == pytest.approx(min(torch_s) / min(jax_s))
    assert (f'| rgb | {phase} | {row["rf_jax"][phase]["images_per_s"]:.1f} | '
            f'{row["torch_channels_last"][phase]["images_per_s"]:.1f} | {ratio:.2f}x |'
            in proc.stdout), phase
  pipe = report['pipeline']
  configured = pipe['runs'][str(settings['workers'])]
  assert (pipe['batch'], pipe['eval_batch'], configured['threads']) == (
      batch, eval_batch, settings['workers'])
  assert 0 < pipe['chips'] < 24  # the train split of the chips generated
  assert configured['chips'] == configured['batches'] * batch
  assert pipe['batches_per_s'] == configured['batches_per_s'] > 0
  assert pipe['train_cpu_ms_per_chip'] == configured['cpu_ms_per_chip'] > 0
  assert 0 < pipe['eval']['chips'] <= pipe['eval']['batches'] * eval_batch  # last one padded
  assert pipe['eval_cpu_ms_per_chip'] == pipe['eval']['cpu_ms_per_chip'] > 0
  demand = row['rf_jax']['train']['images_per_s'] / batch
  assert pipe['demand_batches_per_s'] == pytest.approx(demand)
  assert pipe['supply_over_demand'] == pytest.approx(pipe['batches_per_s'] / demand)
  assert pipe['imread_ms_per_chip'] > 0 and pipe['copy_ms_per_chip'] > 0
  for mode in ('before', 'none', 'host', 'device'):  # host CPU per chip, each cache mode
    assert pipe[mode]['host_ms_per_train_chip'] > 0, mode
    assert pipe[mode]['host_ms_per_eval_chip'] > 0, mode


def test_bad_flag_value_is_one_error_line():
  proc = subprocess.run([sys.executable, str(SCRIPT), '--variant', 'rgb,nir'],
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip() == "error: --variant='nir' is not one of rgb,rgbir,dual"


def test_benchmark_variants_are_the_registry_models():
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from rf_jax.models import registry  # pylint: disable=g-import-not-at-top
  assert common.VARIANTS == registry.MODEL_NAMES


def test_preload_reaches_both_sides_and_a_missing_library_is_an_error(monkeypatch):
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from benchmarks import orchestrate  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv('LD_PRELOAD', raising=False)
  preloaded = common.create_settings(quick=True, preload='libc.so.6')
  assert [orchestrate._child_env(preloaded, jax_side).get('LD_PRELOAD')
          for jax_side in (True, False)] == ['libc.so.6', 'libc.so.6']
  assert 'LD_PRELOAD' not in orchestrate._child_env(common.create_settings(quick=True), True)
  with pytest.raises(ValueError, match=r"--preload='libno_such_malloc.so' cannot be loaded"):
    common.create_settings(quick=True, preload='libno_such_malloc.so')


_BIAS_ONLY_PROBE = '''
import jax, json
from benchmarks import jax_patches
jax_patches.apply(('batchnorm_bias_only',))
from rf_jax import steps
from rf_jax.models import registry
model = registry.create_model('rgb', num_classes=17)
variables = steps.init_variables(model, jax.random.key(0), 96, 3)
print(json.dumps({'bn1': sorted(variables['params']['bn1']),
                  'bn1_stats': sorted(variables['batch_stats']['bn1'])}))
'''


def test_batchnorm_bias_only_patch_leaves_each_norm_its_bias_alone():
  proc = subprocess.run([sys.executable, '-c', _BIAS_ONLY_PROBE], capture_output=True, text=True,
                        cwd=ROOT, timeout=120, check=True)  # benchmarks/ imports from the root
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {'bn1': ['bias'],
                                                              'bn1_stats': ['unused']}
