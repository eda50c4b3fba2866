"""train_and_evaluate end to end on tiny synthetic data: artefacts, exact resume, failures."""

import json
import math
import pathlib
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from rf_jax.configs import rgb
from rf_jax import checkpoints
from rf_jax import config_checks
from rf_jax import parallel
from rf_jax import provenance
from rf_jax import steps
from rf_jax import train
from rf_jax.models import registry
from rf_jax.workdir import Workdir
from tiny_configs import tiny, tiny_weights_file

TIMING_KEYS = ('train_images_per_s', 'epoch_seconds')


@pytest.fixture(scope='module')
def weights_file(tmp_path_factory) -> pathlib.Path:
  """A random-init ResNet-18 of the tiny width, written like the ported ImageNet one."""
  return tiny_weights_file(tmp_path_factory.mktemp('weights') / 'resnet18.msgpack')


@pytest.fixture(scope='module')
def prepared_dir(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp('prepared')


@pytest.fixture(scope='module')
def runs(tmp_path_factory, synthetic_kaggle_dir, prepared_dir, weights_file):
  """One finished run per study model: rgb for two epochs, the others for one."""
  out = {}
  for name, epochs in (('rgb', 2), ('rgbir', 1), ('dual', 1)):
    workdir = tmp_path_factory.mktemp(name)
    config = tiny(name, synthetic_kaggle_dir, prepared_dir, weights_file, epochs)
    config.log_every_steps = 1  # every step's metrics in TensorBoard
    out[name] = (config, workdir, train.train_and_evaluate(config, workdir))
  return out


def _events(workdir: pathlib.Path) -> dict:
  """Scalars of the TensorBoard event files: {tag: [values]} (TFRecord framing)."""
  scalars = {}
  for path in sorted((workdir / 'tensorboard').glob('events.out.tfevents.*')):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append(value.simple_value)
  return scalars


def _history(workdir) -> list:
  return json.loads(Workdir(workdir).history.read_text())['epochs']


@pytest.mark.parametrize('name', ['rgb', 'rgbir', 'dual'])
def test_run_leaves_checkpoints_history_and_events(runs, name):
  config, workdir, state = runs[name]
  history = _history(workdir)
  assert [r['epoch'] for r in history] == list(range(1, config.num_epochs + 1))
  steps_per_epoch = history[0]['step']
  assert steps_per_epoch == 40 // config.batch_size  # 60 chips, 67% for training
  for record in history:
    for key in ('train_loss', 'val_loss', 'val_map', 'lr', *TIMING_KEYS):
      assert math.isfinite(record[key]) and record[key] > 0, (key, record)
    assert len(record['val_ap']) == 17
    assert 0 <= record['val_mean_precision_at_0.5'] <= 1
  assert int(state.step) == history[-1]['step']

  manager = checkpoints.create_manager(Workdir(workdir).checkpoints, read_only=True)
  assert manager.latest_step() == history[-1]['step']
  best = checkpoints.restore_for_evaluation(Workdir(workdir).checkpoints)
  assert best.val_scores.shape == (20, 17)  # the best epoch's validation scores, kept with it
  assert manager.best_step() == history[int(np.argmax([r['val_map'] for r in history]))]['step']

  scalars = _events(workdir)
  for key in ('train_loss', 'val_loss', 'val_map', 'lr'):
    assert np.allclose(scalars[key], [r[key] for r in history], rtol=1e-6), key
  assert all(math.isfinite(v) for values in scalars.values() for v in values)


def test_provenance_records_the_machine(runs):
  """The processor and its vector instruction sets (they choose XLA:CPU's kernels), from
  /proc/cpuinfo, and the devices."""
  _, workdir, _ = runs['rgb']
  recorded = json.loads(Workdir(workdir).provenance.read_text())['invocations'][-1]['machine']
  cpuinfo = pathlib.Path('/proc/cpuinfo').read_text().splitlines()
  if not any(line.startswith('model name') for line in cpuinfo):
    pytest.skip('no x86 /proc/cpuinfo to compare with')
  model = next(l.split(':', 1)[1].strip() for l in cpuinfo if l.startswith('model name'))
  flags = next(l.split(':', 1)[1].split() for l in cpuinfo if l.startswith('flags'))
  assert recorded['processor'] == model
  assert recorded['cpu_flags'] and set(recorded['cpu_flags']) <= set(flags)
  assert recorded['devices'] == f'{jax.local_device_count()} x cpu (cpu)'


def test_history_and_events_hold_the_step_metrics(runs):
  """Every step's loss, gradient norm and parameter norm reach TensorBoard (log_every_steps=1),
  and each epoch's record holds their means over its steps."""
  _, workdir, _ = runs['rgb']
  history, scalars = _history(workdir), _events(workdir)
  per_epoch = history[0]['step']
  for name in ('loss', 'grad_norm', 'param_norm'):
    values = np.asarray(scalars[f'step/{name}'])
    assert len(values) == history[-1]['step'] and np.all(values > 0), name
    means = values.reshape(len(history), per_epoch).mean(axis=1)
    np.testing.assert_allclose([r[f'train_{name}'] for r in history], means, rtol=1e-6)
  assert len(set(scalars['step/param_norm'])) > 1  # the parameters moved


def test_resume_after_an_epoch_is_exact(runs, tmp_path, synthetic_kaggle_dir, prepared_dir,
                                        weights_file):
  _, full_workdir, full_state = runs['rgb']
  config = tiny('rgb', synthetic_kaggle_dir, prepared_dir, weights_file, num_epochs=1)
  train.train_and_evaluate(config, tmp_path)  # stopped after epoch 1 ...
  config.num_epochs = 2
  with pytest.raises(config_checks.ConfigError, match='(?s)config.num_epochs: the run has 1, this '
                     'config has 2.*--allow_config_change=num_epochs'):
    train.train_and_evaluate(config, tmp_path)  # a changed config is refused ...
  resumed_state = train.train_and_evaluate(  # ... unless the change is allowed
      config, tmp_path, allow_config_change=('num_epochs',))

  strip = lambda history: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history]
  assert strip(_history(tmp_path)) == strip(_history(full_workdir))
  changes = json.loads(Workdir(tmp_path).history.read_text())['config_changes']
  assert changes == [{'key': 'num_epochs', 'from': 1, 'to': 2, 'step': 5}]
  for got, want in zip(jax.tree.leaves(jax.device_get(resumed_state)),
                       jax.tree.leaves(jax.device_get(full_state)), strict=True):
    np.testing.assert_array_equal(got, want)


@pytest.fixture
def nan_loss(monkeypatch):
  """The training loss made NaN (and with it every gradient) in the steps built meanwhile."""
  real_loss = steps.sigmoid_bce
  monkeypatch.setattr(steps, 'sigmoid_bce',
                      lambda logits, labels: real_loss(logits, labels) * jnp.nan)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(runs, tmp_path, nan_loss):
  del nan_loss
  config, workdir, _ = runs['rgbir']
  shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
  before = json.loads(Workdir(tmp_path).history.read_text())
  config = config.copy_and_resolve_references()
  config.num_epochs = 2
  with pytest.raises(train.NonFiniteLossError, match=r'last good checkpoint \(step 5\)'):
    train.train_and_evaluate(config, tmp_path, allow_config_change=('num_epochs',))
  manager = checkpoints.create_manager(Workdir(tmp_path).checkpoints, read_only=True)
  assert manager.all_steps() == [5]
  after = json.loads(Workdir(tmp_path).history.read_text())
  assert after['epochs'] == before['epochs']  # nothing recorded after the non-finite loss
  assert after['config_changes'] == [{'key': 'num_epochs', 'from': 1, 'to': 2, 'step': 5}]
  restored = checkpoints.restore_for_evaluation(Workdir(tmp_path).checkpoints)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.state['params']))


def test_restarting_with_another_model_in_the_workdir_is_refused(runs, tmp_path):
  config, workdir, _ = runs['rgbir']
  shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
  config = config.copy_and_resolve_references()
  config.model.name = 'dual'
  config.num_epochs = 2
  with pytest.raises(checkpoints.CheckpointError, match="model 'rgbir'.*config.model.name"):
    train.train_and_evaluate(config, tmp_path)


@pytest.mark.parametrize('key,value,message', [
    ('model.name', 'resnet50', r"config.model.name='resnet50' is not one of "
     + ', '.join(registry.MODEL_NAMES)),
    ('model.ir_stem_init', 'he', r"config.model.ir_stem_init='he' is not one of study, "),
    ('data.train_transform', 'crop', r"config.data.train_transform='crop' is not one of "),
    ('eval.select_by', 'loss', r"config.eval.select_by='loss' is not one of map, "),
    ('optim.lr', -0.1, r'config.optim.lr=-0.1 must be > 0'),
    ('dtype', 'float16', r"config.dtype='float16'"),
    ('data.val_fraction', 1.5, r'config.data.val_fraction=1.5'),
])
def test_bad_config_values_name_the_key(key, value, message):
  config = rgb.get_config()
  section, _, field = key.rpartition('.')
  (config[section] if section else config)[field] = value
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.check(config)


def test_a_key_added_since_the_run_counts_as_its_default():
  """A run saved before config.model.width existed resumes; another width is refused."""
  config = rgb.get_config()
  saved = config.to_dict()
  del saved['model']['width']
  assert config_checks.check_same_run(saved, config, (), 'the run') == {}
  config.model.width = 8
  with pytest.raises(config_checks.ConfigError, match='config.model.width: the run has 64, '
                     'this config has 8'):
    config_checks.check_same_run(saved, config, (), 'the run')


def test_a_saved_config_lacking_later_keys_loads_with_their_defaults(tmp_path):
  """--mode evaluate of a run saved before config.model.width and config.cpu_tuning existed."""
  saved = rgb.get_config().to_dict()
  del saved['model']['width'], saved['cpu_tuning']
  saved['num_epochs'] = 3
  wd = Workdir(tmp_path)
  wd.config.write_text(json.dumps(saved))
  config = provenance.saved_config(wd)
  assert (config.model.width, config.cpu_tuning, config.num_epochs) == (64, True, 3)
  config_checks.check(config)
  with pytest.raises(AttributeError):
    config.no_such_key = 1  # still locked


def test_batch_must_divide_over_devices(monkeypatch):
  monkeypatch.setattr(jax, 'device_count', lambda: 3)
  with pytest.raises(parallel.DeviceCountError, match=r'config.batch_size=16 does not divide'):
    parallel.check_batch_sizes(rgb.get_config())
