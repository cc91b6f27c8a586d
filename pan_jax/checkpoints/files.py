"""What every checkpoint directory shares: file names, atomic writes, metadata.

A training workdir, an inference checkpoint and a converted checkpoint all
carry some of:

  config.json    the run's ConfigDict (`config.to_json()`)
  dataset.json   the dataset's metadata (`DatasetMeta.to_json()`)
  variables/     an Orbax StandardCheckpointer item {'params', 'batch_stats'}

They are written here and read back here, once. Writes are atomic (a
temporary file in the same directory, then a rename), so a reader never sees
half a file.
"""

import json
import os
import tempfile
from typing import Any, Dict, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from pan_jax import defaults
from pan_jax import errors
from pan_jax.data import sources

CONFIG_FILE = 'config.json'
DATASET_FILE = 'dataset.json'
VARIABLES_DIR = 'variables'


def absolute(path: str) -> str:
  """`path` made absolute, as Orbax requires; URLs (gs://...) are kept."""
  return path if '://' in path else os.path.abspath(path)


def write_bytes(path: str, data: bytes) -> None:
  """Writes `path` atomically (temporary file in its directory, rename)."""
  directory = os.path.dirname(path) or '.'
  os.makedirs(directory, exist_ok=True)
  fd, temporary = tempfile.mkstemp(dir=directory, prefix='.tmp_')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def write_json(path: str, value: Any) -> None:
  """Writes `value` as indented JSON to `path` atomically."""
  write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + '\n'
                     ).encode())


def required(directory: str, name: str) -> str:
  """directory/name, or FileNotFoundError saying pan_jax did not write it."""
  path = os.path.join(directory, name)
  if not os.path.exists(path):
    raise errors.MissingError(
        f'{path} is missing: {directory} is not a training workdir or '
        'inference checkpoint written by pan_jax')
  return path


def read_json(path: str) -> Dict[str, Any]:
  """The JSON object in `path`; ValueError naming the file if it is not."""
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise errors.DataError(f'{path} is not valid JSON: {e}') from e


def read_config(directory: str) -> ml_collections.ConfigDict:
  """directory/config.json on top of today's defaults (defaults.merged)."""
  return defaults.merged(read_json(required(directory, CONFIG_FILE)))


def read_meta(directory: str) -> sources.DatasetMeta:
  """directory/dataset.json as a DatasetMeta."""
  with open(required(directory, DATASET_FILE)) as f:
    return sources.DatasetMeta.from_json(f.read())


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
  checkpointer.save(absolute(directory),
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
  if not os.path.isdir(directory):
    raise errors.MissingError(f'{directory} is missing: not a complete '
                              'checkpoint written by pan_jax')
  checkpointer = ocp.StandardCheckpointer()
  directory = absolute(directory)
  metadata = checkpointer.metadata(directory).item_metadata
  tree = getattr(metadata, 'tree', metadata)
  target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree)
  return as_dict(checkpointer.restore(directory, target))
