"""XLA:CPU default flags (rf_jax/xla_cpu.py) and a torch-free training process."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest

from rf_jax import xla_cpu

FLAG = '--xla_cpu_experimental_ynn_fusion_type='
SCHEDULER = '--xla_cpu_enable_concurrency_optimized_scheduler=false'


def test_flags_added_for_measured_jaxlib_and_kept_with_users_flags():
  flags = xla_cpu.default_flags('0.10.2', '--xla_force_host_platform_device_count=2')
  assert flags.split() == ['--xla_force_host_platform_device_count=2',
                           FLAG + '-individual_convolution', SCHEDULER]
  assert xla_cpu.default_flags('0.10.7.dev20270101', '').split() == [
      FLAG + '-individual_convolution', SCHEDULER]


def test_users_own_setting_of_a_flag_wins():
  mine = FLAG + '+individual_convolution'
  assert xla_cpu.default_flags('0.10.2', mine).split() == [mine, SCHEDULER]


@pytest.mark.parametrize('version', ['0.9.2', '0.10.1', '0.11.0', '1.0.0'])
def test_unmeasured_jaxlib_gets_no_flag(version):
  # XLA aborts on flags it does not know, so nothing is added outside the measured range.
  assert xla_cpu.default_flags(version, '') == ''


def _on_cpu(*shape) -> jax.Array:
  return jax.device_put(np.zeros(shape, np.float32), jax.devices('cpu')[0])


# The flags' effects on what XLA:CPU compiles in this process, not XLA_FLAGS' text: flags set
# after JAX created its backend, or not at all, fail these.


def test_convolutions_leave_ynnpack_in_this_process():
  if FLAG not in xla_cpu.default_flags(jaxlib.version.__version__, ''):
    pytest.skip('flag not applied to this jaxlib')
  x = _on_cpu(4, 32, 32, 64)
  w = _on_cpu(3, 3, 64, 64)
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  hlo = conv.lower(x, w).compile().as_text()
  assert 'convolution(' in hlo
  assert '__ynn_fusion' not in hlo


def _temp_bytes(branches: int) -> int:
  """Temporary memory of `branches` independent matrix products, each summed to a scalar:
  scheduled one after another they need one product's buffers, side by side all of them."""

  def f(x):
    return sum((jnp.sin(x * (i + 1.0)) @ jnp.cos(x.T * (i + 2.0))).sum() for i in range(branches))

  return jax.jit(f).lower(_on_cpu(512, 512)).compile().memory_analysis().temp_size_in_bytes


def test_independent_ops_are_not_scheduled_side_by_side_in_this_process():
  # The concurrency-optimised scheduler gives 4 products 4x one product's temporaries.
  if SCHEDULER not in xla_cpu.default_flags(jaxlib.version.__version__, ''):
    pytest.skip('flag not applied to this jaxlib')
  assert _temp_bytes(4) < 2 * _temp_bytes(1)


def test_training_writer_does_not_load_torch(tmp_path):
  pytest.importorskip('torch')  # only meaningful where torch is installed
  code = ('import sys, pathlib\n'
          'from rf_jax import history\n'
          f'history.summary_writer(pathlib.Path({str(tmp_path)!r})).close()\n'
          "print('torch' in sys.modules)\n")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=pathlib.Path(__file__).resolve().parents[1], timeout=120)
  assert out.stdout.strip() == 'False', out.stderr[-2000:]
  assert any(tmp_path.glob('events.out.tfevents.*'))
