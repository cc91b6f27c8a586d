"""Start-up of every command: XLA CPU flags, jax.distributed, logging.

Every `python -m pan_jax.<command>` ends in `runtime.run(main)`, which parses
the absl flags and calls `start()` before `main`, so a training, evaluation,
export or benchmark process starts the same way on one CPU, a GPU host or
every host of a TPU pod slice:

* CPU: unless the user set XLA CPU options, XLA_FLAGS gets the options that
  make ResNet training ~4x faster on XLA's CPU backend (measured on this
  project's 2-core machine, side by side with PyTorch): without multi-output
  fusion XLA recomputes residual blocks for the weight gradients, and
  jaxlib 0.10's YNN convolutions are slow for training (YNN stays on for
  reductions). XLA reads XLA_FLAGS when its first backend starts, not when
  jax is imported, so setting it here, before any computation, is in time.
  XLA aborts the process on a flag it does not know, and these are
  experimental: each is set only when this jaxlib knows it (its name occurs
  in jaxlib's shared libraries; `cpu_xla_flags`).
  glibc's huge pages (GLIBC_TUNABLES, read when a process starts) remove the
  page faults of fresh multi-GB buffers every step; they only help when in
  the environment of the command (launch scripts and the bench set
  cpu_env()).
* Multi-host: with PAN_JAX_DISTRIBUTED=1 (set by launch/*.sh),
  `jax.distributed.initialize()` is called first. Cluster environments (TPU
  VMs, SLURM, MPI) configure themselves; elsewhere set
  JAX_COORDINATOR_ADDRESS, PAN_JAX_NUM_PROCESSES and PAN_JAX_PROCESS_ID on
  every process. It is never called otherwise: it fails on a single host
  that is not a TPU. A process that dies (kill -9, a lost host) stops
  beating; after PAN_JAX_HEARTBEAT_TIMEOUT seconds (default 20; jax's own is
  100) the coordinator declares it dead and every other process exits with
  an error naming it, instead of waiting in a collective for ever.
  PAN_JAX_SHUTDOWN_TIMEOUT (default 60) bounds the wait for the others at
  exit, PAN_JAX_INIT_TIMEOUT (default 300) the wait for them at start.
* Logging with several processes: every line carries `[process i/n]`, and
  processes other than 0 log warnings and errors only (metrics, progress
  and reports come from process 0) unless --verbosity is given.
* Random bits do not depend on how arrays are sharded
  (`jax_threefry_partitionable`), so initialisation is the same on 1 device
  or 256.
* Logging: Orbax logs every step of every save and restore at INFO; only its
  warnings are kept. jax logs at INFO that each accelerator plugin it looks
  for is absent ("Unable to initialize backend 'tpu'", on every CPU or GPU
  machine); that line is dropped (its warnings are kept). tfds warns on
  every image decoder it builds that OpenCV is not installed (PIL decodes
  the PNG/JPEG bytes of our records correctly); that warning is dropped too,
  also in the data loader's worker processes (`quiet_library_logs`, which
  pan_jax.data.sources calls when a worker imports it).
"""

import ctypes
import functools
import gc
import glob
import importlib.metadata
import importlib.util
import logging as py_logging
import mmap
import os
import sys
import threading
import traceback
from typing import (Any, Callable, Dict, FrozenSet, Iterable, Mapping, Optional,
                    Sequence)

from absl import app
from absl import flags
from absl import logging
import jax
from jax._src import distributed as jax_distributed
from ml_collections import config_flags
# is_config_flag is public in the module, not re-exported by the package.
from ml_collections.config_flags import config_flags as ml_config_flags

from pan_jax import defaults
from pan_jax import errors
from pan_jax import inference

# The XLA CPU tuning (see the module docstring); `cpu_xla_flags()` is the
# part of it this jaxlib knows. (An unknown *option* inside
# --xla_backend_extra_options is ignored by XLA; an unknown flag aborts.)
CPU_XLA_FLAGS = ('--xla_backend_extra_options=xla_cpu_use_multi_output_fusion'
                 ' --xla_cpu_experimental_ynn_fusion_type=reduce')
# jax plugins whose presence means jax will not run on the CPU.
_ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin',
                        'jax_rocm7_plugin', 'libtpu')


def on_cpu() -> bool:
  """Whether jax will run on the CPU (decided without starting a backend)."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms == 'cpu'
  return not any(importlib.util.find_spec(p) for p in _ACCELERATOR_PLUGINS)


def flag_name(flag: str) -> str:
  """'xla_cpu_x' for '--xla_cpu_x=value'."""
  return flag.split('=', 1)[0].lstrip('-')


def known_xla_flags(names: Iterable[str],
                    library_dir: Optional[str] = None) -> FrozenSet[str]:
  """The flag names among `names` that this jaxlib's XLA knows.

  XLA registers every flag by name in its flag table, so a flag's name occurs
  in the bytes of the shared library that holds XLA; an unknown flag in
  XLA_FLAGS aborts the process ("Unknown flag in XLA_FLAGS") when the first
  backend starts, too late to recover. Searching the memory-mapped libraries
  costs ~20 ms when every name is found early (jaxlib 0.10: one 350 MB
  library, the names within its first 20 MB) and ~0.2 s when one is absent.
  A name found nowhere (or no library found) is unknown: the tuning is then
  left out, which only costs speed.

  Args:
    names: flag names without dashes, e.g. 'xla_cpu_use_thunk_runtime'.
    library_dir: where to look (default: the installed jaxlib's directory).

  Returns:
    The names found.
  """
  wanted = {name.encode() for name in names}
  if library_dir is None:
    spec = importlib.util.find_spec('jaxlib')
    if spec is None or not spec.submodule_search_locations:
      return frozenset()
    library_dir = list(spec.submodule_search_locations)[0]
  libraries = sorted(glob.glob(os.path.join(library_dir, '*.so*')),
                     key=os.path.getsize, reverse=True)  # XLA's is largest.
  found = set()
  for path in libraries:
    try:
      with open(path, 'rb') as f, mmap.mmap(f.fileno(), 0,
                                            access=mmap.ACCESS_READ) as data:
        found.update(name for name in wanted - found
                     if data.find(name) >= 0)
    except (OSError, ValueError):  # Unreadable, or empty (mmap refuses).
      continue
    if found == wanted:
      break
  return frozenset(name.decode() for name in found)


@functools.cache
def cpu_xla_flags() -> str:
  """CPU_XLA_FLAGS without the flags this jaxlib does not know.

  Computed once per process (see `known_xla_flags`); a flag left out is
  logged by `start()`.
  """
  tuning = CPU_XLA_FLAGS.split()
  known = known_xla_flags(flag_name(f) for f in tuning)
  return ' '.join(f for f in tuning if flag_name(f) in known)


def cpu_env() -> Dict[str, str]:
  """The environment of a CPU process started by another (bench, scripts).

  Returns:
    {'XLA_FLAGS': cpu_xla_flags(), 'GLIBC_TUNABLES': huge pages}.
  """
  return {'XLA_FLAGS': cpu_xla_flags(),
          'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}


def release_free_memory() -> None:
  """Gives the C heap's free pages back to the system (glibc's malloc_trim).

  XLA's compiler frees gigabytes of working memory when it is done, and
  glibc keeps those pages for later allocations; the buffers of the
  program it compiled do not reuse them all, so the process's peak held
  both. Called between compiling and running (`compile_then_release`).
  Elsewhere than glibc (macOS, musl), nothing happens.
  """
  gc.collect()  # Arrays (and executables) held only by reference cycles.
  try:
    trim = ctypes.CDLL(None).malloc_trim
  except (OSError, AttributeError):
    return
  trim(0)


def compile_then_release(function: Any, *args: Any) -> Any:
  """`function` (a jax.jit function) compiled for `args`, before it runs.

  Compiled by its first call, the program's buffers come on top of the
  memory the compiler freed, and the process's peak holds both; compiled
  here, that memory is given back first (`release_free_memory`). Measured
  on the CPU: training R101 at b2 x 512^2 peaks ~650 MiB lower, predicting
  one 512^2 image with it ~130 MiB lower (787 -> 651-664 MiB).

  Args:
    function: the jitted function.
    *args: arguments of the shapes, dtypes and shardings of its calls.

  Returns:
    The compiled function, called with such arguments as `function` is.
  """
  release_free_memory()  # What came before (a restore, an init) too.
  compiled = function.lower(*args).compile()
  release_free_memory()
  return compiled


def set_cpu_flags() -> None:
  """Adds cpu_xla_flags() to XLA_FLAGS unless the user chose XLA CPU options.

  Call before jax's first computation (jax may already be imported).
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_cpu_' in flags or 'xla_backend_extra_options' in flags:
    return  # The user chose; respect it.
  os.environ['XLA_FLAGS'] = (flags + ' ' + cpu_xla_flags()).strip()
  missing = sorted(set(CPU_XLA_FLAGS.split()) - set(cpu_xla_flags().split()))
  if missing:
    logging.warning('XLA CPU flag(s) %s not set: jaxlib %s does not know '
                    'them (CPU training may be slower)', ' '.join(missing),
                    _jaxlib_version())


def _jaxlib_version() -> str:
  try:
    return importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return '(unknown version)'


# jax.distributed.initialize's timeouts (seconds): (argument, variable that
# overrides it, default).
DISTRIBUTED_TIMEOUTS = (
    ('heartbeat_timeout_seconds', 'PAN_JAX_HEARTBEAT_TIMEOUT', 20),
    ('shutdown_timeout_seconds', 'PAN_JAX_SHUTDOWN_TIMEOUT', 60),
    ('initialization_timeout', 'PAN_JAX_INIT_TIMEOUT', 300))


def _not_orbax_info(record: py_logging.LogRecord) -> bool:
  if '/orbax/' not in record.pathname:
    return True
  if record.exc_info and not _show_tracebacks():
    # A failed save is logged with its traceback by Orbax's threads, then
    # raised in the main thread, where pan_jax reports it (a full disk as one
    # line, a bug with its traceback): keep Orbax's line, not a second copy.
    record.exc_info = record.exc_text = None
  return record.levelno >= py_logging.WARNING


def _not_opencv_advice(record: py_logging.LogRecord) -> bool:
  return not str(record.msg).startswith('OpenCV is not installed')


def quiet_library_logs() -> None:
  """Drops the libraries' log lines that are noise here (see the module
  docstring); idempotent, also right for a process that never runs `start`
  (a data worker)."""
  logger = logging.get_absl_logger()
  if _not_opencv_advice not in logger.filters:
    logger.addFilter(_not_opencv_advice)


def _not_missing_backend_info(record: py_logging.LogRecord) -> bool:
  return not (record.levelno < py_logging.WARNING and
              str(record.msg).startswith('Unable to initialize backend'))


def start() -> None:
  """Prepares this process for jax; `run` calls it before every command."""
  # Before the first backend starts (jax.process_index() below).
  py_logging.getLogger('jax._src.xla_bridge').addFilter(
      _not_missing_backend_info)
  if on_cpu():
    set_cpu_flags()
  logging.get_absl_logger().addFilter(_not_orbax_info)
  quiet_library_logs()
  if os.environ.get('PAN_JAX_DISTRIBUTED') == '1':
    jax.distributed.initialize(**distributed_arguments(os.environ))
  jax.config.update('jax_threefry_partitionable', True)
  logging.info('process %d/%d, %d local / %d global devices (%s); XLA_FLAGS=%r',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.default_backend(), os.environ.get('XLA_FLAGS', ''))
  if jax.process_count() > 1:
    logging.get_absl_handler().setFormatter(
        _ProcessFormatter(jax.process_index(), jax.process_count()))
    if jax.process_index() != 0 and not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)


def distributed_arguments(environ: Mapping[str, str]) -> Dict[str, int]:
  """jax.distributed.initialize's arguments from the environment.

  Args:
    environ: the environment (os.environ).

  Returns:
    num_processes / process_id where PAN_JAX_NUM_PROCESSES /
    PAN_JAX_PROCESS_ID are set (cluster environments detect them), and the
    timeouts of DISTRIBUTED_TIMEOUTS.

  Raises:
    errors.UsageError: a variable is not a positive integer (the process id
      may be 0).
  """
  arguments = {}
  names = [('num_processes', 'PAN_JAX_NUM_PROCESSES', None),
           ('process_id', 'PAN_JAX_PROCESS_ID', None),
           *DISTRIBUTED_TIMEOUTS]
  for argument, variable, default in names:
    value = environ.get(variable)
    if value is None:
      if default is not None:
        arguments[argument] = default
      continue
    minimum = 0 if argument == 'process_id' else 1
    if not value.isdigit() or int(value) < minimum:
      raise errors.UsageError(
          f'{variable}={value!r}: expected an integer >= {minimum}')
    arguments[argument] = int(value)
  return arguments


class _ProcessFormatter(logging.PythonFormatter):
  """absl's log lines with '[process i/n] ' before each message."""

  def __init__(self, index: int, count: int):
    super().__init__()
    self._tag = f'[process {index}/{count}] '

  def formatMessage(self, record: py_logging.LogRecord) -> str:  # pylint: disable=invalid-name
    return self._tag + super().formatMessage(record)


def run(main: Callable[[Sequence[str]], Any]) -> None:
  """Runs a command: parses flags (absl), `start()`, then `main(argv)`.

  A user's mistake is printed as one line, `pan_jax.<command>: error:
  <message>`, without a traceback: a flag that does not parse (an unknown
  flag or --config.x field, a value of the wrong type, a config file that
  does not load; exit status 2), a `pan_jax.errors.UserError` raised by the
  command (its exit_code: 1, or 2 for usage errors) or absl's
  app.UsageError (2). PAN_JAX_TRACEBACK=1 raises them instead. Other
  exceptions are bugs and keep their traceback. With several processes,
  an exception is first reported in one line while the coordinator is
  asked whether a process is lost (`_report_lost_processes`); if one is
  (a collective whose peer died), a line names it, then comes the
  traceback, and this process exits with status 1 at once instead of
  waiting for the lost one at shutdown.

  Args:
    main: the command's main(argv); its return value is the exit status.
  """
  _lend_help_to_console_script(main)

  def start_then_main(argv):
    try:
      start()
      return main(argv)
    except (errors.UserError, app.UsageError) as e:
      if _show_tracebacks():
        raise
      _print_error(str(e))
      return getattr(e, 'exit_code', errors.UsageError.exit_code)
    except Exception as e:  # pylint: disable=broad-except
      if jax.process_count() <= 1:
        raise
      lost = _report_lost_processes(e)
      if not lost:
        raise
      os._exit(1)  # pylint: disable=protected-access  (no shutdown barrier)
  app.run(start_then_main, flags_parser=_parse_flags)


def _show_tracebacks() -> bool:
  return os.environ.get('PAN_JAX_TRACEBACK') == '1'


def _print_error(message: str) -> None:
  print(f'{_command_name()}: error: {message}', file=sys.stderr, flush=True)


def _parse_flags(argv: Sequence[str]) -> Sequence[str]:
  """absl's flag parsing, with every way it can fail reported as one line.

  --help and --helpfull still print their help and exit (absl does that
  while parsing).
  """
  try:
    remaining = flags.FLAGS(argv)
    for name in flags.FLAGS:
      flag = flags.FLAGS[name]
      if ml_config_flags.is_config_flag(flag) and flag.value is not None:
        flag.value.keys()  # A config file that failed to load raises now.
    return remaining
  except flags.Error as e:
    error, message = e, f'{e} (--helpfull lists every flag)'
  except (KeyError, AttributeError) as e:
    # ml_collections: an override of a field the config does not have is a
    # KeyError (wrapped in an AttributeError below the top level).
    key_error = e
    while isinstance(key_error, AttributeError) and key_error.args and (
        isinstance(key_error.args[0], BaseException)):
      key_error = key_error.args[0]
    if not isinstance(key_error, KeyError):
      raise
    error, message = e, _unknown_field_message(key_error, argv)
  except OSError as e:  # A config file that does not load.
    error, message = e, _config_file_message(e)
  if _show_tracebacks():
    raise error
  _print_error(message)
  sys.exit(errors.UsageError.exit_code)


def _unknown_field_message(error: KeyError, argv: Sequence[str]) -> str:
  """'--config.a.b=1: the config has no field 'b'. Did you mean ...'."""
  key, _, hint = str(error.args[0] if error.args else error).partition('\n')
  key = key.strip('\'"')
  given = [a for a in argv[1:] if a.startswith('--') and
           key in a.split('=')[0].split('.')[1:]]
  where = given[0] if given else 'a --config override'
  return f'{where}: the config has no field {key!r}. {hint.strip()}'.strip()


def _config_file_message(error: OSError) -> str:
  """'--config=FILE: cannot load the config file (reason)'."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  reason = lines[-1] if lines else repr(error)
  for name in flags.FLAGS:
    flag = flags.FLAGS[name]
    if ml_config_flags.is_config_flag(flag) and flag.present:
      try:
        path = config_flags.get_config_filename(flag)
      except (TypeError, ValueError, AttributeError):
        continue  # Not a config *file* flag.
      return f'--{name}={path}: cannot load the config file ({reason})'
  return f'cannot load a config file ({reason})'


def _report_lost_processes(error: Exception) -> str:
  """Reports an exception of a multi-process run; names lost processes.

  A collective fails at once when a peer dies, but the coordinator names
  the dead process only when its heartbeat timeout ends, and at that moment
  jax's error polling also starts terminating this process (jax's own
  fatal line then names the task that "stopped sending heartbeats"). So a
  first line says what failed before the wait, the traceback is formatted
  during it, and the line naming the lost processes, then the traceback,
  are printed the instant the coordinator answers.

  Args:
    error: the exception being handled.

  Returns:
    lost_processes() ('' when none is lost: the caller re-raises).
  """
  timeout = distributed_arguments(os.environ)['heartbeat_timeout_seconds']
  summary = (str(error).strip().splitlines() or [''])[0][:300]
  _print_error(f'process {jax.process_index()}/{jax.process_count()}: '
               f'{type(error).__name__}: {summary}; asking the coordinator '
               'whether a process of this run is lost (it knows within '
               f'PAN_JAX_HEARTBEAT_TIMEOUT={timeout} s)')
  trace = traceback.format_exc()
  lost = lost_processes(wait_seconds=timeout + 10)
  if lost:
    _print_error(f'{lost}; process {jax.process_index()}/'
                 f'{jax.process_count()} stops too. Restart the command on '
                 'every host: training resumes from its last checkpoint. '
                 'The error this process saw:')
    sys.stderr.write(trace)
    sys.stderr.flush()
  return lost


def lost_processes(wait_seconds: Optional[float] = None) -> str:
  """Which processes of this distributed run are gone, in words ('' if none).

  Asks the coordinator which processes still send heartbeats; if the
  coordinator itself cannot be reached, process 0 (which runs it) is lost.
  The coordinator answers once every live process has asked too, or once
  the heartbeat timeout has declared the others dead; a live process that
  does not ask (it waits in a collective for this one) would keep it from
  answering, so after `wait_seconds` no process counts as lost.

  Args:
    wait_seconds: how long to wait for the answer (None: as long as it
      takes).
  """
  if jax.process_count() <= 1:
    return ''
  # jax has no public API for this; the client is jax.distributed's own.
  client = jax_distributed.global_state.client
  if client is None:
    return ''
  count = jax.process_count()
  answer = {}

  def ask():
    try:
      answer['live'] = client.get_live_nodes(list(range(count)))
    except Exception:  # pylint: disable=broad-except
      answer['unreachable'] = True

  asking = threading.Thread(target=ask, name='pan_jax-live-nodes', daemon=True)
  asking.start()
  asking.join(wait_seconds)
  if 'unreachable' in answer:
    return ('lost the coordinator, process 0 (it cannot be reached: killed, '
            'or its host is gone?)')
  lost = [i for i in range(count) if i not in answer.get('live', range(count))]
  if not lost:
    return ''
  names = ', '.join(str(i) for i in lost)
  return (f'lost process{"es" if len(lost) > 1 else ""} {names} of {count} '
          '(no heartbeat: killed, or its host is gone?)')


def _lend_help_to_console_script(main: Callable[..., Any]) -> None:
  """Makes --help of a console script (pan-jax-evaluate) that of its module.

  absl's --help prints the docstring of the __main__ module and the flags
  key to sys.argv[0]; under a console script __main__ is a generated
  wrapper, so the command module's docstring and key flags are lent to it.
  Under `python -m` the command is __main__ and nothing changes.

  Args:
    main: the command's main (its module is the command's).
  """
  module = sys.modules.get(getattr(main, '__module__', '__main__'))
  wrapper = sys.modules['__main__']
  if module is None or module is wrapper:
    return
  if not wrapper.__doc__:
    wrapper.__doc__ = module.__doc__
  for flag in flags.FLAGS.get_key_flags_for_module(module.__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def _command_name() -> str:
  """'pan_jax.evaluate' for `python -m pan_jax.evaluate` (argv[0] otherwise)."""
  spec = getattr(sys.modules['__main__'], '__spec__', None)
  name = spec.name if spec is not None else os.path.basename(sys.argv[0])
  return name.removesuffix('.__main__')


def define_checkpoint_flags(purpose: str) -> None:
  """--checkpoint, --step and --config.x=y, for a command that reads one.

  Args:
    purpose: what the checkpoint is for, for --help ('to evaluate').
  """
  flags.DEFINE_string(
      'checkpoint', None, 'Training workdir, inference checkpoint or '
      f'converted network {purpose}.', required=True)
  flags.DEFINE_integer('step', None,
                       'Checkpoint step of a workdir (default: the latest).')
  define_config_overrides()


def define_inference_flags() -> None:
  """--scales, --flip and --mode: how predictions are made.

  Each defaults to the checkpoint's config.eval value; read them with
  `inference_flag_values`.
  """
  flags.DEFINE_list('scales', None,
                    'Test-time scales, e.g. 0.5,0.75,1.0,1.25,1.5,1.75 '
                    '(default config.eval.scales).')
  flags.DEFINE_boolean('flip', None,
                       'Also average the flipped image (default '
                       'config.eval.flip).')
  flags.DEFINE_enum('mode', None, list(inference.MODES),
                    'whole or slide (default config.eval.mode).')


def inference_flag_values() -> Dict[str, Any]:
  """{'scales', 'flip', 'mode'} as given (None where left to the config)."""
  values = flags.FLAGS
  return {'scales': ([float(s) for s in values.scales] if values.scales
                     else None),
          'flip': values.flip, 'mode': values.mode}


def define_config_overrides() -> None:
  """`--config.x=y` for a command that reads a checkpoint's saved config.

  The flags are parsed against today's fields (pan_jax.defaults), locked: a
  mistyped field is the same error as in training. Read them with
  `config_overrides`.
  """
  config_flags.DEFINE_config_dict(
      'config', defaults.get_config(),
      'Overrides of the checkpoint\'s saved config, e.g. '
      '--config.eval.canvas_size="(640, 640)".', lock_config=True)
  # --help would print the whole base config as the default; what is
  # overridden is the checkpoint's own config.
  flags.FLAGS['config'].default_as_str = "the checkpoint's config.json"


def config_overrides() -> Dict[str, Any]:
  """{dotted path: value} given as --config.x=y (see define_config_overrides).

  Apply them with `pan_jax.defaults.override(config, ...)`.
  """
  return dict(config_flags.get_override_values(flags.FLAGS['config']))
