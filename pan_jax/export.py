"""The export command and the StableHLO artefacts: python -m pan_jax.export.

    python -m pan_jax.export --checkpoint=RUN --output=EXPORT [--step=N]
        [--serving [--serving_logits]] [--config.x=y ...]

writes an inference checkpoint (checkpoints/exported.py: config.json,
dataset.json, variables/, export.json) of a training workdir's step, plus
model.stablehlo (a jax.export artefact) and model.json (what it takes and
returns, and how to call it).

With --serving the artefact is what a server calls: uint8 RGB images
[b, H, W, 3] in, int32 class ids [b, H, W] out (with --serving_logits also
float32 logits [b, H, W, K]), the ImageNet normalisation inside, and b, H
and W all symbolic: any batch and any H, W >= models.min_input_size(config)
(H and W need not be multiples of anything; each new shape is compiled once
by the caller's jax). Its ids are those of `predict.Predictor` with
single-scale whole-image inference and eval.padding 'exact' (the network
sees each image at its own size; tested on several sizes), whatever the
checkpoint's config.eval says.

Without --serving, the artefact is `jax.export` of

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
    logits = exported.call(variables, images)  # images [b, H, W, 3]
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
from pan_jax import progress as progress_lib
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
  image_spec = jax.ShapeDtypeStruct(
      (batch, int(crop_size[0]), int(crop_size[1]), 3), jnp.float32)
  return jax.export.export(jax.jit(serve), platforms=tuple(platforms))(
      _specs(variables), image_spec)


def export_serving(model: Any, variables: Dict[str, Any], min_size: int,
                   platforms: Sequence[str] = DEFAULT_PLATFORMS,
                   logits: bool = False) -> jax.export.Exported:
  """jax.export of uint8 images [b, H, W, 3] -> int32 class ids [b, H, W].

  The program normalises the images as `transforms.normalize` does, runs the
  model at the images' size (telling it that size, as the Predictor does)
  and takes the argmax of the softmax probabilities: `predict.Predictor`
  with single-scale whole-image inference.

  Args:
    model: the linen Module.
    variables: {'params', 'batch_stats'} (only shapes and dtypes are used).
    min_size: smallest H and W (models.min_input_size), a constraint of the
      symbolic shape.
    platforms: platforms to lower for ('cpu', 'cuda', 'rocm', 'tpu').
    logits: also return the float32 logits [b, H, W, K].

  Returns:
    The Exported; call it as `exported.call(variables, images)`, b, H and W
    symbolic (b >= 1, H and W >= min_size).
  """
  scale = jnp.asarray(1.0 / transforms.IMAGENET_STD, jnp.float32)
  offset = jnp.asarray(-transforms.IMAGENET_MEAN / transforms.IMAGENET_STD,
                       jnp.float32)

  def serve(variables, images):
    batch, height, width, _ = images.shape
    sizes = jnp.broadcast_to(jnp.array([height, width], jnp.int32),
                             (batch, 2))
    scores = model.apply(variables, images.astype(jnp.float32) * scale +
                         offset, train=False, image_sizes=sizes)
    ids = jnp.argmax(jax.nn.softmax(scores, axis=-1), axis=-1)
    ids = ids.astype(jnp.int32)
    return (ids, scores) if logits else ids

  shape = jax.export.symbolic_shape(
      'b, h, w', constraints=('b >= 1', f'h >= {int(min_size)}',
                              f'w >= {int(min_size)}'))
  image_spec = jax.ShapeDtypeStruct(shape + (3,), jnp.uint8)
  return jax.export.export(jax.jit(serve), platforms=tuple(platforms))(
      _specs(variables), image_spec)


def _specs(variables: Dict[str, Any]) -> Dict[str, Any]:
  """ShapeDtypeStructs of a variables tree."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)),
      variables)


def load_stablehlo(path: str) -> jax.export.Exported:
  """Deserializes EXPORT/model.stablehlo (or the file `path`)."""
  if paths.isdir(path):
    path = os.path.join(path, STABLEHLO_FILE)
  return jax.export.deserialize(bytearray(paths.read_bytes(path)))


# How to serve the --serving artefact with jax and orbax only (model.json's
# 'example'; the README shows the same and tests/test_export.py runs it).
SERVING_EXAMPLE = """\
# POST an .npy uint8 [H, W, 3] image, get an .npy int32 [H, W] mask back.
import http.server, io
import jax, numpy as np, orbax.checkpoint as ocp

EXPORT = '/abs/path/EXPORT'
with open(f'{EXPORT}/model.stablehlo', 'rb') as f:
  model = jax.export.deserialize(bytearray(f.read()))
variables = ocp.StandardCheckpointer().restore(f'{EXPORT}/variables')

class Handler(http.server.BaseHTTPRequestHandler):
  def do_POST(self):
    body = self.rfile.read(int(self.headers['Content-Length']))
    ids = model.call(variables, np.load(io.BytesIO(body))[None])[0]
    out = io.BytesIO()
    np.save(out, np.asarray(ids))
    self.send_response(200)
    self.end_headers()
    self.wfile.write(out.getvalue())

server = http.server.HTTPServer(('', 8000), Handler)
server.serve_forever()
"""


def write_stablehlo(path: str, exported: jax.export.Exported,
                    config: ml_collections.ConfigDict, meta: Any,
                    serving: bool = False) -> None:
  """Writes model.stablehlo and its description model.json into `path`.

  Args:
    path: the export directory.
    exported: from export_stablehlo, or export_serving (serving=True).
    config: the export's config.
    meta: its DatasetMeta.
    serving: whether `exported` is the serving artefact.
  """
  paths.write_bytes(os.path.join(path, STABLEHLO_FILE), exported.serialize())
  common = {
      'variables': (f'the tree in {files.VARIABLES_DIR}/ '
                    '({params, batch_stats})'),
      'platforms': list(exported.platforms),
      'class_names': list(meta.class_names),
      'compute_dtype': config.compute_dtype,
  }
  if serving:
    logits = len(exported.out_avals) == 2
    info = {
        'call': 'exported.call(variables, images) -> ' + (
            '(ids, logits)' if logits else 'ids'),
        'images': 'uint8 [b, H, W, 3], RGB 0-255 (normalised inside)',
        'constraints': (f'b >= 1, H >= {models.min_input_size(config)}, '
                        f'W >= {models.min_input_size(config)}, all '
                        'symbolic (any values; one compilation per shape)'),
        'ids': 'int32 [b, H, W] class ids (argmax of the softmax)',
        **({'logits': f'float32 [b, H, W, {meta.num_classes}]'} if logits
           else {}),
        'example': SERVING_EXAMPLE,
    }
  else:
    height, width = exported.in_avals[-1].shape[1:3]
    info = {
        'call': 'exported.call(variables, images) -> logits',
        'images': f'float32 [b, {height}, {width}, 3], RGB, '
                  '(pixel - mean) / std on the 0-255 scale',
        'logits': f'float32 [b, {height}, {width}, {meta.num_classes}]',
        'mean': [float(v) for v in transforms.IMAGENET_MEAN],
        'std': [float(v) for v in transforms.IMAGENET_STD],
    }
  files.write_json(os.path.join(path, STABLEHLO_INFO_FILE),
                   {**info, **common})


def _define_flags() -> None:
  """The command's flags (defined when run as a program, as every command)."""
  runtime.define_checkpoint_flags('to export')
  flags.DEFINE_string('output', None, 'New directory for the export.',
                      required=True)
  flags.DEFINE_list('platforms', list(DEFAULT_PLATFORMS),
                    'Platforms the StableHLO artefact is lowered for.')
  flags.DEFINE_boolean('stablehlo', True,
                       'Also write the StableHLO artefact (model.stablehlo).')
  flags.DEFINE_boolean(
      'serving', False, 'Make model.stablehlo the serving artefact: uint8 RGB '
      '[b, H, W, 3] -> int32 class ids [b, H, W], b, H and W symbolic (H, W '
      '>= the model\'s minimum side). Default: normalised float32 '
      '[b, crop, crop, 3] -> logits.')
  flags.DEFINE_boolean('serving_logits', False,
                       'With --serving, also return float32 logits '
                       '[b, H, W, K].')
  flags.adopt_module_key_flags(runtime)  # --help lists them too.


def run(checkpoint: str, output: str, step: Optional[int] = None,
        platforms: Sequence[str] = DEFAULT_PLATFORMS,
        stablehlo: bool = True,
        config_overrides: Optional[Mapping[str, Any]] = None,
        serving: bool = False, serving_logits: bool = False,
        progress: bool = True) -> Optional[int]:
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
    serving: write the serving artefact (export_serving) instead.
    serving_logits: the serving artefact also returns the logits.
    progress: show the stages done (progress.Bar: load, save, and with
      stablehlo lower, write).

  Returns:
    The exported step.
  """
  if jax.process_count() > 1:
    raise errors.UsageError(
        'export writes one directory from one process: run it on one host, '
        'without PAN_JAX_DISTRIBUTED=1')
  if serving_logits and not serving:
    raise errors.UsageError('--serving_logits needs --serving')
  bar = progress_lib.Bar('export', 4 if stablehlo else 2, 'stages',
                         enabled=progress, rate=False)
  config, meta, variables, step = checkpoints.load(checkpoint, step)
  bar.update()
  defaults.override(config, config_overrides or {})
  output = paths.absolute(output)
  checkpoints.exported.save(output, config, meta, variables, step=step,
                            source=paths.absolute(checkpoint))
  bar.update()
  logging.info('Wrote the inference checkpoint (step %s) to %s', step, output)
  if stablehlo:
    model = models.create_model(config, meta.num_classes)
    if serving:
      if config.eval.padding != 'exact':
        logging.warning('The serving artefact sees each image at its own '
                        "size (padding 'exact'), not config.eval.padding=%r",
                        config.eval.padding)
      min_size = models.min_input_size(config)
      exported = export_serving(model, variables, min_size, platforms,
                                logits=serving_logits)
      what = f'uint8 images [b, H, W, 3], H, W >= {min_size}'
    else:
      crop = int(config.data.crop_size)
      exported = export_stablehlo(model, variables, (crop, crop), platforms)
      what = f'images [b, {crop}, {crop}, 3]'
    bar.update()
    write_stablehlo(output, exported, config, meta, serving=serving)
    bar.update()
    logging.info('Wrote %s for %s on %s', os.path.join(output, STABLEHLO_FILE),
                 what, ','.join(exported.platforms))
  bar.close()
  return step


def main(argv: Sequence[str]) -> None:
  """Exports --checkpoint to --output (see the module docstring)."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  flag_values = flags.FLAGS
  step = run(flag_values.checkpoint, flag_values.output, flag_values.step,
             flag_values.platforms, flag_values.stablehlo,
             config_overrides=runtime.config_overrides(),
             serving=flag_values.serving,
             serving_logits=flag_values.serving_logits)
  print(f'exported step {step} to {paths.absolute(flag_values.output)}',
        file=sys.stdout)


def cli() -> None:
  """The console script pan-jax-export (= python -m pan_jax.export)."""
  _define_flags()
  runtime.run(main)


if __name__ == '__main__':
  cli()
