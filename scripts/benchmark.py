r"""rf_jax vs PyTorch: train/eval throughput, input pipeline, peak memory.

One command; every measurement runs in its own subprocess (one process per
framework run), and the frameworks alternate A B A B over `--rounds` so that
machine drift shows in the per-round figures.

  python scripts/benchmark.py                      # full: 256 px, batch 16/64, fp32
  python scripts/benchmark.py --quick              # smoke test, < 2 minutes
  python scripts/benchmark.py --variant dual --steps 8 --json out.json
  python scripts/benchmark.py --dtype bfloat16     # on a GPU (both sides autocast/bf16)

What is measured
* rf_jax: the REAL steps, `parallel.create_runner('jit', train.train_step,
  partial(train.eval_step, flips=config.eval.flips))` on a state from
  `train.create_train_state` (random init), exactly as `train_and_evaluate`
  calls them: numpy batch -> `runner.put_batch` -> step (state donated) ->
  block on the loss (train) / `runner.get_outputs` to numpy (eval).
* PyTorch reference: torchvision `resnet18(weights=None)` (4-channel stem for
  rgbir; for dual two trunks, fc removed, + Linear(1024, 17)),
  `BCEWithLogitsLoss`, SGD(lr 0.005, momentum 0.9), eager; the batch arrives
  as the same NHWC numpy array. `--torch-layouts` picks channels_last (the
  reference: torch's fastest layout on CPU) and/or contiguous NCHW.
  `torch.set_num_threads` = the usable core count.
* images/s = batch / median timed step (after `--warmup` steps); the first
  call's time (compile for rf_jax) is reported separately.
* peak resident memory (ru_maxrss) of each process after the train phase
  (before any eval) and at the end; on a GPU also the device peak.
* the input pipeline (`pipeline.train_loader` over prepared synthetic chips,
  the configured worker count) in normalised train batches/s, against the
  fastest rf_jax train step's demand in batches/s.

`--jax-patch` and `--xla-flags` apply speed experiments to the rf_jax runs
only (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import os
import pathlib
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

VARIANTS = ('rgb', 'rgbir', 'dual')
NUM_TAGS = 17
LR, MOMENTUM = 0.005, 0.9
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'torchvision', 'grain', 'numpy')


def _cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _maxrss_mb() -> float:
  kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return kb / 1024 if sys.platform != 'darwin' else kb / 2**20


def _random_batches(n: int, batch: int, size: int, channels: int, seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  return [{'image': rng.standard_normal((batch, size, size, channels), np.float32),
           'labels': (rng.random((batch, NUM_TAGS)) < 0.3).astype(np.float32)}
          for _ in range(n)]


def _timed(fn, batches, warmup: int, steps: int) -> dict:
  """fn(batch) must block until done. First call timed alone (compile)."""
  start = time.perf_counter()
  fn(batches[0])
  first = time.perf_counter() - start
  rss_first = _maxrss_mb()  # includes compilation for rf_jax
  for i in range(warmup):
    fn(batches[(i + 1) % len(batches)])
  times = []
  for i in range(steps):
    start = time.perf_counter()
    fn(batches[i % len(batches)])
    times.append(time.perf_counter() - start)
  return {'first_call_s': first, 'step_s': times, 'median_s': statistics.median(times),
          'rss_peak_after_first_call_mb': rss_first}


# --- rf_jax child --------------------------------------------------------------------------


def _weight_grad(x, g, kernel_shape, strides, padding, mode):
  """d(loss)/d(kernel) of an NHWC/HWIO conv as dots over shifted input windows."""
  import jax.numpy as jnp
  from jax import lax
  kh, kw, cin, cout = kernel_shape
  _, ho, wo, _ = g.shape
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  sh, sw = strides
  taps = [lax.slice(xp, (0, i, j, 0), (x.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1,
                                        cin), (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]
  dims = (((0, 1, 2), (0, 1, 2)), ((), ()))
  if mode == 'im2col':
    cols = jnp.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0]
    return lax.dot_general(cols, g, dims).reshape(kernel_shape)
  return jnp.stack([lax.dot_general(t, g, dims) for t in taps]).reshape(kernel_shape)


def _fast_conv_module(mode: str, max_kernel: int):
  """A drop-in `lax.conv_general_dilated` whose VJP computes the kernel gradient as dots
  (`mode` 'taps' or 'im2col') instead of XLA:CPU's backprop-filter convolution."""
  import jax
  from jax import lax

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
  def conv(x, w, strides, padding, dn):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)

  def fwd(x, w, strides, padding, dn):
    return conv(x, w, strides, padding, dn), (x, w)

  def bwd(strides, padding, dn, res, g):
    x, w = res
    _, vjp_x = jax.vjp(
        lambda x_: lax.conv_general_dilated(x_, w, strides, padding, dimension_numbers=dn), x)
    return vjp_x(g)[0], _weight_grad(x, g, w.shape, strides, padding, mode)

  conv.defvjp(fwd, bwd)

  def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                           rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                           precision=None, **kwargs):
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    plain = (dn == nhwc and feature_group_count == 1 and not kwargs and precision is None
             and all(d == 1 for d in (lhs_dilation or (1, 1)))
             and all(d == 1 for d in (rhs_dilation or (1, 1)))
             and not isinstance(padding, str) and rhs.shape[0] <= max_kernel)
    if not plain:
      return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                      rhs_dilation, dimension_numbers, feature_group_count,
                                      precision=precision, **kwargs)
    return conv(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding), nhwc)

  return conv_general_dilated


def _patch_flax_conv(conv_general_dilated) -> None:
  """Makes flax.linen.Conv (module default) call `conv_general_dilated`."""
  import types
  import flax.linen.linear as linear
  from jax import lax
  proxy = types.ModuleType('lax_proxy')
  proxy.__dict__.update({k: getattr(lax, k) for k in dir(lax) if not k.startswith('__')})
  proxy.conv_general_dilated = conv_general_dilated
  linear.lax = proxy


def _jax_patches(names: list[str]):
  """Speed experiments applied by monkeypatching (rf_jax itself unchanged). Each returns a
  short description; see docs/performance.md for the figures."""
  import jax
  described = []
  for name in names:
    if name == 'none' or not name:
      continue
    if name.startswith('conv_gw_'):  # conv_gw_taps, conv_gw_im2col, conv_gw_taps_3x3 ...
      parts = name.split('_')
      mode = parts[2]
      max_kernel = int(parts[3][0]) if len(parts) > 3 else 7
      _patch_flax_conv(_fast_conv_module(mode, max_kernel))
      described.append(name)
    elif name == 'eval_no_loss':  # eval without the per-example loss (lower bound on eval cost)
      from rf_jax import train

      orig = train.eval_step

      def eval_step(state, batch, flips=False, _orig=orig):
        return {'scores': _orig(state, batch, flips)['scores']}
      train.eval_step = eval_step
      described.append(name)
    elif name == 'matmul_precision_default':
      jax.config.update('jax_default_matmul_precision', 'default')
      described.append(name)
    else:
      raise SystemExit(f'unknown --jax-patch {name!r}')
  return described


def run_jax(args) -> dict:
  import jax
  patches = _jax_patches(args.jax_patch)
  from configs import default
  from rf_jax import parallel
  from rf_jax import train
  from rf_jax.models import registry

  config = default.get_config()
  config.model.name = args.variant
  config.model.weights = ''
  config.dtype = args.dtype
  config.batch_size = args.batch
  config.eval_batch_size = args.eval_batch
  channels = len(registry.input_bands(args.variant))
  rss_imports = _maxrss_mb()

  model = train.create_model(config)
  lr_fn = train.create_learning_rate_fn(config, steps_per_epoch=1000)
  state = train.create_train_state(jax.random.key(config.seed), config, model, args.size, lr_fn)
  runner = parallel.create_runner(
      'jit', train.train_step, functools.partial(train.eval_step, flips=config.eval.flips))
  state = runner.put_state(state)
  holder = {'state': state}

  def train_fn(batch):
    holder['state'], loss = runner.train_step(holder['state'], runner.put_batch(batch))
    jax.block_until_ready(loss)

  def eval_fn(batch):
    out = runner.get_outputs(runner.eval_step(holder['state'], runner.put_batch(batch)))
    return out['scores']

  result = {'framework': 'rf_jax', 'layout': 'NHWC', 'patches': patches,
            'xla_flags': os.environ.get('XLA_FLAGS', ''), 'backend': jax.default_backend(),
            'device': str(jax.devices()[0]), 'rss_after_imports_mb': rss_imports}
  batches = _random_batches(2, args.batch, args.size, channels)
  result['train'] = _timed(train_fn, batches, args.warmup, args.steps)
  result['rss_peak_train_mb'] = _maxrss_mb()
  if not args.no_eval:
    eval_batches = _random_batches(2, args.eval_batch, args.size, channels, seed=1)
    result['eval'] = _timed(eval_fn, eval_batches, args.warmup, args.eval_steps)
  result['rss_peak_mb'] = _maxrss_mb()
  try:
    stats = jax.devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
      result['device_peak_mb'] = stats['peak_bytes_in_use'] / 2**20
  except Exception:  # pylint: disable=broad-except
    pass
  return result


# --- PyTorch child -------------------------------------------------------------------------


def torch_model(variant: str):
  """torchvision ResNet-18s matching fusion.create_model's three study models."""
  import torch
  from torch import nn
  import torchvision

  def stem(channels):
    return nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)

  if variant == 'rgb':
    return torchvision.models.resnet18(weights=None, num_classes=NUM_TAGS)
  if variant == 'rgbir':
    model = torchvision.models.resnet18(weights=None, num_classes=NUM_TAGS)
    model.conv1 = stem(4)
    return model

  class Dual(nn.Module):

    def __init__(self):
      super().__init__()
      self.rgb_trunk = torchvision.models.resnet18(weights=None)
      self.rgb_trunk.fc = nn.Identity()
      self.ir_trunk = torchvision.models.resnet18(weights=None)
      self.ir_trunk.conv1 = stem(1)
      self.ir_trunk.fc = nn.Identity()
      self.fc = nn.Linear(1024, NUM_TAGS)

    def forward(self, x):
      return self.fc(torch.cat([self.rgb_trunk(x[:, :3]), self.ir_trunk(x[:, 3:])], dim=1))

  return Dual()


def run_torch(args) -> dict:
  import torch
  from torch import nn
  threads = _cores()
  torch.set_num_threads(threads)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  channels_last = args.layout == 'channels_last'
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  rss_imports = _maxrss_mb()
  torch.manual_seed(0)
  model = torch_model(args.variant).to(device=device, memory_format=fmt)
  optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
  criterion = nn.BCEWithLogitsLoss()
  amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == 'bfloat16'
         else torch.autocast(device.type, enabled=False))
  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

  def to_torch(batch):
    # NHWC numpy -> NCHW view (channels_last strides, no copy) -> the chosen layout.
    x = torch.from_numpy(batch['image']).permute(0, 3, 1, 2)
    x = x.to(device=device).contiguous(memory_format=fmt)
    return x, torch.from_numpy(batch['labels']).to(device)

  def train_fn(batch):
    x, y = to_torch(batch)
    optimizer.zero_grad(set_to_none=True)
    with amp:
      logits = model(x)
    loss = criterion(logits.float(), y)
    loss.backward()
    optimizer.step()
    loss.item()
    sync()

  def eval_fn(batch):
    x, y = to_torch(batch)
    with torch.inference_mode(), amp:
      logits = model(x).float()
      scores = torch.sigmoid(logits)
      loss = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction='none').mean(-1)
    return scores.cpu().numpy(), loss.cpu().numpy()

  channels = 3 if args.variant == 'rgb' else 4
  result = {'framework': 'pytorch', 'layout': args.layout, 'threads': threads,
            'device': str(device), 'rss_after_imports_mb': rss_imports}
  batches = _random_batches(2, args.batch, args.size, channels)
  model.train()
  result['train'] = _timed(train_fn, batches, args.warmup, args.steps)
  result['rss_peak_train_mb'] = _maxrss_mb()
  if not args.no_eval:
    model.eval()
    eval_batches = _random_batches(2, args.eval_batch, args.size, channels, seed=1)
    result['eval'] = _timed(eval_fn, eval_batches, args.warmup, args.eval_steps)
  result['rss_peak_mb'] = _maxrss_mb()
  if device.type == 'cuda':
    result['device_peak_mb'] = torch.cuda.max_memory_allocated() / 2**20
  return result


# --- per-convolution profile (--conv-profile) ----------------------------------------------


def resnet18_convs(size: int, channels: int = 3):
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


def run_convs(args) -> dict:
  """Forward and forward+backward of each ResNet-18 conv shape at the train batch, timed alone
  (the stem's input gradient is not computed, as in training)."""
  import numpy as np
  rng = np.random.default_rng(0)
  out = {'framework': args._framework, 'convs': []}
  if args._framework == 'torch':
    import torch
    torch.set_num_threads(_cores())
    fmt = torch.channels_last if args.layout == 'channels_last' else torch.contiguous_format
  else:
    import rf_jax  # pylint: disable=unused-import  (its XLA:CPU flags, as in training)
    import jax
    from jax import lax
    out['xla_flags'] = os.environ.get('XLA_FLAGS', '')
  for name, count, hw, cin, cout, k, s, p in resnet18_convs(args.size):
    x = rng.standard_normal((args.batch, hw, hw, cin), np.float32)
    w = (rng.standard_normal((k, k, cin, cout)) * 0.05).astype(np.float32)
    ho = (hw + 2 * p - k) // s + 1
    dy = rng.standard_normal((args.batch, ho, ho, cout), np.float32)
    stem = name.startswith('stem')
    if args._framework == 'torch':
      xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
      wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=fmt)
      dyt = torch.from_numpy(dy).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
      xt.requires_grad_(not stem)
      wt.requires_grad_()

      def fwd():
        with torch.no_grad():
          torch.nn.functional.conv2d(xt, wt, stride=s, padding=p)

      def both():
        xt.grad = wt.grad = None
        torch.nn.functional.conv2d(xt, wt, stride=s, padding=p).backward(dyt)
      fns = {'fwd': lambda _: fwd(), 'fwd_bwd': lambda _: both()}
    else:
      conv = lambda x_, w_: lax.conv_general_dilated(
          x_, w_, (s, s), ((p, p), (p, p)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      xj, wj, dyj = (jax.device_put(a) for a in (x, w, dy))
      f = jax.jit(conv)
      if stem:
        fb = jax.jit(lambda x_, w_, g: jax.vjp(lambda w2: conv(x_, w2), w_)[1](g))
      else:
        fb = jax.jit(lambda x_, w_, g: jax.vjp(conv, x_, w_)[1](g))
      gw = jax.jit(lambda x_, w_, g: jax.vjp(lambda w2: conv(x_, w2), w_)[1](g))
      fns = {'fwd': lambda _: f(xj, wj).block_until_ready(),
             'fwd_bwd': lambda _: jax.block_until_ready(fb(xj, wj, dyj)),
             'weight_grad': lambda _: jax.block_until_ready(gw(xj, wj, dyj))}
    row = {'name': name, 'count': count}
    for key, fn in fns.items():
      row[key] = _timed(fn, [None], 1, args.steps)['median_s']
    out['convs'].append(row)
  return out


def conv_profile(args) -> dict:
  sides = [('rf_jax', 'jax', None)] + [(f'torch_{l}', 'torch', l) for l in args.torch_layouts]
  results = {}
  for side, framework, layout in sides:
    results[side] = _child(args, 'convs', None, layout, framework)['convs']
  names = [r['name'] for r in results['rf_jax']]
  lines = ['| conv (batch %d, %d px input) | count | ' % (args.batch, args.size)
           + ' | '.join(f'{s} fwd ms | {s} fwd+bwd ms' for s in results)
           + ' | rf_jax weight-grad alone ms |', '|' + '---|' * (2 + 2 * len(results) + 1)]
  totals = {s: [0.0, 0.0] for s in results}
  for i, name in enumerate(names):
    count = results['rf_jax'][i]['count']
    cells = [name, str(count)]
    for s, rows in results.items():
      cells += [f'{rows[i]["fwd"] * 1e3:.1f}', f'{rows[i]["fwd_bwd"] * 1e3:.1f}']
      totals[s][0] += count * rows[i]['fwd']
      totals[s][1] += count * rows[i]['fwd_bwd']
    cells.append(f'{results["rf_jax"][i]["weight_grad"] * 1e3:.1f}')
    lines.append('| ' + ' | '.join(cells) + ' |')
  cells = ['all 20 convs (sum x count)', '20']
  for s in results:
    cells += [f'{totals[s][0] * 1e3:.0f}', f'{totals[s][1] * 1e3:.0f}']
  lines.append('| ' + ' | '.join(cells + ['']) + ' |')
  return {'convs': results, 'totals_s': totals, 'table': '\n'.join(lines)}


# --- input pipeline child ------------------------------------------------------------------


def run_pipeline(args) -> dict:
  """Normalised train batches/s from prepared synthetic chips (grain workers need absl flags
  and the __main__ guard: this runs under absl.app.run)."""
  import ml_collections
  from rf_jax.data import pipeline
  from configs import default

  workers = default.get_config().data.num_workers if args.workers < 0 else args.workers
  chip = max(256, args.size)
  workdir = pathlib.Path(tempfile.mkdtemp(prefix='rf_jax_bench_'))
  data_config = ml_collections.ConfigDict(dict(
      raw_dir='', layout='kaggle', prepared_dir='', val_fraction=0.33, split_seed=321,
      synthetic=dict(num_chips=args.pipeline_chips, chip_size=chip, num_test=0, seed=0)))
  try:
    start = time.perf_counter()
    data = pipeline.prepare(data_config, workdir)
    prepare_s = time.perf_counter() - start
    result = {'chips': len(data.train), 'chip_size': chip, 'crop': args.size,
              'batch': args.batch, 'bands': [0, 1, 2, 3], 'prepare_s': prepare_s, 'runs': {}}
    for n in sorted({workers} | ({0} if args.pipeline_zero_workers else set())):
      loader = pipeline.train_loader(data, batch_size=args.batch, crop_size=args.size,
                                     bands=(0, 1, 2, 3), seed=0, num_workers=n)
      it = iter(loader)
      start = time.perf_counter()
      for _ in range(3):  # worker start-up
        next(it)
      startup = time.perf_counter() - start
      count, start = 0, time.perf_counter()
      while time.perf_counter() - start < args.pipeline_seconds or count < 3:
        batch = next(it)
        count += 1
      elapsed = time.perf_counter() - start
      assert batch['image'].shape == (args.batch, args.size, args.size, 4), batch['image'].shape
      result['runs'][str(n)] = {'workers': n, 'batches_per_s': count / elapsed,
                                'batches': count, 'startup_s': startup}
      del it, loader
    result['workers'] = workers
    result['batches_per_s'] = result['runs'][str(workers)]['batches_per_s']
    result['rss_peak_mb'] = _maxrss_mb()
    return result
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


# --- orchestration -------------------------------------------------------------------------


def _versions() -> dict:
  out = {'python': platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def _load() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def _child(args, kind: str, variant: str | None = None, layout: str | None = None,
           framework: str | None = None) -> dict:
  """Runs one measurement in a fresh process; returns its JSON result."""
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / 'result.json'
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), '--_child', kind,
           '--_out', str(out)] + _child_argv(args)
    if variant:
      cmd += ['--variant', variant]
    if layout:
      cmd += ['--torch-layouts', layout]
    if framework:
      cmd += ['--_framework', framework]
    env = dict(os.environ)
    if (kind == 'jax' or framework == 'jax') and args.xla_flags:
      env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + args.xla_flags).strip()
    env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, check=False)
    if proc.returncode or not out.exists():
      sys.stderr.write(proc.stdout[-6000:])
      raise RuntimeError(f'benchmark child {kind} {variant or ""} {layout or ""} failed '
                         f'(exit {proc.returncode})')
    result = json.loads(out.read_text())
    result['process_s'] = time.perf_counter() - start
    result['load_after'] = _load()
    return result


def _child_argv(args) -> list[str]:
  argv = ['--batch', str(args.batch), '--eval-batch', str(args.eval_batch),
          '--size', str(args.size), '--dtype', args.dtype, '--steps', str(args.steps),
          '--eval-steps', str(args.eval_steps), '--warmup', str(args.warmup),
          '--pipeline-chips', str(args.pipeline_chips),
          '--pipeline-seconds', str(args.pipeline_seconds), '--workers', str(args.workers)]
  if args.no_eval:
    argv.append('--no-eval')
  if args.pipeline_zero_workers:
    argv.append('--pipeline-zero-workers')
  for patch in args.jax_patch:
    argv += ['--jax-patch', patch]
  return argv


def _ips(runs: list[dict], phase: str, batch: int) -> dict | None:
  """Pools the timed steps of every round; images/s from the pooled median."""
  runs = [r for r in runs if phase in r]
  if not runs:
    return None
  pooled = [t for r in runs for t in r[phase]['step_s']]
  return {
      'images_per_s': batch / statistics.median(pooled),
      # The least-disturbed step: on a shared machine, contention only ever slows a step down.
      'best_step_images_per_s': batch / min(pooled),
      'per_round_images_per_s': [batch / r[phase]['median_s'] for r in runs],
      'first_call_s': statistics.median(r[phase]['first_call_s'] for r in runs),
      'steps_timed': len(pooled),
  }


def summarise(args, runs: dict) -> dict:
  rows = {}
  for variant in args.variant:
    row = {}
    for side in ['rf_jax'] + [f'torch_{l}' for l in args.torch_layouts]:
      side_runs = runs.get((variant, side), [])
      if not side_runs:
        continue
      row[side] = {
          'train': _ips(side_runs, 'train', args.batch),
          'eval': _ips(side_runs, 'eval', args.eval_batch),
          'rss_peak_train_mb': max(r['rss_peak_train_mb'] for r in side_runs),
          'rss_peak_mb': max(r['rss_peak_mb'] for r in side_runs),
          'rss_after_imports_mb': max(r['rss_after_imports_mb'] for r in side_runs),
      }
      if any('device_peak_mb' in r for r in side_runs):
        row[side]['device_peak_mb'] = max(r.get('device_peak_mb', 0) for r in side_runs)
    if 'rf_jax' in row:
      for layout in args.torch_layouts:
        ref = row.get(f'torch_{layout}')
        if not ref:
          continue
        for phase in ('train', 'eval'):
          if row['rf_jax'][phase] and ref[phase]:
            row[f'ratio_{phase}_vs_{layout}'] = (row['rf_jax'][phase]['images_per_s']
                                                 / ref[phase]['images_per_s'])
      # The honest reference: PyTorch at its fastest measured layout, per variant and phase.
      for phase in ('train', 'eval'):
        refs = [(row[f'torch_{l}'][phase]['images_per_s'], l) for l in args.torch_layouts
                if row.get(f'torch_{l}', {}).get(phase)]
        if refs and row['rf_jax'][phase]:
          best, layout = max(refs)
          row[f'ratio_{phase}_vs_best'] = row['rf_jax'][phase]['images_per_s'] / best
          row[f'best_torch_layout_{phase}'] = layout
          best_step = max(row[f'torch_{l}'][phase]['best_step_images_per_s']
                          for l in args.torch_layouts if row.get(f'torch_{l}', {}).get(phase))
          row[f'best_step_ratio_{phase}'] = (row['rf_jax'][phase]['best_step_images_per_s']
                                             / best_step)
    rows[variant] = row
  return rows


def _fmt(x, spec='.1f'):
  return '-' if x is None else format(x, spec)


def table(report: dict) -> str:
  """Markdown: per variant and phase, images/s of each side and rf_jax / PyTorch (the faster
  torch layout), from the pooled median step and from the best step."""
  layouts = report['settings']['torch_layouts']
  short = {'channels_last': 'CL', 'contiguous': 'NCHW'}
  head = ['variant', 'phase', 'rf_jax img/s']
  head += [f'torch {short[l]} img/s' for l in layouts]
  head += ['rf_jax / torch (median)', 'rf_jax / torch (best step)', 'rf_jax first call s',
           'peak RSS train MB rf_jax / ' + ' / '.join(f'torch {short[l]}' for l in layouts)]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for variant, row in report['results'].items():
    jx = row.get('rf_jax', {})
    for phase in ('train', 'eval'):
      if not (jx.get(phase) or any(row.get(f'torch_{l}', {}).get(phase) for l in layouts)):
        continue

      def ips(side):
        s = row.get(side, {}).get(phase)
        return s['images_per_s'] if s else None
      cells = [variant, phase, _fmt(ips('rf_jax'))]
      cells += [_fmt(ips(f'torch_{l}')) for l in layouts]
      best = row.get(f'best_torch_layout_{phase}')
      cells.append(_fmt(row.get(f'ratio_{phase}_vs_best'), '.2f') + 'x'
                   + (f' (vs {short[best]})' if best and len(layouts) > 1 else ''))
      cells.append(_fmt(row.get(f'best_step_ratio_{phase}'), '.2f') + 'x')
      cells.append(_fmt((jx.get(phase) or {}).get('first_call_s')))
      cells.append(' / '.join(_fmt(row.get(side, {}).get('rss_peak_train_mb'), '.0f')
                              for side in ['rf_jax'] + [f'torch_{l}' for l in layouts])
                   if phase == 'train' else '')
      lines.append('| ' + ' | '.join(cells) + ' |')
  pipe = report.get('pipeline')
  if pipe:
    lines.append('')
    lines.append(
        f'Input pipeline ({pipe["workers"]} workers, {pipe["chips"]} synthetic '
        f'{pipe["chip_size"]} px chips, crop {pipe["crop"]}, batch {pipe["batch"]}, 4 bands): '
        f'{pipe["batches_per_s"]:.1f} batches/s; fastest rf_jax train step demands '
        f'{_fmt(pipe.get("demand_batches_per_s"), ".2f")} batches/s -> '
        f'{_fmt(pipe.get("supply_over_demand"), ".1f")}x'
        + ''.join(f'; {r["workers"]} workers {r["batches_per_s"]:.1f} batches/s'
                  for k, r in pipe['runs'].items() if int(k) != pipe['workers']))
  return '\n'.join(lines)


def orchestrate(args) -> dict:
  started = datetime.datetime.now(datetime.timezone.utc)
  report = {
      'date': started.isoformat(timespec='seconds'),
      'versions': _versions(),
      'machine': {'cores': _cores(), 'platform': platform.platform(),
                  'processor': platform.processor() or platform.machine()},
      'load_before': _load(),
      'settings': {k: getattr(args, k) for k in (
          'variant', 'batch', 'eval_batch', 'size', 'dtype', 'steps', 'eval_steps', 'warmup',
          'rounds', 'torch_layouts', 'jax_patch', 'xla_flags', 'quick', 'frameworks')},
      'order': [],
  }
  runs: dict[tuple, list] = {}
  for round_ in range(args.rounds):
    for variant in args.variant:
      sides = []
      if 'jax' in args.frameworks:
        sides.append(('rf_jax', 'jax', None))
      if 'torch' in args.frameworks:
        sides += [(f'torch_{l}', 'torch', l) for l in args.torch_layouts]
      for side, kind, layout in sides:
        result = _child(args, kind, variant, layout)
        runs.setdefault((variant, side), []).append(result)
        report['order'].append(f'r{round_ + 1} {variant} {side}')
        phase = result['train']
        print(f'round {round_ + 1} {variant:5s} {side:20s} train '
              f'{args.batch / phase["median_s"]:7.1f} img/s (first call '
              f'{phase["first_call_s"]:.1f} s)'
              + (f', eval {args.eval_batch / result["eval"]["median_s"]:7.1f} img/s'
                 if 'eval' in result else '')
              + f', peak RSS train {result["rss_peak_train_mb"]:.0f} MB, load '
              f'{result["load_after"]}', flush=True)
  report['results'] = summarise(args, runs)
  report['runs'] = {f'{v}/{s}': r for (v, s), r in runs.items()}
  if args.pipeline_seconds > 0:
    pipe = _child(args, 'pipeline')
    demand = [row['rf_jax']['train']['images_per_s'] / args.batch
              for row in report['results'].values() if row.get('rf_jax', {}).get('train')]
    if demand:
      pipe['demand_batches_per_s'] = max(demand)
      pipe['supply_over_demand'] = pipe['batches_per_s'] / max(demand)
    report['pipeline'] = pipe
    print(f'pipeline {pipe["batches_per_s"]:.1f} batches/s ({pipe["workers"]} workers)',
          flush=True)
  report['load_after'] = _load()
  report['wall_s'] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
  report['table'] = table(report)
  return report


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  csv = lambda s: [x for x in s.split(',') if x]
  p.add_argument('--variant', type=csv, default=None,
                 help='comma list of rgb,rgbir,dual (default: all)')
  p.add_argument('--batch', type=int, default=None, help='train batch (16)')
  p.add_argument('--eval-batch', type=int, default=None, help='eval batch (64)')
  p.add_argument('--size', type=int, default=None, help='image side in px (256)')
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                 help='compute dtype: rf_jax config.dtype; torch autocast')
  p.add_argument('--steps', type=int, default=None, help='timed train steps per run (4)')
  p.add_argument('--eval-steps', type=int, default=None, help='timed eval steps per run (2)')
  p.add_argument('--warmup', type=int, default=None, help='untimed steps after the first (1)')
  p.add_argument('--rounds', type=int, default=None, help='A B A B rounds (2)')
  p.add_argument('--torch-layouts', type=csv, default=None,
                 help='channels_last and/or contiguous (NCHW); the first is the reference '
                      '(default channels_last, torch\'s fastest CPU layout)')
  p.add_argument('--frameworks', type=csv, default=['jax', 'torch'], help='jax,torch')
  p.add_argument('--no-eval', action='store_true', help='train steps only')
  p.add_argument('--jax-patch', action='append', default=[],
                 help='speed experiment applied to the rf_jax runs (repeatable)')
  p.add_argument('--xla-flags', default='', help='appended to XLA_FLAGS for the rf_jax runs')
  p.add_argument('--pipeline-chips', type=int, default=None, help='synthetic chips (300)')
  p.add_argument('--pipeline-seconds', type=float, default=None,
                 help='timed seconds of the pipeline measurement (10); 0 skips it')
  p.add_argument('--pipeline-zero-workers', action='store_true',
                 help='also measure the pipeline with 0 workers')
  p.add_argument('--workers', type=int, default=-1,
                 help='pipeline workers (-1: configs/default.py data.num_workers)')
  p.add_argument('--quick', action='store_true',
                 help='smoke test (< 2 min): 128 px, batch 8/16, 2 steps, 1 round')
  p.add_argument('--json', default='', help='write the report here')
  p.add_argument('--conv-profile', action='store_true',
                 help='instead: time each ResNet-18 conv shape alone (fwd, fwd+bwd) per framework')
  p.add_argument('--_child', choices=('jax', 'torch', 'pipeline', 'convs'),
                 help=argparse.SUPPRESS)
  p.add_argument('--_framework', choices=('jax', 'torch'), help=argparse.SUPPRESS)
  p.add_argument('--_out', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  quick = dict(batch=8, eval_batch=16, size=128, steps=2, eval_steps=2, warmup=1, rounds=1,
               pipeline_chips=48, pipeline_seconds=2.0, torch_layouts=['channels_last'])
  full = dict(batch=16, eval_batch=64, size=256, steps=4, eval_steps=2, warmup=1, rounds=2,
              pipeline_chips=300, pipeline_seconds=10.0, torch_layouts=['channels_last'])
  for key, value in (quick if args.quick else full).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.variant = args.variant or list(VARIANTS)
  for v in args.variant:
    if v not in VARIANTS:
      p.error(f'--variant {v!r}: choose from {",".join(VARIANTS)}')
  for l in args.torch_layouts:
    if l not in ('channels_last', 'contiguous'):
      p.error(f'--torch-layouts {l!r}: channels_last or contiguous')
  args.layout = args.torch_layouts[0] if args.torch_layouts else 'channels_last'
  if args.size < 96:
    print('note: below 96 px XLA:CPU is pathologically slow (DESIGN.md section 4)',
          file=sys.stderr)
  return args


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args._child:
    if args._child == 'pipeline':
      from absl import app  # grain workers read absl flags: run under app.run

      def child_main(_):
        pathlib.Path(args._out).write_text(json.dumps(run_pipeline(args)))
      app.run(child_main, argv=sys.argv[:1])
      return
    args.variant = args.variant[0]
    result = {'jax': run_jax, 'torch': run_torch, 'convs': run_convs}[args._child](args)
    pathlib.Path(args._out).write_text(json.dumps(result))
    return
  if args.conv_profile:
    report = conv_profile(args)
    print(report['table'])
    if args.json:
      pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
    return
  report = orchestrate(args)
  print()
  print(f'{report["date"]}  load {report["load_before"]} -> {report["load_after"]}  '
        f'{report["machine"]["cores"]} cores  ' + '  '.join(
            f'{k} {v}' for k, v in report['versions'].items() if v))
  print(f'size {args.size}, batch {args.batch} train / {args.eval_batch} eval, {args.dtype}, '
        f'{args.steps} train / {args.eval_steps} eval timed steps x {args.rounds} rounds; '
        f'torch threads {_cores()}; wall {report["wall_s"]:.0f} s')
  print(report['table'])
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
    print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
