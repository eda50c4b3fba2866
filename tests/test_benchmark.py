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


def _chips_job_settings(**fields):
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  return common.create_settings(quick=True, **fields)


def test_fed_timing_keeps_two_batches_in_flight_and_times_each_step_once():
  """common.timed_fed: IN_FLIGHT batches are put before their step is dispatched, step i-1 is
  waited for only after step i is dispatched and the next batch put (asynchronous), every timed
  step gets one time and one host input time, the share is their ratio; a synchronous step's
  time is its own (not the next one's)."""
  import time  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  for synchronous in (False, True):
    events, puts = [], iter(range(100))

    def put(batch):
      events.append(('put', batch))
      return next(puts)

    def dispatch(placed):
      events.append(('step', placed))
      if synchronous:
        time.sleep(0.01)
      return placed

    def wait(handle):
      events.append(('wait', handle))

    warmup, steps = 1, 3
    out = common.timed_fed(dispatch, wait, put, ['a', 'b', 'c'], warmup, steps, synchronous)
    assert len(out['step_s']) == len(out['host_input_s']) == steps
    assert out['median_s'] == statistics.median(out['step_s'])
    assert out['host_input_share'] == pytest.approx(sum(out['host_input_s']) / sum(out['step_s']))
    assert out['in_flight'] == common.IN_FLIGHT == 2
    # The host batches cycle; placed batch k is the k-th put.
    assert [e[1] for e in events if e[0] == 'put'] == list('abcabcab')[:2 + 1 + warmup + steps]
    steps_at = [i for i, e in enumerate(events) if e[0] == 'step']
    for k, at in enumerate(steps_at):
      assert events[at][1] == k  # in order
      placed = [e[1] for e in events[:at] if e[0] == 'put']
      assert len(placed) - k == common.IN_FLIGHT  # k used, two more already on their way
      if k:  # the first call blocks alone; then step k-1 is waited for after step k's put
        waits = [e[1] for e in events[:at] if e[0] == 'wait']
        assert waits == list(range(k - 1 if k > 1 else 1)), (k, waits)
    for at, (kind, handle) in enumerate(events):
      if kind == 'wait' and 0 < handle and handle + 1 < len(steps_at):
        assert events[at - 1][0] == 'put' and events[at - 2] == ('step', handle + 1)
    if synchronous:
      assert min(out['step_s']) >= 0.01


def test_torch_chips_input_is_rf_jax_input():
  """torch_child's in-step input (chips feed) equals rf_jax's (augment.eval_input /
  train_input with the benchmark's Preprocess): the same bands, resize and normalisation, each
  training example mirrored or not; the study figures the projection takes."""
  torch = pytest.importorskip('torch')
  import numpy as np  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from benchmarks import jax_child  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_child  # pylint: disable=g-import-not-at-top
  from rf_jax import augment  # pylint: disable=g-import-not-at-top
  from rf_jax.models import registry  # pylint: disable=g-import-not-at-top
  from rf_jax.data import planet  # pylint: disable=g-import-not-at-top
  train, val = planet.split(range(40_479))  # the Kaggle training chips, split as the study
  assert (common.STUDY_EPOCHS, common.STUDY_TRAIN_CHIPS, common.STUDY_VAL_CHIPS) == (
      common.study_config().num_epochs, len(train), len(val))
  settings = _chips_job_settings(size=24)
  assert common.input_size(settings) == 21  # 224 / 256 of the chips' side
  chips = common.random_chips(1, 4, 24)[0]['image']
  assert chips.dtype == np.uint16 and chips.shape == (4, 24, 24, 4)
  assert chips.ctypes.data % 64 == 0
  for variant in common.VARIANTS:
    assert common.BANDS[variant] == registry.input_bands(variant)
    p = jax_child.preprocess(variant, settings, 'float32')
    make = torch_child.input_maker(variant, settings, torch.device('cpu'), 'channels_last')
    expected = np.asarray(augment.eval_input(p, chips))
    for train in (False, True):
      got = make(torch.from_numpy(chips), train).permute(0, 2, 3, 1).numpy()
      assert got.shape == expected.shape == (4, 21, 21, len(common.BANDS[variant]))
      for example, image in enumerate(got):
        candidates = (expected[example], expected[example][:, ::-1]) if train else (
            expected[example],)
        assert min(np.abs(image - c).max() for c in candidates) < 1e-4, (variant, train)


def test_chips_feed_end_to_end_on_cpu(tmp_path):
  """--feed chips on the CPU, both frameworks: uint16 chips placed two batches ahead, the input
  made in the step (224/256 of the chips' side), float32 unless asked; the host input time of
  every timed step and its share of the step reported, and the 35-epoch projection printed."""
  pytest.importorskip('torch')
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from benchmarks import summary  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'chips.json'
  batch, eval_batch, steps, eval_steps = 2, 3, 2, 1
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), '--quick', '--feed', 'chips', '--variant', 'rgb', '--size',
       '64', '--batch', str(batch), '--eval-batch', str(eval_batch), '--steps', str(steps),
       '--eval-steps', str(eval_steps), '--warmup', '0', '--pipeline-seconds', '0', '--json',
       str(out)], capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads(out.read_text())
  row = report['results']['rgb']
  for side in ('rf_jax', 'torch_channels_last'):
    (run,) = report['runs'][f'rgb/{side}']
    assert (run['feed'], run['dtype'], run['input_size']) == ('chips', 'float32', 56), side
    assert 'compile_error' not in run and not run.get('compiled')
    for phase, size, count in (('train', batch, steps), ('eval', eval_batch, eval_steps)):
      timed, figures = run[phase], row[side][phase]
      assert len(timed['step_s']) == len(timed['host_input_s']) == count, (side, phase)
      assert timed['in_flight'] == 2
      assert timed['host_input_share'] == pytest.approx(
          sum(timed['host_input_s']) / sum(timed['step_s']))
      assert figures['images_per_s'] == pytest.approx(size / statistics.median(timed['step_s']))
      assert figures['step_ms'] == pytest.approx(statistics.median(timed['step_s']) * 1e3)
      assert figures['host_input_ms'] == pytest.approx(
          statistics.median(timed['host_input_s']) * 1e3)
      assert figures['host_input_share'] == pytest.approx(timed['host_input_share'])
    minutes = row[side]['study_min']
    assert minutes == pytest.approx(summary.study_minutes(
        row[side]['train']['images_per_s'], row[side]['eval']['images_per_s']))
    assert minutes * 60 == pytest.approx(
        35 * 27120 / row[side]['train']['images_per_s']
        + 35 * 13359 / row[side]['eval']['images_per_s'])
    label = summary.side_label(side, common.create_settings(quick=True))
    train = row[side]['train']
    assert (f'| rgb | {label} | cpu | chips | float32 | {train["images_per_s"]:.1f} | '
            f'{train["step_ms"]:.1f} | {train["host_input_ms"]:.2f} | '
            f'{train["host_input_share"] * 100:.1f}% |' in proc.stdout), side
  assert report['targets']['on_accelerator'] is False
  assert 'Projected 35-epoch study = 35 x 27,120 training chips' in proc.stdout
  assert 'apply to a GPU run only' in proc.stdout


def _fake_gpu_run(module, settings, variant, layout=None, compiled=False):
  """What a child reports on a GPU (chips feed, bfloat16), with made-up step times: rf_jax 10 ms
  a step at batch 16 and 100 ms at 256, PyTorch eager 1.5x as long, compiled 1.2x; every eval
  step 5 ms; torch.compile fails for dual."""
  jax_side = module == 'jax_child'
  result = {'rss_peak_train_mb': 100.0, 'rss_peak_mb': 110.0, 'rss_after_imports_mb': 50.0,
            'device': 'cuda:0' if jax_side else 'cuda', 'device_kind': 'NVIDIA H200',
            'feed': 'chips', 'dtype': 'bfloat16', 'input_size': 224, 'compiled': compiled,
            'process_s': 1.0, 'load_after': None}
  if jax_side:
    result['backend'] = 'gpu'
  if compiled and variant == 'dual':
    return {**result, 'compile_error': 'BackendCompilerFailed: no triton'}
  step = (0.01 if settings.batch == 16 else 0.1) * (1 if jax_side else 1.2 if compiled else 1.5)
  for phase, s, n in (('train', step, settings.steps), ('eval', 0.005, settings.eval_steps)):
    times, host = [s] * n, [s / 100] * n
    result[phase] = {'first_call_s': 1.0, 'step_s': times, 'median_s': s, 'host_input_s': host,
                     'host_input_share': 0.01, 'in_flight': 2}
  return result


def test_gpu_report_batch_sizes_compiled_side_and_targets(monkeypatch):
  """The GPU paths of the parent, on the children's reports as a GPU gives them: each of
  --batch-sizes measured in turn; the torch.compile side added once PyTorch found CUDA and
  dropped after it failed (the reason in the table); the projection and the three targets,
  met or not, from the figures."""
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from benchmarks import orchestrate  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(orchestrate, 'spawn', _fake_gpu_run)
  with pytest.raises(ValueError, match='not both'):
    common.create_settings(quick=True, batch=8, batch_sizes=['16'])
  with pytest.raises(ValueError, match='give integers'):
    common.create_settings(quick=True, batch_sizes=['16', 'x'])
  settings = common.create_settings(quick=True, variant=['rgb', 'dual'],
                                    batch_sizes=['16', '256'], rounds=2, pipeline_seconds=0)
  assert (settings.batch, common.batch_sizes(settings)) == (16, (16, 256))
  report = orchestrate.benchmark(settings)
  assert set(report['by_batch']) == {'16', '256'}
  assert report['results'] == report['by_batch']['16']['results']
  expected = ['r1 rgb rf_jax', 'r1 rgb torch_channels_last', 'r1 rgb torch_compiled',
              'r1 dual rf_jax', 'r1 dual torch_channels_last', 'r1 dual torch_compiled',
              'r2 rgb rf_jax', 'r2 rgb torch_channels_last',
              'r2 dual rf_jax', 'r2 dual torch_channels_last']
  for batch, jax_step, dual_met in ((16, 0.01, False), (256, 0.1, True)):
    part = report['by_batch'][str(batch)]
    assert part['order'] == expected, batch
    rgb, dual = part['results']['rgb'], part['results']['dual']
    assert rgb['rf_jax']['train']['images_per_s'] == pytest.approx(batch / jax_step)
    assert rgb['ratio_train_vs_best'] == pytest.approx(1.5)
    assert rgb['ratio_train_vs_compiled'] == pytest.approx(1.2)
    assert rgb['torch_compiled']['train']['steps_timed'] == settings.steps  # round 1 only
    assert dual['torch_compiled']['compile_error'] == 'BackendCompilerFailed: no triton'
    assert dual['torch_compiled']['train'] is None
    assert rgb['rf_jax']['train']['host_input_share'] == pytest.approx(0.01)
    minutes = (35 * 27120 / (batch / jax_step) + 35 * 13359 / (settings.eval_batch / 0.005)) / 60
    targets = part['targets']
    assert targets['on_accelerator'] and targets['device'] == 'NVIDIA H200'
    assert targets['dual_study_min'] == pytest.approx(minutes)
    assert (targets['train_ratio_met'], targets['host_input_met'],
            targets['dual_study_met']) == (True, True, dual_met)
    table = part['table']
    assert '| dual | torch CL compiled | NVIDIA H200 | chips | bfloat16 | torch.compile failed: ' \
        'BackendCompilerFailed: no triton |' in table
    assert (f'| rgb | rf_jax | NVIDIA H200 | chips | bfloat16 | {batch / jax_step:.1f} | '
            f'{jax_step * 1e3:.1f} | {jax_step * 10:.2f} | 1.0% |') in table
    assert (f'GPU targets (NVIDIA H200): rf_jax / PyTorch train >= 1.2x: rgb 1.50x, dual 1.50x '
            f'(met); rf_jax host input <= 5% of the step: at most 1.0%') in table
    assert f'dual study < 10 min: {minutes:.1f} min ({"met" if dual_met else "NOT met"}).' \
        in table
    assert f'**Train batch {batch}**\n\n{table}' in report['table']
  runs, order = orchestrate.run_rounds(common.create_settings(
      quick=True, variant=['rgb'], torch_compile='no'))
  assert order == ['r1 rgb rf_jax', 'r1 rgb torch_channels_last'] and len(runs) == 2
