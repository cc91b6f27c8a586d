"""pan_jax.convert and pan_jax.pretrained without PyTorch.

State dicts are made from the converter's own key mapping with random values
and written as .safetensors (by hand here, read by the safetensors library,
a dependency of pan_jax), so these tests need no torch; numerical parity
with PyTorch is in test_convert_torch.py.
"""

import json
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import smp_pan
from configs import voc
from pan_jax import convert
from pan_jax import models
from pan_jax.checkpoints import pretrained
from pan_jax.convert import archs
from pan_jax.convert import keymaps
from pan_jax.convert import readers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_safetensors(path, state):
  """Minimal .safetensors writer (float32 / int64 arrays)."""
  codes = {np.dtype(np.float32): 'F32', np.dtype(np.int64): 'I64',
           np.dtype(np.float16): 'F16'}
  header, chunks, offset = {}, [], 0
  for name, array in state.items():
    data = np.ascontiguousarray(array).tobytes()
    header[name] = {'dtype': codes[array.dtype], 'shape': list(array.shape),
                    'data_offsets': [offset, offset + len(data)]}
    chunks.append(data)
    offset += len(data)
  text = json.dumps(header).encode()
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(text)) + text + b''.join(chunks))


def fake_state(fmt, arch, seed=0):
  """A random state dict laid out as `fmt` stores `arch`, with extras.

  Returns:
    (state, expected): the PyTorch-layout dict (with num_batches_tracked
    counters, and fc.* for ImageNet formats) and the flattened pan_jax
    variables it must convert to.
  """
  rng = np.random.RandomState(seed)
  state, expected = {}, {}
  for path, target in archs.target_variables(fmt, arch).items():
    value = rng.randn(*target.shape).astype(np.float32)
    expected[path] = value
    key = keymaps.source_key(fmt, arch, path)
    state[key] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
    if key.endswith('running_var'):
      state[key[:-len('running_var')] + 'num_batches_tracked'] = np.array(
          7, np.int64)
  if fmt != 'smp':
    state['fc.weight'] = rng.randn(1000, 512).astype(np.float32)
    state['fc.bias'] = rng.randn(1000).astype(np.float32)
  return state, expected


@pytest.fixture(scope='module')
def resnet18d(tmp_path_factory):
  """timm resnet18d as .safetensors: deep stem, avg-pool shortcuts."""
  arch = archs.parse_arch('timm', 'resnet18d')
  state, expected = fake_state('timm', arch)
  path = str(tmp_path_factory.mktemp('weights') / 'resnet18d.safetensors')
  write_safetensors(path, state)
  return path, state, expected


@pytest.fixture(scope='module')
def resnet18d_converted(resnet18d, tmp_path_factory):
  path, _, _ = resnet18d
  out = str(tmp_path_factory.mktemp('converted') / 'resnet18d')
  message = convert.convert('timm', path, out)
  return out, message


def test_safetensors_round_trip(resnet18d, resnet18d_converted):
  _, state, expected = resnet18d
  out, message = resnet18d_converted
  assert 'timm resnet18d (inferred from the keys)' in message
  counters = sum(k.endswith('num_batches_tracked') for k in state)
  assert counters == 22  # 3 stem BNs, 2 per block, 3 shortcut BNs.
  assert f'{counters} num_batches_tracked counters' in message
  assert 'fc.weight, fc.bias' in message
  assert '--config.model.stem=deep_narrow' in message
  assert '--config.model.avg_down=True' in message
  info = pretrained.read_info(out)
  assert info['kind'] == 'backbone'
  assert info['model'] == {'backbone': 'resnet18', 'stem': 'deep_narrow',
                           'avg_down': True, 'base_width': 64}
  restored = pretrained.restore_variables(out)
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  flat = traverse_util.flatten_dict(restored)
  assert set(flat) == set(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(flat[key], value, err_msg=str(key))
  # Nothing but the finished directory is left next to it.
  assert os.listdir(os.path.dirname(out)) == ['resnet18d']


def test_reads_files_of_the_safetensors_package(tmp_path):
  st = pytest.importorskip('safetensors.numpy')
  state = {'a': np.arange(6, dtype=np.float32).reshape(2, 3),
           'b': np.array(3, np.int64),
           'c': np.ones((2, 2), np.float16),
           'd': np.array([1.5, -2.25], jnp.bfloat16),
           'e': np.array([7, 65535], np.uint16)}
  path = str(tmp_path / 'x.safetensors')
  st.save_file(state, path)
  read = readers.read_safetensors(path)
  np.testing.assert_array_equal(read['a'], state['a'])
  assert read['b'] == 3 and read['c'].dtype == np.float32
  assert read['d'].dtype == np.float32
  np.testing.assert_array_equal(read['d'], [1.5, -2.25])
  assert read['e'].dtype == np.uint16 and list(read['e']) == [7, 65535]


def _edit_header(path, out, edit):
  """Copies a .safetensors file with edit(header) applied to its JSON."""
  with open(path, 'rb') as f:
    data = f.read()
  (size,) = struct.unpack('<Q', data[:8])
  header = json.loads(data[8:8 + size])
  edit(header)
  text = json.dumps(header).encode()
  with open(out, 'wb') as f:
    f.write(struct.pack('<Q', len(text)) + text + data[8 + size:])


def test_unreadable_safetensors_headers_are_named(resnet18d, tmp_path):
  path, _, _ = resnet18d
  bad = str(tmp_path / 'fp8.safetensors')
  _edit_header(path, bad,
               lambda h: h['fc.bias'].update(dtype='F8_E4M3'))
  with pytest.raises(convert.ConversionError,
                     match=r"tensor 'fc.bias' has dtype 'F8_E4M3'; pan_jax "
                           r'reads F64, F32'):
    readers.read_safetensors(bad)
  # A header that fits the file but leaves bytes no tensor covers: the
  # library refuses it, and the message still names the file.
  gap = str(tmp_path / 'gap.safetensors')

  def shrink(header):
    begin, end = header['fc.bias']['data_offsets']
    header['fc.bias']['data_offsets'] = [begin, end - 4]
    header['fc.bias']['shape'] = [999]

  _edit_header(path, gap, shrink)
  with pytest.raises(convert.ConversionError,
                     match=r'gap\.safetensors: not a valid safetensors file'):
    readers.read_safetensors(gap)


def test_truncated_safetensors_names_the_key(resnet18d, tmp_path):
  path, _, _ = resnet18d
  with open(path, 'rb') as f:
    data = f.read()
  bad = str(tmp_path / 'bad.safetensors')
  with open(bad, 'wb') as f:
    f.write(data[:-1000])
  with pytest.raises(convert.ConversionError,
                     match=r"tensor '[\w.]+' .* the file is truncated"):
    convert.convert('timm', bad, str(tmp_path / 'out'))
  assert not os.path.exists(tmp_path / 'out')


@pytest.mark.parametrize('edit, pattern', [
    ('rename', r"missing key 'layer3\.1\.conv2\.weight' for "
               r'params/backbone/layer3_1/conv2/kernel'),
    ('reshape', r"key 'layer2\.0\.bn1\.running_var': the file has shape "
                r'\(64,\), batch_stats/backbone/layer2_0/bn1/var needs '
                r'\(128,\)'),
    ('extra', r"unexpected key 'layer4\.0\.se\.weight' \(shape \(4,\)\)"),
])
def test_mismatched_file_names_the_key(resnet18d, tmp_path, edit, pattern):
  _, state, _ = resnet18d
  state = dict(state)
  if edit == 'rename':
    state['layer3.1.conv9.weight'] = state.pop('layer3.1.conv2.weight')
  elif edit == 'reshape':
    state['layer2.0.bn1.running_var'] = np.ones(64, np.float32)
  else:
    state['layer4.0.se.weight'] = np.ones(4, np.float32)
  path = str(tmp_path / 'edited.safetensors')
  write_safetensors(path, state)
  with pytest.raises(convert.ConversionError, match=pattern):
    convert.convert('timm', path, str(tmp_path / 'out'))
  assert os.listdir(tmp_path) == ['edited.safetensors']


def test_wrong_arch_flag_says_what_the_file_is(resnet18d, tmp_path):
  path, _, _ = resnet18d
  with pytest.raises(convert.ConversionError,
                     match=r'looks like resnet18d, not --arch=resnet34d'):
    convert.convert('timm', path, str(tmp_path / 'out'), 'resnet34d')
  with pytest.raises(convert.ConversionError, match=r'resnet<depth>d'):
    convert.convert('timm', path, str(tmp_path / 'out'), 'resnet18x')
  message = convert.convert('timm', path, str(tmp_path / 'out'), 'resnet18d')
  assert 'resnet18d (as stated by --arch)' in message


def test_format_mismatch_is_a_clear_cli_error(resnet18d, tmp_path):
  path, _, _ = resnet18d
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-m', 'pan_jax.convert', '--format=torchvision',
       f'--input={path}', f'--output={tmp_path / "out"}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode == 1, result.stderr
  assert 'is not a torchvision state dict' in result.stderr
  assert 'try --format=timm' in result.stderr
  with pytest.raises(convert.ConversionError,
                     match=r'not a smp state dict.*try --format=timm'):
    convert.convert('smp', path, str(tmp_path / 'out'))
  assert not os.path.exists(tmp_path / 'out')


def test_existing_output_is_refused(resnet18d, resnet18d_converted):
  path, _, _ = resnet18d
  out, _ = resnet18d_converted
  with pytest.raises(convert.ConversionError, match='already exists'):
    convert.convert('timm', path, out)


@pytest.mark.parametrize('backbone', ['resnet18', 'resnet101'])
def test_smp_config_is_configs_smp_pan(backbone):
  # convert builds the config itself (library code does not import
  # configs/); it must stay equal to configs/smp_pan.py.
  ours = json.loads(archs.smp_config(backbone).to_json())
  theirs = json.loads(smp_pan.get_config(backbone).to_json())
  assert ours == theirs


def _abstract(config, num_classes=21, size=64):
  network = models.create_model(config, num_classes)
  return jax.eval_shape(
      lambda x: network.init(jax.random.PRNGKey(0), x, train=False),
      jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))


def test_load_pretrained_backbone(resnet18d, resnet18d_converted):
  _, _, expected = resnet18d
  out, _ = resnet18d_converted
  config = voc.get_config('resnet18')
  config.model.stem = 'deep_narrow'
  config.model.avg_down = True
  abstract = _abstract(config)
  variables, message = pretrained.load_pretrained(abstract, out, config)
  assert message.startswith('Loaded the backbone (the centre block')
  assert 'timm resnet18d' in message
  for key, value in expected.items():
    leaf = variables
    for part in key:
      leaf = leaf[part]
    np.testing.assert_array_equal(leaf, value)
  # The head is left as it was given.
  assert isinstance(variables['params']['center']['main']['conv']['kernel'],
                    jax.ShapeDtypeStruct)


def test_load_pretrained_refuses_the_wrong_model(resnet18d_converted):
  out, _ = resnet18d_converted
  config = voc.get_config('resnet18')
  config.model.stem = 'deep_narrow'
  # avg_down changes no shape: only the config check sees it.
  with pytest.raises(ValueError, match=r'model.avg_down=False \(the weights '
                     r'need True\).*--config.model.avg_down=True'):
    pretrained.load_pretrained(_abstract(config), out, config)
  # Without the config, shapes still catch a wrong stem.
  config.model.stem = 'deep'
  with pytest.raises(ValueError, match=r'params/backbone/\S+: .* has shape '
                     r'\(.*\), the model expects \(.*\).*'
                     r'--config.model.stem=deep_narrow'):
    pretrained.load_pretrained(_abstract(config), out)
  config.model.stem = 'torchvision'
  with pytest.raises(ValueError, match=r"has no array for the model's "
                     r'params/backbone/(bn1|conv1)/'):
    pretrained.load_pretrained(_abstract(config), out)


def test_smp_file_becomes_an_inference_checkpoint(tmp_path):
  # A 5-class smp PAN with decoder_channels=16: both are read off the file.
  arch = archs.Arch('resnet18', 'resnet18', 'torchvision', False,
                      num_classes=5, decoder_channels=16)
  state, expected = fake_state('smp', arch)
  assert 'segmentation_head.0.weight' in state
  assert state['decoder.fpa.down3.2.conv.weight'].shape == (1, 1, 3, 3)
  path = str(tmp_path / 'pan.safetensors')
  write_safetensors(path, state)
  out = str(tmp_path / 'pan')
  message = convert.convert('smp', path, out)
  assert 'smp resnet18 (inferred' in message
  assert '5 classes, decoder width 16' in message
  assert sorted(os.listdir(out)) == [
      'config.json', 'dataset.json', 'export.json', 'pretrained.json',
      'variables']
  with open(os.path.join(out, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(os.path.join(out, 'dataset.json')) as f:
    meta = json.load(f)
  assert meta['num_classes'] == 5 and meta['class_names'][4] == 'class_4'
  assert len(meta['palette']) == 5 and meta['ignore_label'] == 255
  assert config.model.decoder_channels == 16
  assert config.data.name == 'folder'
  variables, message = pretrained.load_pretrained(
      _abstract(config, 5, size=128), out, config)
  assert 'the whole network' in message
  np.testing.assert_array_equal(
      variables['params']['classifier']['kernel'],
      expected[('params', 'classifier', 'kernel')])
  # A whole network must be loaded into the network it was trained as...
  other = ml_collections.ConfigDict(config.to_dict())
  other.model.fpa.pooling = 'avg'
  with pytest.raises(ValueError, match=r"model.fpa.pooling='avg' \(the "
                     r"network has 'max'\)"):
    pretrained.load_pretrained(_abstract(other, 5, size=128), out, other)
  # ... though its output stride may change.
  other = ml_collections.ConfigDict(config.to_dict())
  other.model.output_stride = 8
  _, message = pretrained.load_pretrained(
      _abstract(other, 5, size=128), out, other)
  assert 'saved config: model.output_stride: 16 -> 8' in message
  # Without pretrained.json it is a plain inference checkpoint (what
  # pan_jax.export writes), which init_from also takes as a whole network.
  os.remove(os.path.join(out, pretrained.INFO_FILE))
  _, message = pretrained.load_pretrained(
      _abstract(config, 5, size=128), out, config)
  assert 'pan_jax resnet18 weights (network)' in message


def test_voc_meta_and_palette():
  meta = archs.dataset_meta(21)
  assert meta.name == 'voc2012_aug' and meta.ignore_label == 255
  assert meta.class_names[15] == 'person'
  assert meta.palette[:3] == ((0, 0, 0), (128, 0, 0), (0, 128, 0))
