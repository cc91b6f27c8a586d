"""Tests for launch/: sweep.py expansion and the launch scripts' DRY_RUN."""

import os
import shlex
import subprocess
import sys

from configs import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'launch'))
import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_sweep_expands_points_into_commands():
  points = sweep.load_sweep('configs/demo.py')
  assert points == [{'optim.learning_rate': lr} for lr in (2e-3, 5e-3, 1e-2)]
  config = demo.get_config()
  for point in points:  # Every swept key is a real config field.
    for key in point:
      node = config
      for part in key.split('.'):
        node = node[part]
  commands = sweep.commands('configs/demo.py', '/runs/sweep',
                            extra=('--config.total_steps=10',))
  assert commands[0][1:] == [
      '-m', 'pan_jax.main', '--config=configs/demo.py',
      '--workdir=/runs/sweep/learning_rate=0.002',
      '--config.optim.learning_rate=0.002', '--config.total_steps=10']
  launched = sweep.commands('configs/demo.py', 'gs://b/s',
                            launcher='launch/gpu_local.sh')
  assert launched[2] == ['launch/gpu_local.sh', 'configs/demo.py',
                         'gs://b/s/learning_rate=0.01',
                         '--config.optim.learning_rate=0.01']


def test_sweep_cli_prints_commands():
  out = subprocess.run(
      [sys.executable, 'launch/sweep.py', '--config=configs/demo.py',
       '--workdir_base=/tmp/s'], cwd=REPO, capture_output=True, text=True,
      check=True).stdout.splitlines()
  assert len(out) == 3 and all('pan_jax.main' in line for line in out)


def _dry_run(script, *args, **env):
  result = subprocess.run(
      [os.path.join(REPO, 'launch', script), *args], cwd=REPO,
      env=dict(os.environ, DRY_RUN='1', **env), capture_output=True,
      text=True, check=True)
  return result.stdout


def test_tpu_vm_dry_run():
  out = _dry_run('tpu_vm.sh', 'configs/voc.py', 'gs://b/run',
                 '--config.optim.learning_rate=0.01', TPU_NAME='v4-32',
                 ZONE='us-central2-b')
  assert 'gcloud compute tpus tpu-vm ssh v4-32' in out
  assert '--worker=all' in out and 'PAN_JAX_DISTRIBUTED=1' in out
  assert '--config.optim.learning_rate=0.01' in out
  assert '--workdir=gs://b/run' in out


def test_tpu_vm_setup_dry_run_copies_the_code_to_every_worker():
  out = _dry_run('tpu_vm.sh', '--setup', TPU_NAME='v4-32', ZONE='z',
                 REMOTE_DIR='/srv/pan').splitlines()
  assert out[0].startswith(f'git -C {REPO} ls-files -z | tar -czf ')
  assert out[1].startswith('gcloud compute tpus tpu-vm scp ')
  assert 'v4-32:pan_jax_code.tar.gz' in out[1] and '--worker=all' in out[1]
  setup = shlex.split(out[2])
  assert setup[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']
  assert '--worker=all' in setup
  assert setup[-1] == ('mkdir -p /srv/pan && tar -xzf ~/pan_jax_code.tar.gz '
                       '-C /srv/pan && cd /srv/pan && launch/setup_env.sh && '
                       ".venv/bin/pip install -q -c constraints.txt -e "
                       "'.[tpu]'")


def test_pod_demo_dry_run():
  out = _dry_run('pod_demo.sh', '--config.optim.learning_rate=0.01',
                 WORK_DIR='/w', PYTHON='/py', TOTAL_STEPS='40',
                 STOP_AFTER='20').splitlines()
  commands = [shlex.split(line) for line in out if not line.startswith('#')]
  assert commands[0] == ['/py', 'tests/gcs_server.py', 'pod-demo',
                         '/w/gcs.env']
  assert commands[1][:3] == ['/py', '-m', 'pan_jax.data.prepare']
  assert '--data_dir=gs://pod-demo/data' in commands[1]
  train, resume, evaluate, export = commands[2:]
  assert train[train.index('launch/local.sh'):] == resume[
      resume.index('launch/local.sh'):]
  assert 'NUM_PROCESSES=2' in train and 'DEVICES_PER_PROCESS=2' in train
  assert '--workdir=gs://pod-demo/run' in train
  assert '--config.total_steps=40' in train
  assert '--config.optim.learning_rate=0.01' in train
  assert 'MODULE=pan_jax.evaluate' in evaluate
  assert '--checkpoint=gs://pod-demo/run' in evaluate
  assert export[export.index('-m'):] == [
      '-m', 'pan_jax.export', '--checkpoint=gs://pod-demo/run',
      '--output=gs://pod-demo/export', '--platforms=cpu']
  bad = subprocess.run([os.path.join(REPO, 'launch', 'pod_demo.sh')],
                       cwd=REPO, env=dict(os.environ, DRY_RUN='1',
                                          STOP_AFTER='15'),
                       capture_output=True, text=True, check=False)
  assert bad.returncode == 2 and 'STOP_AFTER=15' in bad.stderr


def test_gpu_dry_runs():
  out = _dry_run('gpu_local.sh', 'configs/voc.py', '/runs/a',
                 '--config.global_batch_size=32')
  assert '-m pan_jax.main --config=configs/voc.py --workdir=/runs/a' in out
  assert '--config.global_batch_size=32' in out
  out = _dry_run('gpu_slurm.sh', 'configs/voc.py', '/shared/run', NODES='4')
  assert out.startswith('sbatch ') and '--nodes=4' in out
  assert 'PAN_JAX_DISTRIBUTED=1' in out and '--signal=TERM@120' in out


def test_sweep_of_one_paper_table_names_each_run_after_its_row():
  commands = sweep.commands('configs/ablation.py', '/runs/ablation',
                            extra=('--config.model.init_from=/w',), table=3,
                            evaluate=True)
  assert len(commands) == 8  # Train + evaluate for each of the 4 rows.
  assert commands[0][1:] == [
      '-m', 'pan_jax.main', '--config=configs/ablation.py:t1_baseline',
      '--workdir=/runs/ablation/t1_baseline', '--config.model.init_from=/w']
  assert commands[1][1:] == ['-m', 'pan_jax.evaluate',
                             '--checkpoint=/runs/ablation/t1_baseline']
  assert [c[3] for c in commands[::2]] == [
      f'--config=configs/ablation.py:{row}' for row in
      ('t1_baseline', 't3_skip_3x3', 't3_gau_1x1', 't3_gau_3x3')]
  every = sweep.commands('configs/ablation.py', '/r')
  assert len(every) == 15  # Each network of Tables 1-3 once (10 + 2 + 3).
  try:
    sweep.commands('configs/demo.py', '/r', table=1)
  except ValueError as e:
    assert 'takes no table' in str(e)
  else:
    raise AssertionError('demo.py accepted --table')


def test_sweep_cli_table_flag():
  out = subprocess.run(
      [sys.executable, 'launch/sweep.py', 'configs/ablation.py', '--table=2',
       '--workdir_base=/tmp/a'], cwd=REPO, capture_output=True, text=True,
      check=True).stdout.splitlines()
  assert [line.split('--config=')[1].split()[0] for line in out] == [
      'configs/ablation.py:t2_ppm', 'configs/ablation.py:t2_aspp',
      'configs/ablation.py:t1_c357_avg_gp']
