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
  # CPU-seconds of this process per step, and what the rest used.
  assert len(record['cpu_s']) == 2 and record['median_cpu_s'] > 0
  assert len(record['other_cores']) == 2
  assert all(o >= 0 for o in record['other_cores'])
  assert record['peak_rss_from'] == (
      'weights in memory' if mode == 'infer' else 'process start')
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
                           f'--peer_dir={PEER_DIR}',
                           '--peer_layouts=nchw,channels_last')
  assert [r['side'] for r in records] == ['pan_jax', 'smp',
                                          'smp_channels_last']
  assert [r.get('channels_last') for r in records[1:]] == [False, True]
  assert all(r['median_s'] > 0 for r in records)
  assert 'median time ratio pan_jax/smp over 1 rounds' in stdout
  assert 'median time ratio pan_jax/smp_channels_last over 1 rounds' in stdout
  assert 'median CPU-seconds ratio pan_jax/smp over 1 rounds' in stdout


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
              'final_loss', 'bare_images_per_s'):
    assert record[key] > 0, key
  assert record['loop_over_bare'] == pytest.approx(
      record['images_per_s'] / record['bare_images_per_s'])
  assert 'configs/smoke.py' in stdout


@pytest.mark.slow
def test_gpu_suite_smoke(tmp_path):
  # The accelerator suite on the CPU with tiny shapes: every row measured
  # (smp's too where torch is installed), one table, one JSON record. No
  # MFU here: the CPU has no entry in the peak table.
  has_torch = all(importlib.util.find_spec(m) for m in
                  ('torch', 'segmentation_models_pytorch'))
  records, stdout = _bench(tmp_path, 'gpu', '--batch=2', '--infer_batches=1',
                           '--warmup=0', '--iters=1', '--nosmp_compile',
                           f'--smp={has_torch}')
  assert len(records) == 1 and records[0]['mode'] == 'gpu'
  rows = records[0]['rows']
  want = [('pan_jax', 'train', 'bfloat16', 2), ('pan_jax', 'infer',
                                                'bfloat16', 1),
          ('pan_jax', 'train', 'float32', 2)]
  if has_torch:
    want += [('smp', 'train', 'bfloat16', 2), ('smp', 'infer', 'bfloat16', 1)]
  assert [(r['side'], r['mode'], r['dtype'], r['batch']) for r in rows] == want
  for row in rows:
    assert 'skipped' not in row, row
    assert row['images_per_s'] > 0 and row['mfu'] is None
    assert row['device_kind'] == 'cpu'
  # smp's rows reuse pan_jax's FLOP count of the same shapes.
  assert rows[0]['gflop_per_step'] == rows[-2 if has_torch else 0][
      'gflop_per_step'] > 0
  assert 'img/s' in stdout and 'MFU' in stdout


def test_gpu_suite_budget_and_peaks():
  from pan_jax.bench import gpu  # pylint: disable=g-import-not-at-top
  assert gpu.peak_tflops('NVIDIA H100 PCIe', 'bfloat16') == 756.
  assert gpu.peak_tflops('NVIDIA H100 80GB HBM3', 'float32') == 494.
  assert gpu.peak_tflops('cpu', 'bfloat16') is None
  rows = gpu.plan(8, [1, 8], smp=True, smp_compile=True)
  assert len(rows) == 8 and rows[-1]['compile']
  # Nothing starts once the budget is spent; the rows say why.
  results = gpu.run(rows, lambda row: 1 / 0, budget_s=0)
  assert all(r['skipped'].startswith('budget') for r in results)


def test_memory_ranks_the_peak(tmp_path):
  records, stdout = _bench(tmp_path, 'memory', '--batch=2')
  record = records[0]
  assert record['mode'] == 'memory' and record['batch'] == 2
  # The live set at the peak: the temp buffers and the (donated) state.
  assert record['xla_temp_mib'] < record['peak_live_mib'] <= (
      record['xla_temp_mib'] + record['xla_argument_mib'] + 1)
  assert sum(record['by_kind'].values()) == pytest.approx(
      record['peak_live_mib'])
  assert record['by_kind']['convolution output'] > 0
  assert any(part.startswith('backbone layer') for part in record['by_part'])
  assert '-- largest values' in stdout
