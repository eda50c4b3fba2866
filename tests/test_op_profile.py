"""benchmarks/op_profile.py: the op kinds and relayout counts it reads from optimised HLO,
and `scripts/benchmark.py --profile` end to end (tiny sizes; no timing assertions)."""

import json
import pathlib
import subprocess
import sys

import jax
from jax import lax
import numpy as np
import pytest

from benchmarks import op_profile

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / 'scripts' / 'benchmark.py'


def _conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _hlo(fn, *args) -> str:
  return jax.jit(fn).lower(*args).compile().as_text()


def test_a_kernel_gradient_needs_relayouts_the_forward_conv_does_not():
  """XLA:CPU convolves NHWC with HWIO as they are, but the kernel gradient contracts over the
  batch, so XLA relayouts its operands first."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 16, 16, 8), np.float32)
  w = rng.standard_normal((3, 3, 8, 8), np.float32)
  kinds, counts = op_profile.hlo_kinds(_hlo(_conv, x, w))
  assert counts == {'relayouts': 0, 'relayouts_into_convolutions': 0, 'convolutions': 1}
  assert list(kinds.values()).count('convolution') == 1
  kernel_grad = lambda x, w: jax.grad(lambda w_: (_conv(jax.nn.relu(x * 2.0), w_) ** 2).sum())(w)
  kinds, counts = op_profile.hlo_kinds(_hlo(kernel_grad, x, w))
  assert counts['convolutions'] >= 1 and counts['relayouts_into_convolutions'] >= 1
  assert 'transpose/copy' in kinds.values()


def test_torch_operator_kinds():
  assert op_profile.torch_kind('aten::convolution_backward') == 'convolution'
  assert op_profile.torch_kind('aten::native_batch_norm_backward') == 'batchnorm'
  assert op_profile.torch_kind('aten::copy_') == 'transpose/copy'
  assert op_profile.torch_kind('aten::threshold_backward') == 'elementwise'
  assert op_profile.torch_kind('aten::empty') == 'other'


def test_profile_end_to_end(tmp_path):
  pytest.importorskip('torch')
  out = tmp_path / 'profile.json'
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), '--profile', '--quick', '--variant', 'rgb', '--size', '96',
       '--batch', '4', '--steps', '1', '--warmup', '0', '--json', str(out)],
      capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  sides = json.loads(out.read_text())['profile']['rgb']
  assert set(sides) == {'rf_jax', 'torch_channels_last'}
  for side in sides.values():
    assert side['ms']['convolution'] > 0 and side['step_ms'] > 0
    assert set(side['ms']) <= set(op_profile.KINDS)
    assert side['kernel_ms_per_step'] >= 0 and side['page_faults_per_step'] >= 0
  assert sides['rf_jax']['relayouts_into_convolutions'] > 0
  assert '| kernel (sys) CPU ms' in proc.stdout
  assert '| transpose/copy |' in proc.stdout and 'feeding one of its' in proc.stdout


_RELAYOUT_FEEDING_A_DOT = """\
HloModule m

%fused_relayout (p0: f32[4,8,8,16], p1: f32[16]) -> f32[1024,4] {
  %p0 = f32[4,8,8,16]{3,2,1,0} parameter(0)
  %p1 = f32[16]{0} parameter(1)
  %b = f32[4,8,8,16]{3,2,1,0} broadcast(%p1), dimensions={3}, metadata={op_name="jit(f)/bn1/mul"}
  %m = f32[4,8,8,16]{3,2,1,0} multiply(%p0, %b), metadata={op_name="jit(f)/bn1/mul"}
  %t = f32[8,8,16,4]{2,1,0,3} transpose(%m), dimensions={1,2,3,0}
  %c = f32[8,8,16,4]{3,2,1,0} copy(%t)
  ROOT %r = f32[1024,4]{1,0} bitcast(%c)
}

%fused_scale (p0: f32[4,8,8,16], p1: f32[16]) -> f32[4,8,8,16] {
  %p0 = f32[4,8,8,16]{3,2,1,0} parameter(0)
  %p1 = f32[16]{0} parameter(1)
  %b = f32[4,8,8,16]{3,2,1,0} broadcast(%p1), dimensions={3}, metadata={op_name="jit(f)/bn1/mul"}
  ROOT %m = f32[4,8,8,16]{3,2,1,0} multiply(%p0, %b), metadata={op_name="jit(f)/bn1/mul"}
}

ENTRY %main (x: f32[4,8,8,16], s: f32[16]) -> f32[1024,4] {
  %x = f32[4,8,8,16]{3,2,1,0} parameter(0)
  %s = f32[16]{0} parameter(1)
  %scaled = f32[4,8,8,16]{3,2,1,0} fusion(%x, %s), kind=kLoop, calls=%fused_scale
  ROOT %relayout = f32[1024,4]{1,0} fusion(%scaled, %s), kind=kLoop, calls=%fused_relayout
}
"""


def test_a_relayout_ending_in_a_bitcast_is_a_relayout_not_batchnorm():
  """XLA fuses BatchNorm's recomputation into the copy that relayouts a kernel gradient's
  input for a dot, and bitcasts its result: the time is the relayout's."""
  kinds, counts = op_profile.hlo_kinds(_RELAYOUT_FEEDING_A_DOT)
  assert (kinds['scaled'], kinds['relayout']) == ('batchnorm', 'transpose/copy')
  assert counts == {'relayouts': 1, 'relayouts_into_convolutions': 0, 'convolutions': 0}
