"""Cityscapes (fine annotations, 19 classes): PAN R101 at 768x768 crops.

The paper reports VOC only; this follows the usual Cityscapes recipe of
MMSegmentation / DeepLab (crop 768, batch 8, lr 1e-2 poly, 60k steps) with
sliding-window evaluation over the full 1024x2048 frames.
"""

from configs import base


def get_config(backbone='resnet101'):
  """Returns the Cityscapes configuration for `backbone`."""
  config = base.get_config()
  config.model.backbone = backbone
  config.data.name = 'cityscapes'
  config.data.train_split = 'train'
  config.data.eval_split = 'val'
  config.data.crop_size = 768
  config.global_batch_size = 8
  config.total_steps = 60_000
  config.optim.learning_rate = 1e-2
  config.eval.batch_size = 8
  config.eval.canvas_size = (1024, 2048)
  config.eval.mode = 'slide'
  config.eval.window_size = (768, 768)
  config.eval.window_stride = (512, 512)
  return config
