"""The data benchmark runs end to end (tiny settings; no timing asserted)."""

from pan_jax import bench_data


def test_bench_data_runs(capsys):
  rows = bench_data.run(['--images=3', '--batch_size=2', '--batches=2',
                         '--warmup=1', '--crop_size=64', '--workers=0'])
  assert [row['workers'] for row in rows] == [0]
  assert rows[0]['images_per_s'] > 0
  assert 'images/s per core' in capsys.readouterr().out
