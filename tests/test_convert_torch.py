"""Numerical parity of converted PyTorch weights (torchvision, timm, smp).

Skipped where torch is not installed (requirements-torch.txt installs it).
Random initialisation, eval mode. BatchNorm affine parameters are randomised
and running statistics set from a forward pass on random images, so that
every converted array changes the result while activations keep a realistic
scale. The last BN of each residual branch gets a small scale, as in trained
ResNets: with scales around 1 a random ResNet-101 amplifies float32 rounding
so much that PyTorch's own float32 c5 differs from its float64 c5 by 1-2e-4
(measured), which would leave no room to test the conversion at 1e-4.
Agreement is measured as max|ours - torch| / max|torch|.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')


def _install_torchvision_shim():
  """Lets the CUDA-only torchvision 0.28 wheel import beside CPU torch.

  Its compiled ops cannot load, and its import then fails registering fake
  kernels for two ops; declaring their schemas first is enough for the
  pure-Python ResNets (same trick as ../shared/peer/tv_shim.py).
  """
  try:
    torch.ops.torchvision.nms  # pylint: disable=pointless-statement
    return None
  except (AttributeError, RuntimeError):
    pass
  lib = torch.library.Library('torchvision', 'DEF')
  lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
  lib.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
  return lib


_SHIM = _install_torchvision_shim()
torchvision = pytest.importorskip('torchvision')

# pylint: disable=g-import-not-at-top,wrong-import-position
from pan_jax import checkpoints
from pan_jax import convert
from pan_jax import models
from pan_jax.checkpoints import pretrained
from pan_jax.convert import archs
# pylint: enable=g-import-not-at-top,wrong-import-position

TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def _precise():
  """float32 matmuls/convs at full precision, few torch threads, seeded."""
  previous = jax.config.jax_default_matmul_precision
  jax.config.update('jax_default_matmul_precision', 'highest')
  torch.set_num_threads(2)
  torch.manual_seed(0)  # The models' own random initialisation.
  yield
  jax.config.update('jax_default_matmul_precision', previous)


def _randomise(model, calibration_size, seed=0):
  """Random BN affine params; running stats from one batch of noise."""
  generator = torch.Generator().manual_seed(seed)
  bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  # The BN closing each residual branch (Bottleneck.bn3, BasicBlock.bn2).
  closing = set()
  for module in model.modules():
    if hasattr(module, 'bn3'):
      closing.add(module.bn3)
    elif hasattr(module, 'conv2') and hasattr(module, 'bn2'):
      closing.add(module.bn2)
  with torch.no_grad():
    for bn in bns:
      low, high = (0.1, 0.4) if bn in closing else (0.5, 1.5)
      bn.weight.copy_(low + (high - low) *
                      torch.rand(bn.weight.shape, generator=generator))
      bn.bias.copy_(torch.randn(bn.bias.shape, generator=generator) * 0.2)
      bn.momentum = 1.0  # running stats := this batch's statistics.
    model.train()
    model(torch.randn((2, 3) + calibration_size, generator=generator))
    for bn in bns:
      bn.momentum = 0.1
  return model.eval()


def _relative(ours, reference):
  return float(np.abs(np.asarray(ours) - reference).max() /
               np.abs(reference).max())


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _torch_stages(model, images, stem):
  """c2..c5 of a torchvision/timm ResNet (NHWC numpy)."""
  with torch.no_grad():
    x = stem(_nchw(images))
    x = model.maxpool(x)
    out = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
      x = layer(x)
      out.append(_nhwc(x))
  return out


def _convert_and_run_backbone(tmp_path, fmt, state, images, output_stride=32,
                              contract_dilation=True, arch_name=None):
  path = os.path.join(tmp_path, 'weights.pth')
  torch.save(state, path)
  out_dir = os.path.join(tmp_path, 'converted')
  message = convert.convert(fmt, path, out_dir, arch_name)
  info = pretrained.read_info(out_dir)
  arch = archs.parse_arch(fmt, info['source']['arch'])
  module = archs.backbone_module(arch, output_stride, contract_dilation)
  variables = pretrained.restore_variables(out_dir)
  features = module.apply(
      {'params': variables['params']['backbone'],
       'batch_stats': variables['batch_stats']['backbone']},
      jnp.asarray(images))
  return features, message


@pytest.mark.parametrize('arch', ['resnet50', 'resnet101'])
def test_torchvision_resnet_stages_match(tmp_path, arch):
  model = _randomise(getattr(torchvision.models, arch)(), (64, 64))
  images = np.random.RandomState(0).randn(1, 64, 64, 3).astype(np.float32)
  stem = lambda x: model.relu(model.bn1(model.conv1(x)))
  reference = _torch_stages(model, images, stem)
  features, message = _convert_and_run_backbone(
      tmp_path, 'torchvision', model.state_dict(), images)
  assert f'torchvision {arch} (inferred' in message
  assert 'fc.weight, fc.bias' in message
  for i, ref in enumerate(reference):
    ours = features[f'c{i + 2}']
    assert ours.shape == ref.shape
    error = _relative(ours, ref)
    print(f'{arch} c{i + 2}: {error:.2e}')
    assert error < TOLERANCE, (arch, i, error)


def test_torchvision_dilated_resnet_matches_contract_dilation(tmp_path):
  # torchvision's dilated res5 runs its first block at rate 1, the others at
  # 2: pan_jax's contract_dilation=True at output stride 16.
  model = _randomise(torchvision.models.resnet50(
      replace_stride_with_dilation=[False, False, True]), (64, 64))
  images = np.random.RandomState(1).randn(1, 64, 64, 3).astype(np.float32)
  stem = lambda x: model.relu(model.bn1(model.conv1(x)))
  reference = _torch_stages(model, images, stem)
  features, _ = _convert_and_run_backbone(
      tmp_path, 'torchvision', model.state_dict(), images, output_stride=16,
      contract_dilation=True)
  assert features['c5'].shape == (1, 4, 4, 2048)
  for i, ref in enumerate(reference):
    error = _relative(features[f'c{i + 2}'], ref)
    print(f'resnet50 OS16 c{i + 2}: {error:.2e}')
    assert error < TOLERANCE, (i, error)


@pytest.mark.parametrize('output_stride, size', [(32, (64, 64)),
                                                  (16, (65, 63))])
def test_timm_resnet50d_stages_match(tmp_path, output_stride, size):
  # At output stride 16 res5 is dilated and its shortcut pools with timm's
  # AvgPool2dSame; the odd input size checks the ceil-mode pooling.
  timm = pytest.importorskip('timm')
  model = _randomise(timm.create_model('resnet50d', pretrained=False,
                                       output_stride=output_stride), (64, 64))
  images = np.random.RandomState(2).randn(1, *size, 3).astype(np.float32)
  stem = lambda x: model.act1(model.bn1(model.conv1(x)))
  reference = _torch_stages(model, images, stem)
  # timm's trainer wraps the weights in {'state_dict': ..., 'epoch': ...}.
  features, message = _convert_and_run_backbone(
      tmp_path, 'timm', {'state_dict': model.state_dict(), 'epoch': 3},
      images, output_stride=output_stride, contract_dilation=True)
  assert "'state_dict' entry" in message and 'timm resnet50d' in message
  assert 'avg_down=True' in message and 'stem=deep_narrow' in message
  for i, ref in enumerate(reference):
    assert features[f'c{i + 2}'].shape == ref.shape
    error = _relative(features[f'c{i + 2}'], ref)
    print(f'resnet50d OS{output_stride} c{i + 2}: {error:.2e}')
    assert error < TOLERANCE, (i, error)


def test_mmseg_v1c_layout_matches_timm_resnet_c(tmp_path):
  # mmseg's ResNetV1c is timm's resnet*c with other names: rename timm's
  # keys into an mmseg segmentation checkpoint ('backbone.' prefix, a
  # decode head, the meta/state_dict wrapper) and compare with timm.
  timm = pytest.importorskip('timm')
  # timm has no resnet18c; these arguments make one (ResNet-18 is cheap).
  model = _randomise(timm.create_model('resnet18', pretrained=False,
                                       stem_type='deep', stem_width=32),
                     (64, 64))
  images = np.random.RandomState(3).randn(1, 64, 64, 3).astype(np.float32)
  stem = lambda x: model.act1(model.bn1(model.conv1(x)))
  reference = _torch_stages(model, images, stem)
  names = {'conv1.0': 'stem.0', 'conv1.1': 'stem.1', 'conv1.3': 'stem.3',
           'conv1.4': 'stem.4', 'conv1.6': 'stem.6', 'bn1': 'stem.7'}
  state = {}
  for key, value in model.state_dict().items():
    module, leaf = key.rsplit('.', 1)
    if key.startswith('fc.'):
      continue
    state['backbone.' + names.get(module, module) + '.' + leaf] = value
  state['decode_head.conv_seg.weight'] = torch.zeros(21, 8, 1, 1)
  features, message = _convert_and_run_backbone(
      tmp_path, 'mmseg', {'meta': {'epoch': 1}, 'state_dict': state}, images)
  assert 'mmseg resnet18_v1c' in message
  assert '1 decode_head/auxiliary_head' in message
  for i, ref in enumerate(reference):
    error = _relative(features[f'c{i + 2}'], ref)
    assert error < TOLERANCE, (i, error)


@pytest.mark.parametrize('encoder', ['resnet18', 'resnet101'])
def test_smp_pan_logits_match(tmp_path, encoder):
  smp = pytest.importorskip('segmentation_models_pytorch')
  model = _randomise(smp.PAN(encoder, encoder_weights=None, classes=21),
                     (256, 256))
  path = os.path.join(tmp_path, 'pan.pth')
  torch.save(model.state_dict(), path)
  out_dir = os.path.join(tmp_path, 'converted')
  message = convert.convert('smp', path, out_dir)
  assert f'smp {encoder} (inferred' in message and '21 classes' in message

  # The converted directory is an inference checkpoint: load it as
  # evaluate and predict do.
  config, meta, variables, step = checkpoints.load(out_dir)
  assert config.model.backbone == encoder and step is None
  assert meta.num_classes == 21 and meta.class_names[1] == 'aeroplane'
  network = models.create_model(config, meta.num_classes)
  # And as a whole network for training (init_from).
  abstract = jax.eval_shape(
      lambda x: network.init(jax.random.PRNGKey(0), x, train=False),
      jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
  _, load_message = pretrained.load_pretrained(abstract, out_dir, config)
  assert 'the whole network' in load_message
  apply = jax.jit(lambda v, x: network.apply(v, x, train=False))
  for size in ((256, 256), (320, 480)):
    images = np.random.RandomState(4).randn(1, *size, 3).astype(np.float32)
    with torch.no_grad():
      reference = _nhwc(model(_nchw(images)))
    logits = apply(variables, jnp.asarray(images))
    assert logits.shape == reference.shape
    error = _relative(logits, reference)
    print(f'smp PAN {encoder} {size}: {error:.2e} '
          f'(max |logit| {np.abs(reference).max():.3g})')
    assert error < TOLERANCE, (size, error)


def test_truncated_pth_is_an_error_naming_the_file(tmp_path):
  model = torchvision.models.resnet18()
  path = os.path.join(tmp_path, 'weights.pth')
  torch.save(model.state_dict(), path)
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(convert.ConversionError, match='truncated or corrupted'):
    convert.convert('torchvision', path, os.path.join(tmp_path, 'out'))
  assert not os.path.exists(os.path.join(tmp_path, 'out'))


def test_pickled_module_is_refused(tmp_path):
  path = os.path.join(tmp_path, 'model.pth')
  torch.save(torchvision.models.resnet18(), path)  # the module, not weights
  with pytest.raises(convert.ConversionError, match='state_dict'):
    convert.convert('torchvision', path, os.path.join(tmp_path, 'out'))


def test_renamed_and_reshaped_keys_are_named(tmp_path):
  state = torchvision.models.resnet18().state_dict()
  renamed = dict(state)
  renamed['layer3.1.conv9.weight'] = renamed.pop('layer3.1.conv2.weight')
  path = os.path.join(tmp_path, 'renamed.pth')
  torch.save(renamed, path)
  with pytest.raises(convert.ConversionError,
                     match=r"missing key 'layer3\.1\.conv2\.weight'"):
    convert.convert('torchvision', path, os.path.join(tmp_path, 'a'))

  reshaped = dict(state)
  reshaped['layer2.0.bn1.running_var'] = torch.ones(64)
  path = os.path.join(tmp_path, 'reshaped.pth')
  torch.save(reshaped, path)
  with pytest.raises(convert.ConversionError,
                     match=r"'layer2\.0\.bn1\.running_var'.*\(64,\).*\(128,\)"):
    convert.convert('torchvision', path, os.path.join(tmp_path, 'b'))
