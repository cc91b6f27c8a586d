"""PASCAL VOC 2012 (+SBD): the paper's recipe (section 4.1), in two stages.

Stage 1 (`--config=configs/voc.py`, or `:resnet50`): PAN with ResNet-101,
deep stem, output stride 16, trained on train_aug (10,582 images) from
ImageNet weights; crop 512, global batch 16, SGD momentum 0.9, lr 4e-3 poly
0.9, weight decay 1e-4, random scale 0.5-2 and flip. The paper gives no
iteration count: 30k steps (45 epochs of train_aug) is this repository's
choice, the usual train_aug schedule at batch 16. The paper's VOC val numbers
for this stage (Table 5, TABLES below): 79.38 single scale, 80.77
multi-scale, 81.19 multi-scale + flip; `python -m pan_jax.evaluate
--checkpoint=RUN --protocols=table5` measures all three in one call.

Stage 2 (`--config=configs/voc.py:finetune`, or `:resnet50,finetune`): for
the test server (the paper's 84.0 on VOC 2012 test, Table 6), fine-tune the
stage-1 network on VOC trainval (2,913 images with the finer VOC masks):

  python -m pan_jax.main --config=configs/voc.py:finetune \
      --workdir=runs/voc_trainval --config.model.init_from=runs/voc_r101

init_from takes stage 1's workdir (its latest checkpoint; an export of
another step works too): its params and BatchNorm statistics are loaded,
the step and the optimiser state start from zero, the lr schedule restarts.
The paper gives no numbers for this stage: lr 1e-3 and 10k steps are this
repository's choices. Validation runs only once, at the end, and its val
score is NOT a held-out number (val is part of trainval). Then write the
server files:

  python -m pan_jax.evaluate --checkpoint=runs/voc_trainval --split=test \
      --scales=0.5,0.75,1.0,1.25,1.5,1.75 --flip --format=voc_test

Both stages refuse to start without --config.model.init_from
(config.model.require_init_from; README "Pretrained weights" shows how to get
ImageNet ResNet-101 weights).
"""

from configs import base
from pan_jax import defaults
from pan_jax import models

# Stage 2's departures from stage 1 (this repository's choices; the paper
# only says the network is fine-tuned on trainval).
FINETUNE = {
    'data.train_split': 'trainval',
    'total_steps': 10_000,
    'optim.learning_rate': 1e-3,
    # Only the end-of-training validation (val is inside trainval).
    'eval_every_steps': 0,
}

# The paper's Table 5 (VOC 2012 val, mIoU %): the stage-1 network under three
# evaluation protocols; `run` names the protocol of
# `python -m pan_jax.evaluate --protocols=table5`, whose OUT/<run>/report.json
# launch/results.py reads. Pixel accuracies are not in the sources available
# here (None).
TABLES = {
    5: {'caption': 'Table 5: PAN on VOC 2012 val, single scale (SS), '
                   'multi-scale (MS) and flip',
        'rows': [
            {'label': 'PAN (SS)', 'run': 'ss', 'miou': 79.38,
             'pixel_accuracy': None},
            {'label': 'PAN (MS)', 'run': 'ms', 'miou': 80.77,
             'pixel_accuracy': None},
            {'label': 'PAN (MS+Flip)', 'run': 'ms_flip', 'miou': 81.19,
             'pixel_accuracy': None},
        ]},
}


def get_config(arg='resnet101'):
  """Returns the VOC configuration.

  Args:
    arg: comma-separated: a backbone (resnet50, resnet101, ...) and/or
      'finetune' (stage 2), e.g. 'finetune' or 'resnet50,finetune'.
  """
  backbone, stage2 = 'resnet101', False
  for part in filter(None, arg.split(',')):
    if part == 'finetune':
      stage2 = True
    elif part in models.BACKBONES:
      backbone = part
    else:
      raise ValueError(
          f'configs/voc.py:{arg}: {part!r} is neither "finetune" nor a '
          f'backbone ({", ".join(models.BACKBONES)})')
  config = base.get_config()
  config.model.backbone = backbone
  config.model.require_init_from = True
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
  if stage2:
    finetune(config)
  return config


def finetune(config):
  """Makes a stage-1 config the trainval fine-tuning stage (in place).

  Args:
    config: a VOC ConfigDict (changed in place, also returned).

  Returns:
    `config`.
  """
  defaults.override(config, FINETUNE)
  return config
