"""Expands a config file's `sweep(add)` into one training command per point.

A config file may define (flax convention)

  def sweep(add):
    for lr in (0.004, 0.01):
      for backbone in ('resnet50', 'resnet101'):
        add(**{'optim.learning_rate': lr, 'model.backbone': backbone})

Each `add(...)` call is one run: its overrides become `--config.KEY=VALUE`
flags and its workdir is WORKDIR_BASE/<key=value,...>. Usage:

  python launch/sweep.py configs/ablation.py [--workdir_base=gs://b/sweep] \
      [--launcher="launch/tpu_vm.sh"] [--run] [-- --config.x=y ...]

(absl flags; whatever follows `--` is added to every command).

Without --run the commands are printed (one per line, ready for a shell or a
job array); with --run they are executed one after the other. With a
launcher (launch/gpu_local.sh, launch/tpu_vm.sh, launch/gpu_slurm.sh) the
command is `LAUNCHER CONFIG WORKDIR overrides...`; otherwise it is
`python -m pan_jax.main --config=CONFIG --workdir=WORKDIR overrides...`.
"""

import importlib.util
import os
import re
import shlex
import subprocess
import sys

from absl import app
from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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

  def add(**overrides):
    points.append({k.removeprefix('config.'): v for k, v in overrides.items()})

  module.sweep(add)
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
             extra: tuple[str, ...] = ()) -> list[list[str]]:
  """The command (argv list) of every point of the sweep."""
  result = []
  for overrides in load_sweep(config_path):
    workdir = f'{workdir_base.rstrip("/")}/{point_name(overrides)}'
    flags = [f'--config.{k}={_flag_value(v)}' for k, v in overrides.items()]
    flags += list(extra)
    if launcher:
      result.append(shlex.split(launcher) + [config_path, workdir] + flags)
    else:
      result.append([sys.executable, '-m', 'pan_jax.main',
                     f'--config={config_path}', f'--workdir={workdir}']
                    + flags)
  return result


def _define_flags() -> None:
  """The script's flags (absl, as every pan_jax command)."""
  flags.DEFINE_string('config', None, 'Config file (or give it positionally).')
  flags.DEFINE_string('workdir_base', 'runs/sweep',
                      'Each point trains in WORKDIR_BASE/<name>.')
  flags.DEFINE_string('launcher', '',
                      'e.g. launch/gpu_local.sh (default: python -m).')
  flags.DEFINE_bool('run', False, 'Run the commands one after the other.')


def main(argv):
  """Prints (or runs) the sweep's commands; argv: [CONFIG] [-- extra flags]."""
  args = list(argv[1:])
  config = flags.FLAGS.config
  if args and not config and not args[0].startswith('--'):
    config = args.pop(0)
  if not config:
    raise app.UsageError('give a config file: launch/sweep.py configs/X.py')
  for command in commands(config, flags.FLAGS.workdir_base,
                          flags.FLAGS.launcher, tuple(args)):
    print(shlex.join(command), flush=True)
    if flags.FLAGS.run:
      subprocess.run(command, check=True, cwd=_REPO)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
