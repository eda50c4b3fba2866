"""Where a train step's time goes, per op kind, in rf_jax and in PyTorch (`--profile`).

rf_jax: the real train step (jax_child's), compiled; from its optimised HLO the layout
transposes and copies XLA inserted, and how many of them feed a convolution; then a few steps
under `jax.profiler` (its Perfetto JSON), each op's event time summed per kind. An XLA:CPU
convolution's work runs in Eigen tasks outside its own trace event, so 'convolution' is the
step's wall time less every other kind's (what no other op accounts for).

PyTorch: the same steps as torch_child under `torch.profiler`, each op's self CPU time
summed per kind (oneDNN runs inside its op's event, so the kinds add up to the step).

Both: the untraced steps' kernel (sys) CPU time and minor page faults, per step: each fault
is a fresh zeroed page of a buffer the allocator took from the OS for this step.

  python -m benchmarks.op_profile job.json result.json   (spawned by orchestrate)
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re
import resource
import tempfile
import time

from absl import app

from benchmarks import common
from benchmarks import jax_patches

KINDS = ('convolution', 'transpose/copy', 'batchnorm', 'elementwise', 'other')
_NORM_SCOPE = re.compile(r'/(bn\d|downsample_1)/')  # the BatchNorm modules' op_name scopes
_TRANSPOSE_OPS = ('transpose', 'copy')


class _KernelCost:
  """The kernel time (sys CPU seconds, all threads) and minor page faults of the steps run
  inside it, per step: what the process paid the OS for memory it allocated afresh."""

  def __init__(self, steps: int):
    self.steps, self.per_step = steps, {}

  def __enter__(self):
    self._start = resource.getrusage(resource.RUSAGE_SELF)
    return self

  def __exit__(self, *exc):
    end = resource.getrusage(resource.RUSAGE_SELF)
    self.per_step = {
        'kernel_ms_per_step': (end.ru_stime - self._start.ru_stime) * 1e3 / self.steps,
        'page_faults_per_step': (end.ru_minflt - self._start.ru_minflt) / self.steps}


# --- rf_jax: the optimised HLO ---------------------------------------------------------------


def _computations(hlo: str) -> dict[str, list[str]]:
  """{computation name: its instruction lines} of an HLO module's text."""
  out, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r'^(?:ENTRY )?%([\w.-]+) .*\{$', line)
    if head:
      name = 'ENTRY' if line.startswith('ENTRY') else head.group(1)
      out[name] = []
    elif name and line.startswith(('  %', '  ROOT %')):
      out[name].append(line)
  return out


def _instruction(line: str) -> tuple[str, str, list[str], str]:
  """(name, opcode, operand names, called computation) of one HLO instruction line."""
  name, rest = line.strip().removeprefix('ROOT ')[1:].split(' = ', 1)
  # The opcode follows the result shape (which may be a tuple with spaces and layouts).
  op = re.search(r'[\]}\)] ([a-z][\w-]*)\(', rest) or re.search(r' ([a-z][\w-]*)\(', rest)
  opcode = op.group(1) if op else ''
  args = rest[op.end():] if op else ''
  operands = re.findall(r'%([\w.-]+)', args.split('), ')[0]) if op else []
  called = re.search(r'calls=%([\w.-]+)', rest)
  return name, opcode, operands, called.group(1) if called else ''


def _root_opcode(body: list[str]) -> str:
  """The opcode of a fused computation's result, looking through bitcasts (a relayout
  feeding a dot ends in bitcast(copy(...)), and still recomputes its producers)."""
  ops = {}
  root = ''
  for line in body:
    name, opcode, operands, _ = _instruction(line)
    ops[name] = (opcode, operands)
    if 'ROOT ' in line:
      root = name
  opcode, operands = ops.get(root, ('', []))
  while opcode == 'bitcast' and operands and operands[0] in ops:
    opcode, operands = ops[operands[0]]
  return opcode


def hlo_kinds(hlo: str) -> tuple[dict[str, str], dict]:
  """({top-level instruction name: KIND}, transpose counts) of an optimised HLO module.

  A fusion is 'transpose/copy' when its result is a transpose or copy, bitcasts aside (XLA's
  relayouts, often with the producers' elementwise work fused in: BatchNorm's, the residual
  add's, ReLU's), 'batchnorm' when its ops come from a BatchNorm module, 'elementwise'
  otherwise; counts: every top-level relayout, and those whose result is an operand of a
  convolution.
  """
  comps = _computations(hlo)
  kinds, relayouts, into_convs = {}, set(), set()
  convs = []
  for line in comps.get('ENTRY', []):
    name, opcode, operands, called = _instruction(line)
    if opcode == 'convolution':
      kinds[name] = 'convolution'
      convs.append(operands)
      continue
    body = comps.get(called, [])
    if opcode in _TRANSPOSE_OPS or (opcode == 'fusion' and _root_opcode(body) in _TRANSPOSE_OPS):
      kinds[name] = 'transpose/copy'
      relayouts.add(name)
    elif opcode == 'fusion' or called:
      kinds[name] = 'batchnorm' if _NORM_SCOPE.search('\n'.join(body)) else 'elementwise'
    else:
      kinds[name] = 'other'
  for operands in convs:
    into_convs.update(o for o in operands if o in relayouts)
  return kinds, {'relayouts': len(relayouts), 'relayouts_into_convolutions': len(into_convs),
                 'convolutions': len(convs)}


def _trace_ms(trace_dir: str, kinds: dict[str, str], steps: int) -> dict[str, float]:
  """Event ms per step of each KIND in a jax.profiler Perfetto trace."""
  path = next(pathlib.Path(trace_dir).rglob('*.trace.json.gz'))
  events = json.loads(gzip.decompress(path.read_bytes()))['traceEvents']
  ms = collections.Counter()
  for event in events:
    op = event.get('args', {}).get('hlo_op') if event.get('ph') == 'X' else None
    if op:
      ms[kinds.get(op, 'other')] += event['dur'] / 1e3 / steps
  return dict(ms)


def _jax(settings: common.Settings, variant: str) -> dict:
  patches = jax_patches.apply(settings.jax_patch)  # before anything is built
  import jax  # pylint: disable=g-import-not-at-top
  from rf_jax import runner as runner_lib  # pylint: disable=g-import-not-at-top
  from benchmarks import jax_child  # pylint: disable=g-import-not-at-top
  from rf_jax.models import registry  # pylint: disable=g-import-not-at-top
  runner = runner_lib.create_runner('jit', tta='none')
  state = runner.put_state(jax_child.train_state(variant, settings))
  channels = len(registry.input_bands(variant))
  batch = runner.put_batch(common.random_batches(1, settings.batch, settings.size, channels)[0])
  kinds, counts = hlo_kinds(runner.train_step.lower(state, batch).compile().as_text())

  def steps(n: int) -> float:
    nonlocal state
    start = time.perf_counter()
    for _ in range(n):
      state, metrics = runner.train_step(state, batch)
      jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / n

  steps(1 + settings.warmup)
  with _KernelCost(settings.steps) as kernel:
    step_s = steps(settings.steps)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      traced_s = steps(settings.steps)
    ms = _trace_ms(trace_dir, kinds, settings.steps)
  ms['convolution'] = max(traced_s * 1e3 - sum(v for k, v in ms.items() if k != 'convolution'),
                          0.0)
  return {'step_ms': step_s * 1e3, 'traced_step_ms': traced_s * 1e3, 'ms': ms,
          'patches': patches, **kernel.per_step, **counts}


# --- PyTorch ---------------------------------------------------------------------------------


def torch_kind(name: str) -> str:
  """The KIND of a PyTorch operator name."""
  name = name.lower()
  if 'conv' in name:
    return 'convolution'
  if 'batch_norm' in name:
    return 'batchnorm'
  if any(k in name for k in ('copy', 'contiguous', 'permute', 'transpose', 'clone', 'aten::to',
                             'reorder')):
    return 'transpose/copy'
  if any(k in name for k in ('relu', 'threshold', 'add', 'mul', 'sub', 'div', 'max_pool',
                             'sigmoid', 'binary_cross', 'mean', 'sum', 'fill', 'zero', 'addmm',
                             'mm', 'sgd', 'foreach', 'lerp')):
    return 'elementwise'
  return 'other'


def _torch(settings: common.Settings, variant: str, layout: str) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_child  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_models  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(common.cores())
  torch.manual_seed(common.SEED)
  fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
  model = torch_models.torch_model(variant).to(memory_format=fmt)
  train_fn, _ = torch_child.create_steps(model, settings, torch.device('cpu'), layout)
  batch = common.random_batches(1, settings.batch, settings.size,
                                3 if variant == 'rgb' else 4)[0]
  model.train()
  for _ in range(1 + settings.warmup):
    train_fn(batch)
  with _KernelCost(settings.steps) as kernel:
    start = time.perf_counter()
    for _ in range(settings.steps):
      train_fn(batch)
    step_s = (time.perf_counter() - start) / settings.steps
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    for _ in range(settings.steps):
      train_fn(batch)
    traced_s = (time.perf_counter() - start) / settings.steps
  ms = collections.Counter()
  for row in prof.key_averages():
    ms[torch_kind(row.key)] += row.self_cpu_time_total / 1e3 / settings.steps
  return {'step_ms': step_s * 1e3, 'traced_step_ms': traced_s * 1e3, 'ms': dict(ms),
          **kernel.per_step}


def run(settings: common.Settings, variant: str, framework: str, layout: str = '') -> dict:
  if framework == 'jax':
    return {'framework': 'rf_jax', **_jax(settings, variant)}
  return {'framework': f'torch_{layout}', **_torch(settings, variant, layout)}


def table(results: dict[str, dict[str, dict]], settings: common.Settings) -> str:
  """Markdown: per variant, each side's train-step ms per op kind; the relayout counts."""
  lines = []
  for variant, sides in results.items():
    names = list(sides)
    head = [f'{variant} train step (batch {settings.batch}, {settings.size} px), ms'] + names
    lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for kind in KINDS:
      lines.append('| ' + ' | '.join([kind] + [f'{sides[s]["ms"].get(kind, 0.0):.0f}'
                                              for s in names]) + ' |')
    lines.append('| **step (traced / untraced)** | ' + ' | '.join(
        f'{sides[s]["traced_step_ms"]:.0f} / {sides[s]["step_ms"]:.0f}' for s in names) + ' |')
    lines.append('| kernel (sys) CPU ms, all threads / minor page faults | ' + ' | '.join(
        f'{sides[s]["kernel_ms_per_step"]:.0f} / {sides[s]["page_faults_per_step"]:.0f}'
        for s in names) + ' |')
    jax_side = sides.get('rf_jax')
    if jax_side:
      lines.append(f'\nrf_jax {variant}: {jax_side["relayouts"]} transposes/copies in the '
                   f'optimised train step, {jax_side["relayouts_into_convolutions"]} of them '
                   f'feeding one of its {jax_side["convolutions"]} convolutions.\n')
  return '\n'.join(lines)


if __name__ == '__main__':
  app.run(common.child_main(run))
