"""Loads converted PyTorch weights (`python -m pan_jax.convert`) into a model.

A converted directory DIR holds:

  DIR/pretrained.json  what it is: 'kind' ('backbone' for ImageNet ResNets,
                       'network' for whole smp PAN models), the source
                       (format, file, architecture) and 'model', the
                       config.model fields the weights need.
  DIR/variables/       Orbax StandardCheckpointer item {'params',
                       'batch_stats'}: only the 'backbone' subtrees for
                       kind 'backbone', the whole network otherwise.
  DIR/config.json,     whole networks only: with variables/ these make DIR an
  DIR/dataset.json     inference checkpoint that `pan_jax.evaluate` and
                       `pan_jax.predict` take as --checkpoint.

Training starts from such a directory with `--config.model.init_from=DIR`:
train.py calls `load_pretrained(variables, DIR, config)` on the freshly
initialised variables. Every array is checked against the model's (name and
shape), so a wrong `--config.model.*` fails with the name of the first
mismatched array and the overrides the weights need.
"""

import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

from flax import traverse_util
import numpy as np

INFO_FILE = 'pretrained.json'
VARIABLES_DIR = 'variables'
CONFIG_FILE = 'config.json'
DATASET_FILE = 'dataset.json'
KINDS = ('backbone', 'network')
COLLECTIONS = ('params', 'batch_stats')
# config.model fields that decide what a backbone's weights mean. Shapes catch
# most mismatches, but avg_down changes no shape: only this check sees it.
ARCH_FIELDS = ('backbone', 'stem', 'avg_down', 'base_width')


def read_info(path: str) -> Dict[str, Any]:
  """Reads DIR/pretrained.json of a converted directory.

  Args:
    path: the converted directory.

  Returns:
    The parsed JSON (keys 'kind', 'source', 'model', ...).

  Raises:
    FileNotFoundError / ValueError: not a converted directory.
  """
  info_path = os.path.join(path, INFO_FILE)
  if not os.path.isfile(info_path):
    raise FileNotFoundError(
        f'{path} is not a converted checkpoint: {info_path} is missing '
        '(make one with `python -m pan_jax.convert`)')
  with open(info_path) as f:
    try:
      info = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{info_path} is not valid JSON: {e}') from e
  if info.get('kind') not in KINDS:
    raise ValueError(f'{info_path}: kind must be one of {KINDS}, got '
                     f'{info.get("kind")!r}')
  return info


def restore_variables(path: str) -> Dict[str, Any]:
  """Reads DIR/variables as a nested dict of host numpy arrays."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  item = os.path.join(os.path.abspath(path), VARIABLES_DIR)
  if not os.path.isdir(item):
    raise FileNotFoundError(f'{item} is missing: {path} is not a complete '
                            'converted checkpoint')
  checkpointer = ocp.StandardCheckpointer()
  try:
    # Restoring onto numpy targets keeps everything on the host, whatever the
    # devices: the caller places the arrays.
    metadata = checkpointer.metadata(item).item_metadata.tree
    target = _map_leaves(
        lambda m: np.zeros(m.shape, m.dtype), _as_dict(metadata))
    restored = checkpointer.restore(item, target)
  finally:
    checkpointer.close()
  return _map_leaves(np.asarray, _as_dict(restored))


def _as_dict(tree: Any) -> Any:
  """Nested Mappings (FrozenDict, orbax metadata trees) as plain dicts."""
  if isinstance(tree, Mapping):
    return {k: _as_dict(v) for k, v in tree.items()}
  return tree


def _map_leaves(fn, tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _map_leaves(fn, v) for k, v in tree.items()}
  return fn(tree)


def required_overrides(info: Mapping[str, Any]) -> str:
  """`--config.model.X=Y ...` for the fields a converted checkpoint needs."""
  model = info.get('model', {})
  return ' '.join(f'--config.model.{k}={model[k]}' for k in ARCH_FIELDS
                  if k in model)


def check_config(info: Mapping[str, Any], model_config: Any,
                 path: str) -> None:
  """Raises if config.model disagrees with what the weights need.

  Args:
    info: DIR/pretrained.json.
    model_config: config.model of the run.
    path: DIR, for the message.
  """
  need = info.get('model', {})
  wrong = [f'model.{k}={model_config[k]!r} (the weights need {need[k]!r})'
           for k in ARCH_FIELDS if k in need and model_config[k] != need[k]]
  if wrong:
    raise ValueError(
        f'{path} holds {_describe_source(info)}, which this config cannot '
        f'load: {"; ".join(wrong)}. Use {required_overrides(info)}.')


def _describe_source(info: Mapping[str, Any]) -> str:
  source = info.get('source', {})
  return (f'{source.get("format", "?")} {source.get("arch", "?")} weights '
          f'({info["kind"]})')


def load_pretrained(variables: Mapping[str, Any], path: str,
                    config: Optional[Any] = None
                    ) -> Tuple[Dict[str, Any], str]:
  """Merges a converted checkpoint into freshly initialised variables.

  Kind 'backbone' (ImageNet ResNets) replaces variables['params']['backbone']
  and variables['batch_stats']['backbone'] and leaves the head as
  initialised; kind 'network' (smp PAN) replaces every array. Every array of
  the replaced part must exist on both sides with the same shape.

  Args:
    variables: {'params', 'batch_stats'} from `model.init` (jax or numpy
      leaves; anything with .shape and .dtype).
    path: a directory written by `python -m pan_jax.convert`.
    config: the run's ConfigDict. When given, config.model's backbone, stem,
      avg_down and base_width are checked against what the weights need
      (avg_down changes no shape, so only this catches it).

  Returns:
    (variables, message): a new nested dict in which the loaded leaves are
    host numpy arrays of the target leaves' dtypes (the caller places them on
    devices) and the others are the given leaves unchanged; and one line
    saying what was loaded.

  Raises:
    ValueError: a missing or extra array, a shape mismatch, or (with
      `config`) an architecture field that disagrees; the message names the
      array and both shapes, and the config overrides the weights need.
  """
  info = read_info(path)
  if config is not None:
    check_config(info, config.model, path)
  loaded = restore_variables(path)
  target = traverse_util.flatten_dict(_as_dict(variables))
  source = traverse_util.flatten_dict(loaded)
  if info['kind'] == 'backbone':
    covered = [k for k in target if len(k) > 1 and k[1] == 'backbone']
  else:
    covered = list(target)
  covered.sort(key=lambda k: k[0] != 'params')  # params first in messages.
  hint = (f' ({path} holds {_describe_source(info)}; it needs '
          f'{required_overrides(info)})')
  # Shape mismatches first: they say most about a wrong config.
  for key in covered:
    if key in source and tuple(target[key].shape) != tuple(source[key].shape):
      raise ValueError(
          f'{"/".join(key)}: {path} has shape {tuple(source[key].shape)}, '
          f'the model expects {tuple(target[key].shape)}{hint}')
  missing = [k for k in covered if k not in source]
  if missing:
    raise ValueError(
        f'{path} has no array for the model\'s {"/".join(missing[0])} '
        f'(shape {tuple(target[missing[0]].shape)}); {len(missing)} missing '
        f'in all{hint}')
  extra = [k for k in source if k not in target]
  if extra:
    raise ValueError(
        f'{path} holds {"/".join(extra[0])} (shape '
        f'{tuple(source[extra[0]].shape)}), which the model does not have; '
        f'{len(extra)} such arrays in all{hint}')
  merged = dict(target)
  count = 0
  for key in covered:
    merged[key] = np.asarray(source[key], dtype=target[key].dtype)
    if key[0] == 'params':
      count += int(np.prod(source[key].shape))
  what = ('the backbone (the centre block, decoder and classifier stay '
          'randomly initialised)' if info['kind'] == 'backbone'
          else 'the whole network')
  message = (f'Loaded {what} from {path}: {_describe_source(info)}, '
             f'{len(covered)} arrays, {count:,} parameters.')
  return traverse_util.unflatten_dict(merged), message
