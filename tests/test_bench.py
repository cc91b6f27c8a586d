"""Tests for the benchmark command (pan_jax.bench: harness, step, loop).

A tiny smp_pan ResNet-18 at 128 px (its smallest input), one round: the
records must carry what the README's benchmark table is made of, and with
--peer the PyTorch side must be measured in the same run and the ratio
printed. The loop mode trains configs/smoke.py for a few steps.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_DIR = os.path.join(os.path.dirname(REPO), 'shared', 'peer')
PEER_SCRIPT = os.path.join(PEER_DIR, 'bench_smp.py')


def _run_bench(mode, *extra):
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  return subprocess.run(
      [sys.executable, '-m', 'pan_jax.bench', mode,
       '--config=configs/smp_pan.py:resnet18', '--size=128', '--classes=6',
       '--rounds=1', '--warmup=1', '--iters=2', *extra],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
      check=False)


def _bench(tmp_path, mode, *extra):
  out = tmp_path / 'bench.jsonl'
  result = _run_bench(mode, f'--json={out}', *extra)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  records = [json.loads(line) for line in out.read_text().splitlines()]
  return records, result.stdout


@pytest.mark.parametrize('mode, batch', [('train', 2), ('infer', 1)])
def test_record_fields(tmp_path, mode, batch):
  records, stdout = _bench(tmp_path, mode)
  assert len(records) == 1
  record = records[0]
  assert (record['mode'], record['side'], record['batch']) == (
      mode, 'pan_jax', batch)
  assert record['size'] == 128 and len(record['times_s']) == 2
  assert record['images_per_s'] == pytest.approx(batch / record['median_s'])
  assert record['gflop_per_step'] > 0
  assert record['peak_rss_mib'] > 0
  # XLA's buffer plan: the state (train) or variables (infer) come in.
  assert record['xla_argument_mib'] > 0 and record['xla_temp_mib'] > 0
  assert f'[{mode}] pan_jax round 0:' in stdout


def test_peer_side_by_side(tmp_path):
  if not os.path.exists(PEER_SCRIPT):
    pytest.skip(f'{PEER_SCRIPT} not present')
  for module in ('torch', 'segmentation_models_pytorch'):
    if importlib.util.find_spec(module) is None:
      pytest.skip(f'{module} not installed')
  records, stdout = _bench(tmp_path, 'infer', '--peer',
                           f'--peer_dir={PEER_DIR}')
  assert [r['side'] for r in records] == ['pan_jax', 'smp']
  assert all(r['median_s'] > 0 for r in records)
  assert 'median time ratio pan_jax/smp over 1 rounds' in stdout


def test_peer_needs_peer_dir():
  result = _run_bench('infer', '--peer')
  assert result.returncode == 2  # A usage error, like every bad flag.
  assert '--peer needs --peer_dir=DIR' in result.stderr
  assert '[infer]' not in result.stdout  # Nothing was measured.


@pytest.mark.slow
def test_loop_record_fields(tmp_path):
  records, stdout = _bench(tmp_path, 'loop', '--loop_config=configs/smoke.py',
                           '--steps=4', '--log_every=2')
  assert len(records) == 1
  record = records[0]
  assert (record['mode'], record['config'], record['steps']) == (
      'loop', 'configs/smoke.py', 4)
  for key in ('steps_per_s', 'images_per_s', 'wall_s', 'overhead_s',
              'final_loss'):
    assert record[key] > 0, key
  assert 'configs/smoke.py' in stdout
