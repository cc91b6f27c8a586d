"""segmentation_models_pytorch's PAN, reproduced exactly (weights convert 1:1).

smp.PAN(encoder_name='resnet101', classes=21): torchvision 7x7 stem, res5
dilated at output stride 16 including its first block, FPA with max-pool
downsampling (floor mode) and a one-channel pyramid, decoder width 32, convs
with biases before BN, GAU gate BN + sigmoid, bilinear resizes with
align_corners=True, final 3x3 conv then x4 upsampling. This is the
configuration for weights converted from smp (`python -m pan_jax.convert
--format=smp`) and for the speed comparison with smp (`python -m pan_jax.bench
train --peer --peer_dir=../shared/peer`). Variant:
`--config=configs/smp_pan.py:resnet18` etc.
"""

from configs import voc


def get_config(backbone='resnet101'):
  """Returns smp.PAN's architecture with the VOC recipe for training."""
  config = voc.get_config()
  model = config.model
  model.backbone = backbone
  model.stem = 'torchvision'
  model.avg_down = False
  model.output_stride = 16
  model.contract_dilation = False
  model.multi_grid = (1, 1, 1)
  model.center = 'fpa'
  model.decoder = 'gau'
  model.decoder_channels = 32
  model.head_conv_bias = True
  model.classifier_kernel = 3
  model.pooled_bn = True
  model.align_corners = True
  model.fpa.attention = 'pyramid'
  model.fpa.pooling = 'max'
  model.fpa.kernels = (7, 5, 3)
  model.fpa.pyramid_channels = 1
  model.fpa.ceil_mode = False
  model.fpa.global_branch = 'add'
  model.gau.low_level_kernel = 3
  model.gau.global_context = True
  model.gau.gate = 'sigmoid'
  return config
