"""torchvision references the tests compare against."""

import torch
import torchvision


def make_torch_resnet18(seed=0):
  """Random-init torchvision ResNet-18 whose BN parameters and running stats are not 1/0."""
  torch.manual_seed(seed)
  model = torchvision.models.resnet18()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.1)
    model.train()
    for _ in range(3):  # running stats move away from 0 / 1
      model(torch.randn(4, 3, 96, 96) * 2.0 + 0.5)
  model.eval()
  return model
