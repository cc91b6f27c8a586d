"""Model tests: shapes, parameter counts, dtypes, gradients, errors, padding."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from configs import smoke
from configs import smp_pan
from pan_jax import models
from pan_jax.models import layers
from pan_jax.models import resnet


def tiny_config(**model_overrides):
  config = smoke.get_config()
  config.model.base_width = 8
  config.model.decoder_channels = 8
  for key, value in model_overrides.items():
    node = config.model
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def param_count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def init_shapes(config, num_classes, size=256):
  model = models.create_model(config, num_classes)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))


@pytest.mark.parametrize('arch,expected', [('resnet101', 42_500_160),
                                           ('resnet50', 23_508_032)])
def test_torchvision_backbone_parameter_count(arch, expected):
  config = base.get_config()
  config.model.backbone = arch
  config.model.stem = 'torchvision'
  variables = init_shapes(config, 21)
  assert param_count(variables['params']['backbone']) == expected


@pytest.mark.parametrize('arch,expected', [('resnet101', 43_257_724),
                                           ('resnet18', 11_373_436)])
def test_smp_pan_parameter_count(arch, expected):
  variables = init_shapes(smp_pan.get_config(arch), 21)
  assert param_count(variables['params']) == expected


def test_deep_stems_have_three_convs():
  for stem, widths in (('deep', (64, 64, 128)), ('deep_narrow', (32, 32, 64))):
    config = base.get_config()
    config.model.stem = stem
    backbone = init_shapes(config, 21, 64)['params']['backbone']
    got = tuple(backbone[f'stem_conv{i}']['kernel'].shape[-1]
                for i in (1, 2, 3))
    assert got == widths
    assert backbone['layer1_0']['downsample_conv']['kernel'].shape[2] == (
        widths[-1])


@pytest.mark.parametrize('output_stride', [8, 16, 32])
def test_feature_strides(output_stride):
  norm = functools.partial(nn.BatchNorm, use_running_average=True)
  backbone = resnet.create_resnet(
      'resnet18', norm=norm, dtype=jnp.float32, param_dtype=jnp.float32,
      stem='deep_narrow', base_width=8, output_stride=output_stride)
  images = jnp.zeros((1, 64, 96, 3))
  features = backbone.apply(backbone.init(jax.random.key(0), images), images)
  strides = resnet.feature_strides(output_stride)
  assert strides['c2'] == 4 and strides['c5'] == output_stride
  for name, stride in strides.items():
    assert features[name].shape[1:3] == (64 // stride, 96 // stride), name


@pytest.mark.parametrize('hw', [(512, 512), (375, 500), (500, 375), (64, 64),
                                (97, 131)])
def test_output_matches_input_size(hw):
  config = tiny_config()
  model = models.create_model(config, 5)
  images = jnp.ones((1, *hw, 3))
  variables = model.init(jax.random.key(0), images)
  logits = model.apply(variables, images)
  assert logits.shape == (1, *hw, 5)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_minimum_size_is_stated_and_enforced():
  config = tiny_config()
  assert models.min_input_size(config) == 32
  model = models.create_model(config, 5)
  small = jnp.zeros((1, 24, 64, 3))
  with pytest.raises(ValueError, match='minimum side of 32'):
    model.init(jax.random.key(0), small)
  # PyTorch-style floor pooling (smp) needs c5 >= 8x8: 128 px at OS16.
  assert models.min_input_size(smp_pan.get_config('resnet18')) == 128


@pytest.mark.parametrize('shape', [(64, 64, 3), (1, 3, 64, 64),
                                   (1, 64, 64, 4)])
def test_bad_image_shapes_name_the_expected_shape(shape):
  model = models.create_model(tiny_config(), 5)
  with pytest.raises(ValueError, match=r'\[batch, height, width, 3\]'):
    model.init(jax.random.key(0), jnp.zeros(shape))


@pytest.mark.parametrize('field,value,listed', [
    ('backbone', 'resnet99', 'resnet101'),
    ('stem', 'fancy', 'deep_narrow'),
    ('center', 'xyz', 'aspp'),
    ('decoder', 'unet', 'bilinear'),
    ('fpa.pooling', 'median', 'avg'),
    ('fpa.global_branch', 'mul', 'concat'),
    ('gau.gate', 'tanh', 'sigmoid'),
    ('output_stride', 4, '16'),
])
def test_unknown_names_list_valid_choices(field, value, listed):
  with pytest.raises(ValueError, match=listed):
    models.create_model(tiny_config(**{field: value}), 5)


def test_unknown_compute_dtype():
  config = tiny_config()
  config.compute_dtype = 'float16'
  with pytest.raises(ValueError, match='bfloat16'):
    models.create_model(config, 5)


def test_multi_grid_length_is_checked():
  config = tiny_config(multi_grid=(1, 2, 4))  # resnet18's res5 has 2 blocks
  model = models.create_model(config, 5)
  with pytest.raises(ValueError, match='one rate per res5 block'):
    model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  config = tiny_config(multi_grid=(1, 2))
  model = models.create_model(config, 5)
  model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def test_train_mode_at_batch_one_updates_batch_stats():
  config = tiny_config()
  model = models.create_model(config, 5)
  images = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
  variables = model.init(jax.random.key(0), images)
  logits, updates = model.apply(variables, images, train=True,
                                mutable=['batch_stats'])
  assert logits.shape == (1, 64, 64, 5)
  assert bool(jnp.all(jnp.isfinite(logits)))
  before = variables['batch_stats']['backbone']['bn1' if config.model.stem ==
                                                'torchvision' else 'stem_bn1']
  after = updates['batch_stats']['backbone']['stem_bn1']
  assert not np.allclose(before['mean'], after['mean'])


def test_bfloat16_forward_is_finite_with_float32_logits():
  config = tiny_config()
  config.compute_dtype = 'bfloat16'
  model = models.create_model(config, 5)
  images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  variables = model.init(jax.random.key(0), images)
  leaves = jax.tree.leaves(variables)
  assert all(x.dtype == jnp.float32 for x in leaves)  # param_dtype
  logits = model.apply(variables, images)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.slow
@pytest.mark.parametrize('overrides', [
    {},
    {'center': 'ppm', 'decoder': 'bilinear'},
    {'center': 'aspp'},
    {'fpa.attention': 'se', 'fpa.global_branch': 'concat'},
    {'pooled_bn': False, 'head_conv_bias': True, 'gau.gate': 'sigmoid'},
])
def test_every_parameter_receives_a_gradient(overrides):
  config = tiny_config(**overrides)
  model = models.create_model(config, 4)
  images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  labels = jax.random.randint(jax.random.key(2), (2, 64, 64), 0, 4)
  variables = model.init(jax.random.key(0), images)

  def loss(params):
    logits, _ = model.apply({'params': params,
                             'batch_stats': variables['batch_stats']},
                            images, train=True, mutable=['batch_stats'])
    onehot = jax.nn.one_hot(labels, 4)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * onehot, -1))

  grads = jax.grad(loss)(variables['params'])
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  dead = [jax.tree_util.keystr(path) for path, g in flat
          if not bool(jnp.any(g != 0))]
  assert not dead, f'parameters without gradient: {dead}'


def _padded_vs_exact(config, sizes, canvas=(96, 112), classes=3):
  model = models.create_model(config, classes)
  rng = np.random.default_rng(0)
  batch = np.zeros((len(sizes), *canvas, 3), np.float32)
  exact = []
  for i, (h, w) in enumerate(sizes):
    image = rng.normal(size=(h, w, 3)).astype(np.float32)
    batch[i, :h, :w] = image
    exact.append(image)
  # Make the padding hostile: anything leaking from it changes the result.
  for i, (h, w) in enumerate(sizes):
    batch[i, h:, :] = 100.
    batch[i, :, w:] = -100.
  variables = model.init(jax.random.key(0), jnp.asarray(batch))
  # Non-trivial running statistics, so BN's shift is not zero.
  variables['batch_stats'] = jax.tree.map(
      lambda x: x * jax.random.uniform(jax.random.key(3), x.shape, x.dtype,
                                       0.5, 1.5), variables['batch_stats'])
  padded = model.apply(variables, jnp.asarray(batch),
                       image_sizes=jnp.asarray(sizes, jnp.int32))
  for i, (h, w) in enumerate(sizes):
    alone = model.apply(variables, jnp.asarray(exact[i])[None])[0]
    np.testing.assert_allclose(padded[i, :h, :w], alone, rtol=1e-4,
                               atol=1e-4 * float(jnp.max(jnp.abs(alone))))
    outside = np.asarray(padded[i]).copy()
    outside[:h, :w] = 0
    assert not outside.any(), 'logits outside the valid region must be 0'


@pytest.mark.parametrize('overrides', [
    {},
    {'fpa.pooling': 'max', 'stem': 'torchvision', 'avg_down': True,
     'output_stride': 8, 'align_corners': True, 'fpa.global_branch': 'concat'},
    {'center': 'ppm', 'decoder': 'bilinear'},
    {'center': 'aspp', 'stem': 'deep'},
])
def test_padded_canvas_gives_the_exact_size_prediction(overrides):
  _padded_vs_exact(tiny_config(**overrides), sizes=[(96, 112), (65, 97)])


@pytest.mark.slow
def test_padded_canvas_smp_floor_mode():
  config = smp_pan.get_config('resnet18')
  config.model.base_width = 8
  _padded_vs_exact(config, sizes=[(129, 150)], canvas=(160, 192))


def test_resize_matches_jax_image_resize_half_pixel():
  x = jax.random.normal(jax.random.key(0), (2, 7, 9, 3))
  for size in ((14, 18), (13, 29), (7, 9)):
    ours = layers.resize(x, size)
    ref = jax.image.resize(x, (2, *size, 3), 'bilinear', antialias=False)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_resize_matches_torch_interpolate():
  torch = pytest.importorskip('torch')
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
  for size in ((10, 14), (3, 4), (13, 29), (1, 1)):
    for align in (False, True):
      ours = layers.resize(jnp.asarray(x), size, align_corners=align)
      ref = torch.nn.functional.interpolate(
          torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode='bilinear',
          align_corners=align).permute(0, 2, 3, 1).numpy()
      np.testing.assert_allclose(ours, ref, atol=1e-5, err_msg=f'{size} {align}')


def test_adaptive_pool_matches_torch():
  torch = pytest.importorskip('torch')
  x = np.random.default_rng(0).normal(size=(2, 7, 11, 3)).astype(np.float32)
  for bins in (1, 2, 3, 6):
    ours = layers.adaptive_avg_pool(jnp.asarray(x), bins, None)
    ref = torch.nn.functional.adaptive_avg_pool2d(
        torch.from_numpy(x).permute(0, 3, 1, 2), bins).permute(0, 2, 3, 1)
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)


@pytest.mark.parametrize('train', [True, False])
def test_batch_norm_matches_flax(train):
  # Same variables, outputs, running-statistics update and gradients as
  # flax.linen.BatchNorm; only what autodiff keeps for the backward differs.
  x = 3. + 2. * jax.random.normal(jax.random.key(0), (4, 5, 6, 8))
  g = jax.random.normal(jax.random.key(1), x.shape)
  kwargs = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5)
  ours, ref = layers.BatchNorm(**kwargs), nn.BatchNorm(**kwargs)
  variables = ref.init(jax.random.key(2), x)
  assert (jax.tree.structure(ours.init(jax.random.key(2), x)) ==
          jax.tree.structure(variables))
  variables = jax.tree.map(  # non-trivial scale, bias and running stats
      lambda v: v + jax.random.uniform(jax.random.key(3), v.shape), variables)

  def run(module):
    def f(x, params):
      y, updates = module.apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, x,
          mutable=['batch_stats'])
      return jnp.sum(y * g), (y, updates)
    (_, (y, updates)), grads = jax.value_and_grad(
        f, argnums=(0, 1), has_aux=True)(x, variables['params'])
    return y, updates, grads

  for got, want in zip(jax.tree.leaves(run(ours)), jax.tree.leaves(run(ref))):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('channels', [16, 3])
def test_relu_matches_jax_nn_relu(channels):
  # 16 channels keep a packed 1-bit mask, 3 a bool one; zeros included.
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, channels))
  x = x.at[0, 0, 0].set(0.)
  g = jax.random.normal(jax.random.key(1), x.shape)
  y, vjp = jax.vjp(layers.relu, x)
  y_ref, vjp_ref = jax.vjp(jax.nn.relu, x)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(vjp(g)[0], vjp_ref(g)[0])


@pytest.mark.parametrize('hw,kernel,rate', [((5, 6), 7, 1), ((3, 3), 5, 1),
                                            ((2, 2), 3, 1), ((2, 3), 3, 2),
                                            ((9, 9), 3, 1)])
def test_conv_matches_lax_when_the_kernel_is_larger(hw, kernel, rate):
  # Kernels larger than their input take the matrix-product path.
  x = jax.random.normal(jax.random.key(0), (2, *hw, 6))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, 6, 5))
  pad = layers.pad_for(kernel, rate)
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape,
                                      ('NHWC', 'HWIO', 'NHWC'))

  def loss(x, w, conv):
    y = conv(x, w, (1, 1), pad, rhs_dilation=(rate, rate),
             dimension_numbers=dn, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(jnp.sin(y)), y

  ours = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      x, w, layers.conv_general_dilated)
  ref = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      x, w, jax.lax.conv_general_dilated)
  for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('width,expand', [(0, False), (1, False), (8, False),
                                          (3, True)])
def test_fpa_pyramid_takes_any_width(width, expand):
  """0 = decoder width, 1 = smp's map, any other N is expanded back by 1x1."""
  config = tiny_config(**{'fpa.pyramid_channels': width})
  params = init_shapes(config, 3, size=64)['params']['center']
  channels = config.model.decoder_channels
  assert params['down1']['conv']['kernel'].shape[-1] == (width or channels)
  assert ('expand' in params) == expand
  if expand:
    assert params['expand']['conv']['kernel'].shape == (1, 1, width,
                                                        channels)
  forward = models.create_model(config, 3)
  images = jnp.ones((1, 64, 64, 3))
  logits = forward.apply(forward.init(jax.random.key(0), images), images)
  assert logits.shape == (1, 64, 64, 3)


def test_fpa_expanded_pyramid_ignores_padding():
  _padded_vs_exact(tiny_config(**{'fpa.pyramid_channels': 3}),
                   sizes=[(96, 112), (65, 97)])


def test_fpa_kernel_order_is_finest_level_first():
  params = init_shapes(tiny_config(**{'fpa.kernels': (3, 5, 7)}), 3,
                       size=64)['params']['center']
  assert [params[f'down{i}']['conv']['kernel'].shape[0]
          for i in (1, 2, 3)] == [3, 5, 7]


def test_fpa_negative_width_is_an_error():
  with pytest.raises(ValueError, match='pyramid_channels'):
    init_shapes(tiny_config(**{'fpa.pyramid_channels': -2}), 3, size=64)


def test_recomputed_stages_give_the_same_step():
  # Outputs, gradients and BatchNorm statistics of a train-mode step are
  # those of the network that keeps its activations.
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  labels = jax.random.randint(jax.random.key(1), (2, 64, 64), 0, 3)

  def step(config):
    model = models.create_model(config, 3)
    variables = model.init(jax.random.key(2), images)

    def loss(params):
      logits, updates = model.apply(
          {'params': params, 'batch_stats': variables['batch_stats']},
          images, train=True, mutable=['batch_stats'])
      one_hot = jax.nn.one_hot(labels, 3)
      return -jnp.mean(jax.nn.log_softmax(logits) * one_hot), (logits,
                                                               updates)
    grad = jax.value_and_grad(loss, has_aux=True)
    jaxpr = str(jax.make_jaxpr(grad)(variables['params']))
    return jaxpr.count('custom_vjp_call'), jax.jit(grad)(variables['params'])

  calls, want = step(tiny_config())
  # 2 + 2 + 2 blocks of the smoke config's ResNet-18.
  recomputed, got = step(tiny_config(recompute_stages=(1, 3, 4)))
  assert recomputed >= calls + 6
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_recompute_stages_names_the_bad_stage():
  with pytest.raises(ValueError, match=r'model.recompute_stages=\(5,\)'):
    models.create_model(tiny_config(recompute_stages=(5,)), 3)
