"""The PyTorch reference: torch_models' ResNet-18s, `BCEWithLogitsLoss`, the study's SGD.

Eager, `torch.set_num_threads` = the usable cores, on `cuda` when available. On CUDA at its best
settings: `torch.backends.cudnn.benchmark`, TF32 matmuls, and (`--dtype` auto) bfloat16 under
autocast; with `compiled`, the model under `torch.compile` (a failure is reported as
`compile_error`, not raised). Fed as common.resolve picks for the device:

* `ready` (the CPU default): the same NHWC float32 numpy batch the rf_jax side gets, viewed as
  NCHW in the layout measured (`channels_last`, PyTorch's fastest on CPU, or `contiguous` NCHW),
  copied to the device inside each timed step, which synchronises at its end.
* `chips` (the GPU default): chips as stored (uint16, 4 bands) in pinned memory, as a DataLoader
  with `pin_memory=True` hands them over, copied `non_blocking` on a side stream
  common.IN_FLIGHT batches ahead of their step (common.timed_fed); the step makes the input on
  the device as rf_jax's does: bands, float, antialiased bilinear resize to common.input_size,
  random horizontal flip (training), normalisation, the layout measured.

  python -m benchmarks.torch_child job.json result.json   (spawned by orchestrate)
"""

from __future__ import annotations

import platform

from absl import app

from benchmarks import common
from benchmarks import torch_models


def _autocast(settings: common.Settings, device):
  import torch  # pylint: disable=g-import-not-at-top
  dtype = common.resolve(settings, device.type == 'cuda')[1]
  return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == 'bfloat16')


def create_steps(model, settings: common.Settings, device, layout: str):
  """(train_fn, eval_fn) of `model` on the ready feed, each taking a numpy batch and blocking
  until done."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
  optim = common.study_config().optim  # the study's SGD; its rate decay is per epoch
  optimizer = torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum)
  criterion = nn.BCEWithLogitsLoss()
  autocast = _autocast(settings, device)
  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

  def to_torch(batch):
    # NHWC numpy -> NCHW view (channels_last strides, no copy) -> the layout measured.
    x = torch.from_numpy(batch['image']).permute(0, 3, 1, 2)
    return (x.to(device=device).contiguous(memory_format=fmt),
            torch.from_numpy(batch['labels']).to(device))

  def train_fn(batch):
    x, y = to_torch(batch)
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      logits = model(x)
    loss = criterion(logits.float(), y)
    loss.backward()
    optimizer.step()
    loss.item()
    sync()

  def eval_fn(batch):
    x, y = to_torch(batch)
    with torch.inference_mode(), autocast():
      logits = model(x).float()
      scores = torch.sigmoid(logits)
      loss = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction='none')
    return scores.cpu().numpy(), loss.mean(-1).cpu().numpy()

  return train_fn, eval_fn


def _to_float(device):
  """uint16 tensor -> float32 on `device`: a plain cast where the device's kernels take uint16
  (a 'barebones' dtype in PyTorch), else through its int16 view."""
  import torch  # pylint: disable=g-import-not-at-top
  try:
    torch.zeros(2, dtype=torch.uint16, device=device).float()
    return lambda x: x.float()
  except (RuntimeError, NotImplementedError):
    return lambda x: (x.view(torch.int16).to(torch.int32) & 0xFFFF).float()


def input_maker(variant: str, settings: common.Settings, device, layout: str):
  """make(chips, train): chips as stored, uint16 [B, S, S, 4] on `device` -> the model's float32
  input [B, C, size, size] in `layout`, made as rf_jax/augment.py makes it: the variant's bands,
  the whole chip resized (antialiased bilinear, torchvision Resize's) to common.input_size, in
  training each example mirrored with probability 0.5, normalised."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch.nn import functional  # pylint: disable=g-import-not-at-top
  fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
  bands, size = common.BANDS[variant], common.input_size(settings)
  assert bands == tuple(range(len(bands))), bands  # a slice, no gather
  to_float = _to_float(device)

  def make(chips, train: bool):
    x = to_float(chips[..., :len(bands)]).permute(0, 3, 1, 2)  # NCHW, channels_last strides
    if x.shape[-2:] != (size, size):
      x = functional.interpolate(x, size=(size, size), mode='bilinear', align_corners=False,
                                 antialias=True)
    if train:
      flips = torch.rand(x.shape[0], device=x.device) < 0.5
      x = torch.where(flips[:, None, None, None], x.flip(-1), x)
    return ((x - common.CHIP_MEAN) * (1 / common.CHIP_STD)).contiguous(memory_format=fmt)

  return make


def create_fed_steps(model, variant: str, settings: common.Settings, device, layout: str):
  """The chips feed: {'host': numpy batch -> what the loader hands over (pinned on CUDA),
  'put': start its copy to the device, 'train' / 'eval': placed batch -> handle of the started
  step, 'wait' / 'wait_eval': block until that step is done (eval: its outputs as numpy),
  'synchronous': whether a step is done when dispatched (on the CPU)}."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  optim = common.study_config().optim
  optimizer = torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum)
  criterion = nn.BCEWithLogitsLoss()
  autocast = _autocast(settings, device)
  make = input_maker(variant, settings, device, layout)
  cuda = device.type == 'cuda'
  copies = torch.cuda.Stream(device) if cuda else None

  def host(batch):
    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    return {k: v.pin_memory() for k, v in tensors.items()} if cuda else tensors

  def put(batch):
    if not cuda:
      return batch['image'], batch['labels'], None
    with torch.cuda.stream(copies):
      x = batch['image'].to(device, non_blocking=True)
      y = batch['labels'].to(device, non_blocking=True)
      copied = torch.cuda.Event()
      copied.record(copies)
    return x, y, copied

  def take(placed):
    x, y, copied = placed
    if copied is not None:  # the step's stream waits for the copy; its memory stays the step's
      stream = torch.cuda.current_stream(device)
      stream.wait_event(copied)
      x.record_stream(stream)
      y.record_stream(stream)
    return x, y

  def done():
    if not cuda:
      return None
    event = torch.cuda.Event()
    event.record()
    return event

  def train(placed):
    chips, y = take(placed)
    optimizer.zero_grad(set_to_none=True)
    x = make(chips, True)
    with autocast():
      logits = model(x)
    loss = criterion(logits.float(), y)
    loss.backward()
    optimizer.step()
    return done()

  def wait(event):
    if event is not None:
      event.synchronize()

  def evaluate(placed):
    chips, y = take(placed)
    with torch.inference_mode():
      x = make(chips, False)
      with autocast():
        logits = model(x).float()
      scores = torch.sigmoid(logits)
      loss = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction='none')
      outputs = (scores.to('cpu', non_blocking=True), loss.mean(-1).to('cpu', non_blocking=True))
    return outputs, done()

  def wait_eval(handle):
    outputs, event = handle
    wait(event)
    return [o.numpy() for o in outputs]

  return {'host': host, 'put': put, 'train': train, 'eval': evaluate, 'wait': wait,
          'wait_eval': wait_eval, 'synchronous': not cuda}


def _ready(model, settings: common.Settings, device, layout: str, variant: str,
           out: dict) -> None:
  """Fills `out` with the train (then eval) figures, phase by phase."""
  train_fn, eval_fn = create_steps(model, settings, device, layout)
  channels = len(common.BANDS[variant])
  model.train()
  out['train'] = common.timed(
      train_fn, common.random_batches(2, settings.batch, settings.size, channels),
      settings.warmup, settings.steps)
  out['rss_peak_train_mb'] = common.maxrss_mb()
  if not settings.no_eval:
    model.eval()
    out['eval'] = common.timed(
        eval_fn, common.random_batches(2, settings.eval_batch, settings.size, channels, seed=1),
        settings.warmup, settings.eval_steps)


def _chips(model, settings: common.Settings, device, layout: str, variant: str,
           out: dict) -> None:
  """Fills `out` with the train (then eval) figures, phase by phase."""
  fed = create_fed_steps(model, variant, settings, device, layout)
  distinct = common.IN_FLIGHT + 1  # batches generated, cycled
  model.train()
  out['train'] = common.timed_fed(
      fed['train'], fed['wait'], fed['put'],
      [fed['host'](b) for b in common.random_chips(distinct, settings.batch, settings.size)],
      settings.warmup, settings.steps, fed['synchronous'])
  out['rss_peak_train_mb'] = common.maxrss_mb()
  if not settings.no_eval:
    model.eval()
    out['eval'] = common.timed_fed(
        fed['eval'], fed['wait_eval'], fed['put'],
        [fed['host'](b) for b in common.random_chips(distinct, settings.eval_batch,
                                                      settings.size, seed=1)],
        settings.warmup, settings.eval_steps, fed['synchronous'])


def run(settings: common.Settings, variant: str, layout: str, compiled: bool = False) -> dict:
  """Times `variant`'s train (then eval) step in `layout` (with `compiled`, under
  torch.compile); peak memory after each phase."""
  import torch  # pylint: disable=g-import-not-at-top
  threads = common.cores()
  torch.set_num_threads(threads)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  if device.type == 'cuda':  # PyTorch's fastest GPU settings
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  feed, dtype = common.resolve(settings, device.type == 'cuda')
  rss_imports = common.maxrss_mb()
  torch.manual_seed(common.SEED)
  fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
  model = torch_models.torch_model(variant).to(device=device, memory_format=fmt)
  result = {'framework': 'pytorch', 'layout': layout, 'threads': threads,
            'device': str(device), 'feed': feed, 'dtype': dtype, 'compiled': compiled,
            'input_size': common.input_size(settings) if feed == 'chips' else settings.size,
            'device_kind': (torch.cuda.get_device_name(device) if device.type == 'cuda'
                            else platform.processor() or platform.machine()),
            'rss_after_imports_mb': rss_imports}
  measure = _chips if feed == 'chips' else _ready
  try:
    measure(torch.compile(model) if compiled else model, settings, device, layout, variant,
            result)
  except Exception as e:  # pylint: disable=broad-except
    if not compiled:
      raise
    # torch.compile compiles at a phase's first call: what stops it is reported, and the
    # phases it stopped are left out.
    lines = [line for line in f'{type(e).__name__}: {e}'.splitlines() if line.strip()]
    result['compile_error'] = (lines or [type(e).__name__])[0][:400]
  result.setdefault('rss_peak_train_mb', common.maxrss_mb())
  result['rss_peak_mb'] = common.maxrss_mb()
  if device.type == 'cuda':
    result['device_peak_mb'] = torch.cuda.max_memory_allocated() / 2**20
  return result


if __name__ == '__main__':
  app.run(common.child_main(run))
