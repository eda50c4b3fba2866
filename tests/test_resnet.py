"""The Flax ResNet-18 against torchvision's, with weights ported by rf_jax/weights.

A random-init torchvision ResNet-18 (no download) with non-trivial BatchNorm affine parameters and
running statistics is ported, then logits and every stage's features are compared, with the
network's plain lax ops and with the CPU-tuned ones (models/registry.tuned_ops).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

from rf_jax import weights  # pylint: disable=g-import-not-at-top
from rf_jax.models import registry  # pylint: disable=g-import-not-at-top
from rf_jax.models import resnet  # pylint: disable=g-import-not-at-top
from rf_jax.models.resnet import ResNet18  # pylint: disable=g-import-not-at-top
from torch_reference import make_torch_resnet18  # pylint: disable=g-import-not-at-top

TOL = 1e-4


def torch_stages(model, x):
  """torchvision forward, returning every stage's output (NHWC numpy) and the logits."""
  with torch.no_grad():
    out = {}
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out['stem'] = h
    for i in range(1, 5):
      h = getattr(model, f'layer{i}')(h)
      out[f'layer{i}'] = h
    h = torch.flatten(model.avgpool(h), 1)
    out['pooled'] = h
    logits = model.fc(h)
  nhwc = {k: (v.permute(0, 2, 3, 1) if v.ndim == 4 else v).numpy() for k, v in out.items()}
  return nhwc, logits.numpy()


@pytest.fixture(scope='module')
def tmodel():
  return make_torch_resnet18()


@pytest.fixture(scope='module')
def variables(tmodel):
  return weights.torchvision_to_flax(tmodel.state_dict())


# The network's convolution and max-pool: its plain lax defaults (every backend), or the CPU
# tuning's (the same as plain where the backend is not CPU).
OPS = {'lax': {}, 'cpu_tuned': registry.tuned_ops(True)}


@pytest.fixture(scope='module', params=sorted(OPS))
def ops(request):
  return OPS[request.param]


@pytest.fixture(scope='module')
def flax_eval(ops):
  model = ResNet18(num_classes=1000, **ops)

  @jax.jit
  def apply(variables, x):
    logits, state = model.apply(variables, x, train=False, mutable=['intermediates'])
    return logits, {k: v[0] for k, v in state['intermediates'].items()}

  return apply


@pytest.fixture(scope='module')
def compared(tmodel, variables, flax_eval):
  """{size: (flax logits, flax stages, torch logits, torch stages)} for 224 and 256 inputs."""
  results = {}
  for size in (224, 256):
    x = np.random.default_rng(size).standard_normal((2, 3, size, size), dtype=np.float32)
    t_stages, t_logits = torch_stages(tmodel, torch.from_numpy(x))
    f_logits, f_stages = flax_eval(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    results[size] = (np.asarray(f_logits), jax.tree.map(np.asarray, f_stages), t_logits, t_stages)
  return results


@pytest.mark.parametrize('size', [224, 256])
def test_eval_logits_match_torchvision(compared, size):
  f_logits, _, t_logits, _ = compared[size]
  assert f_logits.shape == t_logits.shape == (2, 1000)
  diff = np.abs(f_logits - t_logits).max()
  print(f'\n{size}x{size}: max |logit difference| Flax vs torchvision = {diff:.3g} '
        f'(max |logit| {np.abs(t_logits).max():.3g})')
  assert diff < TOL
  assert np.abs(t_logits).max() > 0.1  # the comparison is not between near-zero outputs


@pytest.mark.parametrize('size', [224, 256])
def test_every_stage_matches(compared, size):
  _, f_stages, _, t_stages = compared[size]
  assert set(f_stages) == set(t_stages)
  for name, t in t_stages.items():
    f = f_stages[name]
    assert f.shape == t.shape, name
    diff = np.abs(f - t).max()
    print(f'{size} {name}: {f.shape} max |difference| {diff:.3g}')
    assert diff < TOL, name  # absolute, every stage


def test_parameter_count_equals_torchvision(tmodel):
  shapes = jax.eval_shape(lambda: ResNet18(num_classes=1000).init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  n_params = sum(x.size for x in jax.tree.leaves(shapes['params']))
  assert n_params == sum(p.numel() for p in tmodel.parameters()) == 11_689_512
  n_stats = sum(x.size for x in jax.tree.leaves(shapes['batch_stats']))
  assert n_stats == sum(b.numel() for n, b in tmodel.named_buffers() if 'running' in n)


def test_no_conv_bias_and_torch_names(variables):
  flat = jax.tree_util.tree_flatten_with_path(variables['params'])[0]
  names = {'/'.join(k.key for k in path) for path, _ in flat}
  assert not any('conv' in n and n.endswith('bias') for n in names)
  assert {'conv1/kernel', 'bn1/scale', 'layer1_0/conv1/kernel', 'layer2_0/downsample_0/kernel',
          'layer2_0/downsample_1/scale', 'fc/kernel', 'fc/bias'} <= names


def test_train_mode_matches_torch_and_updates_stats(tmodel, variables, ops):
  """train=True normalises with batch statistics like torch and moves the running mean the same way.

  (torch keeps the unbiased running variance, Flax the biased one: variances are compared after
  that correction.)
  """
  x = np.random.default_rng(1).standard_normal((2, 3, 128, 128), dtype=np.float32)
  model = ResNet18(num_classes=1000, **ops)
  logits, new_state = jax.jit(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
          variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  tcopy = make_torch_resnet18()
  tcopy.train()
  with torch.no_grad():
    t_logits = tcopy(torch.from_numpy(x)).numpy()
  assert np.abs(np.asarray(logits) - t_logits).max() < TOL * 10
  old = variables['batch_stats']['layer4_1']['bn2']
  new = new_state['batch_stats']['layer4_1']['bn2']
  t_bn = tcopy.layer4[1].bn2
  np.testing.assert_allclose(new['mean'], t_bn.running_mean.numpy(), atol=1e-5)
  n = 2 * 4 * 4  # elements per channel at layer4 for a 128 px batch of 2
  batch_var_biased = (np.asarray(new['var']) - 0.9 * old['var']) / 0.1
  t_batch_var_unbiased = (t_bn.running_var.numpy() - 0.9 * old['var']) / 0.1
  np.testing.assert_allclose(batch_var_biased * n / (n - 1), t_batch_var_unbiased,
                             rtol=1e-3, atol=1e-4)


def test_batchnorm_axis_name_gives_global_batch_statistics(variables):
  """With axis_name, BN statistics are taken over all replicas (vmap stands in for pmap)."""
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 128, 128, 3), dtype=np.float32))
  single = ResNet18(num_classes=1000)
  _, s1 = jax.jit(lambda v, x: single.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, x)
  synced = ResNet18(num_classes=1000, axis_name='batch')
  _, s2 = jax.jit(jax.vmap(
      lambda x: synced.apply(variables, x[None], train=True, mutable=['batch_stats']),
      axis_name='batch'))(x)
  a = s1['batch_stats']['layer3_0']['bn1']['mean']
  b = s2['batch_stats']['layer3_0']['bn1']['mean']
  np.testing.assert_allclose(b[0], a, atol=1e-5)
  np.testing.assert_allclose(b[1], a, atol=1e-5)


def test_torchvision_initialisers():
  # A quarter-width ResNet-18 (same code path, 16x fewer random numbers: CPU init is slow).
  v = jax.jit(lambda k: ResNet18(num_classes=1000, num_filters=16).init(
      k, jnp.zeros((1, 96, 96, 3))))(jax.random.key(0))
  p = v['params']
  k = np.asarray(p['layer3_0']['conv2']['kernel'])  # 3x3x64x64: fan_out 9 * 64
  np.testing.assert_allclose(k.std(), np.sqrt(2.0 / (9 * 64)), rtol=0.03)
  assert abs(k.mean()) < 4 * k.std() / np.sqrt(k.size)
  stem = np.asarray(p['conv1']['kernel'])  # 7x7x3x16: fan_out 49 * 16, as torchvision
  np.testing.assert_allclose(stem.std(), np.sqrt(2.0 / (49 * 16)), rtol=0.1)
  np.testing.assert_array_equal(p['layer3_0']['bn2']['scale'], 1.0)
  np.testing.assert_array_equal(p['layer3_0']['bn2']['bias'], 0.0)
  np.testing.assert_array_equal(v['batch_stats']['bn1']['var'], 1.0)
  bound = 1.0 / np.sqrt(128)  # fan_in of the quarter-width head
  for leaf in (p['fc']['kernel'], p['fc']['bias']):
    leaf = np.asarray(leaf)
    assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.9 * bound


def test_features_without_head_and_bfloat16(variables):
  x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 128, 128, 3), dtype=np.float32))
  trunk = {'params': {k: v for k, v in variables['params'].items() if k != 'fc'},
           'batch_stats': variables['batch_stats']}
  feats = jax.jit(ResNet18(num_classes=None).apply)(trunk, x)
  assert feats.shape == (1, 512)
  logits32 = np.asarray(jax.jit(ResNet18(num_classes=1000).apply)(variables, x))
  logits16, state = jax.jit(lambda v, x: ResNet18(num_classes=1000, dtype=jnp.bfloat16).apply(
      v, x, mutable=['intermediates']))(variables, x)
  assert logits16.dtype == jnp.float32  # loss-ready whatever the compute dtype
  assert {v[0].dtype for v in state['intermediates'].values()} == {jnp.dtype(jnp.bfloat16)}
  # bf16 (8-bit mantissa) moves the logits by ~0.6% of their range here, float32 round-off by
  # ~1e-6: the bounds fail both for a network that ignores the dtype and for a broken one.
  diff, scale = np.abs(np.asarray(logits16) - logits32).max(), np.abs(logits32).max()
  print(f'\nbfloat16 vs float32 logits: max |difference| {diff:.3g} (max |logit| {scale:.3g})')
  assert 1e-4 * scale < diff < 0.03 * scale


@pytest.mark.parametrize('max_pool', [resnet.max_pool_3x3_stride2,
                                      resnet.max_pool_3x3_stride2_taps])
@pytest.mark.parametrize('size', [(9, 9), (12, 7)])
def test_max_pool_values_and_gradient_routing_equal_torch(size, max_pool):
  """Including ties: ReLU zeros, and equal positive values inside one window."""
  rng = np.random.default_rng(0)
  x = np.maximum(rng.standard_normal((2, *size, 3)), 0).astype(np.float32)
  x[0, 1:3, 1:3, 0] = 1.5  # four equal maxima shared by overlapping windows
  upstream = rng.standard_normal((2, (size[0] - 1) // 2 + 1, (size[1] - 1) // 2 + 1, 3))
  upstream = upstream.astype(np.float32)

  xt = torch.from_numpy(x).permute(0, 3, 1, 2).clone().requires_grad_()
  yt = torch.nn.functional.max_pool2d(xt, 3, stride=2, padding=1)
  yt.backward(torch.from_numpy(upstream).permute(0, 3, 1, 2))
  y, vjp = jax.vjp(max_pool, jnp.asarray(x))
  (grad,) = vjp(jnp.asarray(upstream))

  np.testing.assert_array_equal(np.asarray(y), yt.detach().permute(0, 2, 3, 1).numpy())
  np.testing.assert_array_equal(np.asarray(grad), xt.grad.permute(0, 2, 3, 1).numpy())
