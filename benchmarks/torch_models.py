"""The PyTorch reference models: torchvision ResNet-18s built like rf_jax's study models.

| variant | network (rf_jax/models/registry.py)                                              |
|---------|----------------------------------------------------------------------------------|
| `rgb`   | `resnet18(num_classes=17)`                                                       |
| `rgbir` | the same with a 4-channel 7x7 stem                                               |
| `dual`  | an RGB trunk on x[:, :3] and an IR trunk (1-channel stem) on x[:, 3:], both with |
|         | `fc` removed; their pooled 512 + 512 features concatenated -> Linear(1024, 17)   |

Randomly initialised (torch's defaults); inputs are NCHW in R, G, B[, NIR] order. The
benchmark's PyTorch side and the fidelity tests both build them here.
"""

from __future__ import annotations

from benchmarks import common


def _stem(channels: int):
  from torch import nn  # pylint: disable=g-import-not-at-top
  return nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)


def torch_model(variant: str):
  """The `torch.nn.Module` for `variant` (one of `common.VARIANTS`)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top

  if variant not in common.VARIANTS:
    raise ValueError(f'variant {variant!r} is not one of {", ".join(common.VARIANTS)}')
  if variant in ('rgb', 'rgbir'):
    model = torchvision.models.resnet18(weights=None, num_classes=common.NUM_TAGS)
    if variant == 'rgbir':
      model.conv1 = _stem(4)
    return model

  def trunk(channels: int):
    model = torchvision.models.resnet18(weights=None)
    if channels != 3:
      model.conv1 = _stem(channels)
    model.fc = nn.Identity()
    return model

  class Dual(nn.Module):

    def __init__(self):
      super().__init__()
      self.rgb_trunk = trunk(3)
      self.ir_trunk = trunk(1)
      self.fc = nn.Linear(1024, common.NUM_TAGS)

    def forward(self, x):
      return self.fc(torch.cat([self.rgb_trunk(x[:, :3]), self.ir_trunk(x[:, 3:])], dim=1))

  return Dual()
