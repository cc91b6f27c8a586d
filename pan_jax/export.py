"""The export command and the StableHLO artefact: python -m pan_jax.export.

    python -m pan_jax.export --checkpoint=RUN --output=EXPORT [--step=N]
        [--config.x=y ...]

writes an inference checkpoint (checkpoints/exported.py: config.json,
dataset.json, variables/, export.json) of a training workdir's step, plus

    model.stablehlo   jax.export artefact
    model.json        what model.stablehlo takes and returns

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

import os
import sys
from typing import Any, Dict, Mapping, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pan_jax import checkpoints
from pan_jax import defaults
from pan_jax import errors
from pan_jax import models
from pan_jax import paths
from pan_jax import runtime
from pan_jax.checkpoints import files
from pan_jax.data import transforms

STABLEHLO_FILE = 'model.stablehlo'
STABLEHLO_INFO_FILE = 'model.json'
# Platforms the StableHLO artefact is lowered for (one artefact runs on all).
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')


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
  if paths.isdir(path):
    path = os.path.join(path, STABLEHLO_FILE)
  return jax.export.deserialize(bytearray(paths.read_bytes(path)))


def write_stablehlo(path: str, exported: jax.export.Exported,
                    config: ml_collections.ConfigDict, meta: Any) -> None:
  """Writes model.stablehlo and its description model.json into `path`."""
  paths.write_bytes(os.path.join(path, STABLEHLO_FILE), exported.serialize())
  height, width = exported.in_avals[-1].shape[1:3]
  files.write_json(os.path.join(path, STABLEHLO_INFO_FILE), {
      'call': 'exported.call(variables, images) -> logits',
      'variables': (f'the tree in {files.VARIABLES_DIR}/ '
                    '({params, batch_stats})'),
      'images': f'float32 [b, {height}, {width}, 3], RGB, '
                '(pixel - mean) / std on the 0-255 scale',
      'logits': f'float32 [b, {height}, {width}, {meta.num_classes}]',
      'mean': [float(v) for v in transforms.IMAGENET_MEAN],
      'std': [float(v) for v in transforms.IMAGENET_STD],
      'platforms': list(exported.platforms),
      'class_names': list(meta.class_names),
      'compute_dtype': config.compute_dtype,
  })


def _define_flags() -> None:
  """The command's flags (defined when run as a program, as every command)."""
  runtime.define_checkpoint_flags('to export')
  flags.DEFINE_string('output', None, 'New directory for the export.',
                      required=True)
  flags.DEFINE_list('platforms', list(DEFAULT_PLATFORMS),
                    'Platforms the StableHLO artefact is lowered for.')
  flags.DEFINE_boolean('stablehlo', True,
                       'Also write the StableHLO artefact (model.stablehlo).')
  flags.adopt_module_key_flags(runtime)  # --help lists them too.


def run(checkpoint: str, output: str, step: Optional[int] = None,
        platforms: Sequence[str] = DEFAULT_PLATFORMS,
        stablehlo: bool = True,
        config_overrides: Optional[Mapping[str, Any]] = None) -> Optional[int]:
  """What the CLI does: inference checkpoint (+ StableHLO) from a checkpoint.

  Args:
    checkpoint: training workdir, inference checkpoint or converted network.
    output: new directory.
    step: checkpoint step (None = the latest).
    platforms: platforms of the StableHLO artefact.
    stablehlo: also write model.stablehlo / model.json.
    config_overrides: {dotted path: value} set on the saved config first
      (--config.x=y), e.g. {'data.crop_size': 640} for the artefact's size;
      written into the export's config.json.

  Returns:
    The exported step.
  """
  if jax.process_count() > 1:
    raise errors.UsageError(
        'export writes one directory from one process: run it on one host, '
        'without PAN_JAX_DISTRIBUTED=1')
  config, meta, variables, step = checkpoints.load(checkpoint, step)
  defaults.override(config, config_overrides or {})
  output = paths.absolute(output)
  checkpoints.exported.save(output, config, meta, variables, step=step,
                            source=paths.absolute(checkpoint))
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
             flag_values.platforms, flag_values.stablehlo,
             config_overrides=runtime.config_overrides())
  print(f'exported step {step} to {paths.absolute(flag_values.output)}',
        file=sys.stdout)


if __name__ == '__main__':
  _define_flags()
  runtime.run(main)
