"""Benchmarks: `python -m pan_jax.bench train|infer|data|eval|all [--peer]`.

Every measurement runs in a fresh subprocess (compile caches, allocator state
and peak RSS belong to that measurement alone). With `--peer`, the PyTorch
peer (segmentation_models_pytorch's PAN, ../shared/peer/bench_smp.py) is
measured in the same run, alternating with pan_jax round by round, and the
report gives the ratio pan_jax / smp for each round and the median ratio: a
ratio is only meaningful between runs made side by side on the same machine.

    python -m pan_jax.bench infer --peer                     # R101 b1 x 512^2
    python -m pan_jax.bench train --peer --batch=2 --size=512
    python -m pan_jax.bench train --config=configs/smp_pan.py:resnet50 --peer
    python -m pan_jax.bench data
    python -m pan_jax.bench all --peer --json=bench.jsonl

The default configuration is configs/smp_pan.py (smp's exact architecture), so
both sides compute the same network. On CPU the XLA flags of DESIGN.md §5 and
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 are set for both sides (PyTorch gains
from the latter too); `--no-cpu-tuning` measures the defaults instead.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PEER = os.path.join(os.path.dirname(REPO), 'shared', 'peer')
MODES = ('train', 'infer', 'data', 'eval')
PEER_MODES = ('train', 'infer')


def cpu_environment(tuned: bool) -> dict:
  """Environment of a measurement subprocess."""
  env = dict(os.environ)
  if tuned:
    from pan_jax import runtime  # pylint: disable=g-import-not-at-top
    env.update(runtime.CPU_ENV)
  return env


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m pan_jax.bench', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('mode', choices=MODES + ('all',))
  parser.add_argument('--config', default='configs/smp_pan.py:resnet101',
                      help='config file[:arg] of the measured network')
  parser.add_argument('--batch', type=int, default=None,
                      help='batch size (default: 2 for train, 1 for infer)')
  parser.add_argument('--size', type=int, default=512, help='image side')
  parser.add_argument('--classes', type=int, default=21)
  parser.add_argument('--dtype', default='float32',
                      choices=('float32', 'bfloat16'))
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--iters', type=int, default=5)
  parser.add_argument('--rounds', type=int, default=2,
                      help='alternating pan_jax/peer rounds')
  parser.add_argument('--peer', action='store_true',
                      help='also measure smp.PAN side by side')
  parser.add_argument('--peer_dir', default=DEFAULT_PEER)
  parser.add_argument('--peer_python', default=sys.executable,
                      help='python with torch + smp (default: this one)')
  parser.add_argument('--threads', type=int, default=os.cpu_count() or 1)
  parser.add_argument('--no-cpu-tuning', dest='cpu_tuning',
                      action='store_false')
  parser.add_argument('--json', default=None, help='append records here')
  parser.add_argument('--one', action='store_true', help=argparse.SUPPRESS)
  # Options the harness does not know go to the data / eval benchmarks
  # (`python -m pan_jax.bench data --help` after `--`).
  return parser.parse_known_args(argv)


def _batch(args, mode):
  return args.batch or (2 if mode == 'train' else 1)


def measure_here(args, mode) -> dict:
  """Runs one train / infer measurement in this process."""
  from pan_jax import bench_model  # pylint: disable=g-import-not-at-top
  return bench_model.run(args, mode, _batch(args, mode))


def run_pipeline_bench(mode, extra) -> dict:
  """The data and eval benchmarks manage their own processes and tables."""
  if mode == 'data':
    from pan_jax import bench_data  # pylint: disable=g-import-not-at-top
    return {'mode': 'data', 'rows': bench_data.run(extra)}
  from pan_jax import bench_eval  # pylint: disable=g-import-not-at-top
  return {'mode': 'eval', 'rows': bench_eval.run(extra)}


def _run_child(cmd, env, cwd) -> dict:
  with tempfile.NamedTemporaryFile('r', suffix='.json') as out:
    proc = subprocess.run(cmd + ['--json', out.name], env=env, cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, check=False)
    lines = [l for l in out.read().splitlines() if l.strip()]
  if proc.returncode or not lines:
    raise RuntimeError(f'measurement failed ({" ".join(cmd)}):\n'
                       f'{proc.stdout[-3000:]}')
  return json.loads(lines[-1])


def ours(args, mode, env) -> dict:
  argv = [sys.executable, '-m', 'pan_jax.bench', mode, '--one',
          f'--config={args.config}', f'--size={args.size}',
          f'--batch={_batch(args, mode)}', f'--classes={args.classes}',
          f'--dtype={args.dtype}', f'--warmup={args.warmup}',
          f'--iters={args.iters}']
  return _run_child(argv, env, REPO)


def peer(args, mode, env) -> dict:
  script = os.path.join(args.peer_dir, 'bench_smp.py')
  if not os.path.exists(script):
    raise FileNotFoundError(f'--peer needs {script} (see --peer_dir)')
  arch = args.config.partition(':')[2] or 'resnet101'
  argv = [args.peer_python, script, mode, '--encoder', arch,
          '--batch', str(_batch(args, mode)), '--size', str(args.size),
          '--classes', str(args.classes), '--warmup', str(args.warmup),
          '--iters', str(args.iters), '--threads', str(args.threads)]
  return _run_child(argv, env, args.peer_dir)


def _seconds(record):
  for key in ('median_s', 'step_s', 'time_s', 'median'):
    if key in record:
      return float(record[key])
  raise KeyError(f'no timing in record {sorted(record)}')


def main(argv=None):
  args, extra = parse_args(sys.argv[1:] if argv is None else argv)
  if args.one:
    record = measure_here(args, args.mode)
    if args.json:
      with open(args.json, 'a') as f:
        f.write(json.dumps(record) + '\n')
    print(json.dumps(record))
    return 0
  env = cpu_environment(args.cpu_tuning)
  modes = MODES if args.mode == 'all' else (args.mode,)
  records = []
  for mode in modes:
    if mode in ('data', 'eval'):
      records.append(run_pipeline_bench(mode, extra))
      continue
    with_peer = args.peer and mode in PEER_MODES
    rounds = args.rounds if with_peer else 1
    ratios = []
    for r in range(rounds):
      mine = ours(args, mode, env)
      mine.update(side='pan_jax', round=r)
      records.append(mine)
      print(f'[{mode}] pan_jax round {r}: {_describe(mine)}', flush=True)
      if with_peer:
        theirs = peer(args, mode, env)
        theirs.update(side='smp', round=r)
        records.append(theirs)
        ratio = _seconds(mine) / _seconds(theirs)
        ratios.append(ratio)
        print(f'[{mode}] smp     round {r}: {_describe(theirs)}  '
              f'ratio pan_jax/smp time = {ratio:.2f}', flush=True)
    if ratios:
      print(f'[{mode}] median time ratio pan_jax/smp over {len(ratios)} '
            f'rounds: {statistics.median(ratios):.2f} (< 1 = pan_jax faster)')
  if args.json:
    with open(args.json, 'a') as f:
      for record in records:
        f.write(json.dumps(dict(record, time=time.time())) + '\n')
  return 0


def _describe(record):
  parts = []
  for key in ('median_s', 'images_per_s', 'peak_rss_mib', 'xla_temp_mib',
              'compile_s'):
    if key in record:
      value = record[key]
      parts.append(f'{key}={value:.3f}' if isinstance(value, float)
                   else f'{key}={value}')
  return ' '.join(parts) or json.dumps(record)


if __name__ == '__main__':
  sys.exit(main())
