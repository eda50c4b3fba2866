"""The three study models (rgb, rgbir, dual), their registry, and loading ported weights into them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
stats = pytest.importorskip('scipy.stats')

from rf_jax import steps  # pylint: disable=g-import-not-at-top
from rf_jax import weights  # pylint: disable=g-import-not-at-top
from rf_jax.models import fusion  # pylint: disable=g-import-not-at-top
from rf_jax.models import registry  # pylint: disable=g-import-not-at-top
from rf_jax.models import resnet  # pylint: disable=g-import-not-at-top
from torch_reference import make_torch_resnet18  # pylint: disable=g-import-not-at-top

SIZE = 96  # a 3x3 last stage (XLA:CPU is slow on the 2x2 one of 33-64 px inputs)
# How the study's code drew each model's new stem (DESIGN.md, section 1), and where that stem is.
STUDY_INIT = {'rgbir': 'he_fan_in', 'dual': 'torch_conv_default'}
DRAWN = ('he_fan_in', 'he_fan_out', 'torch_conv_default')


@pytest.fixture(scope='module')
def pretrained():
  return weights.torchvision_to_flax(make_torch_resnet18(seed=1).state_dict())


_FRESH = {}


def create(name):
  return registry.create_model(name, num_classes=17)


def fresh(name):
  """Fresh init of a study model, as training makes it (cached: init is slow on CPU)."""
  if name not in _FRESH:
    _FRESH[name] = steps.init_variables(create(name), jax.random.key(321), SIZE,
                                        len(registry.input_bands(name)))
  return _FRESH[name]


def merged(name, pretrained, how='study', seed=7, dont_load=()):
  return weights.merge_pretrained(fresh(name), pretrained, model=name, ir_stem_init=how,
                                  dont_load=dont_load, rng=jax.random.key(seed))


@pytest.fixture(scope='module')
def loaded(pretrained):
  """{(name, ir_stem_init): study variables with the pretrained trunk merged in}."""
  return {(name, how): merged(name, pretrained, how)
          for name in registry.MODEL_NAMES for how in registry.IR_STEM_INITS}


def new_slice(name, variables):
  """The new stem input channels: rgbir's NIR slice, dual's whole 1-channel IR stem."""
  if name == 'rgbir':
    return np.asarray(variables['params']['conv1']['kernel'])[:, :, 3:]
  return np.asarray(variables['params']['ir_trunk']['conv1']['kernel'])


def pooled(name, variables, x):
  _, state = create(name).apply(variables, x, mutable=['intermediates'])
  return state['intermediates']['pooled'][0]


# --- the registry ----------------------------------------------------------------------------


def test_registry_names_bands_and_stem_rules():
  assert registry.MODEL_NAMES == ('rgb', 'rgbir', 'dual')
  assert registry.input_bands('rgb') == (0, 1, 2)
  assert registry.input_bands('rgbir') == (0, 1, 2, 3)
  assert registry.input_bands('dual') == (0, 1, 2, 3)
  assert registry.IR_STEM_INITS == ('study', 'he_fan_in', 'he_fan_out', 'torch_conv_default',
                                    'rgb_mean')
  models = registry.STUDY_MODELS
  assert [models[n].trunks for n in registry.MODEL_NAMES] == [((),), ((),),
                                                               (('rgb_trunk',), ('ir_trunk',))]
  assert models['rgb'].new_stems == {}
  assert models['rgbir'].new_stems == {(): registry.NewStem(True, STUDY_INIT['rgbir'])}
  assert models['dual'].new_stems == {('ir_trunk',): registry.NewStem(False, STUDY_INIT['dual'])}


def resnet18_trunk_modules():
  """conv1, bn1, layer1_0, ..., layer4_1: what a torchvision ResNet-18 trunk holds."""
  return [p[1] for p in weights.resnet18_shapes() if p[0] == 'params' and p[1] != 'fc']


@pytest.mark.parametrize('name', registry.MODEL_NAMES)
def test_factory_matches_the_declared_bands_and_trunks(name):
  """Each declared trunk prefix holds a whole ResNet-18 trunk taking the declared bands."""
  params = fresh(name)['params']
  stem_channels = 0
  for prefix in registry.STUDY_MODELS[name].trunks:
    trunk = params[prefix[0]] if prefix else params
    assert set(resnet18_trunk_modules()) <= set(trunk)
    stem_channels += trunk['conv1']['kernel'].shape[2]
  assert stem_channels == len(registry.input_bands(name))
  assert params['fc']['kernel'].shape == ((1024 if name == 'dual' else 512), 17)


def test_unknown_names_are_clear_errors(pretrained):
  with pytest.raises(ValueError, match=r"config\.model\.name='rgb_ir'.*rgb, rgbir, dual"):
    registry.create_model('rgb_ir', num_classes=17)
  with pytest.raises(ValueError, match=r'config\.model\.name'):
    registry.input_bands('nir')
  with pytest.raises(ValueError, match=r"config\.model\.ir_stem_init='zeros' is not one of "
                     r'study, he_fan_in, he_fan_out, torch_conv_default, rgb_mean'):
    weights.merge_pretrained({}, {}, model='rgbir', ir_stem_init='zeros', dont_load=(),
                             rng=jax.random.key(0))
  with pytest.raises(ValueError, match=r"config\.model\.dont_load='layer4.\*' is one string"):
    merged('rgb', pretrained, dont_load='layer4.*')


def test_create_model_takes_classes_dtype_and_axis_name():
  model = registry.create_model('dual', num_classes=5, dtype=jnp.bfloat16, axis_name='b')
  assert isinstance(model, fusion.DualResNet)
  assert (model.num_classes, model.dtype, model.axis_name) == (5, jnp.bfloat16, 'b')
  model = registry.create_model('rgbir', num_classes=17)
  assert isinstance(model, resnet.ResNet) and model.num_classes == 17


# --- the pretrained trunk, the fresh head ----------------------------------------------------


@pytest.mark.parametrize('name', registry.MODEL_NAMES)
def test_head_is_fresh_and_trunk_is_pretrained(name, pretrained, loaded):
  v = loaded[name, 'study']
  np.testing.assert_array_equal(v['params']['fc']['kernel'], fresh(name)['params']['fc']['kernel'])
  np.testing.assert_array_equal(v['params']['fc']['bias'], fresh(name)['params']['fc']['bias'])
  trunks = ['rgb_trunk', 'ir_trunk'] if name == 'dual' else [None]
  for t in trunks:
    p = v['params'][t] if t else v['params']
    s = v['batch_stats'][t] if t else v['batch_stats']
    np.testing.assert_array_equal(p['layer4_1']['conv2']['kernel'],
                                  pretrained['params']['layer4_1']['conv2']['kernel'])
    np.testing.assert_array_equal(p['bn1']['scale'], pretrained['params']['bn1']['scale'])
    np.testing.assert_array_equal(s['layer2_0']['downsample_1']['var'],
                                  pretrained['batch_stats']['layer2_0']['downsample_1']['var'])
  if name in ('rgb', 'dual'):
    rgb_stem = v['params']['rgb_trunk']['conv1'] if name == 'dual' else v['params']['conv1']
    np.testing.assert_array_equal(rgb_stem['kernel'], pretrained['params']['conv1']['kernel'])


def test_rgbir_with_zero_nir_gives_the_rgb_models_pooled_features(loaded):
  x = np.random.default_rng(0).standard_normal((2, SIZE, SIZE, 4), dtype=np.float32)
  x[..., 3] = 0.0
  f_rgb = jax.jit(lambda v, x: pooled('rgb', v, x))(loaded['rgb', 'study'],
                                                    jnp.asarray(x[..., :3]))
  f_rgbir = jax.jit(lambda v, x: pooled('rgbir', v, x))(loaded['rgbir', 'study'], jnp.asarray(x))
  f_rgb, f_rgbir = np.asarray(f_rgb), np.asarray(f_rgbir)
  assert f_rgb.shape == f_rgbir.shape == (2, 512)
  diff = np.abs(f_rgb - f_rgbir).max()
  print(f'\nrgbir (NIR = 0) vs rgb pooled features: max |difference| {diff:.3g}')
  # Exact up to float32 summation order in the 3- vs 4-channel stem convolution.
  np.testing.assert_allclose(f_rgbir, f_rgb, rtol=1e-6, atol=1e-6)
  # and the NIR channel is used: a non-zero NIR band changes the features.
  x[..., 3] = 1.0
  f_nir = jax.jit(lambda v, x: pooled('rgbir', v, x))(loaded['rgbir', 'study'], jnp.asarray(x))
  assert np.abs(np.asarray(f_nir) - f_rgb).max() > 1e-3


# --- the new stem input channels -------------------------------------------------------------

DRAWS = 8
# Each initialisation is compared on DRAWS x 3136 values (a 64 x 1 x 7 x 7 slice per draw) with
# as many drawn by torch.nn.init. One sample's std has a relative standard error of
# 1/sqrt(2 N) = 0.45% for a normal (0.28% for a uniform), so the ratio of the two stds has one of
# at most 0.63%: STD_TOL = 3% is ~5 standard errors (a chance failure ~1e-6), while the
# initialisations it must tell apart differ by 40% (he_fan_in with gain 1 instead of sqrt 2) or
# more. The shape of the distribution is checked by a two-sample Kolmogorov-Smirnov test (at this
# N a normal and a uniform of the same std differ by D ~ 0.05, the test's 1e-4 level by ~0.02).
STD_TOL = 0.03
KS_P = 1e-4


def torch_drawn(how, n_new, draws=DRAWS, seed=0):
  """The values torch draws for `draws` [64, n_new, 7, 7] stem slices, flattened."""
  torch.manual_seed(seed)

  def one():
    t = torch.empty(64, n_new, 7, 7)
    if how == 'he_fan_in':  # kaiming_normal_'s defaults: fan_in, leaky_relu(0) -> gain sqrt 2
      return torch.nn.init.kaiming_normal_(t)
    if how == 'he_fan_out':  # torchvision's own convs
      return torch.nn.init.kaiming_normal_(t, mode='fan_out', nonlinearity='relu')
    assert how == 'torch_conv_default'
    return torch.nn.Conv2d(n_new, 64, 7).weight.detach()  # a fresh conv's own init

  return np.concatenate([one().numpy().ravel() for _ in range(draws)])


def uniform_bound(how, n_new):
  """torch_conv_default's U(-b, b): b = 1/sqrt(fan_in), fan_in = n_new * 49 (None: not uniform)."""
  return 1.0 / np.sqrt(n_new * 49) if how == 'torch_conv_default' else None


def same_distribution(sample, reference, bound=None):
  """Same std (STD_TOL), mean ~0, same shape (KS) and, for a uniform, the same bound."""
  sample, reference = np.ravel(sample).astype(np.float64), np.ravel(reference).astype(np.float64)
  ratio = sample.std() / reference.std()
  ks = stats.ks_2samp(sample, reference).pvalue
  print(f'std {sample.std():.4g} vs torch {reference.std():.4g} (ratio {ratio:.4f}), '
        f'mean {sample.mean():.2g}, KS p {ks:.3g}, max |value| {np.abs(sample).max():.4g}')
  ok = (abs(ratio - 1.0) < STD_TOL and ks > KS_P
        and abs(sample.mean()) < 4.0 * reference.std() / np.sqrt(sample.size))
  if bound is not None:  # inside the bound, and reaching it (25k draws come within 1%)
    assert np.abs(reference).max() <= bound, 'torch draws beyond the bound: wrong fan_in'
    ok = ok and bound * 0.99 < np.abs(sample).max() <= bound
  return ok


def test_the_distribution_check_tells_the_initialisations_apart():
  rng = np.random.default_rng(0)
  he_in, conv = torch_drawn('he_fan_in', 1), torch_drawn('torch_conv_default', 1)
  he_std, conv_bound = np.sqrt(2 / 49), uniform_bound('torch_conv_default', 1)
  # The same distribution drawn again passes...
  assert same_distribution(torch_drawn('he_fan_in', 1, seed=1), he_in)
  assert same_distribution(torch_drawn('torch_conv_default', 1, seed=1), conv, conv_bound)
  # ...a wrong fan, a wrong gain, the wrong family with the right std, or zeros do not.
  assert not same_distribution(torch_drawn('he_fan_out', 1, seed=1), he_in)
  assert not same_distribution(rng.normal(0, 1 / 7, he_in.size), he_in)
  assert not same_distribution(rng.uniform(-np.sqrt(3) * he_std, np.sqrt(3) * he_std,
                                           he_in.size), he_in)
  assert not same_distribution(rng.normal(0, conv.std(), conv.size), conv, conv_bound)
  assert not same_distribution(rng.uniform(-1 / 14, 1 / 14, conv.size), conv, conv_bound)
  assert not same_distribution(np.zeros_like(he_in), he_in)


@pytest.mark.parametrize('name', sorted(STUDY_INIT))
@pytest.mark.parametrize('how', DRAWN + ('study',))
def test_new_stem_is_drawn_as_torch_draws_it(name, how, pretrained):
  named = STUDY_INIT[name] if how == 'study' else how
  sample = [new_slice(name, merged(name, pretrained, how, seed)) for seed in range(DRAWS)]
  assert sample[0].shape == (7, 7, 1, 64)
  assert same_distribution(np.stack(sample), torch_drawn(named, 1), uniform_bound(named, 1))


@pytest.mark.parametrize('name', sorted(STUDY_INIT))
def test_study_init_is_what_the_study_code_did(name, loaded):
  np.testing.assert_array_equal(new_slice(name, loaded[name, 'study']),
                                new_slice(name, loaded[name, STUDY_INIT[name]]))


@pytest.mark.parametrize('how', registry.IR_STEM_INITS)
def test_pretrained_rgb_stem_slices_are_untouched(how, pretrained, loaded):
  rgb = np.asarray(pretrained['params']['conv1']['kernel'])
  rgbir = np.asarray(loaded['rgbir', how]['params']['conv1']['kernel'])
  assert rgbir.shape == (7, 7, 4, 64)
  np.testing.assert_array_equal(rgbir[:, :, :3], rgb)
  dual = loaded['dual', how]['params']
  np.testing.assert_array_equal(dual['rgb_trunk']['conv1']['kernel'], rgb)
  assert dual['ir_trunk']['conv1']['kernel'].shape == (7, 7, 1, 64)


@pytest.mark.parametrize('how', DRAWN)
def test_new_stem_slice_fans_for_two_new_channels(how, pretrained):
  """fan_in grows with the new channels (n * 49), fan_out does not (64 * 49)."""
  kernel = np.asarray(pretrained['params']['conv1']['kernel'])
  draws = [weights.new_stem_slice(jax.random.key(seed), kernel, 2, how)
           for seed in range(DRAWS // 2)]
  assert draws[0].shape == (7, 7, 2, 64) and draws[0].dtype == np.float32
  assert same_distribution(np.stack(draws), torch_drawn(how, 2, DRAWS // 2),
                           uniform_bound(how, 2))
  # widen_stem keeps R, G, B in front of the new channels; 'study' is the rule's own init.
  rule = registry.NewStem(keep_rgb=True, study_init=how)
  wide = weights.widen_stem(jax.random.key(0), kernel, 5, rule, 'study')
  np.testing.assert_array_equal(wide[:, :, :3], kernel)
  np.testing.assert_array_equal(wide[:, :, 3:], draws[0])


def test_new_stem_depends_on_the_rng_only(pretrained, loaded):
  nir = new_slice('rgbir', loaded['rgbir', 'study'])
  np.testing.assert_array_equal(new_slice('rgbir', merged('rgbir', pretrained, seed=7)), nir)
  assert not np.array_equal(new_slice('rgbir', merged('rgbir', pretrained, seed=8)), nir)


def test_rgb_mean_stem_option(pretrained, loaded):
  rgb = np.asarray(pretrained['params']['conv1']['kernel'])
  k = np.asarray(loaded['rgbir', 'rgb_mean']['params']['conv1']['kernel'])
  np.testing.assert_allclose(k[:, :, 3], rgb.mean(axis=2), rtol=1e-6, atol=1e-7)
  ir = np.asarray(loaded['dual', 'rgb_mean']['params']['ir_trunk']['conv1']['kernel'])
  np.testing.assert_allclose(ir[:, :, 0], rgb.mean(axis=2), rtol=1e-6, atol=1e-7)


# --- training the dual model, errors, the entry point ----------------------------------------


def test_dual_output_shape_and_both_trunks_get_gradients(loaded):
  variables = loaded['dual', 'study']
  model = create('dual')
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
  v = merged('rgb', pretrained, dont_load=[r'(params|batch_stats)/layer4_.*'])
  np.testing.assert_array_equal(v['params']['layer4_1']['conv2']['kernel'],
                                fresh('rgb')['params']['layer4_1']['conv2']['kernel'])
  np.testing.assert_array_equal(v['params']['layer3_1']['conv2']['kernel'],
                                pretrained['params']['layer3_1']['conv2']['kernel'])
  v = merged('dual', pretrained, dont_load=['params/ir_trunk/conv1/kernel'])
  np.testing.assert_array_equal(v['params']['ir_trunk']['conv1']['kernel'],
                                fresh('dual')['params']['ir_trunk']['conv1']['kernel'])
  with pytest.raises(weights.WeightsMismatchError, match=r"pattern 'layer9.\*' matches no name"):
    merged('rgb', pretrained, dont_load=['layer9.*'])


def test_model_mismatch_lists_every_name(pretrained):
  """rgb variables treated as rgbir (3-channel stem) and a ResNet-34 trunk: one listing error."""
  with pytest.raises(weights.WeightsMismatchError) as e:
    weights.merge_pretrained(fresh('rgb'), pretrained, model='rgbir', ir_stem_init='study',
                             dont_load=['layer9.*'], rng=jax.random.key(0))
  msg = str(e.value)
  assert 'params/conv1/kernel' in msg and '(7, 7, 3, 64)' in msg
  assert "pattern 'layer9.*' matches no name" in msg and '2 mismatch(es)' in msg

  r34 = weights.torchvision_to_flax(torchvision.models.resnet34().state_dict(), check=False)
  with pytest.raises(weights.WeightsMismatchError) as e:
    merged('dual', r34)
  msg = str(e.value)
  for name in ('params/layer1_2/conv1/kernel', 'batch_stats/layer4_2/bn2/var',
               'params/layer3_5/bn2/scale'):
    assert name in msg
  assert msg.count('\n') == (3 + 4 + 6 + 3 - 8) * 10  # one row per array of the 8 extra blocks


def test_load_pretrained_from_scratch_and_from_file(pretrained, tmp_path):
  v = fresh('rgb')
  load = lambda path: weights.load_pretrained(v, model='rgb', path=path, ir_stem_init='study',
                                              dont_load=(), rng=jax.random.key(0))
  assert load('') is v
  path = tmp_path / 'w.msgpack'
  weights.save_weights_file(pretrained, path)
  out = load(str(path))
  np.testing.assert_array_equal(out['params']['conv1']['kernel'],
                                pretrained['params']['conv1']['kernel'])
  with pytest.raises(FileNotFoundError, match='config.model.weights'):
    load(str(tmp_path / 'nope.msgpack'))
