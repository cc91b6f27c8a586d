"""The data benchmark runs end to end (tiny settings; no timing asserted)."""

from pan_jax.bench import data as data_bench


def test_bench_data_runs(capsys):
  rows = data_bench.run(images=3, batch=2, iters=2, warmup=1, size=64,
                        workers=[0])
  assert [row['workers'] for row in rows] == [0]
  assert rows[0]['images_per_s'] > 0
  assert 'images/s per core' in capsys.readouterr().out
