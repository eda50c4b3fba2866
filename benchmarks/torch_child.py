"""The PyTorch reference: torch_models' ResNet-18s, `BCEWithLogitsLoss`, the study's SGD.

Eager, `torch.set_num_threads` = the usable cores, on `cuda` when available (synchronised
before each timing, `--dtype bfloat16` under autocast). The batch arrives as the same NHWC
numpy array the rf_jax side gets and is viewed as NCHW in the layout measured:
`channels_last` (PyTorch's fastest on CPU) or `contiguous` NCHW.

  python -m benchmarks.torch_child job.json result.json   (spawned by orchestrate)
"""

from __future__ import annotations

from absl import app

from benchmarks import common
from benchmarks import torch_models


def create_steps(model, settings: common.Settings, device, layout: str):
  """(train_fn, eval_fn) of `model`, each taking a numpy batch and blocking until done."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
  optim = common.study_config().optim  # the study's SGD; its rate decay is per epoch
  optimizer = torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum)
  criterion = nn.BCEWithLogitsLoss()
  autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16,
                                    enabled=settings.dtype == 'bfloat16')
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


def run(settings: common.Settings, variant: str, layout: str) -> dict:
  """Times `variant`'s train (then eval) step in `layout`; peak memory after each phase."""
  import torch  # pylint: disable=g-import-not-at-top
  threads = common.cores()
  torch.set_num_threads(threads)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  rss_imports = common.maxrss_mb()
  torch.manual_seed(common.SEED)
  fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
  model = torch_models.torch_model(variant).to(device=device, memory_format=fmt)
  train_fn, eval_fn = create_steps(model, settings, device, layout)
  channels = 3 if variant == 'rgb' else 4  # registry.input_bands, without flax in this process
  result = {'framework': 'pytorch', 'layout': layout, 'threads': threads,
            'device': str(device), 'rss_after_imports_mb': rss_imports}
  model.train()
  result['train'] = common.timed(
      train_fn, common.random_batches(2, settings.batch, settings.size, channels),
      settings.warmup, settings.steps)
  result['rss_peak_train_mb'] = common.maxrss_mb()
  if not settings.no_eval:
    model.eval()
    result['eval'] = common.timed(
        eval_fn, common.random_batches(2, settings.eval_batch, settings.size, channels, seed=1),
        settings.warmup, settings.eval_steps)
  result['rss_peak_mb'] = common.maxrss_mb()
  if device.type == 'cuda':
    result['device_peak_mb'] = torch.cuda.max_memory_allocated() / 2**20
  return result


if __name__ == '__main__':
  app.run(common.child_main(run))
