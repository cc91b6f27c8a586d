"""A command for tests/test_multihost.py: a bug on process 0 only.

Every process joins an all-gather; then process 0 raises a RuntimeError (a
bug, not a lost process) while the others wait for it in a second one.
"""

import jax
from jax.experimental import multihost_utils
import numpy as np

from pan_jax import runtime


def main(argv):
  del argv
  multihost_utils.process_allgather(np.ones(1))
  if jax.process_index() == 0:
    raise RuntimeError('a bug on process 0 only')
  multihost_utils.process_allgather(np.ones(1))


if __name__ == '__main__':
  runtime.run(main)
