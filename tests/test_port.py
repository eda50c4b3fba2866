"""torchvision <-> Flax conversion, the weights file, the generic merge, the port script and its
refusals."""

import builtins
import importlib.util
import subprocess
import sys
from pathlib import Path

from absl.testing import flagsaver
from flax.core import FrozenDict
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

from rf_jax import weights  # pylint: disable=g-import-not-at-top


def _load_script():
  """scripts/port_weights.py as a module, once per process (it defines absl flags)."""
  if 'port_weights' not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        'port_weights', ROOT / 'scripts' / 'port_weights.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules['port_weights'] = module
  return sys.modules['port_weights']


ROOT = Path(__file__).parents[1]
port_weights = _load_script()


def run_script(*args) -> int:
  """The script's exit status, as `app.run` gives it; every flag starts from its default."""
  with flagsaver.flagsaver():
    try:
      return port_weights.main(port_weights.parse_flags(['port_weights.py', *map(str, args)]))
    except SystemExit as e:
      return e.code


@pytest.fixture(scope='module')
def state_dict():
  torch.manual_seed(0)
  return torchvision.models.resnet18().state_dict()


def test_conversion_layout_and_roundtrip(state_dict):
  v = weights.torchvision_to_flax(state_dict)
  w = state_dict['layer2.0.downsample.0.weight'].numpy()
  np.testing.assert_array_equal(v['params']['layer2_0']['downsample_0']['kernel'],
                                w.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v['params']['fc']['kernel'], state_dict['fc.weight'].numpy().T)
  np.testing.assert_array_equal(v['batch_stats']['bn1']['var'],
                                state_dict['bn1.running_var'].numpy())
  back = weights.flax_to_torchvision(v)
  expected = {k: t.numpy() for k, t in state_dict.items() if 'num_batches' not in k}
  assert set(back) == set(expected)
  for k in expected:
    np.testing.assert_array_equal(back[k], expected[k])
  v2 = weights.torchvision_to_flax({k: t.numpy() for k, t in state_dict.items()})  # numpy input too
  np.testing.assert_array_equal(v2['params']['conv1']['kernel'], v['params']['conv1']['kernel'])


def test_resnet34_and_truncated_state_dicts_list_every_name(state_dict):
  with pytest.raises(weights.WeightsMismatchError) as e:
    weights.torchvision_to_flax(torchvision.models.resnet34().state_dict())
  assert '80 mismatch(es)' in str(e.value) and 'layer3_5/conv2/kernel' in str(e.value)
  sd = dict(state_dict)
  del sd['layer4.1.conv2.weight'], sd['layer4.1.bn2.running_mean']
  sd['fc.weight'] = sd['fc.weight'][:, :100]
  with pytest.raises(weights.WeightsMismatchError) as e:
    weights.torchvision_to_flax(sd)
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
  with pytest.raises(weights.UnsafeCheckpointError, match='weights_only=True'):
    weights.read_state_dict(evil)
  assert run_script('--src', evil, '--out', tmp_path / 'o.msgpack') == 2
  assert 'refusing to load' in capsys.readouterr().err
  assert not marker.exists() and not (tmp_path / 'o.msgpack').exists()


def test_script_pth_and_safetensors_with_verify(state_dict, tmp_path, capsys, monkeypatch):
  pth = tmp_path / 'resnet18.pth'
  torch.save(state_dict, pth)
  out = tmp_path / 'w.msgpack'
  assert run_script('--src', pth, '--out', out, '--verify', '--verify_size', '128') == 0
  text = capsys.readouterr().out
  print(text)
  assert 'OK' in text and (tmp_path / 'w.msgpack.sha256').is_file()
  diff = float(text.split('= ')[1].split()[0])
  assert diff < 1e-4
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  st = tmp_path / 'm.safetensors'
  save_file({k: v.numpy() for k, v in state_dict.items()}, str(st))
  monkeypatch.setitem(sys.modules, 'torch', None)  # .safetensors must not need torch
  sd = weights.read_state_dict(st)
  monkeypatch.undo()
  out2 = tmp_path / 'w2.msgpack'
  assert run_script('--src', st, '--out', out2) == 0
  a, b = weights.load_weights_file(out), weights.load_weights_file(out2)
  np.testing.assert_array_equal(a['params']['conv1']['kernel'], b['params']['conv1']['kernel'])
  assert set(sd) == set(state_dict)


def test_weights_file_sha_and_missing_file(state_dict, tmp_path):
  missing = tmp_path / 'weights' / 'r18.msgpack'
  with pytest.raises(FileNotFoundError, match=r'python scripts/port_weights.py --torchvision resnet18 --out'):
    weights.load_weights_file(missing)
  path = tmp_path / 'w.msgpack'
  weights.save_weights_file(weights.torchvision_to_flax(state_dict), path)
  weights.load_weights_file(path)
  data = bytearray(path.read_bytes())
  data[-1] ^= 1
  path.write_bytes(bytes(data))
  with pytest.raises(weights.WeightsFileError, match='does not match'):
    weights.load_weights_file(path)
  (tmp_path / 'w.msgpack.sha256').unlink()
  with pytest.raises(weights.WeightsFileError, match='no SHA-256'):
    weights.load_weights_file(path)


def test_hub_name_hash_is_checked(state_dict, tmp_path, capsys):
  pth = tmp_path / 'resnet18-deadbeef.pth'
  torch.save(state_dict, pth)
  assert run_script('--src', pth, '--out', tmp_path / 'o.msgpack') == 2
  assert 'corrupt' in capsys.readouterr().err


def the_error_line(capsys) -> str:
  """stderr, which must be exactly one `error:` line (no traceback)."""
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), lines
  return lines[0]


def test_state_dict_wrappers_are_unwrapped(state_dict, tmp_path):
  path = tmp_path / 'checkpoint.pt'
  torch.save({'state_dict': {f'module.{k}': v for k, v in state_dict.items()}, 'epoch': 3}, path)
  read = weights.read_state_dict(path)
  assert set(read) == set(state_dict)
  np.testing.assert_array_equal(read['layer1.0.conv1.weight'],
                                state_dict['layer1.0.conv1.weight'].numpy())


@pytest.mark.parametrize('args, says', [
    ((), 'give exactly one of --src and --torchvision'),
    (('--src', 'a.pth', '--torchvision', 'resnet18', '--out', 'o'), 'exactly one of'),
    (('--src', 'a.pth'), '--out is required'),
    (('--torchvision', 'resnet50', '--out', 'o'), 'resnet18'),
    (('--verify_size', 'big', '--src', 'a.pth', '--out', 'o'), 'verify_size'),
    (('--srcs', 'a.pth', '--out', 'o'), 'srcs'),
    (('--src', 'a.pth', '--out', 'o', 'extra'), "unexpected arguments 'extra'"),
    (('--src', 'no_such.pth', '--out', 'o'), "No such file or directory: 'no_such.pth'"),
])
def test_usage_mistakes_are_one_error_line(args, says, capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert run_script(*args) == 2
  assert says in the_error_line(capsys)
  assert not (tmp_path / 'o').exists()


def test_without_torch_the_script_says_what_to_install(state_dict, tmp_path, capsys, monkeypatch):
  pth = tmp_path / 'resnet18.pth'
  torch.save(state_dict, pth)
  out = tmp_path / 'o.msgpack'
  monkeypatch.setitem(sys.modules, 'torch', None)
  monkeypatch.setitem(sys.modules, 'torchvision', None)
  assert run_script('--torchvision', 'resnet18', '--out', out) == 2
  line = the_error_line(capsys)
  assert 'pip install torch torchvision' in line and '--src' in line and '.safetensors' in line
  assert run_script('--src', pth, '--out', out) == 2
  line = the_error_line(capsys)
  assert 'pip install torch' in line and 'resnet18.pth' in line and '.safetensors' in line
  assert not out.exists()


def test_cli_without_torch_exits_2_with_one_line(tmp_path):
  """Through absl.app.run, as a user runs it: exit status 2 and one `error:` line."""
  out = tmp_path / 'o.msgpack'
  code = ("import runpy, sys; sys.modules['torch'] = sys.modules['torchvision'] = None; "
          f"sys.argv = ['port_weights.py', '--torchvision', 'resnet18', '--out', {str(out)!r}]; "
          "runpy.run_path('scripts/port_weights.py', run_name='__main__')")
  run = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, check=False)
  print(run.stderr)
  errors = [line for line in run.stderr.splitlines() if line.startswith('error: ')]
  assert run.returncode == 2 and len(errors) == 1 and 'Traceback' not in run.stderr
  assert 'pip install torch torchvision' in errors[0] and not out.exists()


# --- the generic merge ------------------------------------------------------------------------


def test_merge_loads_casts_and_keeps_dont_load_on_both_sides():
  init = FrozenDict({'params': {'conv': {'kernel': jnp.zeros((2, 3), jnp.float32)},
                                'head': {'bias': jnp.zeros(4, jnp.float32)}},
                     'batch_stats': {'bn': {'mean': jnp.zeros(3, jnp.float32)}}})
  loaded = {'params': {'conv': {'kernel': np.ones((2, 3), np.float64)},
                       'head': {'bias': np.ones(1000)}},  # another head: never compared
            'batch_stats': {'bn': {'mean': np.full(3, 2.0)}}}
  out = weights.merge(init, loaded, dont_load=[r'params/head/.*'])
  assert isinstance(out, FrozenDict)
  assert out['params']['conv']['kernel'].dtype == jnp.float32
  np.testing.assert_array_equal(out['params']['conv']['kernel'], np.ones((2, 3)))
  np.testing.assert_array_equal(out['batch_stats']['bn']['mean'], np.full(3, 2.0))
  assert out['params']['head']['bias'] is init['params']['head']['bias']
  plain = weights.merge(dict(init), loaded, dont_load=[r'params/head/.*'])
  assert not isinstance(plain, FrozenDict)


def test_merge_lists_every_mismatch_in_one_error():
  init = {'params': {'conv': {'kernel': jnp.zeros((2, 3)), 'bias': jnp.zeros(3)},
                     'fc': {'kernel': jnp.zeros(4)}}}
  loaded = {'params': {'conv': {'kernel': np.zeros((3, 2))}, 'fc': {'kernel': np.zeros(4)},
                       'extra': {'kernel': np.zeros(5)}}}
  with pytest.raises(weights.WeightsMismatchError) as e:
    weights.merge(init, loaded, dont_load=['params/nothing/.*', '('])
  msg = str(e.value)
  print(msg)
  assert '5 mismatch(es) (2 dont_load, 1 shape, 1 missing, 1 unexpected)' in msg
  assert "pattern 'params/nothing/.*' matches no name" in msg
  assert "pattern '(' is not a regular expression" in msg
  assert 'params/conv/kernel' in msg and 'expected (2, 3), found (3, 2)' in msg
  assert 'params/conv/bias' in msg and 'expected (3,), found none' in msg
  assert 'params/extra/kernel' in msg and 'expected none, found (5,)' in msg
  assert 'params/fc/kernel' not in msg
