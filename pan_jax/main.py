"""The training command: python -m pan_jax.main --config=FILE --workdir=RUN.

Overrides: --config.field=value (unknown fields are an error). Rerunning the
same command on the same workdir resumes from its latest checkpoint.
Start-up (XLA CPU flags, jax.distributed on PAN_JAX_DISTRIBUTED=1) is
`runtime.start()`, as for every command.
"""

import shlex
import sys
from typing import Sequence

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from pan_jax import runtime
from pan_jax import train


def _define_flags() -> None:
  """The command's flags (defined when run as a program, as every command)."""
  flags.DEFINE_string('workdir', None,
                      'Run directory: checkpoints, config.json, metrics.',
                      required=True)
  config_flags.DEFINE_config_file(
      'config', None,
      'Config file, e.g. configs/voc.py (or configs/voc.py:arg).',
      lock_config=True)
  flags.mark_flags_as_required(['config'])


def main(argv: Sequence[str]) -> None:
  """Trains (or resumes) --workdir with --config."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdir = flags.FLAGS.workdir
  result = train.train_and_evaluate(flags.FLAGS.config, workdir)
  if result['stopped_by'] and jax.process_index() == 0:
    print(f'Stopped by {result["stopped_by"]} after step {result["step"]}; '
          f'the checkpoint is saved in {workdir}/checkpoints. To '
          f'resume, rerun the same command:\n  '
          f'{shlex.join([sys.executable, "-m", "pan_jax.main"] + sys.argv[1:])}',
          flush=True)


def cli() -> None:
  """The console script pan-jax-train (= python -m pan_jax.main)."""
  _define_flags()
  runtime.run(main)


if __name__ == '__main__':
  cli()
