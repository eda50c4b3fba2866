"""Each ResNet-18 convolution shape timed alone, forward and forward+backward (--conv-profile).

At the train batch and image size; the stem's input gradient is not computed, as in training.
rf_jax's side runs with the XLA:CPU flags rf_jax trains with (rf_jax/xla_cpu.py, set by
scripts/benchmark.py), and also times the kernel gradient alone (XLA's backprop-filter
convolution).

  python -m benchmarks.convs job.json result.json   (spawned by orchestrate)
"""

from __future__ import annotations

import os

from absl import app

from benchmarks import common


def resnet18_convs(size: int, channels: int = 3) -> list[tuple]:
  """(name, count, in_hw, cin, cout, kernel, stride, pad) of every conv in ResNet-18."""
  convs = [('stem 7x7/2', 1, size, channels, 64, 7, 2, 3)]
  hw, cin = size // 4, 64
  for stage, cout in enumerate((64, 128, 256, 512)):
    if stage == 0:
      convs.append((f'layer1 3x3 {cout}', 4, hw, cin, cout, 3, 1, 1))
    else:
      convs.append((f'layer{stage + 1}_0 3x3/2 {cin}->{cout}', 1, hw, cin, cout, 3, 2, 1))
      convs.append((f'layer{stage + 1}_0 1x1/2 {cin}->{cout}', 1, hw, cin, cout, 1, 2, 0))
      hw //= 2
      convs.append((f'layer{stage + 1} 3x3 {cout}', 3, hw, cout, cout, 3, 1, 1))
    cin = cout
  return convs


def _torch_fns(x, w, dy, stride: int, pad: int, stem: bool, layout: str) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
  wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=fmt)
  dyt = torch.from_numpy(dy).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
  xt.requires_grad_(not stem)
  wt.requires_grad_()
  conv = lambda: torch.nn.functional.conv2d(xt, wt, stride=stride, padding=pad)

  def fwd(_):
    with torch.no_grad():
      conv()

  def fwd_bwd(_):
    xt.grad = wt.grad = None
    conv().backward(dyt)

  return {'fwd': fwd, 'fwd_bwd': fwd_bwd}


def _jax_fns(x, w, dy, stride: int, pad: int, stem: bool) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  conv = lambda x_, w_: lax.conv_general_dilated(
      x_, w_, (stride, stride), ((pad, pad), (pad, pad)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  xj, wj, dyj = (jax.device_put(a) for a in (x, w, dy))
  forward = jax.jit(conv)
  kernel_grad = jax.jit(lambda x_, w_, g: jax.vjp(lambda w2: conv(x_, w2), w_)[1](g))
  both = kernel_grad if stem else jax.jit(lambda x_, w_, g: jax.vjp(conv, x_, w_)[1](g))
  return {'fwd': lambda _: forward(xj, wj).block_until_ready(),
          'fwd_bwd': lambda _: jax.block_until_ready(both(xj, wj, dyj)),
          'weight_grad': lambda _: jax.block_until_ready(kernel_grad(xj, wj, dyj))}


def run(settings: common.Settings, framework: str, layout: str) -> dict:
  """Median seconds of each conv's timed functions for `framework` ('jax' or 'torch')."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(common.SEED)
  out = {'framework': framework, 'convs': []}
  if framework == 'torch':
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(common.cores())
  else:
    out['xla_flags'] = os.environ.get('XLA_FLAGS', '')  # with rf_jax's, as in training
  for name, count, hw, cin, cout, k, stride, pad in resnet18_convs(settings.size):
    x = rng.standard_normal((settings.batch, hw, hw, cin), np.float32)
    w = (rng.standard_normal((k, k, cin, cout)) * 0.05).astype(np.float32)
    ho = (hw + 2 * pad - k) // stride + 1
    dy = rng.standard_normal((settings.batch, ho, ho, cout), np.float32)
    stem = name.startswith('stem')
    fns = (_torch_fns(x, w, dy, stride, pad, stem, layout) if framework == 'torch'
           else _jax_fns(x, w, dy, stride, pad, stem))
    row = {'name': name, 'count': count}
    for key, fn in fns.items():
      row[key] = common.timed(fn, [None], 1, settings.steps)['median_s']
    out['convs'].append(row)
  return out


def table(results: dict[str, list[dict]], settings: common.Settings) -> tuple[str, dict]:
  """Markdown of `results` (side -> run's rows, 'rf_jax' first) and each side's
  (forward, forward+backward) seconds over all 20 convs."""
  sides = list(results)
  head = ([f'conv (batch {settings.batch}, {settings.size} px input)', 'count']
          + [f'{s} {what} ms' for s in sides for what in ('fwd', 'fwd+bwd')]
          + ['rf_jax weight-grad alone ms'])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  totals = {s: [0.0, 0.0] for s in sides}
  for i, jax_row in enumerate(results['rf_jax']):
    cells = [jax_row['name'], str(jax_row['count'])]
    for s in sides:
      row = results[s][i]
      cells += [f'{row["fwd"] * 1e3:.1f}', f'{row["fwd_bwd"] * 1e3:.1f}']
      totals[s][0] += jax_row['count'] * row['fwd']
      totals[s][1] += jax_row['count'] * row['fwd_bwd']
    lines.append('| ' + ' | '.join(cells + [f'{jax_row["weight_grad"] * 1e3:.1f}']) + ' |')
  cells = ['all 20 convs (sum x count)', '20']
  cells += [f'{t * 1e3:.0f}' for s in sides for t in totals[s]]
  lines.append('| ' + ' | '.join(cells + ['']) + ' |')
  return '\n'.join(lines), totals


if __name__ == '__main__':
  app.run(common.child_main(run))
