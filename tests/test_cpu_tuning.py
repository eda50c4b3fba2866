"""The CPU tuning (config.cpu_tuning): the XLA:CPU flags only where JAX's backend will be the
CPU (rf_jax/xla_cpu.py), the model's tuned convolution and max-pool only where it is
(models/registry.tuned_ops); everywhere else plain lax, which forward-mode AD goes through."""

import functools
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
from jax import lax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest

from rf_jax import steps
from rf_jax import xla_cpu
from rf_jax.models import conv
from rf_jax.models import registry
from rf_jax.models import resnet

WIDTH, SIZE = 8, 96  # tests/tiny_configs.py's network
ROOT = pathlib.Path(__file__).resolve().parents[1]


# --- the XLA:CPU flags --------------------------------------------------------------------


@pytest.mark.parametrize('platforms,plugins,cpu', [
    ('cpu', ('jax_plugins.xla_cuda12',), True),  # asked for: the plugin stays unused
    ('cpu,cuda', (), True),
    ('cuda', (), False),
    ('cuda,cpu', (), False),
    ('tpu', (), False),
    (None, (), True),  # nothing that could give an accelerator
    ('', (), True),
    (None, ('jax_plugins.xla_cuda12',), False),  # JAX takes the GPU wherever it finds one
    (None, ('libtpu',), False),
])
def test_flags_are_for_a_cpu_backend_only(platforms, plugins, cpu):
  assert xla_cpu.backend_is_cpu(platforms, plugins) == cpu


def test_an_installed_plugin_is_found_without_importing_it(tmp_path, monkeypatch):
  plugin = tmp_path / 'jax_plugins' / 'fake_accelerator'
  plugin.mkdir(parents=True)
  (plugin / '__init__.py').write_text('raise ImportError("imported")\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  assert 'jax_plugins.fake_accelerator' in xla_cpu.accelerator_plugins()


_FLAGS_PROBE = '''
import json, os
import rf_jax, rf_jax.models.registry, rf_jax.runner, rf_jax.steps
imported = os.environ.get('XLA_FLAGS')
import jax
from rf_jax import xla_cpu
out = {'after_import': imported}
for platforms in ('cuda', 'cuda,cpu', 'cpu'):
  jax.config.update('jax_platforms', platforms)  # read when a backend is made: none is here
  os.environ['XLA_FLAGS'] = ''
  xla_cpu.set_default_flags()
  out[platforms] = os.environ['XLA_FLAGS']
print(json.dumps(out))
'''


def test_import_sets_no_flag_and_set_default_flags_only_for_the_cpu():
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  proc = subprocess.run([sys.executable, '-c', _FLAGS_PROBE], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['after_import'] is None
  assert out['cuda'] == out['cuda,cpu'] == ''
  assert out['cpu'] == xla_cpu.default_flags(jaxlib.version.__version__, '')


# --- the model ----------------------------------------------------------------------------


def _ops(model) -> tuple:
  return model.conv_general_dilated, model.max_pool


PLAIN = (lax.conv_general_dilated, resnet.max_pool_3x3_stride2)
TUNED = (conv.conv_general_dilated, resnet.max_pool_3x3_stride2_taps)


@pytest.mark.parametrize('name', registry.MODEL_NAMES)
def test_the_model_is_tuned_only_on_a_cpu_backend_with_the_key_on(name, monkeypatch):
  assert _ops(registry.create_model(name, num_classes=17, cpu_tuning=False)) == PLAIN
  on_cpu = registry.create_model(name, num_classes=17, cpu_tuning=True)
  assert _ops(on_cpu) == (TUNED if jax.default_backend() == 'cpu' else PLAIN)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert _ops(registry.create_model(name, num_classes=17, cpu_tuning=True)) == PLAIN
  # The network defaults, what the registry leaves alone, are the plain ones.
  assert _ops(resnet.ResNet18()) == PLAIN


def _model_and_variables(name, cpu_tuning):
  """The study model `name` (tiny) and variables of it drawn at random: nothing is initialised
  (the init's compile would cost more than the test), and training's forward pass, the one
  differentiated here, normalises with the batch's statistics, not the running ones."""
  model = registry.create_model(name, num_classes=17, width=WIDTH, cpu_tuning=cpu_tuning)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, SIZE, SIZE, len(registry.input_bands(name)))))
  rng = np.random.default_rng(1)
  return model, jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
                             shapes)


@pytest.mark.parametrize('name', registry.MODEL_NAMES)
def test_forward_mode_ad_through_each_study_model_without_cpu_tuning(name):
  model, variables = _model_and_variables(name, cpu_tuning=False)
  rng = np.random.default_rng(0)
  shape = (2, SIZE, SIZE, len(registry.input_bands(name)))
  x, tangent = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
  cotangent = jnp.asarray(rng.standard_normal((2, 17)), jnp.float32)

  def logits(x):  # training's forward: batch statistics
    return model.apply(variables, x, train=True, mutable=['batch_stats'])[0]

  @jax.jit
  def both(x, tangent, cotangent):
    _, forward = jax.jvp(logits, (x,), (tangent,))
    (backward,) = jax.vjp(logits, x)[1](cotangent)
    return forward, backward

  forward, backward = both(x, tangent, cotangent)
  assert np.abs(np.asarray(forward)).max() > 0
  # <u, J t> two ways: forward mode, and the reverse-mode gradient dotted with the tangent.
  np.testing.assert_allclose(float(jnp.vdot(cotangent, forward)),
                             float(jnp.vdot(backward, tangent)), rtol=1e-3)


@pytest.mark.parametrize('cpu_tuning', [False, True])
def test_train_step_is_plain_lax_unless_tuned_on_cpu(cpu_tuning):
  """Untuned (as on any other backend): the forward pass has no custom_vjp, and the lowered
  step lax's ops: the max-pool a reduce-window with its select-and-scatter gradient, the head's
  three products (forward, two gradients) the only ones. Tuned on CPU: the custom_vjp, one
  identity product per convolution (its kernel gradient's relayout), the max-pool in slices."""
  if cpu_tuning and jax.default_backend() != 'cpu':
    pytest.skip('the CPU tuning applies on a CPU backend only')
  model, variables = _model_and_variables('rgb', cpu_tuning)
  forward = str(jax.make_jaxpr(
      lambda x: model.apply(variables, x, train=True, mutable=['batch_stats']))(
          jnp.zeros((8, SIZE, SIZE, 3))))
  state = steps.create_train_state(variables, model, steps.create_optimizer(0.005, 0.9))
  batch = {'image': jnp.zeros((8, SIZE, SIZE, 3)), 'labels': jnp.zeros((8, 17))}
  ops = re.findall(r'stablehlo\.(\w+)', jax.jit(steps.train_step).lower(state, batch).as_text())
  counts = {op: ops.count(op) for op in ('dot_general', 'reduce_window', 'select_and_scatter',
                                         'convolution', 'custom_call')}
  convolutions = 20  # ResNet-18's; each appears 3 times in the step (forward, two gradients)
  assert counts['convolution'] == 3 * convolutions - 1  # the stem's input gets no gradient
  assert counts['custom_call'] == 0
  if cpu_tuning:
    assert 'custom_vjp_call' in forward
    assert counts['dot_general'] == 3 + convolutions
    assert counts['reduce_window'] == counts['select_and_scatter'] == 0
  else:
    assert 'custom_vjp' not in forward
    assert counts['dot_general'] == 3
    assert counts['reduce_window'] == counts['select_and_scatter'] == 1


def test_the_tuned_convolution_is_why_forward_mode_needs_the_key_off():
  if jax.default_backend() != 'cpu':
    pytest.skip('the CPU tuning applies on a CPU backend only')
  model, variables = _model_and_variables('rgb', cpu_tuning=True)
  with pytest.raises(TypeError, match='custom_vjp'):
    jax.jvp(lambda x: model.apply(variables, x), (jnp.zeros((1, SIZE, SIZE, 3)),),
            (jnp.ones((1, SIZE, SIZE, 3)),))
