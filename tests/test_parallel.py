"""The mesh and pmap layouts equal one device on the same global batch (2 fake CPU devices).

Run in float64: summing across devices reorders BatchNorm's sums, and in float32 three SGD
steps from random init amplify that rounding to ~1e-5 in the loss and ~1% in BatchNorm
updates (tests/test_train_fidelity.py), too close to a real divergence to tell apart. In
float64 the same reordering is ~1e-10, so the tolerances below are ~1e-8.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

# Runs in a child process: the device count is fixed when jax starts.
_SCRIPT = textwrap.dedent('''
    import functools, json
    import jax, jax.numpy as jnp, numpy as np
    from rf_jax.configs import default
    from rf_jax import parallel, steps, train
    from rf_jax.models import registry

    jax.config.update('jax_enable_x64', True)
    config = default.get_config()
    config.model.weights = ''
    config.batch_size = 8
    config.data.crop_size = 96
    rng = np.random.default_rng(0)
    batches = [{'image': rng.normal(size=(8, 96, 96, 3)),
                'labels': (rng.random((8, 17)) < 0.3).astype(np.float64)} for _ in range(3)]
    lr_fn = steps.create_learning_rate_fn(0.005, 10, 0.3, steps_per_epoch=10)

    def run(kind, devices=None):
      model = registry.create_model('rgb', num_classes=17, dtype=jnp.float64,
                                    axis_name=parallel.AXIS_NAME if kind == 'pmap' else None)
      state = train.create_train_state(config, model, lr_fn, jax.random.key(0))
      runner = parallel.create_runner(kind, steps.train_step, steps.eval_step, devices)
      state = runner.put_state(state)
      losses = []
      for batch in batches:
        state, loss = runner.train_step(state, runner.put_batch(batch))
        losses.append(float(loss))
      scores = runner.get_outputs(runner.eval_step(state, runner.put_batch(batches[0])))['scores']
      final = jax.device_get(runner.get_state(state))
      leaves = jax.tree.leaves({'params': final.params, 'batch_stats': final.batch_stats})
      return {'losses': losses, 'scores': np.asarray(scores).tolist(),
              'leaves': [np.asarray(x).ravel()[:64].tolist() for x in leaves]}

    assert jax.device_count() == 2, jax.devices()
    print('RESULT ' + json.dumps({'single': run('jit', jax.devices()[:1]),
                                  'mesh': run('jit'), 'pmap': run('pmap')}))
''')


@pytest.fixture(scope='module')
def results():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, '-c', _SCRIPT], cwd=root, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  line = next(l for l in done.stdout.splitlines() if l.startswith('RESULT '))
  return json.loads(line[len('RESULT '):])


@pytest.mark.parametrize('kind', ['mesh', 'pmap'])
def test_loss_curve_equals_single_device(results, kind):
  single = results['single']['losses']
  assert len(set(single)) == 3, 'the loss should change from step to step'
  np.testing.assert_allclose(results[kind]['losses'], single, rtol=1e-8)  # seen 1.2e-10


@pytest.mark.parametrize('kind', ['mesh', 'pmap'])
def test_parameters_and_statistics_equal_single_device(results, kind):
  # Three steps at lr 0.005 move a parameter by ~1e-3; the largest difference seen is 3.7e-9.
  for got, want in zip(results[kind]['leaves'], results['single']['leaves'], strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('kind', ['mesh', 'pmap'])
def test_eval_scores_equal_single_device(results, kind):
  np.testing.assert_allclose(results[kind]['scores'], results['single']['scores'], rtol=1e-8)
