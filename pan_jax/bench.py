"""Benchmarks: `python -m pan_jax.bench data [options]`.

Minimal dispatcher from the data branch; only `data` (bench_data.py) is wired
here. Options after the target are passed to the benchmark.
"""

import sys

from pan_jax import bench_data

TARGETS = {'data': bench_data.run}


def main(argv):
  if len(argv) < 2 or argv[1] not in TARGETS:
    print(f'usage: python -m pan_jax.bench {"|".join(TARGETS)} [options]',
          file=sys.stderr)
    return 2
  TARGETS[argv[1]](argv[2:])
  return 0


if __name__ == '__main__':
  # Guarded: the data benchmark starts worker processes with spawn.
  sys.exit(main(sys.argv))
