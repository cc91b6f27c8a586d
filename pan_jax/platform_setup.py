"""Process-level settings that must be in place before jax is imported.

On CPU, XLA's defaults are ~4x slower than PyTorch for ResNet training
(DESIGN.md §5, measured on this project's 2-core machine): without
multi-output fusion XLA recomputes residual blocks for the weight gradients,
and jaxlib 0.10's YNN convolutions are slow for training. The flags below fix
both (YNN stays on for reductions), and glibc's huge pages remove the page
faults of fresh multi-GB buffers every step. The flags only affect XLA's CPU
backend, so they are harmless on GPU/TPU hosts.
"""

import os

CPU_XLA_FLAGS = ('--xla_backend_extra_options=xla_cpu_use_multi_output_fusion'
                 ' --xla_cpu_experimental_ynn_fusion_type=reduce')
# GLIBC_TUNABLES is read when the process starts: it only helps when it is in
# the environment of the command (launch scripts and the bench set it).
CPU_ENV = {'XLA_FLAGS': CPU_XLA_FLAGS,
           'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}


def set_cpu_flags() -> None:
  """Adds the fast CPU flags to XLA_FLAGS unless the user set XLA options.

  Call before the first `import jax` of the process.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_cpu_' in flags or 'xla_backend_extra_options' in flags:
    return  # The user chose; respect it.
  os.environ['XLA_FLAGS'] = (flags + ' ' + CPU_XLA_FLAGS).strip()
