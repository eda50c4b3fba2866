"""Test-time augmentation (config.eval.tta): the scores are the mean probabilities over the
views, each view scored as a plain evaluation of that transformed input (numpy's rot90 and flip),
on the model's input and on chips as stored; an old run's eval.flips is read as eval.tta."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rf_jax import augment
from rf_jax import config_checks
from rf_jax import provenance
from rf_jax import steps
from rf_jax import workdir as workdir_lib
from rf_jax.configs import default
from rf_jax.models import registry
from tiny_configs import TINY

SIZE = TINY['data.eval_size']  # 96 px: XLA:CPU is pathologically slow at 33-64 px


def _numpy_views(images: np.ndarray, tta: str) -> list[np.ndarray]:
  """The views of [B, H, W, C] images, made independently of steps.tta_views."""
  if tta == 'flip':
    return [images, np.flip(images, axis=2)]
  return [np.rot90(x, k, axes=(1, 2)) for x in (images, np.flip(images, axis=2)) for k in range(4)]


@pytest.fixture(scope='module')
def dual():
  """The tiny dual model (RGB and IR trunks), freshly initialised, as an eval-only state."""
  model = registry.create_model('dual', num_classes=17, width=TINY['model.width'])
  variables = steps.init_variables(model, jax.random.key(0), SIZE, 4)
  return steps.eval_state(variables, model, step=0)


EVAL_STEP = jax.jit(steps.eval_step, static_argnames='tta')
LABELS = (np.random.default_rng(1).random((3, 17)) < 0.4).astype(np.float32)


def _reference(state, images: np.ndarray, tta: str) -> tuple[np.ndarray, np.ndarray]:
  """Per view: the plain eval step's probabilities; their mean, and its loss (float64)."""
  per_view = np.stack([np.asarray(EVAL_STEP(state, {'image': jnp.asarray(view.copy()),
                                                    'labels': LABELS}, tta='none')['scores'],
                                  np.float64) for view in _numpy_views(images, tta)])
  p = per_view.mean(axis=0)
  loss = -(LABELS * np.log(p) + (1 - LABELS) * np.log1p(-p)).mean(axis=-1)
  # The views must score differently, or the mean would equal any one of them.
  assert np.abs(per_view - per_view[0]).max() > 1e-4
  return p, loss


def test_the_views_are_the_squares_symmetries():
  images = np.random.default_rng(0).random((1, 4, 4, 1)).astype(np.float32)
  views = np.asarray(steps.tta_views(jnp.asarray(images), 'dihedral8'))
  assert views.shape == (8, 1, 4, 4, 1)
  assert len({v.tobytes() for v in views}) == 8  # all 8 distinct: the whole dihedral group
  assert {v.tobytes() for v in views} == {v.tobytes() for v in _numpy_views(images, 'dihedral8')}
  np.testing.assert_array_equal(steps.tta_views(jnp.asarray(images), 'none'), images[None])


@pytest.mark.parametrize('tta', ['flip', 'dihedral8'])
def test_scores_are_the_mean_over_the_views_of_the_model_input(dual, tta):
  images = np.random.default_rng(0).standard_normal((3, SIZE, SIZE, 4)).astype(np.float32)
  want, want_loss = _reference(dual, images, tta)
  out = EVAL_STEP(dual, {'image': jnp.asarray(images), 'labels': LABELS}, tta=tta)
  np.testing.assert_allclose(out['scores'], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out['loss'], want_loss, rtol=1e-4)


def test_views_of_chips_as_stored_are_those_of_the_model_input(dual):
  """uint16 chips, 128 px resized to 96 and normalised on the device: the views are made
  after that, so they are those of the model's input."""
  chips = np.random.default_rng(2).integers(0, 2 ** 14, (3, 128, 128, 4), dtype=np.uint16)
  preprocess = augment.Preprocess(bands=(0, 1, 2, 3), mean=(5000.0, 6000.0, 7000.0, 8000.0),
                                  inv_std=(1 / 4000,) * 4, train_transform='resize_flip',
                                  crop_size=SIZE, eval_size=SIZE, seed=0)
  model_input = np.asarray(augment.eval_input(preprocess, jnp.asarray(chips)))
  want, want_loss = _reference(dual, model_input, 'dihedral8')
  out = jax.jit(steps.preprocessed_eval_step, static_argnames=('preprocess', 'tta'))(
      dual, {'image': jnp.asarray(chips), 'labels': LABELS}, preprocess=preprocess,
      tta='dihedral8')
  np.testing.assert_allclose(out['scores'], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out['loss'], want_loss, rtol=1e-4)
  np.testing.assert_array_equal(out['labels'], LABELS)


def test_an_unknown_tta_is_refused_naming_the_key():
  config = default.get_config()
  config.data.synthetic.num_chips = 8
  config.eval.tta = 'dihedral'
  with pytest.raises(config_checks.ConfigError, match=r"config\.eval\.tta='dihedral' is not one "
                     r'of none, flip, dihedral8'):
    config_checks.check(config)


@pytest.mark.parametrize('flips, tta', [(True, 'flip'), (False, 'none')])
def test_an_old_runs_eval_flips_is_read_as_eval_tta(flips, tta):
  saved = default.get_config().to_dict()
  del saved['eval']['tta']
  saved['eval']['flips'] = flips
  config = config_checks.with_defaults(saved)
  assert config['eval']['tta'] == tta and 'flips' not in config['eval']
  assert config_checks.changed_keys(saved, default.get_config()) == {}


def test_an_old_runs_config_json_evaluates_with_its_flips(tmp_path):
  """--mode evaluate without --config reads config.json: an old one holds eval.flips."""
  saved = default.get_config()
  saved.data.synthetic.num_chips = 8
  saved = saved.to_dict()
  del saved['eval']['tta']
  saved['eval']['flips'] = True
  wd = workdir_lib.Workdir(tmp_path)
  workdir_lib.write_json(wd.config, saved)
  config = provenance.saved_config(wd)
  config_checks.check(config)
  assert config.eval.tta == 'flip' and 'flips' not in config.eval
