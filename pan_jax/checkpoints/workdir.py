"""The training workdir: Orbax checkpoints of state + data iterator, stops.

Layout of a training workdir (`--workdir=RUN`):

  RUN/checkpoints/<step>/state      train state (params, batch_stats,
                                     opt_state, step): Orbax PyTree (not
                                     StandardSave: PyTree restores can be
                                     partial, see restore_variables)
  RUN/checkpoints/<step>/data_iter  grain iterator position, one JSON file
                                     per process
  RUN/config.json                   the run's ConfigDict (config.to_json())
  RUN/dataset.json                  the dataset's metadata (classes, palette)
  (files.py writes and reads these two)

One `ocp.CheckpointManager` saves asynchronously every
`config.checkpoint_every_steps`, at the last step and when the run is
stopped (SIGTERM/SIGINT, or Orbax's multi-host preemption sync point), and
keeps the newest `config.max_checkpoints_to_keep`.

The state restores onto any device count because it is restored against a
`jax.eval_shape` target that carries the new shardings. The data iterator's
state is per process and grain refuses it under another process count or
worker count: then the iterator starts afresh and the user is told.
"""

import json
import os
import re
import signal
import tempfile
from typing import Any, Optional

from absl import logging
import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from pan_jax import errors
from pan_jax import paths
from pan_jax.checkpoints import files
from pan_jax.data import sources

CHECKPOINT_DIR = 'checkpoints'

# Config fields that must equal the saved config's to resume a workdir: they
# change the network's parameters or the data it learns from. Everything else
# (cadences, total_steps, data_dir, workers, eval.*, optim.*) may change
# between runs; differences are logged.
RESUME_INVARIANT_FIELDS = (
    'model', 'data.name', 'data.train_split', 'data.crop_size',
    'data.min_scale', 'data.max_scale')
# Inside 'model', fields that only matter for a fresh start.
_IGNORED_ON_RESUME = ('model.init_from', 'model.require_init_from')


def create_manager(workdir: str, config: ml_collections.ConfigDict
                   ) -> ocp.CheckpointManager:
  """The run's CheckpointManager in WORKDIR/checkpoints.

  Args:
    workdir: the training workdir (local path or gs://...).
    config: reads checkpoint_every_steps and max_checkpoints_to_keep.

  Returns:
    An asynchronous ocp.CheckpointManager with items 'state' and 'data_iter'.
  """
  every = config.checkpoint_every_steps
  if every <= 0:
    raise errors.ConfigError(
        f'config.checkpoint_every_steps must be positive, got {every}.')
  if config.max_checkpoints_to_keep <= 0:
    raise errors.ConfigError(
        'config.max_checkpoints_to_keep must be positive, got '
        f'{config.max_checkpoints_to_keep}.')
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=policies.AnySavePolicy([
          policies.FixedIntervalPolicy(every),
          policies.PreemptionCheckpointingPolicy()]),
      preservation_policy=policies.LatestN(config.max_checkpoints_to_keep),
      enable_async_checkpointing=True,
      create=True)
  return ocp.CheckpointManager(
      os.path.join(paths.absolute(workdir), CHECKPOINT_DIR),
      item_names=('state', 'data_iter'),
      item_handlers={'state': _state_handler(),
                     'data_iter': grain.checkpoint.CheckpointHandler()},
      options=options)


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """The PyTree handler of the 'state' item.

  Orbax saves replicated arrays "replica-parallel" by default on CPU and TPU:
  each replica writes a slice, which compiles one slicing program per array
  shape (~20 s for PAN's ~300 arrays over 8 CPU devices, on every first
  save). It is meant for many-host TPU pods; on CPU it is pure overhead, so
  there each array is written from one replica (Orbax already does so on GPU).
  """
  if jax.default_backend() != 'cpu':
    return ocp.PyTreeCheckpointHandler()
  handlers = [(ty, ocp.type_handlers.get_type_handler(ty))
              for ty in ocp.type_handlers.supported_types()
              if ty is not jax.Array]
  handlers.insert(0, (jax.Array, ocp.type_handlers.ArrayHandler(
      use_replica_parallel=False)))
  registry = ocp.type_handlers.create_type_handler_registry(*handlers)
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         data_iter: Any, force: bool = False) -> bool:
  """Starts an asynchronous save of `state` and `data_iter` at `step`.

  The device-to-host copy happens before this returns, so the caller may
  donate `state` to the next train step right away.

  Args:
    manager: from `create_manager`.
    step: the number of train steps `state` has taken.
    state: the TrainState (global jax.Arrays).
    data_iter: the grain iterator, positioned after the last batch used.
    force: save even if the manager's policy says no (end of run, stop).

  Returns:
    Whether a save was started.
  """
  try:
    return manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            data_iter=grain.checkpoint.CheckpointSave(data_iter)),
        force=force)
  except Exception as e:  # pylint: disable=broad-except
    raise _save_failed(manager, step, e) from e


def check_saved(manager: ocp.CheckpointManager, step: Optional[int],
                block: bool = True) -> bool:
  """Raises StorageError if the asynchronous save of `step` failed.

  Orbax writes in background threads and raises a failure only when it is
  next waited for; the training loop calls this every step (block=False) so
  that a run whose checkpoint could not be written stops right away instead
  of training on, and at the end (block=True). With several processes the
  non-blocking check does nothing: every process must stop at the same step,
  and they all wait at the next save.

  Args:
    manager: from `create_manager`.
    step: the step of the last save started (None: none was).
    block: wait for a save in progress; else return while one is.

  Returns:
    True if the save is complete (or step is None), False if it is still
    being written (block=False only).

  Raises:
    StorageError: the save failed for a reason of the file system (full
      disk, no permission, ...); the message names the path, the cause and
      the last complete checkpoint, which the failed save left as it was.
    Exception: any other failure, as Orbax raised it (a bug).
  """
  if step is None:
    return True
  if not block and (jax.process_count() > 1 or
                    manager.is_saving_in_progress()):
    return False
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _save_failed(manager, step, e) from e
  return True


def close_manager(manager: ocp.CheckpointManager,
                  raise_errors: bool = True) -> None:
  """Waits for the save in progress, then closes `manager`.

  Orbax raises a failed save again when closing: it is turned into one
  StorageError as in `check_saved`.

  Args:
    manager: from `create_manager`.
    raise_errors: raise a failure; False when another error is already on
      its way to the user (a failed save is then its cause, or secondary to
      it, and is not reported twice; anything else is logged).
  """
  failure = None
  for finish in (manager.wait_until_finished, manager.close):
    try:
      finish()
    except Exception as e:  # pylint: disable=broad-except
      failure = failure or (e, _save_failed(manager, None, e))
  if failure is None:
    return
  cause, error = failure
  if raise_errors:
    raise error from cause
  if not isinstance(error, errors.StorageError):
    logging.warning('Closing the checkpoints also failed: %r', cause)


# "... [os_error_code='28']" in the errors tensorstore raises for local files.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_FAILED_PATH = re.compile(r'(?:Failed writing|Error writing local file|'
                          r'Error opening|local file) "([^"]+)"')


def _save_failed(manager: ocp.CheckpointManager, step: Optional[int],
                 error: Exception) -> Exception:
  """The error to raise for a failed save: StorageError, or `error` itself.

  A file-system failure (an OSError, or a tensorstore error carrying an OS
  error code) becomes one StorageError naming the path and the cause; any
  other exception is returned unchanged, to keep its traceback.
  """
  text = str(error)
  code = _OS_ERROR_CODE.search(text)
  if isinstance(error, OSError) and error.errno:
    cause = f'{error.strerror or os.strerror(error.errno)}'
    where = error.filename or ''
  elif code:
    cause = os.strerror(int(code.group(1)))
    found = _FAILED_PATH.search(text)
    where = found.group(1) if found else ''
  else:
    return error
  directory = str(manager.directory)
  complete = [s for s in manager.all_steps() if s != step]
  last = (f'the last complete checkpoint, step {max(complete)}, is as it was'
          if complete else 'there is no complete checkpoint yet')
  writing = f' (writing {where})' if where else ''
  which = f'the checkpoint of step {step}' if step is not None else (
      'a checkpoint')
  return errors.StorageError(
      f'saving {which} in {directory} failed: {cause}{writing}. The run '
      f'stopped; {last}. Free space or fix the directory, then rerun the '
      'same command to resume.')


def restore_state(manager: ocp.CheckpointManager, step: int,
                  abstract_state: Any) -> Any:
  """Restores the train state saved at `step` onto `abstract_state`.

  Args:
    manager: from `create_manager`.
    step: a saved step.
    abstract_state: `jax.eval_shape` of the state, each leaf a
      jax.ShapeDtypeStruct carrying the sharding to restore onto. This is
      what lets a checkpoint written on N devices restore on M.

  Returns:
    The restored state, with the structure of `abstract_state`.
  """
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
  restored = manager.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=abstract_state, restore_args=restore_args)))
  return restored['state']


def restore_data_iter(manager: ocp.CheckpointManager, step: int,
                      data_iter: Any) -> bool:
  """Moves `data_iter` to its position saved at `step`, if grain can.

  Args:
    manager: from `create_manager`.
    step: a saved step.
    data_iter: a freshly built grain iterator of the same pipeline.

  Returns:
    True if restored; False if the saved state does not fit this run (other
    process count or worker count). Then `data_iter` is left at its start
    and a warning says so: the run continues with a reshuffled data order.
  """
  try:
    manager.restore(
        step,
        args=ocp.args.Composite(
            data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
    return True
  except (ValueError, KeyError, FileNotFoundError) as e:
    logging.warning(
        'The data iterator state saved at step %d does not fit this run '
        '(saved with another process count or data.num_workers?): %s. '
        'The model state is restored, but the data pipeline starts again '
        'from the beginning of its order, so this run does not see exactly '
        'the batches an uninterrupted run would have seen. Resume with the '
        'original process count and data.num_workers to avoid that.', step,
        str(e).rstrip('.'))
    return False


def restore_variables(workdir: str, step: Optional[int] = None
                      ) -> tuple[dict[str, Any], int]:
  """Reads only the model variables of a training workdir, as NumPy.

  Works on any device and process count (every process reads the whole
  arrays), and needs neither the model nor the optimiser.

  Args:
    workdir: a training workdir (the directory holding checkpoints/).
    step: the step to read; None means the latest.

  Returns:
    ({'params': ..., 'batch_stats': ...} as trees of np.ndarray, step).

  Raises:
    FileNotFoundError: no checkpoint (at `step`) in the workdir.
  """
  directory = os.path.join(paths.absolute(workdir), CHECKPOINT_DIR)
  manager = ocp.CheckpointManager(
      directory, item_names=('state', 'data_iter'),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                     'data_iter': grain.checkpoint.CheckpointHandler()},
      options=ocp.CheckpointManagerOptions(create=False))
  try:
    steps = manager.all_steps()
    if not steps:
      raise errors.MissingError(f'No checkpoint in {directory}.')
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise errors.MissingError(
          f'No checkpoint for step {step} in {directory}; saved steps: '
          f'{sorted(steps)}.')
    metadata = manager.item_metadata(step)['state']
    tree = getattr(metadata, 'tree', metadata)
    wanted = {name: tree[name] for name in ('params', 'batch_stats')}
    restore_args = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=wanted, restore_args=restore_args, partial_restore=True)))
  finally:
    manager.close()
  return dict(restored['state']), step


def is_workdir(path: str) -> bool:
  """True if `path` is a training workdir (config.json and checkpoints/)."""
  return (paths.isfile(os.path.join(path, files.CONFIG_FILE)) and
          paths.isdir(os.path.join(path, CHECKPOINT_DIR)))


def make_workdir(workdir: str) -> None:
  """Creates `workdir` if needed and checks that files can be written in it.

  Fails before anything is compiled, naming the directory: a file where the
  directory should be, a parent that cannot be created, no permission, a
  read-only file system, a full disk. (A gs:// workdir is not probed.)

  Args:
    workdir: the training workdir (--workdir).

  Raises:
    StorageError: `workdir` is not a directory that can be written.
  """
  if paths.is_url(workdir):
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.StorageError(
        f'--workdir={workdir} is a file; expected a directory (new or a '
        'training workdir to resume)')
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir) as probe:
      probe.write(b'0')
      probe.flush()
  except OSError as e:
    raise errors.StorageError(
        f'--workdir={workdir} cannot be written: {e.strerror or e}'
        f'{f" ({e.filename})" if e.filename else ""}') from e


def save_run_info(workdir: str, config: ml_collections.ConfigDict,
                  meta: Any) -> None:
  """Writes WORKDIR/config.json and WORKDIR/dataset.json (process 0 only)."""
  if jax.process_index() == 0:
    files.write_config_and_meta(workdir, config, meta)


def check_compatible(workdir: str, config: ml_collections.ConfigDict,
                     meta: Any = None) -> None:
  """Refuses to resume a workdir whose checkpoints came from another model.

  Compares `config` with WORKDIR/config.json on RESUME_INVARIANT_FIELDS and
  logs every other difference; compares the dataset's classes with
  WORKDIR/dataset.json (a classifier for 3 classes cannot resume on 5, and a
  model trained on other class names would silently learn a new meaning).
  Does nothing for a workdir without checkpoints.

  Args:
    workdir: the training workdir.
    config: this run's configuration.
    meta: this run's DatasetMeta (None: classes are not compared).

  Raises:
    MismatchError: checkpoints exist and an invariant field or the classes
      differ.
    ConfigError: config.json (or dataset.json) is missing or unreadable.
  """
  checkpoints = os.path.join(workdir, CHECKPOINT_DIR)
  has_checkpoints = paths.isdir(checkpoints) and any(
      name.isdigit() for name in paths.listdir(checkpoints))
  if not has_checkpoints:
    return
  path = os.path.join(workdir, files.CONFIG_FILE)
  try:
    saved = files.flatten(files.read_json(path))
  except (OSError, ValueError) as e:
    raise errors.ConfigError(
        f'{checkpoints} holds checkpoints but {path} cannot be read ({e}), so '
        'they cannot be checked against this config. Use a new --workdir, or '
        'restore config.json.') from e
  current = files.flatten(json.loads(config.to_json()))
  keys = sorted(set(saved) | set(current))
  differing = [k for k in keys if saved.get(k) != current.get(k)]
  invariant = [
      k for k in differing
      if any(k == f or k.startswith(f + '.') for f in RESUME_INVARIANT_FIELDS)
      and k not in _IGNORED_ON_RESUME]
  if invariant:
    lines = '\n'.join(
        f'  {k}: saved {saved.get(k, "<absent>")!r}, now '
        f'{current.get(k, "<absent>")!r}' for k in invariant)
    raise errors.MismatchError(
        f'{workdir} holds checkpoints of a run with another model or '
        f'training data, so it cannot be resumed with this config:\n{lines}\n'
        'Use a new --workdir (or the saved values) instead.')
  if meta is not None:
    try:
      saved_meta = files.read_meta(workdir)
    except (OSError, ValueError, KeyError) as e:
      raise errors.ConfigError(
          f'{checkpoints} holds checkpoints but '
          f'{os.path.join(workdir, files.DATASET_FILE)} cannot be read ({e}), '
          'so their classes cannot be checked against the dataset. Use a new '
          '--workdir.') from e
    sources.check_classes(saved_meta, meta, f'workdir {workdir}',
                          f'dataset {meta.name} in {config.data.data_dir}')
  for k in differing:
    logging.warning('Resuming %s with %s changed: %r -> %r.', workdir, k,
                    saved.get(k, '<absent>'), current.get(k, '<absent>'))


class StopRequest:
  """Turns SIGTERM/SIGINT into a request to checkpoint and stop cleanly.

  With one process, handlers for SIGTERM and SIGINT set a flag that the loop
  reads after every step. With several, every process must stop after the
  same step, agreed without a blocking round trip per step: SIGTERM is left
  to JAX's preemption notifier, which tells the coordinator; the processes
  agree in the background on a step just ahead of all of them, and Orbax's
  `reached_preemption(step)`, a local check, says when it is reached. A
  SIGINT (Ctrl-C) is passed on as a SIGTERM of this process, so it takes the
  same path. A second SIGINT stops at once, without a checkpoint.
  """

  def __init__(self):
    self.signal_name: Optional[str] = None
    self._previous = {}
    self._several = jax.process_count() > 1
    signals = [signal.SIGINT]
    if not self._several:
      signals.append(signal.SIGTERM)
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.signal_name is not None and signum == signal.SIGINT:
      # A second Ctrl-C means "now": do not wait for the checkpoint.
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name
    logging.warning('%s received: saving a checkpoint after this step, then '
                    'stopping.', self.signal_name)
    if self._several:
      # To JAX's preemption notifier, which agrees the step with the others.
      os.kill(os.getpid(), signal.SIGTERM)

  def should_stop(self, step: int, manager: ocp.CheckpointManager) -> bool:
    """Whether to save and stop after `step` (same answer on all processes).

    Call it after every step on every process: with several processes the
    agreed step is only seen by a process that asks at that step.
    """
    if manager.reached_preemption(step):
      self.signal_name = self.signal_name or 'a SIGTERM (preemption notice)'
      return True
    return not self._several and self.signal_name is not None

  def close(self) -> None:
    """Puts back the handlers that were there before."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
