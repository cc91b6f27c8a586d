"""Inference checkpoints and StableHLO export; `python -m pan_jax.export`.

An inference checkpoint is what evaluation, prediction and serving need and
nothing more:

  EXPORT/
    config.json       the training config (config.to_json())
    dataset.json      the dataset's metadata (class names, palette, ...)
    variables/        Orbax StandardCheckpointer item {'params', 'batch_stats'}
    export.json       where it came from: {'step', 'source', ...} (optional)
    model.stablehlo   jax.export artefact (only when written by this CLI)
    model.json        what model.stablehlo takes and returns

`load(path)` reads an inference checkpoint or a training workdir alike.

The StableHLO artefact is `jax.export` of

    serve(variables, images) = model.apply(variables, images, train=False)

for images float32 [b, H, W, 3] (normalised with the ImageNet mean and std on
the 0-255 scale) at the fixed crop size H = W = config.data.crop_size, with a
symbolic batch dimension b; it returns float32 logits [b, H, W, K]. The
variables are an argument, not constants baked into the program: the
artefact stays small and the weights live once, in `variables/`. Calling it
needs jax and orbax only, not pan_jax:

    import jax, orbax.checkpoint as ocp
    with open('EXPORT/model.stablehlo', 'rb') as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    variables = ocp.StandardCheckpointer().restore('/abs/EXPORT/variables')
    logits = exported.call(variables, images)   # images [b, H, W, 3]
"""

import json
import os
import shutil
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from pan_jax import runtime

CONFIG_FILE = 'config.json'
DATASET_FILE = 'dataset.json'
VARIABLES_DIR = 'variables'
INFO_FILE = 'export.json'
STABLEHLO_FILE = 'model.stablehlo'
STABLEHLO_INFO_FILE = 'model.json'
# Platforms the StableHLO artefact is lowered for (one artefact runs on all).
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')


def is_inference_checkpoint(path: str) -> bool:
  """True if `path` holds an inference checkpoint (has variables/)."""
  return os.path.isdir(os.path.join(path, VARIABLES_DIR))


def load(path: str, step: Optional[int] = None
         ) -> Tuple[ml_collections.ConfigDict, Any, Dict[str, Any],
                    Optional[int]]:
  """Reads a training workdir or an inference checkpoint.

  Args:
    path: a training workdir (config.json, dataset.json, checkpoints/) or an
      inference checkpoint (config.json, dataset.json, variables/).
    step: for a workdir, the step to read (None = the latest); an inference
      checkpoint holds one step and rejects a different one.

  Returns:
    (config, meta, variables, step): the ConfigDict, the DatasetMeta,
    {'params', 'batch_stats'} as trees of NumPy arrays, and the training step
    (None when an inference checkpoint does not record it).

  Raises:
    FileNotFoundError: `path` is neither, or lacks a file (named).
    ValueError: `step` does not match the inference checkpoint's.
  """
  from pan_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from pan_jax.data import sources  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(path):
    raise FileNotFoundError(f'checkpoint directory {path!r} does not exist')
  config = ml_collections.ConfigDict(_read_json(path, CONFIG_FILE))
  with open(_required(path, DATASET_FILE)) as f:
    meta = sources.DatasetMeta.from_json(f.read())
  if is_inference_checkpoint(path):
    info = (_read_json(path, INFO_FILE)
            if os.path.exists(os.path.join(path, INFO_FILE)) else {})
    saved_step = info.get('step')
    if step is not None and step != saved_step:
      raise ValueError(
          f'{path} is an inference checkpoint of step {saved_step}; it '
          f'cannot give step {step}')
    variables = restore_variables(os.path.join(path, VARIABLES_DIR))
    return config, meta, variables, saved_step
  if not os.path.isdir(os.path.join(path, checkpointing.CHECKPOINT_DIR)):
    raise FileNotFoundError(
        f'{path} is neither a training workdir (no '
        f'{checkpointing.CHECKPOINT_DIR}/) nor an inference checkpoint (no '
        f'{VARIABLES_DIR}/)')
  variables, step = checkpointing.restore_variables(path, step)
  return config, meta, variables, step


def restore_variables(directory: str) -> Dict[str, Any]:
  """Reads an Orbax StandardCheckpointer item as NumPy arrays.

  The target is built from the item's own metadata with NumPy leaves, so the
  restore works on any device count, whatever sharding the writer had.

  Args:
    directory: the item directory (EXPORT/variables).

  Returns:
    The saved tree with np.ndarray leaves.
  """
  directory = os.path.abspath(directory)
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(directory).item_metadata
  tree = getattr(metadata, 'tree', metadata)
  target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree)
  return checkpointer.restore(directory, target)


def save_inference_checkpoint(path: str, config: ml_collections.ConfigDict,
                              meta: Any, variables: Dict[str, Any],
                              step: Optional[int] = None,
                              source: Optional[str] = None) -> None:
  """Writes an inference checkpoint at `path` (a new directory).

  Everything is written to a temporary sibling directory that is renamed to
  `path` at the end, so `path` is either absent or complete.

  Args:
    path: destination; must not exist yet.
    config: the model's ConfigDict.
    meta: the DatasetMeta (a dataclass with to_json()).
    variables: {'params', 'batch_stats'} (any arrays; written as NumPy).
    step: training step the variables come from, recorded in export.json.
    source: where they came from (recorded).
  """
  path = os.path.abspath(path)
  if os.path.exists(path):
    raise FileExistsError(f'{path} already exists; choose a new --output')
  temporary = f'{path}.tmp-{os.getpid()}'
  shutil.rmtree(temporary, ignore_errors=True)
  os.makedirs(temporary)
  variables = {name: jax.device_get(variables[name])
               for name in ('params', 'batch_stats')}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(temporary, VARIABLES_DIR), variables)
  checkpointer.wait_until_finished()
  _write_text(temporary, CONFIG_FILE, config.to_json(indent=2))
  _write_text(temporary, DATASET_FILE, meta.to_json())
  _write_text(temporary, INFO_FILE, json.dumps(
      {'step': step, 'source': source}, indent=2))
  os.replace(temporary, path)


def export_stablehlo(model: Any, variables: Dict[str, Any],
                     crop_size: Sequence[int],
                     platforms: Sequence[str] = DEFAULT_PLATFORMS
                     ) -> jax.export.Exported:
  """jax.export of `model.apply(variables, images, train=False)`.

  Args:
    model: the linen Module.
    variables: {'params', 'batch_stats'} (only shapes and dtypes are used).
    crop_size: (height, width) of the images the artefact takes.
    platforms: platforms to lower for ('cpu', 'cuda', 'rocm', 'tpu').

  Returns:
    The Exported (call `.serialize()` for bytes); its first argument is the
    variables tree, its second float32 images [b, H, W, 3], b symbolic.
  """
  def serve(variables, images):
    return model.apply(variables, images, train=False)

  batch, = jax.export.symbolic_shape('b', constraints=('b >= 1',))
  variable_specs = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)),
      variables)
  image_spec = jax.ShapeDtypeStruct(
      (batch, int(crop_size[0]), int(crop_size[1]), 3), jnp.float32)
  return jax.export.export(jax.jit(serve), platforms=tuple(platforms))(
      variable_specs, image_spec)


def load_stablehlo(path: str) -> jax.export.Exported:
  """Deserializes EXPORT/model.stablehlo (or the file `path`)."""
  if os.path.isdir(path):
    path = os.path.join(path, STABLEHLO_FILE)
  with open(path, 'rb') as f:
    return jax.export.deserialize(bytearray(f.read()))


def write_stablehlo(path: str, exported: jax.export.Exported,
                    config: ml_collections.ConfigDict, meta: Any) -> None:
  """Writes model.stablehlo and its description model.json into `path`."""
  from pan_jax.data import transforms  # pylint: disable=g-import-not-at-top
  _write_bytes(path, STABLEHLO_FILE, exported.serialize())
  height, width = exported.in_avals[-1].shape[1:3]
  _write_text(path, STABLEHLO_INFO_FILE, json.dumps({
      'call': 'exported.call(variables, images) -> logits',
      'variables': f'the tree in {VARIABLES_DIR}/ ({{params, batch_stats}})',
      'images': f'float32 [b, {height}, {width}, 3], RGB, '
                '(pixel - mean) / std on the 0-255 scale',
      'logits': f'float32 [b, {height}, {width}, {meta.num_classes}]',
      'mean': [float(v) for v in transforms.IMAGENET_MEAN],
      'std': [float(v) for v in transforms.IMAGENET_STD],
      'platforms': list(exported.platforms),
      'class_names': list(meta.class_names),
      'compute_dtype': config.compute_dtype,
  }, indent=2))


def _required(path: str, name: str) -> str:
  full = os.path.join(path, name)
  if not os.path.exists(full):
    raise FileNotFoundError(f'{full} is missing: {path} is not a training '
                            'workdir or inference checkpoint written by '
                            'pan_jax')
  return full


def _read_json(path: str, name: str) -> Dict[str, Any]:
  full = _required(path, name)
  with open(full) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{full} is not valid JSON: {e}') from e


def _write_bytes(directory: str, name: str, data: bytes) -> None:
  """Writes directory/name atomically."""
  temporary = os.path.join(directory, f'.{name}.tmp')
  with open(temporary, 'wb') as f:
    f.write(data)
  os.replace(temporary, os.path.join(directory, name))


def _write_text(directory: str, name: str, text: str) -> None:
  _write_bytes(directory, name, (text.rstrip('\n') + '\n').encode())


def _define_flags() -> None:
  """The CLI's flags (defined only when run as a program: this module is also
  a library, imported next to other CLIs with flags of the same names)."""
  flags.DEFINE_string('checkpoint', None,
                      'Training workdir (or inference checkpoint) to export.')
  flags.DEFINE_string('output', None, 'New directory for the export.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_list('platforms', list(DEFAULT_PLATFORMS),
                    'Platforms the StableHLO artefact is lowered for.')
  flags.DEFINE_boolean('stablehlo', True,
                       'Also write the StableHLO artefact (model.stablehlo).')
  flags.mark_flags_as_required(['checkpoint', 'output'])


def run(checkpoint: str, output: str, step: Optional[int] = None,
        platforms: Sequence[str] = DEFAULT_PLATFORMS,
        stablehlo: bool = True) -> Optional[int]:
  """What the CLI does: inference checkpoint (+ StableHLO) from a checkpoint.

  Args:
    checkpoint: training workdir or inference checkpoint.
    output: new directory.
    step: checkpoint step (None = the latest).
    platforms: platforms of the StableHLO artefact.
    stablehlo: also write model.stablehlo / model.json.

  Returns:
    The exported step.
  """
  from pan_jax import models  # pylint: disable=g-import-not-at-top
  config, meta, variables, step = load(checkpoint, step)
  output = os.path.abspath(output)
  save_inference_checkpoint(output, config, meta, variables, step=step,
                            source=os.path.abspath(checkpoint))
  logging.info('Wrote the inference checkpoint (step %s) to %s', step, output)
  if stablehlo:
    model = models.create_model(config, meta.num_classes)
    crop = int(config.data.crop_size)
    exported = export_stablehlo(model, variables, (crop, crop), platforms)
    write_stablehlo(output, exported, config, meta)
    logging.info('Wrote %s for images [b, %d, %d, 3] on %s',
                 os.path.join(output, STABLEHLO_FILE), crop, crop,
                 ','.join(exported.platforms))
  return step


def main(argv: Sequence[str]) -> None:
  """Exports --checkpoint to --output (see the module docstring)."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  flag_values = flags.FLAGS
  step = run(flag_values.checkpoint, flag_values.output, flag_values.step,
             flag_values.platforms, flag_values.stablehlo)
  print(f'exported step {step} to {os.path.abspath(flag_values.output)}',
        file=sys.stdout)


if __name__ == '__main__':
  _define_flags()
  runtime.run(main)
