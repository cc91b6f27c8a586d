"""segmentation_models_pytorch's PAN, reproduced exactly (weights convert 1:1).

smp.PAN(encoder_name='resnet101', classes=21): the architecture is
`pan_jax.defaults.SMP_PAN_MODEL` (torchvision 7x7 stem, res5 dilated at
output stride 16 including its first block, FPA with max-pool downsampling
in floor mode and a one-channel pyramid, decoder width 32, convs with biases
before BN, GAU gate BN + sigmoid, bilinear resizes with align_corners=True,
final 3x3 conv then x4 upsampling). This is the configuration for weights
converted from smp (`python -m pan_jax.convert --format=smp`) and for the
speed comparison with smp (`python -m pan_jax.bench train --peer
--peer_dir=../shared/peer`). Variant:
`--config=configs/smp_pan.py:resnet18` etc. Training with it needs
--config.model.init_from (converted smp weights, or torchvision ImageNet
weights for its 7x7 stem), as every VOC recipe does.
"""

from configs import voc
from pan_jax import defaults


def get_config(backbone='resnet101'):
  """Returns smp.PAN's architecture with the VOC recipe for training."""
  config = voc.get_config()
  defaults.use_smp_pan(config.model, backbone)
  return config
