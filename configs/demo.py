"""Demo configuration: a small PAN trained from scratch on the synthetic set.

`launch/demo.sh` prepares the synthetic dataset (python -m
pan_jax.data.prepare --dataset=synthetic), trains with this config and
evaluates: within 10 minutes on a 2-core CPU, including the install, it
reaches mIoU >= 0.80 on the synthetic val split (measured: 0.86 after 1,800
steps, about 5 minutes of training at ~100 images/s). The network is the
paper's (ResNet + FPA + three GAUs) at a width that trains in minutes on a
CPU.
"""

from configs import base


def get_config():
  """Returns the demo configuration."""
  config = base.get_config()
  config.total_steps = 1800
  config.global_batch_size = 16
  config.log_every_steps = 50
  config.eval_every_steps = 0  # Validate once, at the end.
  config.checkpoint_every_steps = 600
  config.max_checkpoints_to_keep = 1

  config.model.backbone = 'resnet18'
  config.model.stem = 'deep_narrow'
  config.model.base_width = 16
  config.model.decoder_channels = 32
  # The sigmoid gate of smp trains much faster from scratch than ReLU.
  config.model.gau.gate = 'sigmoid'

  config.data.name = 'synthetic'
  config.data.data_dir = 'data'
  config.data.train_split = 'train'
  config.data.eval_split = 'val'
  config.data.crop_size = 96
  config.data.min_scale = 0.75
  config.data.max_scale = 1.25
  config.data.num_workers = 0

  config.eval.batch_size = 16
  config.eval.canvas_size = (128, 128)  # synthetic.MAX_SIDE
  config.eval.num_overlays = 4

  # From scratch in a few hundred steps AdamW learns far faster than the
  # paper's SGD (which assumes ImageNet weights and 30k steps).
  config.optim.optimizer = 'adamw'
  config.optim.learning_rate = 5e-3
  config.optim.warmup_steps = 20
  config.optim.weight_decay = 1e-4
  return config


def sweep(add):
  """Learning-rate sweep (launch/sweep.py --config=configs/demo.py ...)."""
  for learning_rate in (2e-3, 5e-3, 1e-2):
    add(**{'optim.learning_rate': learning_rate})
