"""Every checkpoint directory pan_jax writes or reads, and one `load`.

  workdir.py     a training workdir: Orbax CheckpointManager of the train
                 state + grain iterator, resume, compatibility, stop requests
  exported.py    an inference checkpoint (`python -m pan_jax.export`)
  pretrained.py  converted PyTorch weights (`python -m pan_jax.convert`),
                 loaded by `config.model.init_from`
  files.py       what they share: file names, atomic JSON, config and
                 dataset metadata, variables as an Orbax item

`load(path, step)` gives the variables of a training workdir, an inference
checkpoint or a converted whole network alike, which is why evaluate,
predict and export take any of them as --checkpoint.
"""

import os
from typing import Any, Dict, NamedTuple, Optional

from flax import traverse_util
import ml_collections
import numpy as np

from pan_jax import errors
from pan_jax import paths
from pan_jax.checkpoints import exported
from pan_jax.checkpoints import files
from pan_jax.checkpoints import pretrained
from pan_jax.checkpoints import workdir
from pan_jax.data import sources


class Checkpoint(NamedTuple):
  """What `load` returns (unpacks as config, meta, variables, step)."""
  config: ml_collections.ConfigDict
  meta: sources.DatasetMeta
  # {'params', 'batch_stats'} as nested dicts of NumPy arrays.
  variables: Dict[str, Any]
  # The training step, None when an inference checkpoint does not record it.
  step: Optional[int]


def load(path: str, step: Optional[int] = None) -> Checkpoint:
  """Reads a training workdir, an inference checkpoint or a converted network.

  Args:
    path: a training workdir (config.json, dataset.json, checkpoints/), an
      inference checkpoint (config.json, dataset.json, variables/), or a
      converted whole network (an inference checkpoint plus pretrained.json).
    step: for a workdir, the step to read (None = the latest); an inference
      checkpoint holds one step and rejects a different one.

  Returns:
    A Checkpoint (config, meta, variables, step).

  Raises:
    FileNotFoundError: `path` is none of these, or lacks a file (named).
    ValueError: `step` does not match the inference checkpoint's, or the
      checkpoint fails `check`.
  """
  if not paths.isdir(path):
    raise errors.MissingError(
        f'checkpoint directory {path!r} does not exist')
  if exported.is_inference_checkpoint(path):
    return check(path, Checkpoint(*exported.read(path, step)))
  if paths.isfile(os.path.join(path, pretrained.INFO_FILE)):
    raise errors.MissingError(
        f'{path} holds converted {pretrained.read_info(path)["kind"]} weights, '
        'not a whole network: train from it with '
        f'--config.model.init_from={path}')
  config = files.read_config(path)
  meta = files.read_meta(path)
  if not paths.isdir(os.path.join(path, workdir.CHECKPOINT_DIR)):
    raise errors.MissingError(
        f'{path} is neither a training workdir (no {workdir.CHECKPOINT_DIR}/) '
        f'nor an inference checkpoint (no {files.VARIABLES_DIR}/)')
  variables, step = workdir.restore_variables(path, step)
  return check(path, Checkpoint(config, meta, files.as_dict(variables), step))


def check(path: str, checkpoint: Checkpoint) -> Checkpoint:
  """Refuses a checkpoint whose parts disagree or whose values are not finite.

  Checked: dataset.json lists one name and colour per class, the network's
  classifier predicts that many classes, and every array is finite (a
  checkpoint saved after training diverged predicts nothing meaningful;
  training checks this before every save, older versions did not check
  BatchNorm statistics).

  Args:
    path: where it was read from (named in the messages).
    checkpoint: what `load` read.

  Returns:
    `checkpoint`.

  Raises:
    MismatchError: the class counts disagree.
    DataError: an array holds inf or NaN.
  """
  meta, variables = checkpoint.meta, checkpoint.variables
  dataset_file = os.path.join(path, files.DATASET_FILE)
  if len(meta.class_names) != meta.num_classes or (
      len(meta.palette) < meta.num_classes):
    raise errors.MismatchError(
        f'{dataset_file} says num_classes={meta.num_classes} but lists '
        f'{len(meta.class_names)} class names and {len(meta.palette)} '
        'palette colours')
  classifier = variables.get('params', {}).get('classifier', {}).get('kernel')
  if classifier is not None and classifier.shape[-1] != meta.num_classes:
    raise errors.MismatchError(
        f'the network in {path} predicts {classifier.shape[-1]} classes but '
        f'{dataset_file} lists {meta.num_classes}: {list(meta.class_names)}')
  bad = ['/'.join(key) for key, value in
         traverse_util.flatten_dict(variables).items()
         if np.issubdtype(np.asarray(value).dtype, np.inexact)
         and not np.all(np.isfinite(value))]
  if bad:
    at = f' (step {checkpoint.step})' if checkpoint.step is not None else ''
    raise errors.DataError(
        f'the checkpoint in {path}{at} holds inf/NaN values in {len(bad)} '
        f'array(s), e.g. {", ".join(bad[:3])}: it was saved after training '
        'diverged, and predicts nothing meaningful. Use an earlier --step, '
        'or retrain from an earlier checkpoint with a lower learning rate.')
  return checkpoint
