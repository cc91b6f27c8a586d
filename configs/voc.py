"""PASCAL VOC 2012 (+SBD, train_aug): the paper's recipe (section 4.1).

PAN with ResNet-101, deep stem, output stride 16; crop 512, global batch 16,
SGD momentum 0.9, lr 4e-3 poly 0.9, weight decay 1e-4. Variant:
`--config=configs/voc.py:resnet50`.
"""

from configs import base


def get_config(backbone='resnet101'):
  """Returns the VOC training configuration for `backbone`."""
  config = base.get_config()
  config.model.backbone = backbone
  config.data.name = 'voc2012_aug'
  config.data.train_split = 'train_aug'
  config.data.eval_split = 'val'
  config.data.crop_size = 512
  config.global_batch_size = 16
  config.total_steps = 30_000
  config.optim.learning_rate = 4e-3
  config.optim.poly_power = 0.9
  config.optim.momentum = 0.9
  config.optim.weight_decay = 1e-4
  # VOC images are at most 500x500.
  config.eval.canvas_size = (512, 512)
  return config
