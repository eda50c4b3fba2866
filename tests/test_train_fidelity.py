"""rf_jax's train step against PyTorch's, from identical weights on the same batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('torchvision')  # torch_models builds torchvision's ResNet-18

from benchmarks import torch_models  # pylint: disable=g-bad-import-order
from rf_jax import steps
from rf_jax import weights
from rf_jax.configs import default
from rf_jax.models import resnet

BATCH, SIZE, TAGS, LR, MOMENTUM = 8, 96, 17, 0.005, 0.9
DECAY_EPOCHS, DECAY_RATE, STEPS_PER_EPOCH = 10, 0.3, 10


def _torch_state(model) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _flat(tree) -> dict:
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _relative(a, b) -> float:
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _two_steps(dtype):
  """Two SGD steps of each framework from identical weights on the same two batches."""
  torch.manual_seed(0)
  net = torch_models.torch_model('rgb')
  net.train()
  with torch.no_grad():  # non-trivial running statistics, as a pretrained trunk has
    for _ in range(2):
      net(torch.randn(4, 3, SIZE, SIZE) * 2 + 0.5)
  net = net.to(getattr(torch, dtype))
  rng = np.random.default_rng(0)
  batches = [{'image': rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(dtype),
              'labels': (rng.random((BATCH, TAGS)) < 0.3).astype(dtype)} for _ in range(2)]

  variables = weights.torchvision_to_flax(_torch_state(net))
  model = resnet.ResNet18(num_classes=TAGS, dtype=dtype, param_dtype=dtype)
  lr_fn = steps.create_learning_rate_fn(LR, DECAY_EPOCHS, DECAY_RATE, STEPS_PER_EPOCH)
  state = steps.TrainState.create(
      apply_fn=model.apply, params=jax.tree.map(lambda a: jnp.asarray(a, dtype), variables['params']),
      batch_stats=jax.tree.map(lambda a: jnp.asarray(a, dtype), variables['batch_stats']),
      tx=optax.sgd(lr_fn, momentum=MOMENTUM))
  step = jax.jit(steps.train_step)
  flax_states, flax_metrics = [jax.device_get(state)], []
  for batch in batches:
    state, metrics = step(state, batch)
    flax_states.append(jax.device_get(state))
    flax_metrics.append({k: float(v) for k, v in metrics.items()})

  optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
  criterion = torch.nn.BCEWithLogitsLoss()
  torch_states, torch_metrics = [_torch_state(net)], []
  norm = lambda tensors: torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)).item()
  for batch in batches:
    optimizer.zero_grad()
    loss = criterion(net(torch.from_numpy(batch['image']).permute(0, 3, 1, 2)),
                     torch.from_numpy(batch['labels']))
    loss.backward()
    grad_norm = norm(p.grad for p in net.parameters())
    optimizer.step()
    torch_states.append(_torch_state(net))
    torch_metrics.append({'loss': loss.item(), 'grad_norm': grad_norm,
                          'param_norm': norm(net.parameters())})
  return flax_states, flax_metrics, torch_states, torch_metrics


@pytest.fixture(scope='module')
def two_steps():
  return _two_steps('float32')


@pytest.fixture(scope='module')
def two_steps_float64():
  """The same in float64 on both sides: what is left is the implementations' difference."""
  jax.config.update('jax_enable_x64', True)
  try:
    return _two_steps('float64')
  finally:
    jax.config.update('jax_enable_x64', False)


def _torch_update(torch_states, k) -> dict:
  """Step k's torch update (new - old, in the states' precision) in Flax names and layout."""
  old, new = torch_states[k - 1], torch_states[k]
  return _flat(weights.torchvision_to_flax({n: new[n] - old[n] for n in new})['params'])


def _update_errors(flax_update: dict, reference_update: dict) -> dict:
  """Per parameter: |update - reference| / |reference|."""
  assert flax_update.keys() == reference_update.keys()
  assert all(np.linalg.norm(u) > 0 for u in reference_update.values()), 'a parameter did not move'
  return {n: _relative(flax_update[n], reference_update[n]) for n in reference_update}


def _flax_update(flax_states, k) -> dict:
  old, new = _flat(flax_states[k - 1].params), _flat(flax_states[k].params)
  return {n: new[n] - old[n] for n in new}


@pytest.mark.parametrize('k', [0, 1], ids=['first_step', 'second_step_with_momentum'])
def test_float32_step_metrics_are_as_close_to_exact_as_torchs(two_steps, two_steps_float64, k):
  """The loss, the gradient's norm and the updated parameters' norm the step returns, against
  float64 torch: within 1e-5, or no further than twice float32 torch's own error (the second
  step starts from parameters whose float32 rounding the batch's BatchNorm amplifies)."""
  _, flax_metrics, _, torch_metrics = two_steps
  exact = two_steps_float64[3][k]
  assert flax_metrics[k].keys() == torch_metrics[k].keys() == exact.keys()
  for name, want in exact.items():
    allowed = max(1e-5 * abs(want), 2 * abs(torch_metrics[k][name] - want))
    assert abs(flax_metrics[k][name] - want) <= allowed, (name, flax_metrics[k][name],
                                                          torch_metrics[k][name], want)


@pytest.mark.parametrize('k', [1, 2], ids=['first_step', 'second_step_with_momentum'])
def test_every_parameter_update_equals_torch_in_float64(two_steps_float64, k):
  """The update rule itself: with rounding out of the way the two agree far below 1e-3."""
  flax_states, flax_metrics, torch_states, torch_metrics = two_steps_float64
  # Step 2 starts from step 1's update, off by optax's float32 learning rate (2e-8).
  for name, want in torch_metrics[k - 1].items():
    assert flax_metrics[k - 1][name] == pytest.approx(want, rel=1e-12 if k == 1 else 1e-9), name
  errors = _update_errors(_flax_update(flax_states, k), _torch_update(torch_states, k))
  worst = max(errors, key=errors.get)
  assert errors[worst] < 1e-6, (worst, errors[worst])


@pytest.mark.parametrize('k', [1, 2], ids=['first_step', 'second_step_with_momentum'])
def test_float32_updates_are_as_close_to_exact_as_torchs(two_steps, two_steps_float64, k):
  """In float32 both frameworks round; rf_jax must be as close to the float64 truth as torch.

  A BatchNorm's scale and bias gradients are small differences of large sums (the next
  BatchNorm undoes shifts), so torch's own float32 update is off the float64 one by up to
  ~1% for a randomly initialised net: a fixed 1e-3 between two float32 runs would measure
  rounding, not fidelity. The float64 test above bounds the implementation difference.
  """
  truth = _torch_update(two_steps_float64[2], k)
  flax_errors = _update_errors(_flax_update(two_steps[0], k), truth)
  torch_errors = _update_errors(_torch_update(two_steps[2], k), truth)
  for name in truth:
    assert flax_errors[name] < max(2 * torch_errors[name], 1e-3), (
        name, flax_errors[name], torch_errors[name])


@pytest.mark.parametrize('precision,k,rtol', [
    ('float32', 1, 1e-4),
    ('float64', 1, 1e-9),
    ('float64', 2, 1e-9),
])
def test_running_statistics_equal_torch(two_steps, two_steps_float64, precision, k, rtol):
  flax_states, _, torch_states, _ = two_steps if precision == 'float32' else two_steps_float64
  flax_old, flax_new = _flat(flax_states[k - 1].batch_stats), _flat(flax_states[k].batch_stats)
  # Names mapped by hand, not through the port, which rounds to float32.
  torch_old, torch_new = ({n: torch_states[i][weights.flax_name_to_torch(['batch_stats', *n.split('/')])]
                           for n in flax_new} for i in (k - 1, k))
  means = [n for n in torch_new if n.endswith('mean')]
  variances = [n for n in torch_new if n.endswith('var')]
  assert len(means) == len(variances) == 20
  for name in means:
    np.testing.assert_allclose(flax_new[name], torch_new[name], rtol=rtol, atol=rtol / 10,
                               err_msg=name)
  for name in variances:
    # new = 0.9 old + 0.1 v; Flax's v is the biased batch variance, torch's the unbiased
    # one, v * n / (n - 1), with n the values per channel: batch x height x width.
    batch_variance = (flax_new[name] - 0.9 * flax_old[name]) / 0.1
    n = BATCH * _feature_area(name)
    expected_torch = 0.9 * torch_old[name] + 0.1 * batch_variance * n / (n - 1)
    np.testing.assert_allclose(expected_torch, torch_new[name], rtol=rtol, err_msg=name)
    if n < 1000:  # ...where the correction is large enough to see, it is needed
      assert not np.allclose(flax_new[name], torch_new[name], rtol=rtol, atol=0), name


def _feature_area(name: str) -> int:
  """Height x width of the map a BatchNorm normalises, for a SIZE x SIZE input."""
  side = SIZE // 2  # stem conv, stride 2
  if not name.startswith('bn1'):
    layer = int(name[len('layer')])  # layerK_i/...
    side = SIZE // 4 // 2 ** (layer - 1)  # after the max-pool, then stride 2 per stage
  return side * side


def test_learning_rate_of_every_epoch_equals_step_lr():
  config = default.get_config()
  lr_fn = steps.create_learning_rate_fn(config.optim.lr, config.optim.decay_epochs,
                                        config.optim.decay_rate, STEPS_PER_EPOCH)
  optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.optim.lr)
  scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.optim.decay_epochs,
                                              gamma=config.optim.decay_rate)
  for epoch in range(config.num_epochs):
    expected = optimizer.param_groups[0]['lr']
    for step in (epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH - 1):
      assert float(lr_fn(step)) == pytest.approx(expected, rel=1e-6), (epoch, step)
    optimizer.step()
    scheduler.step()
