"""Cityscapes (fine annotations, 19 classes): PAN R101 at 768x768 crops.

The paper reports Cityscapes in section 4.3 (Table 7: 78.6 mIoU on the test
set, trained on the fine annotations only) from ImageNet weights, like VOC
(--config.model.init_from is required; README "Pretrained weights").

Departures from the paper's section 4 recipe (global batch 16, lr 4e-3 poly),
named as such: this file uses MMSegmentation's / DeepLab's usual Cityscapes
schedule, global batch 8 and lr 1e-2 poly; crop 768 and 60k steps are this
repository's choices (the sources available here give no crop or iteration
count for the paper's Cityscapes runs). For the section 4 values use
`--config.global_batch_size=16 --config.optim.learning_rate=4e-3`.

Evaluation: sliding 768x768 windows at stride 512 over the full 1024x2048
frames. Test-server files (`*_labelIds.png`, label ids, not train ids):

  python -m pan_jax.evaluate --checkpoint=RUN --split=test \
      --format=cityscapes_test --output=OUT
"""

from configs import base


def get_config(backbone='resnet101'):
  """Returns the Cityscapes configuration for `backbone`."""
  config = base.get_config()
  config.model.backbone = backbone
  config.model.require_init_from = True
  config.data.name = 'cityscapes'
  config.data.train_split = 'train'
  config.data.eval_split = 'val'
  config.data.crop_size = 768
  # Departures from section 4 (batch 16, lr 4e-3): see the module docstring.
  config.global_batch_size = 8
  config.total_steps = 60_000
  config.optim.learning_rate = 1e-2
  config.eval.batch_size = 8
  config.eval.canvas_size = (1024, 2048)
  config.eval.mode = 'slide'
  config.eval.window_size = (768, 768)
  config.eval.window_stride = (512, 512)
  return config
