"""Training: TrainState, the jitted train step and the training loop.

`train_and_evaluate(config, workdir)` is the whole run: it builds the model
and the data pipeline, restores the latest checkpoint of `workdir` (or
initialises), trains with one `jax.jit`-compiled `train_step` over a 1-D
'data' mesh spanning every device of every process, validates, writes
metrics and checkpoints, and stops cleanly on SIGTERM/SIGINT. Rerunning it
on the same workdir resumes where the last checkpoint left off, including
the data order.

Parallelism is plain data parallelism expressed as shardings: the state is
replicated, the batch is split along its leading axis, and XLA inserts the
gradient all-reduce. BatchNorm has no axis_name: under jit its statistics
are computed over the global batch (synchronised BN), which also makes the
result independent of the device count up to float rounding.
"""

import collections
import functools
import json
import math
import os
import shutil
import tempfile
import time
from typing import Any, Optional

from absl import logging
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pan_jax import errors
from pan_jax import evaluate
from pan_jax import losses
from pan_jax import models
from pan_jax import optim
from pan_jax import paths
from pan_jax import progress as progress_lib
from pan_jax import runtime
from pan_jax import sharding
from pan_jax import visualize
from pan_jax.checkpoints import pretrained
from pan_jax.checkpoints import workdir as workdir_lib
from pan_jax.data import pipeline
from pan_jax.data import records
from pan_jax.data import sources

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
# jax.profiler traces of config.profile_steps (open with TensorBoard's
# profile plugin: tensorboard --logdir=WORKDIR/profile).
PROFILE_DIR = 'profile'
# Train steps dispatched to the devices and not finished, at most.
MAX_STEPS_IN_FLIGHT = 2
# Per-step values that must stay finite; a checkpoint is only written after
# every step up to it has been checked.
_FINITE_METRICS = ('loss', 'grad_norm', 'param_norm')
# Per-step flags: every array of that part of the new state is finite. With
# param_norm they cover everything a checkpoint holds: BatchNorm's running
# variance can overflow while the loss (which uses the batch's statistics)
# and the gradients stay finite.
_FINITE_FLAGS = {'batch_stats_finite': 'batch_stats',
                 'opt_state_finite': 'opt_state'}


class TrainState(train_state.TrainState):
  """Flax TrainState plus the BatchNorm running statistics."""
  batch_stats: Any


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict,
                       model: Any, tx: optax.GradientTransformation
                       ) -> TrainState:
  """Initialises the model and optimiser state.

  Pure in `rng`, so it can be traced by `jax.eval_shape` (shapes only) and
  compiled by `jax.jit` with the state's shardings as out_shardings.

  Args:
    rng: PRNG key for parameter initialisation.
    config: reads data.crop_size (the shape of the dummy input).
    model: the linen module from `models.create_model`.
    tx: the optimiser.

  Returns:
    A TrainState at step 0.
  """
  crop = config.data.crop_size
  images = jnp.zeros((1, crop, crop, 3), jnp.float32)  # [1, H, W, 3]
  variables = model.init(rng, images, train=False)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           tx=tx, batch_stats=variables['batch_stats'])


def train_step(state: TrainState, batch: dict[str, jax.Array],
               ignore_label: int = records.IGNORE_LABEL
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on a global batch.

  There is no rng argument: PAN has no dropout or other random layers.

  Args:
    state: the train state (replicated).
    batch: {'image': float32 [B, H, W, 3], 'label': int32 [B, H, W]}, sharded
      over the batch axis.
    ignore_label: label value that does not count in the loss.

  Returns:
    (new state, {'loss', 'grad_norm', 'param_norm'} float32 scalars and
    {'batch_stats_finite', 'opt_state_finite'} bool scalars).
  """
  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    logits, updates = state.apply_fn(
        variables, batch['image'], train=True,
        mutable=['batch_stats'])  # [B, H, W, K]
    loss = losses.cross_entropy(logits, batch['label'], ignore_label)
    return loss, updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  new_state = state.apply_gradients(grads=grads,
                                    batch_stats=updates['batch_stats'])
  metrics = {
      'loss': loss,
      'grad_norm': optax.tree.norm(grads),
      # Checked before every save, so a checkpoint never holds inf/NaN even
      # when the last update overflowed the parameters.
      'param_norm': optax.tree.norm(new_state.params),
      'batch_stats_finite': _all_finite(new_state.batch_stats),
      'opt_state_finite': _all_finite(new_state.opt_state),
  }
  return new_state, metrics


def _all_finite(tree: Any) -> jax.Array:
  """bool []: whether every floating-point value in `tree` is finite."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def is_time(step: int, every: int, total: int) -> bool:
  """True every `every` steps and at the last step (every <= 0: last only)."""
  return step == total or (every > 0 and step % every == 0)


def check_config(config: ml_collections.ConfigDict,
                 mesh: jax.sharding.Mesh) -> None:
  """The guards that can fail before anything is compiled.

  Args:
    config: the run's configuration.
    mesh: the training mesh.

  Raises:
    ConfigError: naming the field, its value and what was expected.
  """
  sharding.check_batch_size(config.global_batch_size, mesh)
  min_side = models.min_input_size(config)
  if config.data.crop_size < min_side:
    raise errors.ConfigError(
        f'config.data.crop_size={config.data.crop_size} is too small for '
        f'this model (backbone {config.model.backbone}, output stride '
        f'{config.model.output_stride}): every side must be at least '
        f'{min_side} pixels so the coarsest feature map and the FPA pyramid '
        f'keep at least one pixel. Use --config.data.crop_size={min_side} or '
        'more.')
  for field in ('total_steps', 'log_every_steps'):
    if config[field] <= 0:
      raise errors.ConfigError(f'config.{field} must be positive, got '
                       f'{config[field]}.')
  if config.model.init_from:
    # Fails now, not after compiling, on a missing directory or weights that
    # need another config.model.
    pretrained.check_config(pretrained.read_info(config.model.init_from),
                            config.model, config.model.init_from)
  pipeline.check_eval_canvas(config, config.data.eval_split)
  if config.eval_every_steps < 0:
    raise errors.ConfigError(
        'config.eval_every_steps must be >= 0 (0 = only at the end), got '
        f'{config.eval_every_steps}.')
  profile_steps(config)


def profile_steps(config: ml_collections.ConfigDict
                  ) -> Optional[tuple[int, int]]:
  """config.profile_steps as (first, last), or None when not profiling.

  Raises:
    ConfigError: not () or two steps 1 <= first <= last.
  """
  value = tuple(config.get('profile_steps', ()) or ())
  if not value:
    return None
  if (len(value) != 2 or not all(isinstance(v, int) for v in value) or
      not 1 <= value[0] <= value[1]):
    raise errors.ConfigError(
        f'config.profile_steps={value!r} must be () (no profile) or (first, '
        'last), two steps with 1 <= first <= last, e.g. '
        '--config.profile_steps="(10, 15)".')
  return value


def check_init_from(config: ml_collections.ConfigDict) -> None:
  """Refuses a recipe that needs pretrained weights but was given none.

  The paper's recipes (configs/voc.py, cityscapes.py, ablation.py) set
  config.model.require_init_from: they start from ImageNet weights, and a
  30k-step run from random weights cannot reach the paper's numbers, so it
  is stopped before anything is compiled rather than after hours.

  Args:
    config: the run's configuration.

  Raises:
    errors.ConfigError: require_init_from is set and init_from is empty.
  """
  if config.model.require_init_from and not config.model.init_from:
    raise errors.ConfigError(
        'this recipe starts from pretrained weights '
        '(config.model.require_init_from=True) but config.model.init_from '
        'is empty. Give --config.model.init_from=DIR: ImageNet ResNet '
        'weights converted with `python -m pan_jax.convert` (README '
        '"Pretrained weights"), or, for configs/voc.py:finetune, the '
        'train_aug run\'s workdir. To train from random initialisation '
        'anyway, give --config.model.require_init_from=False.')


def validate(model: Any, state: TrainState, config: ml_collections.ConfigDict,
             meta: Any, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Scores the current state on config.data.eval_split (whole images).

  Returns:
    evaluate.evaluate_split's result (miou, pixel_accuracy, mean_accuracy,
    per_class_iou, confusion_matrix, num_images, ...) and 'samples': its
    first config.eval.num_overlays examples with their predictions
    (process 0), for TensorBoard.
  """
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  result, samples = evaluate.evaluate_split(
      model, variables, config, meta, mesh,
      num_samples=config.eval.num_overlays)
  return {**result, 'samples': samples}


class _MetricWriter:
  """metrics.jsonl, TensorBoard events and the console line (process 0).

  On a gs:// workdir both files are written in a local directory and copied
  to the workdir by `sync` (after every checkpoint and validation, and at
  the end): a GCS object cannot be appended to, and tensorboardX's own gs://
  writer uploads its whole file again at every flush.
  """

  def __init__(self, workdir: str, start_step: int):
    self._enabled = jax.process_index() == 0
    self._workdir = workdir
    self._tensorboard = None
    self._local = None  # The local directory of a gs:// workdir.
    if not self._enabled:
      return
    # Imported here: only process 0 writes events, and importing pan_jax.train
    # (evaluate, export, tests) need not load it.
    import tensorboardX  # pylint: disable=g-import-not-at-top
    if paths.is_url(workdir):
      self._local = tempfile.mkdtemp(prefix='pan_jax_metrics_')
    directory = self._local or workdir
    self._path = os.path.join(directory, METRICS_FILE)
    saved = os.path.join(workdir, METRICS_FILE)
    # A resumed run repeats the steps after its checkpoint: drop their lines.
    lines = []
    if paths.exists(saved):
      lines = [l + '\n' for l in paths.read_text(saved).splitlines()
               if l.strip() and json.loads(l).get('step', 0) <= start_step]
    paths.write_bytes(self._path, ''.join(lines).encode())
    self._tensorboard = tensorboardX.SummaryWriter(
        os.path.join(directory, TENSORBOARD_DIR), purge_step=start_step + 1)

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self._enabled:
      return
    record = {'step': step, **{k: _to_json(v) for k, v in values.items()}}
    try:
      with open(self._path, 'a') as f:  # A local file (see the docstring).
        f.write(json.dumps(record) + '\n')
    except OSError as e:
      raise errors.StorageError(
          f'cannot write {self._path}: {e.strerror or e}') from e
    for key, value in values.items():
      tag = key if key.startswith('val/') else f'train/{key}'
      if isinstance(value, dict):  # Per class: one scalar per class name.
        for name, number in value.items():
          if isinstance(number, (int, float)) and math.isfinite(number):
            self._tensorboard.add_scalar(f'{tag}/{name}', number, step)
      elif isinstance(value, (int, float)) and not isinstance(value, bool):
        self._tensorboard.add_scalar(tag, value, step)
    self._tensorboard.flush()

  def images(self, step: int, images: dict[str, np.ndarray]) -> None:
    """Adds uint8 RGB [H, W, 3] images by tag."""
    if not self._enabled:
      return
    for tag, image in images.items():
      self._tensorboard.add_image(tag, image, step, dataformats='HWC')
    self._tensorboard.flush()

  def copy_tree(self, local: str, name: str) -> None:
    """Copies a local directory to WORKDIR/name (a gs:// workdir)."""
    for root, _, files in os.walk(local):
      for file_name in files:
        path = os.path.join(root, file_name)
        _copy_file(path, os.path.join(self._workdir, name,
                                      os.path.relpath(path, local)))

  def sync(self) -> None:
    """Copies the local files of a gs:// workdir to it (each atomically)."""
    if self._local is None:
      return
    for name in os.listdir(self._local):
      local = os.path.join(self._local, name)
      if os.path.isdir(local):
        for child in os.listdir(local):
          _copy_file(os.path.join(local, child),
                     os.path.join(self._workdir, name, child))
      else:
        _copy_file(local, os.path.join(self._workdir, name))

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
      self.sync()
    if self._local is not None:
      shutil.rmtree(self._local, ignore_errors=True)


def _copy_file(local: str, destination: str) -> None:
  with open(local, 'rb') as f:
    paths.write_bytes(destination, f.read())


def _to_json(value: Any) -> Any:
  """NumPy values as JSON values; NaN/inf (e.g. IoU of an absent class) as
  null, so that every line is strict JSON."""
  if isinstance(value, np.ndarray):
    return _to_json(value.tolist())
  if isinstance(value, (np.floating, np.integer)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_json(v) for v in value]
  return value


def _check_finite(pending: list[tuple[int, dict[str, Any]]],
                  last_good: Optional[int], workdir: str,
                  state: Any = None) -> None:
  """Raises DivergedError naming the first step with a bad value.

  Args:
    pending: (step, fetched metrics) of the steps not yet checked.
    last_good: the step of the last checkpoint written (None: none yet).
    workdir: the run's workdir (named in the message).
    state: the current train state, to name the arrays that are no longer
      finite.
  """
  for step, metrics in pending:
    bad = {k: float(metrics[k]) for k in _FINITE_METRICS
           if not np.isfinite(metrics[k])}
    bad.update({part: 'inf/NaN' for flag, part in _FINITE_FLAGS.items()
                if not bool(metrics[flag])})
    if bad:
      where = (f'step {last_good} in '
               f'{os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)}'
               if last_good is not None else 'none (no checkpoint yet)')
      arrays = _non_finite_arrays(state) if state is not None else []
      now = (f' Non-finite now: {", ".join(arrays[:3])}'
             f'{f" and {len(arrays) - 3} more" if len(arrays) > 3 else ""}.'
             if arrays else '')
      raise errors.DivergedError(
          f'Non-finite training values at step {step}: {bad}.{now} The run '
          f'stopped without saving this state; the last good checkpoint '
          f'is {where}. Rerunning resumes from it: lower '
          '--config.optim.learning_rate (or add --config.optim.warmup_steps) '
          'first, or the divergence will repeat.')


def _non_finite_arrays(state: TrainState) -> list[str]:
  """'batch_stats/backbone/stem_bn1/var', ... : arrays holding inf or NaN."""
  found = []
  for part in ('params', 'batch_stats', 'opt_state'):
    leaves = jax.tree_util.tree_flatten_with_path(getattr(state, part))[0]
    for path, value in leaves:
      value = np.asarray(jax.device_get(value))
      if np.issubdtype(value.dtype, np.inexact) and not np.all(
          np.isfinite(value)):
        name = jax.tree_util.keystr(path, simple=True, separator='/')
        found.append(f'{part}/{name}')
  return found


def _summarise_eval(result: dict[str, Any], meta: Any) -> dict[str, Any]:
  names = list(getattr(meta, 'class_names', []) or [])
  per_class = np.asarray(result.get('per_class_iou', []), np.float64)
  summary = {f'val/{k}': float(result[k])
             for k in ('miou', 'pixel_accuracy', 'mean_accuracy')
             if k in result}
  if len(names) == len(per_class):
    summary['val/per_class_iou'] = dict(zip(names, per_class.tolist()))
  return summary


def _load_pretrained(state: TrainState, config: ml_collections.ConfigDict,
                     mesh: jax.sharding.Mesh) -> TrainState:
  """Replaces initialised variables with config.model.init_from's.

  The optimiser state does not depend on the parameter values at step 0
  (zero momentum / moments), so only params and batch_stats change.
  """
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  variables, message = pretrained.load_pretrained(
      variables, config.model.init_from, config)
  logging.info('%s', message)
  variables = jax.device_put(variables, sharding.replicated(mesh))
  return state.replace(params=variables['params'],
                       batch_stats=variables['batch_stats'])


# (config JSON, mesh, num_classes, ignore_label) -> _programs' result.
_PROGRAM_CACHE: dict[tuple[Any, ...], tuple[Any, Any, Any]] = {}


def _programs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
              num_classes: int, ignore_label: int) -> tuple[Any, Any, Any]:
  """The model, the jitted init (rng -> state) and the jitted train step.

  Kept for the process, so that running the same config again (a resumed run
  in a notebook, tests) reuses the traced and compiled programs instead of
  tracing the network again.
  """
  key = (config.to_json(), mesh, num_classes, ignore_label)
  if key not in _PROGRAM_CACHE:
    model = models.create_model(config, num_classes=num_classes)
    tx = optim.create_optimizer(config)
    replicated = sharding.replicated(mesh)
    init_fn = jax.jit(functools.partial(create_train_state, config=config,
                                        model=model, tx=tx),
                      out_shardings=replicated)
    step_fn = jax.jit(
        functools.partial(train_step, ignore_label=ignore_label),
        in_shardings=(replicated, sharding.batch_sharding(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnames=('state',))
    if len(_PROGRAM_CACHE) >= 4:
      _PROGRAM_CACHE.pop(next(iter(_PROGRAM_CACHE)))  # The oldest.
    _PROGRAM_CACHE[key] = (model, init_fn, step_fn)
  return _PROGRAM_CACHE[key]


def compile_train_step(step_fn: Any, state: TrainState,
                       batch: dict[str, jax.Array],
                       init_fn: Optional[Any] = None) -> Any:
  """`step_fn` compiled before the first step, the compiler's memory freed.

  The init program, run once, is dropped from its jit cache first; then
  runtime.compile_then_release. Measured (R101 smp architecture, b2 x
  512^2, fp32, CPU, `python -m pan_jax.bench train`): peak RSS 3,514 ->
  2,778 MiB, ~120 MiB of it the init program.

  Args:
    step_fn: the jitted train step (`_programs`).
    state: the state it is called with (donated at the call, not here).
    batch: a batch of the shapes and shardings of every step.
    init_fn: the jitted init whose executable to drop (None: none).

  Returns:
    The compiled step: called as step_fn (state, batch) -> (state, metrics).
  """
  if init_fn is not None:
    init_fn.clear_cache()
  return runtime.compile_then_release(step_fn, state, batch)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       *, mesh: Optional[jax.sharding.Mesh] = None
                       ) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir` to config.total_steps.

  Args:
    config: the run's configuration (configs/*.py).
    workdir: where checkpoints, config.json, dataset.json, metrics.jsonl and
      TensorBoard events go. If it holds checkpoints, training resumes from
      the latest one.
    mesh: the 'data' mesh; default all devices of all processes (tests pass
      a sub-mesh to compare device counts).

  Returns:
    {'step': steps done, 'stopped_by': signal name or None, 'last_metrics':
    the last logged values, 'eval': the last validation result or None}.

  Raises:
    ConfigError: a config guard failed.
    MismatchError: the workdir holds checkpoints of an incompatible config
      or of other classes.
    StorageError: the workdir cannot be written, or a checkpoint could not
      be saved (the run stops at the next step).
    DivergedError: the loss, gradient or a saved array became non-finite.
  """
  # Random bits must not depend on how arrays are sharded, so initialisation
  # is the same on 1 device or 256.
  jax.config.update('jax_threefry_partitionable', True)
  mesh = mesh if mesh is not None else sharding.make_mesh()
  check_init_from(config)  # Before the dataset: the first thing to fix.
  meta = sources.get_meta(config.data)
  check_config(config, mesh)
  workdir_lib.make_workdir(workdir)
  workdir_lib.check_compatible(workdir, config, meta)

  model, init_fn, step_fn = _programs(config, mesh, meta.num_classes,
                                      meta.ignore_label)
  rng = jax.random.key(config.seed)
  # Tracing gives the state's shapes, dtypes and shardings (the restore
  # target) without computing anything; it is compiled only for a fresh start.
  abstract_state = init_fn.trace(rng).out_info

  # From here on a signal means "checkpoint as soon as possible and stop".
  stop = workdir_lib.StopRequest()
  manager = data_iter = writer = profiler = None
  finished = False
  try:
    manager = workdir_lib.create_manager(workdir, config)
    data_iter = pipeline.build_train_iter(
        config, process_index=jax.process_index(),
        process_count=jax.process_count())
    start_step = manager.latest_step()
    if start_step is None:
      logging.info('No checkpoint in %s: starting from scratch.', workdir)
      state = init_fn(rng)
      if config.model.init_from:
        state = _load_pretrained(state, config, mesh)
      start_step = 0
    else:
      logging.info('Resuming from the checkpoint of step %d in %s.',
                   start_step, workdir)
      state = workdir_lib.restore_state(manager, start_step, abstract_state)
      workdir_lib.restore_data_iter(manager, start_step, data_iter)
    workdir_lib.save_run_info(workdir, config, meta)
    writer = _MetricWriter(workdir, start_step)
    profiler = _Profiler(config, workdir, writer)
    result = _train_loop(config, workdir, mesh, model, meta,
                         (step_fn, init_fn), state, start_step, data_iter,
                         manager, writer, stop, profiler)
    finished = True
    return result
  finally:
    stop.close()
    if manager is not None:
      # After another error, a failed save is logged, not raised over it.
      workdir_lib.close_manager(manager, raise_errors=finished)
    if profiler is not None:
      profiler.stop()  # Training ended (or failed) inside the traced steps.
    if writer is not None:
      writer.close()
    close = getattr(data_iter, 'close', None)
    if close is not None:
      close()


def _sample_images(samples: list[dict[str, Any]],
                   meta: Any) -> dict[str, np.ndarray]:
  """TensorBoard images of validation samples: val/overlay/<index>."""
  return {f'val/overlay/{s["index"]}': visualize.comparison(
      evaluate.to_uint8(s['image']), s['label'], s['prediction'],
      meta.class_names, meta.palette, meta.ignore_label,
      title=f'val #{s["index"]}') for s in samples}


class _Profiler:
  """Traces config.profile_steps with jax.profiler into WORKDIR/profile.

  Process 0 only (one trace is what a user opens; every host runs the same
  program). A gs:// workdir gets the trace copied after it is written
  locally (the profiler writes local files).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               writer: _MetricWriter):
    steps = profile_steps(config)
    self._first, self._last = steps or (0, -1)
    if jax.process_index() != 0:
      self._first, self._last = 0, -1
    self._workdir, self._writer = workdir, writer
    self._local = None
    self._active = False

  def before(self, step: int) -> None:
    """Called before step `step` (1-based) runs."""
    if step != self._first:
      return
    if paths.is_url(self._workdir):
      self._local = tempfile.mkdtemp(prefix='pan_jax_profile_')
      directory = self._local
    else:
      directory = os.path.join(self._workdir, PROFILE_DIR)
      paths.makedirs(directory)
    logging.info('Profiling steps %d to %d into %s.', self._first,
                 self._last, os.path.join(self._workdir, PROFILE_DIR))
    jax.profiler.start_trace(directory)
    self._active = True

  def after(self, step: int, state: Any) -> None:
    """Called after step `step` was dispatched."""
    if self._active and step >= self._last:
      jax.block_until_ready(state)  # The trace holds the steps' device time.
      self.stop()

  def stop(self) -> None:
    """Ends the trace (also when training stops before the last step)."""
    if not self._active:
      return
    self._active = False
    jax.profiler.stop_trace()
    if self._local is not None:
      self._writer.copy_tree(self._local, PROFILE_DIR)
      shutil.rmtree(self._local, ignore_errors=True)
      self._local = None


def _train_loop(config, workdir, mesh, model, meta, programs, state,
                start_step, data_iter, manager, writer, stop, profiler):
  """Steps from `start_step` to config.total_steps (or a stop request).

  Order after each step: check that the last save has not failed, log (and
  check values are finite), stop check, checkpoint, validate (once this
  step's checkpoint is written). Arguments are train_and_evaluate's locals;
  `programs` is (jitted step, jitted init): the step is compiled with the
  first batch (compile_train_step); `profiler` (a _Profiler) is told before
  and after each step.
  """
  step_fn, init_fn = programs
  compiled_step = None
  total = config.total_steps
  if start_step >= total:
    logging.info('%s is already trained to step %d (config.total_steps=%d): '
                 'nothing to do.', workdir, start_step, total)
  pending = []  # (step, metrics on device) not yet checked or logged.
  last_good = start_step if start_step > 0 else None
  last_metrics, eval_result, stopped_by = {}, None, None
  step = start_step
  timer_step, timer_start, run_start = step, None, time.time()
  in_flight = collections.deque()  # Metrics of the unfinished steps.
  saving = None  # The step of a save started and not known to be complete.
  while step < total:
    profiler.before(step + 1)
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      batch = next(data_iter)
      batch = sharding.to_global(
          {'image': batch['image'], 'label': batch['label']}, mesh)
      if compiled_step is None:
        compiled_step = compile_train_step(step_fn, state, batch, init_fn)
      state, metrics = compiled_step(state, batch)
    step += 1
    profiler.after(step, state)
    pending.append((step, metrics))
    # At most MAX_STEPS_IN_FLIGHT steps dispatched and not finished (with 2:
    # step n - 1 must finish before step n + 1 is prepared). The device
    # stays busy (step n waits behind n - 1), and a stop request is acted
    # on, and its checkpoint written, within about two step times.
    # Unbounded, the loop ran ~30 steps ahead of the device, each holding
    # its batch, and a SIGTERM waited for all of them (75 s, more than a
    # spot VM's notice).
    in_flight.append(metrics)
    if len(in_flight) >= MAX_STEPS_IN_FLIGHT:
      jax.block_until_ready(in_flight.popleft())
    # A save that failed in the background stops the run before this step
    # is logged (the step gave the save time to finish or fail).
    if workdir_lib.check_saved(manager, saving, block=False):
      saving = None
    if timer_start is None:
      # Throughput excludes compilation: time from the first finished step.
      jax.block_until_ready(metrics)
      timer_step, timer_start = step, time.time()

    if is_time(step, config.log_every_steps, total):
      fetched = jax.device_get(pending)
      _check_finite(fetched, last_good, workdir, state)
      pending = []
      last_metrics = {
          'loss': float(np.mean([m['loss'] for _, m in fetched])),
          'grad_norm': float(fetched[-1][1]['grad_norm']),
          'param_norm': float(fetched[-1][1]['param_norm']),
          # The rate used by this step's update (the step-th update).
          'learning_rate': float(optim.learning_rate(config, step - 1)),
      }
      progress = f'step {step}/{total} | loss {last_metrics["loss"]:.4f}'
      progress += f' | lr {last_metrics["learning_rate"]:.3g}'
      progress += f' | grad {last_metrics["grad_norm"]:.3g}'
      if step > timer_step:  # Not on the first step: compile time.
        rate = (step - timer_step) / (time.time() - timer_start)
        last_metrics['steps_per_sec'] = rate
        last_metrics['images_per_sec'] = rate * config.global_batch_size
        progress += (f' | {last_metrics["images_per_sec"]:.1f} img/s'
                     f' | ETA {progress_lib.format_duration((total - step) / rate)}')
      writer.write(step, last_metrics)
      logging.info('%s', progress)
      timer_step, timer_start = step, time.time()

    stopping = stop.should_stop(step, manager)
    # Save before validating: a failing validation must not lose training.
    if stopping or step == total or manager.should_save(step):
      save_start = time.time()
      _check_finite(jax.device_get(pending), last_good, workdir, state)
      workdir_lib.check_saved(manager, saving)  # Orbax waits for it anyway.
      workdir_lib.save(manager, step, state, data_iter, force=True)
      writer.sync()
      last_good = saving = step
      timer_start += time.time() - save_start
    if not stopping and is_time(step, config.eval_every_steps, total):
      eval_start = time.time()
      # A save of this step finishes first: if it fails, the run stops now,
      # not after a validation (the save takes seconds, validation minutes).
      workdir_lib.check_saved(manager, saving, block=saving == step)
      eval_result = validate(model, state, config, meta, mesh)
      samples = eval_result.pop('samples', [])
      summary = _summarise_eval(eval_result, meta)
      writer.write(step, summary)
      writer.images(step, _sample_images(samples, meta))
      writer.sync()
      per_class = ', '.join(f'{name} {iou:.3f}' for name, iou in
                            summary.get('val/per_class_iou', {}).items())
      logging.info('step %d validation: mIoU %.4f (%.1fs) | %s', step,
                   summary.get('val/miou', math.nan),
                   time.time() - eval_start, per_class)
      timer_start += time.time() - eval_start  # Not training time.

    if stopping:
      workdir_lib.check_saved(manager, saving)  # Saved before saying so.
      stopped_by = stop.signal_name
      logging.warning('Stopped by %s after step %d; checkpoint saved.',
                      stopped_by, step)
      break
  workdir_lib.check_saved(manager, saving)
  logging.info('Trained steps %d to %d in %s.', start_step, step,
               progress_lib.format_duration(time.time() - run_start))
  return {'step': step, 'stopped_by': stopped_by,
          'last_metrics': last_metrics, 'eval': eval_result}
