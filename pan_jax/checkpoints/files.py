"""What every checkpoint directory shares: file names, atomic writes, metadata.

A training workdir, an inference checkpoint and a converted checkpoint all
carry some of:

  config.json    the run's ConfigDict (`config.to_json()`)
  dataset.json   the dataset's metadata (`DatasetMeta.to_json()`)
  variables/     an Orbax StandardCheckpointer item {'params', 'batch_stats'}

They are written here and read back here, once, locally or on gs://
(pan_jax/paths.py). Writes are atomic (locally a temporary file and a
rename; on GCS one object), so a reader never sees half a file.
"""

import json
import os
from typing import Any, Dict, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from pan_jax import defaults
from pan_jax import errors
from pan_jax import paths
from pan_jax.data import sources

CONFIG_FILE = 'config.json'
DATASET_FILE = 'dataset.json'
VARIABLES_DIR = 'variables'


def write_json(path: str, value: Any) -> None:
  """Writes `value` as indented JSON to `path` atomically."""
  paths.write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + '\n'
                     ).encode())


def required(directory: str, name: str) -> str:
  """directory/name, or FileNotFoundError saying pan_jax did not write it."""
  path = os.path.join(directory, name)
  if not paths.exists(path):
    raise errors.MissingError(
        f'{path} is missing: {directory} is not a training workdir or '
        'inference checkpoint written by pan_jax')
  return path


def read_json(path: str) -> Dict[str, Any]:
  """The JSON object in `path`; ValueError naming the file if it is not."""
  try:
    return json.loads(paths.read_text(path))
  except json.JSONDecodeError as e:
    raise errors.DataError(f'{path} is not valid JSON: {e}') from e


def read_config(directory: str) -> ml_collections.ConfigDict:
  """directory/config.json on top of today's defaults (defaults.merged)."""
  return defaults.merged(read_json(required(directory, CONFIG_FILE)))


def read_meta(directory: str) -> sources.DatasetMeta:
  """directory/dataset.json as a DatasetMeta."""
  return sources.DatasetMeta.from_json(
      paths.read_text(required(directory, DATASET_FILE)))


def write_config_and_meta(directory: str, config: ml_collections.ConfigDict,
                          meta: Any) -> None:
  """Writes directory/config.json and directory/dataset.json.

  Args:
    directory: where to write them.
    config: the ConfigDict.
    meta: a DatasetMeta, or its fields as a JSON-ready mapping.
  """
  write_json(os.path.join(directory, CONFIG_FILE), json.loads(config.to_json()))
  write_json(os.path.join(directory, DATASET_FILE),
             json.loads(meta.to_json()) if isinstance(meta, sources.DatasetMeta)
             else dict(meta))


def flatten(value: Any, prefix: str = '') -> Dict[str, Any]:
  """{'a': {'b': 1}} -> {'prefix.a.b': 1} ('a.b' without one); lists stay."""
  if not isinstance(value, Mapping):
    return {prefix: value}
  flat = {}
  for key, item in value.items():
    flat.update(flatten(item, f'{prefix}.{key}' if prefix else key))
  return flat


def as_dict(tree: Any) -> Any:
  """Nested Mappings (FrozenDict, Orbax trees) as plain dicts."""
  if isinstance(tree, Mapping):
    return {k: as_dict(v) for k, v in tree.items()}
  return tree


def save_variables(directory: str, variables: Mapping[str, Any]) -> None:
  """Writes {'params', 'batch_stats'} as an Orbax item at `directory`."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(paths.absolute(directory),
                    {name: jax.device_get(variables[name])
                     for name in ('params', 'batch_stats')})
  checkpointer.wait_until_finished()
  checkpointer.close()


def read_variables(directory: str) -> Dict[str, Any]:
  """Reads an Orbax StandardCheckpointer item as nested dicts of NumPy arrays.

  The target is built from the item's own metadata with NumPy leaves, so the
  restore works on any device count, whatever sharding the writer had.

  Args:
    directory: the item directory (e.g. EXPORT/variables).

  Returns:
    The saved tree with np.ndarray leaves.
  """
  if not paths.isdir(directory):
    raise errors.MissingError(f'{directory} is missing: not a complete '
                              'checkpoint written by pan_jax')
  checkpointer = ocp.StandardCheckpointer()
  directory = paths.absolute(directory)
  metadata = checkpointer.metadata(directory).item_metadata
  tree = getattr(metadata, 'tree', metadata)
  target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree)
  return as_dict(checkpointer.restore(directory, target))
