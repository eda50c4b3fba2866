"""The split held on device (config.data.cache='device') over 2 fake CPU devices: replicated
on each, every device gathers its rows in the step; the mesh and pmap layouts train and score
as one device fed the same chips from the host (cache 'host'), augmentation included; so does
pmap fed from the host (it refuses a split held on device, which it would copy at every step).

The model is a small conv net with BatchNorm (what the layouts change is the data path; the
ResNet's BatchNorm over the replicas is tests/test_resnet.py's, and a float64 ResNet costs
minutes to compile on a small CPU); its stride-4 4x4 kernels see every pixel, so a different
crop or flip of any example changes the loss. Float64: summing across devices reorders
BatchNorm's sums, and in float32 a few SGD steps from random init amplify that rounding to
~1e-5 in the loss, too close to a real divergence to tell apart; in float64 the reordered sums
differ by ~1e-12.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tiny_configs import xla_flags_with_devices

# Runs in a child process: the device count is fixed when jax starts.
_SCRIPT = textwrap.dedent('''
    import dataclasses, json, sys
    import flax.linen as nn
    import jax, jax.numpy as jnp, optax
    from rf_jax import config_checks, inputs, parallel, predict, steps
    from rf_jax import runner as runner_lib
    sys.path.insert(0, 'tests')
    from tiny_configs import tiny

    jax.config.update('jax_enable_x64', True)
    assert jax.device_count() == 2, jax.devices()
    config = tiny('rgb', *sys.argv[1:3])
    config.dtype = 'float64'  # the model's input dtype (normalised in float32, then cast)
    data = inputs.prepare(config, None)

    class Small(nn.Module):
      axis_name: str | None = None

      @nn.compact
      def __call__(self, x, train):
        f64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
        x = nn.Conv(8, (4, 4), strides=4, **f64)(x)
        x = nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name, **f64)(x)
        return nn.Dense(17, **f64)(nn.relu(x).mean(axis=(1, 2)))

    def run(kind, cache, devices=None, draw_seed=None):
      config.data.cache = cache
      preprocess = inputs.preprocess(config, data)
      if draw_seed is not None:  # other crops and flips of the same chips
        preprocess = dataclasses.replace(preprocess, seed=draw_seed)
      model = Small(parallel.AXIS_NAME if kind == 'pmap' else None)
      variables = steps.init_variables(model, jax.random.key(0), 96, 3)
      state = steps.create_train_state(variables, model, optax.sgd(0.1))
      runner = runner_lib.create_runner(kind, tta='flip', preprocess=preprocess,
                                        devices=devices)
      state = runner.put_state(state)
      loader, losses = inputs.train_loader(config, data), []
      for _ in range(4):
        state, metrics = runner.train_step(state, runner.put_batch(next(loader)))
        losses.append(float(metrics['loss']))
      scores, labels, loss = predict.predict(runner, state,
                                             inputs.eval_batches(config, data, 'validation'))
      return {'losses': losses, 'val_loss': loss, 'scores': scores.tolist(),
              'labels': labels.tolist()}

    def crop_flip_losses(kind, cache, devices=None, draw_seed=None):
      config.data.train_transform = 'crop_flip'
      try:
        return run(kind, cache, devices, draw_seed)['losses']
      finally:
        config.data.train_transform = 'resize_flip'

    def refusals():
      config.data.cache, config.parallel = 'device', 'pmap'
      try:
        inputs.train_loader(config, data)
      except config_checks.ConfigError as e:
        config.parallel = 'jit'
        try:
          runner_lib.create_runner('pmap', tta='none').put_batch(
              next(inputs.train_loader(config, data)))
        except ValueError as f:
          return [str(e), str(f)]

    config.data.cache = 'device'
    held = next(inputs.train_loader(config, data))['cache']['image']
    one = jax.devices()[:1]
    print('RESULT ' + json.dumps({
        'held': [held.sharding.is_fully_replicated, len(held.sharding.device_set),
                 list(held.shape)],
        'refusals': refusals(), 'single': run('jit', 'host', one), 'mesh': run('jit', 'device'),
        'pmap': run('pmap', 'host'),
        'crop_flip': {'single': crop_flip_losses('jit', 'host', one),
                      'mesh': crop_flip_losses('jit', 'device'),
                      'pmap': crop_flip_losses('pmap', 'host'),
                      'other_draws': crop_flip_losses('jit', 'host', one, draw_seed=7)}}))
''')


@pytest.fixture(scope='module')
def results(synthetic_kaggle_dir, tmp_path_factory):
  env = dict(os.environ, XLA_FLAGS=xla_flags_with_devices(2), JAX_PLATFORMS='cpu')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(
      [sys.executable, '-c', _SCRIPT, str(synthetic_kaggle_dir),
       str(tmp_path_factory.mktemp('prepared'))],
      cwd=root, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-4000:]
  line = next(l for l in done.stdout.splitlines() if l.startswith('RESULT '))
  return json.loads(line[len('RESULT '):])


def test_split_is_replicated_on_each_device(results):
  # The 40 training chips of the session's synthetic set, whole, on both devices.
  assert results['held'] == [True, 2, [40, 128, 128, 4]]


def test_pmap_refuses_a_split_held_on_device(results):
  config_error, runner_error = results['refusals']
  assert "config.data.cache='device' needs config.parallel='jit'" in config_error
  assert '--config.parallel=jit or --config.data.cache=host' in config_error
  assert "['cache'] on device" in runner_error


@pytest.mark.parametrize('kind', ['mesh', 'pmap'])
@pytest.mark.parametrize('transform', ['resize_flip', 'crop_flip'])
def test_training_equals_one_device_fed_from_the_host(results, kind, transform):
  runs = results if transform == 'resize_flip' else results['crop_flip']
  single = runs['single'] if transform == 'crop_flip' else runs['single']['losses']
  got = runs[kind] if transform == 'crop_flip' else runs[kind]['losses']
  assert len(set(single)) == 4, 'the loss should change from step to step'
  np.testing.assert_allclose(got, single, rtol=1e-10)


def test_other_draws_change_the_losses(results):
  """The comparison above can fail: other crops and flips of the same chips change every
  loss by far more than its tolerance."""
  runs = results['crop_flip']
  for other, mine in zip(runs['other_draws'], runs['single']):
    assert abs(other - mine) > 1e-6 * abs(mine)


@pytest.mark.parametrize('kind', ['mesh', 'pmap'])
def test_validation_equals_one_device_fed_from_the_host(results, kind):
  single = results['single']
  assert len(single['scores']) == 20  # every validation chip once, padding dropped
  np.testing.assert_array_equal(results[kind]['labels'], single['labels'])
  np.testing.assert_allclose(results[kind]['scores'], single['scores'], rtol=1e-10)
  np.testing.assert_allclose(results[kind]['val_loss'], single['val_loss'], rtol=1e-10)
