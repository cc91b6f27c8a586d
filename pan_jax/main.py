"""Trains PAN: python -m pan_jax.main --config=configs/X.py --workdir=RUN.

Overrides: --config.field=value (unknown fields are an error). Rerunning the
same command on the same workdir resumes from its latest checkpoint.
Multi-host: set PAN_JAX_DISTRIBUTED=1 on every host (launch/*.sh do) to call
jax.distributed.initialize() first.

On CPU, unless XLA_FLAGS is already set, this sets the XLA flags measured
to make training ~4x faster (DESIGN.md section 5): multi-output fusion and
Eigen convolutions (YNN kept for reductions). They must be set before jax
is imported. Also export GLIBC_TUNABLES=glibc.malloc.hugetlb=1 before
starting Python (launch/demo.sh does) for a further gain.
"""

import importlib.util
import logging as py_logging
import os
import shlex
import sys

CPU_XLA_FLAGS = ('--xla_backend_extra_options=xla_cpu_use_multi_output_fusion'
                 ' --xla_cpu_experimental_ynn_fusion_type=reduce')
_ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin',
                        'jax_rocm7_plugin', 'libtpu')


def _set_cpu_xla_flags() -> None:
  platforms = os.environ.get('JAX_PLATFORMS', '')
  on_cpu = platforms == 'cpu' or (not platforms and not any(
      importlib.util.find_spec(p) for p in _ACCELERATOR_PLUGINS))
  if on_cpu and 'XLA_FLAGS' not in os.environ:
    os.environ['XLA_FLAGS'] = CPU_XLA_FLAGS


_set_cpu_xla_flags()

# pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from pan_jax import train
# pylint: enable=g-import-not-at-top,g-bad-import-order

_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory: checkpoints, config.json, metrics.',
    required=True)
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/voc.py (or configs/voc.py:arg).',
    lock_config=True)
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Orbax logs every step of every save at INFO; keep its warnings only.
  logging.get_absl_logger().addFilter(
      lambda r: r.levelno >= py_logging.WARNING or '/orbax/' not in r.pathname)
  if os.environ.get('PAN_JAX_DISTRIBUTED') == '1':
    jax.distributed.initialize()
  jax.config.update('jax_threefry_partitionable', True)
  logging.info('process %d/%d, %d local / %d global devices (%s); XLA_FLAGS=%r',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.default_backend(), os.environ.get('XLA_FLAGS', ''))
  result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if result['stopped_by'] and jax.process_index() == 0:
    print(f'Stopped by {result["stopped_by"]} after step {result["step"]}; '
          f'the checkpoint is saved in {_WORKDIR.value}/checkpoints. To '
          f'resume, rerun the same command:\n  '
          f'{shlex.join([sys.executable, "-m", "pan_jax.main"] + sys.argv[1:])}',
          flush=True)


if __name__ == '__main__':
  app.run(main)
