"""Expands a config file's `sweep(add)` into one training command per point.

A config file may define (flax convention)

  def sweep(add):
    for lr in (0.004, 0.01):
      for backbone in ('resnet50', 'resnet101'):
        add(**{'optim.learning_rate': lr, 'model.backbone': backbone})

Each `add(...)` call is one run: its overrides become `--config.KEY=VALUE`
flags and its workdir is WORKDIR_BASE/<key=value,...>. Two keywords are not
overrides: `name=` names the run's workdir (WORKDIR_BASE/<name>) and
`config_arg=` the config file's argument (`--config=FILE:<config_arg>`).
A file whose `sweep(add, table=None)` takes a table (configs/ablation.py:
the paper's Tables 1-3) sweeps one table with --table=N. Usage:

  python launch/sweep.py configs/ablation.py --table=3 \
      [--workdir_base=gs://b/ablation] [--launcher="launch/tpu_vm.sh"] \
      [--evaluate] [--run] [-- --config.model.init_from=DIR ...]

(absl flags; whatever follows `--` is added to every training command).
With --evaluate each training command is followed by
`python -m pan_jax.evaluate --checkpoint=WORKDIR`, whose report
(WORKDIR/eval_val/report.json) launch/results.py puts into the paper's table.

Without --run the commands are printed (one per line, ready for a shell or a
job array); with --run they are executed one after the other. With a
launcher (launch/gpu_local.sh, launch/tpu_vm.sh, launch/gpu_slurm.sh) the
command is `LAUNCHER CONFIG WORKDIR overrides...`; otherwise it is
`python -m pan_jax.main --config=CONFIG --workdir=WORKDIR overrides...`.
"""

import dataclasses
import importlib.util
import inspect
import os
import re
import shlex
import subprocess
import sys

from absl import app
from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep.

  Attributes:
    overrides: {'optim.learning_rate': 0.01, ...}.
    name: the workdir's name under WORKDIR_BASE ('' = from the overrides).
    config_arg: the config file's argument ('' = the one given, if any).
  """
  overrides: dict[str, object]
  name: str = ''
  config_arg: str = ''


def load_sweep(config_path: str) -> list[dict[str, object]]:
  """The list of override dicts that the file's `sweep(add)` produces.

  Args:
    config_path: a config file (a path, optionally with ':arg' as for
      --config; the argument is ignored here).

  Returns:
    One dict {'optim.learning_rate': 0.01, ...} per add() call.

  Raises:
    ValueError: the file has no `sweep` function or it added nothing.
  """
  return [point.overrides for point in load_points(config_path)]


def load_points(config_path: str, table: int | None = None) -> list[Point]:
  """The runs that the file's `sweep(add)` (or `sweep(add, table)`) adds.

  Args:
    config_path: a config file (a path, optionally with ':arg').
    table: passed to `sweep(add, table=table)` when given.

  Returns:
    One Point per add() call.

  Raises:
    ValueError: no `sweep` function, one that takes no table although
      `table` is given, or nothing added.
  """
  path = config_path.split(':', 1)[0]
  if _REPO not in sys.path:
    sys.path.insert(0, _REPO)  # Config files import `configs.base`.
  spec = importlib.util.spec_from_file_location('_swept_config', path)
  if spec is None:
    raise ValueError(f'{path}: not a Python file.')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'sweep'):
    raise ValueError(f'{path} defines no sweep(add) function.')
  points = []

  def add(name='', config_arg='', **overrides):
    points.append(Point(
        {k.removeprefix('config.'): v for k, v in overrides.items()},
        str(name), str(config_arg)))

  if table is None:
    module.sweep(add)
  elif 'table' in inspect.signature(module.sweep).parameters:
    module.sweep(add, table=table)
  else:
    raise ValueError(f'sweep(add) in {path} takes no table; --table is for '
                     'files such as configs/ablation.py.')
  if not points:
    raise ValueError(f'sweep(add) in {path} added no point.')
  return points


def _flag_value(value: object) -> str:
  if isinstance(value, (tuple, list)):
    return '(' + ','.join(map(str, value)) + (',)' if len(value) == 1 else ')')
  return str(value)


def point_name(overrides: dict[str, object]) -> str:
  """A workdir-safe name for one point, e.g. 'learning_rate=0.01,seed=1'."""
  parts = [f'{k.split(".")[-1]}={_flag_value(v)}'
           for k, v in sorted(overrides.items())]
  return re.sub(r'[^A-Za-z0-9_.,=+-]', '_', ','.join(parts)) or 'default'


def commands(config_path: str, workdir_base: str, launcher: str = '',
             extra: tuple[str, ...] = (), table: int | None = None,
             evaluate: bool = False) -> list[list[str]]:
  """The commands (argv lists) of every point of the sweep, in order.

  Args:
    config_path: the config file (optionally with ':arg').
    workdir_base: each run trains in WORKDIR_BASE/<point name>.
    launcher: e.g. 'launch/gpu_local.sh' (default: python -m pan_jax.main).
    extra: flags added to every training command.
    table: the table to sweep (files whose sweep takes one).
    evaluate: follow each training command by its evaluation.

  Returns:
    One training command per point (each followed by its evaluate command
    when `evaluate`).
  """
  result = []
  for point in load_points(config_path, table):
    name = point.name or point_name(point.overrides)
    workdir = f'{workdir_base.rstrip("/")}/{name}'
    config = config_path
    if point.config_arg:
      config = f'{config_path.split(":", 1)[0]}:{point.config_arg}'
    flags = [f'--config.{k}={_flag_value(v)}'
             for k, v in point.overrides.items()]
    flags += list(extra)
    if launcher:
      result.append(shlex.split(launcher) + [config, workdir] + flags)
    else:
      result.append([sys.executable, '-m', 'pan_jax.main',
                     f'--config={config}', f'--workdir={workdir}'] + flags)
    if evaluate:
      result.append([sys.executable, '-m', 'pan_jax.evaluate',
                     f'--checkpoint={workdir}'])
  return result


def _define_flags() -> None:
  """The script's flags (absl, as every pan_jax command)."""
  flags.DEFINE_string('config', None, 'Config file (or give it positionally).')
  flags.DEFINE_string('workdir_base', 'runs/sweep',
                      'Each point trains in WORKDIR_BASE/<name>.')
  flags.DEFINE_string('launcher', '',
                      'e.g. launch/gpu_local.sh (default: python -m).')
  flags.DEFINE_bool('run', False, 'Run the commands one after the other.')
  flags.DEFINE_integer('table', None,
                       'Sweep one table of the paper (configs/ablation.py: '
                       '1, 2 or 3).')
  flags.DEFINE_bool('evaluate', False,
                    'Follow each training command by python -m '
                    'pan_jax.evaluate on its workdir.')


def main(argv):
  """Prints (or runs) the sweep's commands; argv: [CONFIG] [-- extra flags]."""
  args = list(argv[1:])
  config = flags.FLAGS.config
  if args and not config and not args[0].startswith('--'):
    config = args.pop(0)
  if not config:
    raise app.UsageError('give a config file: launch/sweep.py configs/X.py')
  for command in commands(config, flags.FLAGS.workdir_base,
                          flags.FLAGS.launcher, tuple(args),
                          table=flags.FLAGS.table,
                          evaluate=flags.FLAGS.evaluate):
    print(shlex.join(command), flush=True)
    if flags.FLAGS.run:
      subprocess.run(command, check=True, cwd=_REPO)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
