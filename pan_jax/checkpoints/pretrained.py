"""Converted weights (`python -m pan_jax.convert`) and loading them (init_from).

A converted directory DIR holds:

  DIR/pretrained.json  what it is: 'kind' ('backbone' for ImageNet ResNets,
                       'network' for whole smp PAN models), the source
                       (format, file, architecture) and 'model', the
                       config.model fields the weights need.
  DIR/variables/       Orbax StandardCheckpointer item {'params',
                       'batch_stats'}: only the 'backbone' subtrees for
                       kind 'backbone', the whole network otherwise.
  DIR/config.json,     whole networks only: with variables/ these make DIR an
  DIR/dataset.json,    inference checkpoint (exported.py's format) that
  DIR/export.json      `pan_jax.evaluate` and `pan_jax.predict` take as
                       --checkpoint.

Training starts from such a directory with `--config.model.init_from=DIR`
(an inference checkpoint written by `python -m pan_jax.export`, or a training
workdir, whose latest checkpoint is read, work too, as whole networks: the
second stage of configs/voc.py:finetune starts from the first stage's
workdir): train.py calls `load_pretrained(variables, DIR, config)` on the
freshly initialised variables, so the step and the optimiser state are those
of a fresh start whatever DIR held. Every array is checked against the
model's (name and shape), and config.model against what the weights need, so
a wrong `--config.model.*` fails with the name of the first mismatched array
or field and the overrides the weights need.
"""

import json
import os
import shutil
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Tuple

from flax import traverse_util
import ml_collections
import numpy as np

from pan_jax import errors
from pan_jax import paths
from pan_jax.checkpoints import exported
from pan_jax.checkpoints import files
from pan_jax.checkpoints import workdir

INFO_FILE = 'pretrained.json'
KINDS = ('backbone', 'network')
# config.model fields that decide what a backbone's weights mean. Shapes catch
# most mismatches, but avg_down changes no shape: only this check sees it.
ARCH_FIELDS = ('backbone', 'stem', 'avg_down', 'base_width')
# config.model fields a whole network may be loaded with changed.
NETWORK_FREE_FIELDS = ('init_from', 'require_init_from', 'output_stride',
                       'multi_grid', 'contract_dilation', 'bn_momentum')


def read_info(path: str) -> Dict[str, Any]:
  """Describes a converted directory, or an inference checkpoint.

  Args:
    path: a directory from `python -m pan_jax.convert` (DIR/pretrained.json),
      an inference checkpoint from `python -m pan_jax.export` (config.json
      and variables/, no pretrained.json) or a training workdir (config.json
      and checkpoints/): those two are whole networks.

  Returns:
    {'kind', 'source': {'format', 'arch', ...}, 'model': the config.model
    fields of ARCH_FIELDS the weights need}.

  Raises:
    FileNotFoundError / ValueError: neither kind of directory.
  """
  info_path = os.path.join(path, INFO_FILE)
  if not paths.isfile(info_path):
    kind = ('pan_jax' if exported.is_inference_checkpoint(path) else
            'pan_jax workdir' if workdir.is_workdir(path) else None)
    if kind:
      model = files.read_config(path).get('model', {})
      return {'kind': 'network',
              'source': {'format': kind, 'arch': model.get('backbone')},
              'model': {k: model[k] for k in ARCH_FIELDS if k in model}}
    raise errors.MissingError(
        f'{path} is not a converted checkpoint ({info_path} is missing; make '
        'one with `python -m pan_jax.convert`), an inference checkpoint or a '
        'training workdir')
  info = files.read_json(info_path)
  if info.get('kind') not in KINDS:
    raise errors.DataError(f'{info_path}: kind must be one of {KINDS}, '
                           f'got {info.get("kind")!r}')
  return info


def restore_variables(path: str) -> Dict[str, Any]:
  """Reads DIR/variables (or a workdir's latest checkpoint) as NumPy trees."""
  if (workdir.is_workdir(path) and
      not exported.is_inference_checkpoint(path)):
    return files.as_dict(workdir.restore_variables(path)[0])
  return files.read_variables(os.path.join(path, files.VARIABLES_DIR))


def save(output: str, variables: Mapping[str, Any], info: Mapping[str, Any],
         config: Optional[ml_collections.ConfigDict] = None,
         meta: Optional[Any] = None) -> None:
  """Writes a converted directory (see the module docstring).

  A whole network (`config` given) is written as an inference checkpoint,
  then pretrained.json is added. A backbone is written into a temporary
  sibling directory that is renamed to `output` at the end (on gs://, which
  cannot rename, in place with pretrained.json last). Either way `output`
  is read as converted weights only once its variables are complete.

  Args:
    output: the directory to create (local or gs://); must not exist.
    variables: {'params', 'batch_stats'} NumPy tree.
    info: contents of pretrained.json.
    config: whole config (networks only).
    meta: dataset metadata (networks only).

  Raises:
    FileExistsError: `output` exists.
  """
  output = paths.absolute(output)
  if paths.exists(output):
    raise errors.ExistsError(f'--output={output} already exists; choose a '
                             'new directory or remove it')
  if config is not None:
    exported.save(output, config, meta, dict(variables),
                  source=info['source']['file'])
    # Added last; without it the directory is still a valid inference
    # checkpoint, which read_info also understands.
    files.write_json(os.path.join(output, INFO_FILE), dict(info))
    return
  if paths.is_url(output):
    files.save_variables(os.path.join(output, files.VARIABLES_DIR), variables)
    files.write_json(os.path.join(output, INFO_FILE), dict(info))  # Marker.
    return
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  temporary = tempfile.mkdtemp(prefix=os.path.basename(output) + '.tmp',
                               dir=parent)
  try:
    files.save_variables(os.path.join(temporary, files.VARIABLES_DIR),
                         variables)
    files.write_json(os.path.join(temporary, INFO_FILE), dict(info))
    os.rename(temporary, output)
  except BaseException:
    shutil.rmtree(temporary, ignore_errors=True)
    raise


def required_overrides(info: Mapping[str, Any]) -> str:
  """`--config.model.X=Y ...` for the fields a converted checkpoint needs."""
  model = info.get('model', {})
  return ' '.join(f'--config.model.{k}={model[k]}' for k in ARCH_FIELDS
                  if k in model)


def check_config(info: Mapping[str, Any], model_config: Any,
                 path: str) -> List[str]:
  """Raises if config.model disagrees with what the weights need.

  For a backbone that is ARCH_FIELDS. A whole network's weights mean
  something only in the network they were trained in, so there every
  config.model field must equal the saved config.json's except
  NETWORK_FREE_FIELDS (changing the output stride to fine-tune or evaluate
  is common practice).

  Args:
    info: from `read_info`.
    model_config: config.model of the run.
    path: DIR, for the message.

  Returns:
    'model.X: saved -> now' for each free field that differs.
  """
  need = info.get('model', {})
  wrong = [f'model.{k}={model_config[k]!r} (the weights need {need[k]!r})'
           for k in ARCH_FIELDS if k in need and model_config[k] != need[k]]
  if wrong:
    raise errors.MismatchError(
        f'{path} holds {_describe_source(info)}, which this config cannot '
        f'load: {"; ".join(wrong)}. Use {required_overrides(info)}.')
  config_path = os.path.join(path, files.CONFIG_FILE)
  if info['kind'] != 'network' or not paths.isfile(config_path):
    return []
  saved = files.flatten(files.read_json(config_path).get('model', {}),
                        'model')
  # Through JSON, so that tuples and lists compare equal.
  current = files.flatten(json.loads(model_config.to_json()), 'model')
  differing = [k for k in sorted(set(saved) | set(current))
               if saved.get(k) != current.get(k)]
  free = [k for k in differing if k.split('.')[1] in NETWORK_FREE_FIELDS]
  wrong = [f'{k}={current.get(k, "<absent>")!r} (the network has '
           f'{saved.get(k, "<absent>")!r})' for k in differing if k not in free]
  if wrong:
    raise errors.MismatchError(
        f'{path} holds {_describe_source(info)} whose config.model differs '
        f'from this run\'s: {"; ".join(wrong)}. Start from its config.json '
        '(for converted smp models: --config=configs/smp_pan.py:BACKBONE).')
  return [f'{k}: {saved.get(k)!r} -> {current.get(k)!r}' for k in free
          if k != 'model.init_from']


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
    path: a directory written by `python -m pan_jax.convert`, an inference
      checkpoint or a training workdir (its latest checkpoint).
    config: the run's ConfigDict. When given, config.model is checked with
      `check_config`: a backbone's ARCH_FIELDS (avg_down changes no shape, so
      only this catches it), a network's whole config.model.

  Returns:
    (variables, message): a new nested dict in which the loaded leaves are
    host numpy arrays of the target leaves' dtypes (the caller places them on
    devices) and the others are the given leaves unchanged; and one line
    saying what was loaded.

  Raises:
    ValueError: a missing or extra array, a shape mismatch, or (with
      `config`) a config.model field that disagrees; the message names the
      array and both shapes, or the fields and the values the weights need.
  """
  info = read_info(path)
  changed = check_config(info, config.model, path) if config is not None else []
  loaded = restore_variables(path)
  target = traverse_util.flatten_dict(files.as_dict(variables))
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
      raise errors.MismatchError(
          f'{"/".join(key)}: {path} has shape {tuple(source[key].shape)}, '
          f'the model expects {tuple(target[key].shape)}{hint}')
  missing = [k for k in covered if k not in source]
  if missing:
    raise errors.MismatchError(
        f'{path} has no array for the model\'s {"/".join(missing[0])} '
        f'(shape {tuple(target[missing[0]].shape)}); {len(missing)} missing '
        f'in all{hint}')
  covered_set = set(covered)
  extra = [k for k in source if k not in covered_set]
  if extra:
    raise errors.MismatchError(
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
  if changed:
    message += f' Changed from the saved config: {"; ".join(changed)}.'
  return traverse_util.unflatten_dict(merged), message
