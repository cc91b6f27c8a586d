"""Smoke configuration: a tiny PAN on the in-memory 'fake' dataset (tests, CPU).

Same structure as the paper's model (ResNet, FPA, three GAUs) at a width that
compiles and runs in seconds on a laptop CPU.
"""

from configs import base


def get_config():
  """Returns a tiny, fast configuration."""
  config = base.get_config()
  config.total_steps = 4
  config.global_batch_size = 8
  config.log_every_steps = 1
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.max_checkpoints_to_keep = 2

  config.model.backbone = 'resnet18'
  config.model.stem = 'deep_narrow'
  config.model.base_width = 8
  config.model.decoder_channels = 16

  config.data.name = 'fake'
  config.data.train_split = 'train'
  config.data.eval_split = 'val'
  config.data.crop_size = 64
  config.data.num_workers = 0

  config.eval.batch_size = 8
  config.eval.canvas_size = (96, 96)
  config.eval.window_size = (64, 64)
  config.eval.window_stride = (48, 48)
  config.eval.num_overlays = 0
  return config
