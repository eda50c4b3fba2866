"""scripts/benchmark.py --quick end to end (tiny sizes; no timing assertions)."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'scripts' / 'benchmark.py'


def test_quick_benchmark_end_to_end(tmp_path):
  pytest.importorskip('torch')
  pytest.importorskip('torchvision')
  out = tmp_path / 'bench.json'
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), '--quick', '--variant', 'rgb', '--size', '96',
       '--batch', '4', '--eval-batch', '4', '--steps', '1', '--eval-steps', '1',
       '--warmup', '0', '--pipeline-chips', '24', '--pipeline-seconds', '0.5',
       '--json', str(out)],
      capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert '| rgb |' in proc.stdout
  report = json.loads(out.read_text())
  assert report['settings']['variant'] == ['rgb']
  assert report['versions']['jax'] and report['versions']['torch']
  row = report['results']['rgb']
  for side in ('rf_jax', 'torch_channels_last'):
    for phase in ('train', 'eval'):
      assert row[side][phase]['images_per_s'] > 0
      assert row[side][phase]['first_call_s'] > 0
    assert row[side]['rss_peak_train_mb'] > 0
  assert row['ratio_train_vs_channels_last'] > 0
  assert row['ratio_eval_vs_channels_last'] > 0
  pipe = report['pipeline']
  assert pipe['batches_per_s'] > 0 and pipe['supply_over_demand'] > 0
  assert pipe['workers'] >= 0
  assert pipe['train_cpu_ms_per_chip'] > 0 and pipe['eval_cpu_ms_per_chip'] > 0
  assert pipe['imread_ms_per_chip'] > 0 and pipe['copy_ms_per_chip'] > 0
  for mode in ('before', 'none', 'host', 'device'):  # host CPU per chip, each cache mode
    assert pipe[mode]['host_ms_per_train_chip'] > 0, mode
    assert pipe[mode]['host_ms_per_eval_chip'] > 0, mode
  assert report['table'].count('\n') >= 2


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
