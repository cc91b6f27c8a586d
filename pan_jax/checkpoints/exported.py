"""The inference checkpoint: what evaluation, prediction and serving need.

  EXPORT/
    config.json       the training config (files.py)
    dataset.json      the dataset's metadata: class names, palette (files.py)
    variables/        Orbax StandardCheckpointer item {'params', 'batch_stats'}
    export.json       where it came from: {'step', 'source'}
    model.stablehlo   jax.export artefact, and model.json describing it
                      (written by `python -m pan_jax.export`, see export.py)

`python -m pan_jax.export` writes one from a training workdir; `python -m
pan_jax.convert --format=smp` writes one for a converted smp network (plus
pretrained.json, see pretrained.py).

Locally the directory appears whole (written under a temporary name, then
renamed). A gs:// prefix cannot be renamed, so there export.json is written
last and is the commit marker: a gs:// export without it is incomplete and
is refused when read.
"""

import os
import shutil
from typing import Any, Dict, Optional, Tuple

import ml_collections

from pan_jax import errors
from pan_jax import paths
from pan_jax.checkpoints import files
from pan_jax.data import sources

INFO_FILE = 'export.json'


def is_inference_checkpoint(path: str) -> bool:
  """True if `path` holds an inference checkpoint (config.json, variables/)."""
  return (paths.isdir(os.path.join(path, files.VARIABLES_DIR)) and
          paths.isfile(os.path.join(path, files.CONFIG_FILE)))


def save(path: str, config: ml_collections.ConfigDict,
         meta: sources.DatasetMeta, variables: Dict[str, Any],
         step: Optional[int] = None, source: Optional[str] = None) -> None:
  """Writes an inference checkpoint at `path` (a new directory).

  Locally everything is written to a temporary sibling directory that is
  renamed to `path` at the end, so `path` is either absent or complete; on
  gs:// export.json is written last (see the module docstring).

  Args:
    path: destination (local or gs://); must not exist yet.
    config: the model's ConfigDict.
    meta: the DatasetMeta.
    variables: {'params', 'batch_stats'} (any arrays; written as NumPy).
    step: training step the variables come from, recorded in export.json.
    source: where they came from (recorded).

  Raises:
    FileExistsError: `path` exists.
  """
  path = paths.absolute(path)
  if paths.exists(path):
    raise errors.ExistsError(f'{path} already exists; choose a new --output')
  if paths.is_url(path):
    try:
      _write(path, config, meta, variables, step, source)
    except BaseException:
      paths.rmtree(path)  # No marker was written: nothing half-done stays.
      raise
    return
  temporary = f'{path}.tmp-{os.getpid()}'
  shutil.rmtree(temporary, ignore_errors=True)
  os.makedirs(temporary)
  try:
    _write(temporary, config, meta, variables, step, source)
    os.replace(temporary, path)
  except BaseException:
    shutil.rmtree(temporary, ignore_errors=True)
    raise


def _write(path, config, meta, variables, step, source):
  """The files of `save`, export.json last."""
  files.save_variables(os.path.join(path, files.VARIABLES_DIR), variables)
  files.write_config_and_meta(path, config, meta)
  files.write_json(os.path.join(path, INFO_FILE),
                   {'step': step, 'source': source})


def read(path: str, step: Optional[int] = None
         ) -> Tuple[ml_collections.ConfigDict, sources.DatasetMeta,
                    Dict[str, Any], Optional[int]]:
  """Reads an inference checkpoint.

  Args:
    path: the EXPORT directory.
    step: None, or the step the caller expects (it must be the saved one).

  Returns:
    (config, meta, variables as NumPy trees, the recorded step or None).

  Raises:
    ValueError: `step` is not the checkpoint's.
  """
  info_path = os.path.join(path, INFO_FILE)
  if paths.exists(info_path):
    info = files.read_json(info_path)
  elif paths.is_url(path):
    raise errors.MissingError(
        f'{path} is an incomplete inference checkpoint: {INFO_FILE}, written '
        'last, is missing (the export was interrupted?); export it again')
  else:
    info = {}
  saved_step = info.get('step')
  if step is not None and step != saved_step:
    raise errors.ConfigError(
        f'{path} is an inference checkpoint of step {saved_step}; it cannot '
        f'give --step={step}')
  variables = files.read_variables(os.path.join(path, files.VARIABLES_DIR))
  return files.read_config(path), files.read_meta(path), variables, saved_step
