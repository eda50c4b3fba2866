"""The three study models (rgb, rgbir, dual) and loading ported weights into them."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

from rf_jax.models import fusion  # pylint: disable=g-import-not-at-top
from rf_jax.models import port  # pylint: disable=g-import-not-at-top

SIZE = 128
HE_VAR = 2.0 / (64 * 7 * 7)  # torchvision's kaiming_normal_(mode='fan_out') for the 7x7x64 stem


def model_config(name, ir_stem_init='he', weights=''):
  cfg = ml_collections.ConfigDict()
  cfg.name = name
  cfg.weights = weights
  cfg.ir_stem_init = ir_stem_init
  return cfg


@pytest.fixture(scope='module')
def pretrained():
  torch.manual_seed(1)
  tmodel = torchvision.models.resnet18()
  with torch.no_grad():
    for m in tmodel.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.1)
    tmodel.train()
    tmodel(torch.randn(4, 3, 96, 96) * 2.0 + 0.5)
  return port.torchvision_to_flax(tmodel.state_dict())


_FRESH = {}


def fresh(name):
  """Fresh init of a study model (cached: init is slow on CPU)."""
  if name not in _FRESH:
    model = fusion.create_model(model_config(name))
    c = len(fusion.input_bands(name))
    _FRESH[name] = model.lazy_init(jax.random.key(321),
                                   jax.ShapeDtypeStruct((1, SIZE, SIZE, c), jnp.float32))
  return _FRESH[name]


@pytest.fixture(scope='module')
def loaded(pretrained):
  """{(name, ir_stem_init): study variables with the pretrained trunk merged in}."""
  out = {}
  for name in fusion.MODEL_NAMES:
    for how in ('he', 'rgb_mean'):
      out[name, how] = port.init_from_pretrained(fresh(name), pretrained, model_config(name, how),
                                                 jax.random.key(7))
  return out


def pooled(name, variables, x):
  model = fusion.create_model(model_config(name))
  _, state = model.apply(variables, x, mutable=['intermediates'])
  return state['intermediates']['pooled'][0]


def is_he(kernel_slice):
  """Mean ~0 and variance 2/fan within 15% (the sample's relative s.e. is ~2.5%)."""
  k = np.asarray(kernel_slice, np.float64).ravel()
  return (abs(k.var() / HE_VAR - 1.0) < 0.15
          and abs(k.mean()) < 4.0 * np.sqrt(HE_VAR / k.size))


def test_input_bands_and_names():
  assert fusion.MODEL_NAMES == ('rgb', 'rgbir', 'dual')
  assert fusion.input_bands('rgb') == (0, 1, 2)
  assert fusion.input_bands('rgbir') == (0, 1, 2, 3)
  assert fusion.input_bands('dual') == (0, 1, 2, 3)


def test_unknown_model_name_is_a_clear_error():
  with pytest.raises(ValueError, match=r"config\.model\.name='rgb_ir'.*rgb, rgbir, dual"):
    fusion.create_model(model_config('rgb_ir'))
  with pytest.raises(ValueError, match=r'config\.model\.name'):
    fusion.input_bands('nir')
  with pytest.raises(ValueError, match=r"ir_stem_init='zeros'.*he, rgb_mean"):
    port.init_from_pretrained({}, {}, model_config('rgbir', 'zeros'), jax.random.key(0))


def test_create_model_accepts_plain_dicts_and_dtype():
  model = fusion.create_model({'name': 'dual'}, num_classes=5, dtype=jnp.bfloat16, axis_name='b')
  assert isinstance(model, fusion.DualResNet)
  assert (model.num_classes, model.dtype, model.axis_name) == (5, jnp.bfloat16, 'b')


@pytest.mark.parametrize('name', fusion.MODEL_NAMES)
def test_head_is_fresh_and_trunk_is_pretrained(name, pretrained, loaded):
  v = loaded[name, 'he']
  np.testing.assert_array_equal(v['params']['fc']['kernel'], fresh(name)['params']['fc']['kernel'])
  assert v['params']['fc']['kernel'].shape == ((1024 if name == 'dual' else 512), 17)
  trunks = ['rgb_trunk', 'ir_trunk'] if name == 'dual' else [None]
  for t in trunks:
    p = v['params'][t] if t else v['params']
    s = v['batch_stats'][t] if t else v['batch_stats']
    np.testing.assert_array_equal(p['layer4_1']['conv2']['kernel'],
                                  pretrained['params']['layer4_1']['conv2']['kernel'])
    np.testing.assert_array_equal(p['bn1']['scale'], pretrained['params']['bn1']['scale'])
    np.testing.assert_array_equal(s['layer2_0']['downsample_1']['var'],
                                  pretrained['batch_stats']['layer2_0']['downsample_1']['var'])
  if name == 'rgb' or name == 'dual':
    rgb_stem = v['params']['rgb_trunk' if name == 'dual' else 'conv1']
    rgb_stem = rgb_stem['conv1']['kernel'] if name == 'dual' else rgb_stem['kernel']
    np.testing.assert_array_equal(rgb_stem, pretrained['params']['conv1']['kernel'])


def test_rgbir_with_zero_nir_gives_the_rgb_models_pooled_features(loaded):
  x = np.random.default_rng(0).standard_normal((2, SIZE, SIZE, 4), dtype=np.float32)
  x[..., 3] = 0.0
  f_rgb = jax.jit(lambda v, x: pooled('rgb', v, x))(loaded['rgb', 'he'], jnp.asarray(x[..., :3]))
  f_rgbir = jax.jit(lambda v, x: pooled('rgbir', v, x))(loaded['rgbir', 'he'], jnp.asarray(x))
  f_rgb, f_rgbir = np.asarray(f_rgb), np.asarray(f_rgbir)
  assert f_rgb.shape == f_rgbir.shape == (2, 512)
  diff = np.abs(f_rgb - f_rgbir).max()
  print(f'\nrgbir (NIR = 0) vs rgb pooled features: max |difference| {diff:.3g}')
  # Exact up to float32 summation order in the 3- vs 4-channel stem convolution.
  np.testing.assert_allclose(f_rgbir, f_rgb, rtol=1e-6, atol=1e-6)
  # and the NIR channel is used: a non-zero NIR band changes the features.
  x[..., 3] = 1.0
  f_nir = jax.jit(lambda v, x: pooled('rgbir', v, x))(loaded['rgbir', 'he'], jnp.asarray(x))
  assert np.abs(np.asarray(f_nir) - f_rgb).max() > 1e-3


def test_rgbir_stem_keeps_rgb_and_he_initialises_nir(pretrained, loaded):
  kernel = np.asarray(loaded['rgbir', 'he']['params']['conv1']['kernel'])
  assert kernel.shape == (7, 7, 4, 64)
  np.testing.assert_array_equal(kernel[:, :, :3], pretrained['params']['conv1']['kernel'])
  nir = kernel[:, :, 3]
  print(f'NIR slice variance {nir.var():.4g}, He 2/fan = 2/3136 = {HE_VAR:.4g}')
  assert is_he(nir)
  # The check cannot pass for a zero, a constant, or a fan_in-scaled (2/49) kernel.
  assert not is_he(np.zeros_like(nir))
  assert not is_he(np.full_like(nir, np.sqrt(HE_VAR)))
  assert not is_he(np.random.default_rng(0).normal(0, np.sqrt(2 / 49), nir.shape))
  # deterministic in the rng, different for another rng
  again = port.init_from_pretrained(fresh('rgbir'), pretrained, model_config('rgbir'),
                                    jax.random.key(7))
  np.testing.assert_array_equal(again['params']['conv1']['kernel'], kernel)
  other = port.init_from_pretrained(fresh('rgbir'), pretrained, model_config('rgbir'),
                                    jax.random.key(8))
  assert not np.array_equal(other['params']['conv1']['kernel'][:, :, 3], nir)


def test_rgb_mean_stem_option(pretrained, loaded):
  rgb = np.asarray(pretrained['params']['conv1']['kernel'])
  k = np.asarray(loaded['rgbir', 'rgb_mean']['params']['conv1']['kernel'])
  np.testing.assert_array_equal(k[:, :, :3], rgb)
  np.testing.assert_allclose(k[:, :, 3], rgb.mean(axis=2), rtol=1e-6, atol=1e-7)
  ir = np.asarray(loaded['dual', 'rgb_mean']['params']['ir_trunk']['conv1']['kernel'])
  assert ir.shape == (7, 7, 1, 64)
  np.testing.assert_allclose(ir[:, :, 0], rgb.mean(axis=2), rtol=1e-6, atol=1e-7)


def test_dual_ir_stem_is_he(loaded):
  ir = np.asarray(loaded['dual', 'he']['params']['ir_trunk']['conv1']['kernel'])
  assert ir.shape == (7, 7, 1, 64)
  assert is_he(ir)


def test_dual_output_shape_and_both_trunks_get_gradients(loaded):
  variables = loaded['dual', 'he']
  model = fusion.create_model(model_config('dual'))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, SIZE, SIZE, 4), dtype=np.float32))
  y = jnp.asarray(rng.integers(0, 2, (2, 17)).astype(np.float32))

  @jax.jit
  def loss_and_grad(params):
    def loss_fn(params):
      logits, state = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                                  train=True, mutable=['batch_stats'])
      loss = jnp.mean(jnp.maximum(logits, 0) - logits * y + jnp.log1p(jnp.exp(-jnp.abs(logits))))
      return loss, (logits, state)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, (logits, state)), grads = loss_and_grad(variables['params'])
  assert logits.shape == (2, 17) and logits.dtype == jnp.float32
  assert np.isfinite(float(loss))
  for trunk in ('rgb_trunk', 'ir_trunk'):
    for name in ('conv1', 'layer4_1'):
      g = jax.tree.leaves(grads[trunk][name])
      norm = np.sqrt(sum(float(jnp.sum(jnp.square(a))) for a in g))
      assert norm > 0 and np.isfinite(norm), (trunk, name)
    assert not np.array_equal(state['batch_stats'][trunk]['bn1']['mean'],
                              variables['batch_stats'][trunk]['bn1']['mean'])
  assert float(jnp.abs(grads['fc']['kernel'][:512]).sum()) > 0  # RGB half of the head
  assert float(jnp.abs(grads['fc']['kernel'][512:]).sum()) > 0  # IR half


def test_dont_load_keeps_fresh_values(pretrained):
  cfg = model_config('rgb')
  v = port.init_from_pretrained(fresh('rgb'), pretrained, cfg, jax.random.key(0),
                                dont_load=[r'(params|batch_stats)/layer4_.*'])
  np.testing.assert_array_equal(v['params']['layer4_1']['conv2']['kernel'],
                                fresh('rgb')['params']['layer4_1']['conv2']['kernel'])
  np.testing.assert_array_equal(v['params']['layer3_1']['conv2']['kernel'],
                                pretrained['params']['layer3_1']['conv2']['kernel'])
  with pytest.raises(port.WeightsMismatchError, match=r"pattern 'layer9.\*' matches no name"):
    port.init_from_pretrained(fresh('rgb'), pretrained, cfg, jax.random.key(0),
                              dont_load=['layer9.*'])


def test_model_mismatch_lists_every_name(pretrained):
  """rgb variables treated as rgbir (3-channel stem) and a ResNet-34 trunk: one listing error."""
  with pytest.raises(port.WeightsMismatchError) as e:
    port.init_from_pretrained(fresh('rgb'), pretrained, model_config('rgbir'), jax.random.key(0))
  assert 'params/conv1/kernel' in str(e.value) and '(7, 7, 3, 64)' in str(e.value)

  r34 = port.torchvision_to_flax(torchvision.models.resnet34().state_dict(), check=False)
  with pytest.raises(port.WeightsMismatchError) as e:
    port.init_from_pretrained(fresh('dual'), r34, model_config('dual'), jax.random.key(0))
  msg = str(e.value)
  for name in ('params/layer1_2/conv1/kernel', 'batch_stats/layer4_2/bn2/var',
               'params/layer3_5/bn2/scale'):
    assert name in msg
  assert msg.count('\n') == (3 + 4 + 6 + 3 - 8) * 10  # one row per array of the 8 extra blocks


def test_load_pretrained_from_scratch_and_from_file(pretrained, tmp_path):
  v = fresh('rgb')
  assert port.load_pretrained(v, model_config('rgb', weights=''), jax.random.key(0)) is v
  path = tmp_path / 'w.msgpack'
  port.save_weights_file(pretrained, path)
  out = port.load_pretrained(v, model_config('rgb', weights=str(path)),
                             jax.random.key(0))
  np.testing.assert_array_equal(out['params']['conv1']['kernel'],
                                pretrained['params']['conv1']['kernel'])
