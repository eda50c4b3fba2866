"""torchvision <-> Flax conversion, the weights file, the port script and its refusals."""

import builtins
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

from rf_jax.models import port  # pylint: disable=g-import-not-at-top

_spec = importlib.util.spec_from_file_location(
    'port_weights', Path(__file__).parents[1] / 'scripts' / 'port_weights.py')
port_weights = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(port_weights)


@pytest.fixture(scope='module')
def state_dict():
  torch.manual_seed(0)
  return torchvision.models.resnet18().state_dict()


def test_conversion_layout_and_roundtrip(state_dict):
  v = port.torchvision_to_flax(state_dict)
  w = state_dict['layer2.0.downsample.0.weight'].numpy()
  np.testing.assert_array_equal(v['params']['layer2_0']['downsample_0']['kernel'],
                                w.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v['params']['fc']['kernel'], state_dict['fc.weight'].numpy().T)
  np.testing.assert_array_equal(v['batch_stats']['bn1']['var'],
                                state_dict['bn1.running_var'].numpy())
  back = port.flax_to_torchvision(v)
  expected = {k: t.numpy() for k, t in state_dict.items() if 'num_batches' not in k}
  assert set(back) == set(expected)
  for k in expected:
    np.testing.assert_array_equal(back[k], expected[k])
  v2 = port.torchvision_to_flax({k: t.numpy() for k, t in state_dict.items()})  # numpy input too
  np.testing.assert_array_equal(v2['params']['conv1']['kernel'], v['params']['conv1']['kernel'])


def test_resnet34_and_truncated_state_dicts_list_every_name(state_dict):
  with pytest.raises(port.WeightsMismatchError) as e:
    port.torchvision_to_flax(torchvision.models.resnet34().state_dict())
  assert '80 mismatch(es)' in str(e.value) and 'layer3_5/conv2/kernel' in str(e.value)
  sd = dict(state_dict)
  del sd['layer4.1.conv2.weight'], sd['layer4.1.bn2.running_mean']
  sd['fc.weight'] = sd['fc.weight'][:, :100]
  with pytest.raises(port.WeightsMismatchError) as e:
    port.torchvision_to_flax(sd)
  msg = str(e.value)
  assert '3 mismatch(es)' in msg
  assert 'params/layer4_1/conv2/kernel  [torch layer4.1.conv2.weight]' in msg
  assert 'batch_stats/layer4_1/bn2/mean' in msg and 'expected (3, 3, 512, 512), found none' in msg
  assert 'expected (512, 1000), found (100, 1000)' in msg


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (builtins.exec, (f'open({str(self.marker)!r}, "w").close()',))


def test_malicious_pth_is_refused(tmp_path, capsys):
  marker = tmp_path / 'pwned'
  evil = tmp_path / 'evil.pth'
  torch.save({'conv1.weight': _Evil(marker)}, evil)
  with pytest.raises(port.UnsafeCheckpointError, match='weights_only=True'):
    port.read_state_dict(evil)
  assert port_weights.main(['--src', str(evil), '--out', str(tmp_path / 'o.msgpack')]) == 2
  assert 'refusing to load' in capsys.readouterr().err
  assert not marker.exists() and not (tmp_path / 'o.msgpack').exists()


def test_script_pth_and_safetensors_with_verify(state_dict, tmp_path, capsys, monkeypatch):
  pth = tmp_path / 'resnet18.pth'
  torch.save(state_dict, pth)
  out = tmp_path / 'w.msgpack'
  assert port_weights.main(['--src', str(pth), '--out', str(out), '--verify',
                            '--verify-size', '128']) == 0
  text = capsys.readouterr().out
  print(text)
  assert 'OK' in text and (tmp_path / 'w.msgpack.sha256').is_file()
  diff = float(text.split('= ')[1].split()[0])
  assert diff < 1e-4
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  st = tmp_path / 'm.safetensors'
  save_file({k: v.numpy() for k, v in state_dict.items()}, str(st))
  monkeypatch.setitem(sys.modules, 'torch', None)  # .safetensors must not need torch
  sd = port.read_state_dict(st)
  monkeypatch.undo()
  out2 = tmp_path / 'w2.msgpack'
  assert port_weights.main(['--src', str(st), '--out', str(out2)]) == 0
  a, b = port.load_weights_file(out), port.load_weights_file(out2)
  np.testing.assert_array_equal(a['params']['conv1']['kernel'], b['params']['conv1']['kernel'])
  assert set(sd) == set(state_dict)


def test_weights_file_sha_and_missing_file(state_dict, tmp_path):
  missing = tmp_path / 'weights' / 'r18.msgpack'
  with pytest.raises(FileNotFoundError, match=r'python scripts/port_weights.py --torchvision resnet18 --out'):
    port.load_weights_file(missing)
  path = tmp_path / 'w.msgpack'
  port.save_weights_file(port.torchvision_to_flax(state_dict), path)
  port.load_weights_file(path)
  data = bytearray(path.read_bytes())
  data[-1] ^= 1
  path.write_bytes(bytes(data))
  with pytest.raises(port.WeightsFileError, match='does not match'):
    port.load_weights_file(path)
  (tmp_path / 'w.msgpack.sha256').unlink()
  with pytest.raises(port.WeightsFileError, match='no SHA-256'):
    port.load_weights_file(path)


def test_hub_name_hash_is_checked(state_dict, tmp_path, capsys):
  pth = tmp_path / 'resnet18-deadbeef.pth'
  torch.save(state_dict, pth)
  assert port_weights.main(['--src', str(pth), '--out', str(tmp_path / 'o.msgpack')]) == 2
  assert 'corrupt' in capsys.readouterr().err
