"""Every config field pan_jax reads, its default and its meaning; presets.

`get_config()` is the base configuration (the paper's PAN on PASCAL VOC with
ResNet-101); configs/base.py returns it and every file in configs/ overrides
some of its fields. The schema lives in the library, not in configs/,
because commands parse `--config.x=y` against it: evaluate, predict and
export apply such overrides on top of a checkpoint's saved config, and
convert writes whole configs for converted networks. Every field below is
read by code (tests/test_configs.py loads every config file and builds its
model). Durations are in steps. Choices are strings looked up in explicit
dicts; an unknown value fails with the list of valid ones.

The number of classes, their names, palette and ignore value are NOT config
fields: they come from the dataset's metadata, so changing `data.name` is
enough to train on another dataset.

`use_smp_pan(model_config, backbone)` is the one place that knows
segmentation_models_pytorch's PAN architecture (configs/smp_pan.py and
`python -m pan_jax.convert --format=smp` both use it).
"""

import json
from typing import Any, Mapping

import ml_collections

from pan_jax import errors


def get_config() -> ml_collections.ConfigDict:
  """Returns the base configuration (the paper's PAN on VOC, ResNet-101)."""
  config = ml_collections.ConfigDict()

  # Seed for parameter initialisation, data order and augmentation.
  config.seed = 0
  # Number of optimiser steps; the poly schedule decays to zero at this step.
  config.total_steps = 30_000
  # Images per step summed over every device of every process.
  config.global_batch_size = 16
  # Steps between metric lines (console, metrics.jsonl, TensorBoard).
  config.log_every_steps = 50
  # Steps between validation runs (0 disables periodic validation; the end of
  # training always validates).
  config.eval_every_steps = 2_000
  # Steps between checkpoints (the last step and preemption always save).
  config.checkpoint_every_steps = 1_000
  # Newest checkpoints kept in WORKDIR/checkpoints.
  config.max_checkpoints_to_keep = 3
  # (first, last): steps traced by jax.profiler into WORKDIR/profile; () none.
  config.profile_steps = ()
  # Compute dtype of every layer: 'float32' or 'bfloat16'. Parameters, batch
  # statistics and logits stay float32. bfloat16 is the choice on TPUs and on
  # A100/H100-class GPUs; on CPU it is slower.
  config.compute_dtype = 'float32'

  # ---------------------------------------------------------------- model --
  config.model = model = ml_collections.ConfigDict()
  # Backbone: resnet18 | resnet34 | resnet50 | resnet101 | resnet152.
  model.backbone = 'resnet101'
  # Stem: 'deep' (three 3x3 convs, 64-64-128, PSPNet/DUC, the paper's),
  # 'deep_narrow' (32-32-64, mmseg ResNetV1c / timm 'c' and 'd'),
  # 'torchvision' (one 7x7 conv; torchvision and smp weights).
  model.stem = 'deep'
  # timm 'd' variant: 2x2 average pool before the 1x1 shortcut conv of
  # downsampling blocks instead of a strided 1x1 conv.
  model.avg_down = False
  # Width of the first ResNet stage (64 in every published ResNet). Tests and
  # the CPU demo use smaller widths; pretrained weights need 64.
  model.base_width = 64
  # Output stride of the backbone: 8, 16 (the paper) or 32. Strides of res4 /
  # res5 are traded for dilation.
  model.output_stride = 16
  # Multi-grid: per-block multipliers of the res5 dilation rate, e.g. (1, 2, 4)
  # as in DeepLabv3. (1, 1, 1) is plain dilation.
  model.multi_grid = (1, 1, 1)
  # ResNet stages (1-4) recomputed in the backward pass, keeping only each
  # block's input: (3,) cuts the b2 x 512^2 R101 train step's XLA temp memory
  # by ~23% for ~17% more FLOPs (README "Benchmarks"). () keeps everything.
  model.recompute_stages = ()
  # If True (torchvision, mmseg 'contract_dilation'), the first block of a
  # dilated stage uses half the stage's rate; if False (smp) it uses the full
  # rate like the other blocks.
  model.contract_dilation = True
  # Centre block on c5: 'fpa' (the paper), 'ppm' (PSPNet pyramid pooling),
  # 'aspp' (DeepLabv3), or 'none' (a 1x1 conv: the plain dilated FCN).
  model.center = 'fpa'
  # Decoder: 'gau' (the paper's Global Attention Upsample on c4, c3, c2) or
  # 'bilinear' (classifier on the centre's output, upsampled directly).
  model.decoder = 'gau'
  # Channels of the centre block's output and of every decoder stage. The paper
  # is silent; 256 follows FPN/DeepLab, smp uses 32.
  model.decoder_channels = 256
  # Biases in the centre-block and decoder convs besides their BatchNorm
  # (smp has them; redundant before BN, so off by default).
  model.head_conv_bias = False
  # Kernel size of the classifier conv. The paper does not say; 1 is the
  # FCN/DeepLab convention, smp uses 3.
  model.classifier_kernel = 1
  # BatchNorm on 1x1 pooled vectors (FPA global branch, GAU context, SE). smp
  # uses it; its batch statistics come from one vector per image, so it is
  # degenerate at per-device batch 1 in PyTorch. Here BatchNorm statistics are
  # global under jit, so it works at global batch >= 2.
  model.pooled_bn = True
  # Bilinear resizes with align_corners=True (smp) instead of the half-pixel
  # convention of jax.image.resize.
  model.align_corners = False
  # BatchNorm momentum (flax convention: running = momentum * running + (1 -
  # momentum) * batch; PyTorch's 0.1 is 0.9 here) and epsilon.
  model.bn_momentum = 0.9
  model.bn_epsilon = 1e-5
  # Weights to start from: a converted checkpoint (python -m pan_jax.convert;
  # an ImageNet backbone or a whole network), an inference checkpoint
  # (python -m pan_jax.export) or a training workdir (its latest step; the
  # second, trainval stage of configs/voc.py:finetune). Only params and batch
  # statistics are taken: the step and the optimiser start afresh.
  # '' = random initialisation.
  model.init_from = ''
  # Refuse to train without init_from. The paper's recipes (configs/voc.py,
  # cityscapes.py, ablation.py) set it: they start from ImageNet weights, and
  # from random weights they cannot reach the paper's numbers. Give
  # --config.model.require_init_from=False to train from scratch anyway.
  model.require_init_from = False

  # Feature Pyramid Attention (used when model.center == 'fpa').
  model.fpa = fpa = ml_collections.ConfigDict()
  # 'pyramid' (the paper's U-shaped pixel attention) or 'se' (SENet-style
  # channel attention, Table 1's "SE" row).
  fpa.attention = 'pyramid'
  # Downsampling in the pyramid: 'avg' (the paper's choice) or 'max' (smp).
  fpa.pooling = 'avg'
  # Kernel sizes of the three pyramid levels, FINEST LEVEL FIRST (the level
  # pooled once from c5, 16x16 at a 512x512 input, then 8x8, then 4x4). This
  # order is the switch for the paper's ambiguity: Fig. 3 puts the 7x7 conv on
  # the 16x16 level, i.e. (7, 5, 3), the default and smp's; the text's "3x3,
  # 5x5, 7x7 ... respectively" read in level order is (3, 5, 7). Table 1's
  # C333 is (3, 3, 3). Any three odd sizes work.
  fpa.kernels = (7, 5, 3)
  # Channels inside the pyramid (the paper is silent). 0 = decoder_channels;
  # 1 = one spatial attention map broadcast over the channels (smp); any other
  # N = N channels, brought back to decoder_channels by a 1x1 ConvBN before
  # the multiplication, e.g. decoder_channels // 4 (64 at 256) for "C/4". The
  # first pyramid conv (7x7 on c5's 2048 channels) dominates the parameter
  # count: 25.7M at 256 channels, 6.4M at 64, 0.1M at 1 (README).
  fpa.pyramid_channels = 0
  # Pyramid pooling keeps an odd last row/column (ceil mode): every input
  # size works. False is PyTorch's floor mode (smp); c5 then needs >= 8x8.
  fpa.ceil_mode = True
  # Global pooling branch: 'add' (figure and all public code), 'concat' (the
  # text's wording; followed by a 1x1 conv back to decoder_channels) or 'none'.
  fpa.global_branch = 'add'

  # Global Attention Upsample (used when model.decoder == 'gau').
  model.gau = gau = ml_collections.ConfigDict()
  # Kernel of the low-level conv: 3 (the paper) or 1 (Table 3).
  gau.low_level_kernel = 3
  # Weight low-level features by the high-level global context (Table 3's
  # "GP"); False makes the stage a plain skip connection.
  gau.global_context = True
  # Nonlinearity after the context's BN: 'relu' (the paper's text) or
  # 'sigmoid' (smp).
  gau.gate = 'relu'

  # PSPNet pyramid pooling (used when model.center == 'ppm'): bin sizes.
  model.ppm = ml_collections.ConfigDict()
  model.ppm.bins = (1, 2, 3, 6)
  # DeepLabv3 ASPP (used when model.center == 'aspp'): atrous rates at output
  # stride 16 (doubled at output stride 8), plus image pooling.
  model.aspp = ml_collections.ConfigDict()
  model.aspp.rates = (6, 12, 18)

  # ----------------------------------------------------------------- data --
  config.data = data = ml_collections.ConfigDict()
  # Dataset: 'voc2012_aug', 'cityscapes', 'folder', 'synthetic' (tfds datasets
  # built by `python -m pan_jax.data.prepare`), or 'fake' (in memory; tests).
  data.name = 'voc2012_aug'
  # Directory holding the prepared tfds datasets (local or gs://).
  data.data_dir = 'data'
  # Local directory where a gs:// data_dir's dataset is copied once per host
  # (verified, shared by the host's processes) and read from.
  data.cache_dir = '~/.cache/pan_jax/data'
  # Splits used for training and validation.
  data.train_split = 'train_aug'
  data.eval_split = 'val'
  # Square training crop. Images are padded with the mean and masks with 255
  # where the scaled image is smaller.
  data.crop_size = 512
  # Random scale range of training augmentation (the paper: 0.5 to 2).
  data.min_scale = 0.5
  data.max_scale = 2.0
  # Worker processes of the training pipeline (0 = in the main process).
  data.num_workers = 4
  # Batches each worker prepares ahead.
  data.prefetch_buffer_size = 2

  # ----------------------------------------------------------------- eval --
  config.eval = ev = ml_collections.ConfigDict()
  # Images per evaluation batch, over all devices (rounded up to a multiple of
  # the device count).
  ev.batch_size = 8
  # Fixed canvas (height, width) every validation image is padded to, so one
  # compiled function serves the whole split. Must hold the largest image
  # (VOC: 500, Cityscapes: 1024x2048) and be a multiple of 32.
  ev.canvas_size = (512, 512)
  # 'whole' (the full image at once) or 'slide' (overlapping windows of
  # ev.window_size at ev.window_stride; Cityscapes).
  ev.mode = 'whole'
  # Sliding-window size and stride (height, width).
  ev.window_size = (512, 512)
  ev.window_stride = (341, 341)
  # Test-time scales (1.0 alone = single scale) and horizontal flip; the
  # softmax probabilities are averaged at the image's size.
  ev.scales = (1.0,)
  ev.flip = False
  # What the network sees around an image (see pan_jax/inference.py).
  # 'exact': it is told each image's valid size and ignores the padding, so
  # the prediction is that of the image alone. 'divisor': every network input
  # is padded bottom/right to a multiple of eval.size_divisor with the
  # training pad value (the mean colour) and the network sees that padding, as
  # MMSegmentation's size_divisor and smp users do. 'crop': padded to at least
  # eval.window_size first (the training crop in the recipes), as the
  # PSPNet and DeepLab evaluation code do. report.json records the choice;
  # the protocols can differ by several mIoU points for the same weights.
  ev.padding = 'exact'
  # The multiple of eval.padding='divisor' / 'crop' (MMSegmentation: 32).
  ev.size_divisor = 32
  # Prediction overlays written by evaluation.
  ev.num_overlays = 4

  # ---------------------------------------------------------------- optim --
  config.optim = optim = ml_collections.ConfigDict()
  # 'sgd' (the paper: SGD + momentum + L2 decay, as torch.optim.SGD) or
  # 'adamw' (decoupled decay, b1 = momentum; for short from-scratch runs such
  # as configs/demo.py).
  optim.optimizer = 'sgd'
  # Initial learning rate of the poly schedule lr0 * (1 - step/total)^power.
  optim.learning_rate = 4e-3
  optim.poly_power = 0.9
  # Linear warm-up from 0 over this many steps (0 = none).
  optim.warmup_steps = 0
  # SGD momentum.
  optim.momentum = 0.9
  # L2 weight decay (added to the gradient, as torch.optim.SGD does).
  optim.weight_decay = 1e-4
  # Whether BatchNorm scales/biases and conv biases are decayed too. The
  # paper does not say; True is what plain torch.optim.SGD and MMSegmentation's
  # default do (every parameter decayed); False is the common modern choice.
  optim.decay_norm_and_bias = True

  return config


# smp.PAN(encoder_name=...)'s architecture as config.model fields (besides
# the backbone): torchvision 7x7 stem, res5 dilated at output stride 16
# including its first block, FPA with max-pool downsampling (floor mode) and
# a one-channel pyramid, decoder width 32, convs with biases before BN, GAU
# gate BN + sigmoid, bilinear resizes with align_corners=True, final 3x3 conv.
SMP_PAN_MODEL = {
    'stem': 'torchvision', 'avg_down': False, 'output_stride': 16,
    'contract_dilation': False, 'multi_grid': (1, 1, 1), 'center': 'fpa',
    'decoder': 'gau', 'decoder_channels': 32, 'head_conv_bias': True,
    'classifier_kernel': 3, 'pooled_bn': True, 'align_corners': True,
    'fpa.attention': 'pyramid', 'fpa.pooling': 'max', 'fpa.kernels': (7, 5, 3),
    'fpa.pyramid_channels': 1, 'fpa.ceil_mode': False,
    'fpa.global_branch': 'add', 'gau.low_level_kernel': 3,
    'gau.global_context': True, 'gau.gate': 'sigmoid',
}


def use_smp_pan(model: ml_collections.ConfigDict, backbone: str) -> None:
  """Makes config.model smp.PAN(encoder_name=backbone)'s architecture.

  Args:
    model: config.model, changed in place.
    backbone: resnet18 ... resnet152.
  """
  model.backbone = backbone
  override(model, SMP_PAN_MODEL)


def override(config: ml_collections.ConfigDict,
             values: Mapping[str, Any]) -> None:
  """Sets fields given by dotted paths, e.g. {'eval.canvas_size': (640, 640)}.

  Args:
    config: changed in place.
    values: dotted path -> value.

  Raises:
    ConfigError: a path that is not a field of `config` (named).
  """
  for path, value in values.items():
    *groups, field = path.split('.')
    node = config
    for group in groups:
      node = node[group]
    if field not in node:
      raise errors.ConfigError(
          f'config.{path} is not a field of this config')
    node[field] = value


def merged(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A saved config (JSON dict) on top of today's fields and defaults.

  A checkpoint written before a field existed gets the field's default (a
  new field's default keeps the old behaviour), so every command can read
  every field of a saved config. Values stay as JSON has them (lists).

  Args:
    saved: a config as read from config.json.

  Returns:
    An unlocked ConfigDict.
  """
  def merge(base, update):
    out = dict(base)
    for key, value in update.items():
      out[key] = (merge(base[key], value) if isinstance(value, Mapping) and
                  isinstance(base.get(key), Mapping) else value)
    return out
  return ml_collections.ConfigDict(
      merge(json.loads(get_config().to_json()), saved))
