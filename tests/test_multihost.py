"""Several processes on this machine, as on a pod, with data and runs in a bucket.

Each run below starts real processes of a pan_jax command joined by
jax.distributed over a coordinator on 127.0.0.1 (CPU devices, gloo), against
the local GCS server (tests/gcs_server.py); the dataset, the workdirs, the
pretrained weights, the export and the evaluation report live in its bucket.
The runs are module fixtures shared by the tests that check them; every
process is killed if a test fails or times out.

  pretrained  an inference checkpoint written into the bucket (this process)
  straight    2 processes x 4 devices (launch/local.sh), 6 steps from
              init_from=gs://.../pretrained, validation at the end
  one         1 process x 8 devices, the same config (local workdir)
  stopped     2 x 4 as straight, SIGTERM to process 1 after step 1, then
              the same command again to step 6
  evaluated   straight's checkpoint evaluated by 2 processes x 3 devices
              (13 images), the report written into the bucket
  exported    export and predict (1 process), from and into the bucket
  killed      2 x 1, kill -9 of process 1 after step 1
  (and tests/multihost_fault.py: a bug on process 0 of 2, not a lost one)

Gated like the other multi-process tests (PAN_JAX_TEST_MULTIPROCESS=1; CI
sets it): about 10 minutes on 2 busy cores, mostly compiling.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

from configs import smoke
import jax
import numpy as np
import pytest

import eval_standins
import gcs_server as gcs_lib
from pan_jax import paths
from pan_jax import sharding
from pan_jax import train
from pan_jax.checkpoints import exported
from pan_jax.checkpoints import workdir as workdir_lib
from pan_jax.data import pipeline

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get('PAN_JAX_TEST_MULTIPROCESS') != '1',
        reason='several processes compile in parallel (~10 min on 2 cores); '
        'set PAN_JAX_TEST_MULTIPROCESS=1 to run'),
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
NUM_VAL = 13
# Seconds any one run may take before its processes are killed.
RUN_TIMEOUT = 600


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Processes:
  """`count` processes of `python -m module args`, each with `devices` CPUs.

  Output goes to LOGS/process_<i>.log. Use as a context manager: whatever is
  still running at the end is killed.
  """

  def __init__(self, module, args, count, devices, logs, env):
    port = _free_port()
    os.makedirs(logs, exist_ok=True)
    self.logs = [os.path.join(logs, f'process_{i}.log') for i in range(count)]
    self.procs = []
    for index in range(count):
      process_env = dict(
          env, PAN_JAX_DISTRIBUTED='1', PAN_JAX_NUM_PROCESSES=str(count),
          PAN_JAX_PROCESS_ID=str(index),
          JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
          JAX_COORDINATOR_BIND_ADDRESS=f'127.0.0.1:{port}',
          XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
      with open(self.logs[index], 'wb') as log:
        self.procs.append(subprocess.Popen(
            [sys.executable, '-m', module, *args], cwd=REPO, env=process_env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True))

  def log(self, index):
    with open(self.logs[index], errors='replace') as f:
      return f.read()

  def wait_for(self, pattern, index=0, timeout=RUN_TIMEOUT):
    """Waits until process `index`'s log matches `pattern`."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, self.log(index)):
      dead = [i for i, p in enumerate(self.procs) if p.poll() is not None]
      assert not dead, (f'process(es) {dead} exited before {pattern!r}:\n' +
                        self.log(dead[0])[-3000:])
      assert time.monotonic() < deadline, f'no {pattern!r} in time'
      time.sleep(0.1)

  def wait(self, timeout=RUN_TIMEOUT):
    """Every process's exit status (all killed if one is not done in time)."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in self.procs:
      try:
        codes.append(p.wait(timeout=max(1, deadline - time.monotonic())))
      except subprocess.TimeoutExpired:
        self.kill()
        raise
    return codes

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.kill()


@pytest.fixture(scope='module')
def bucket(gcs_server, tmp_path_factory):
  """A bucket, the environment that reaches it (set here too), a tmp dir."""
  with pytest.MonkeyPatch.context() as patch:
    gcs_lib.apply_env(gcs_server.env(), patch)
    name = gcs_server.create_bucket(f'multihost-{os.getpid()}')
    tmp = tmp_path_factory.mktemp('multihost')
    env = dict(os.environ, **gcs_server.env(), JAX_PLATFORMS='cpu',
               JAX_DISABLE_MOST_OPTIMIZATIONS='1')
    env.pop('PAN_JAX_TRACEBACK', None)
    yield {'url': name, 'env': env, 'tmp': tmp}


@pytest.fixture(scope='module')
def dataset(bucket):  # pylint: disable=redefined-outer-name
  """The synthetic set (16 train, 13 val images) prepared into the bucket."""
  data_dir = f'{bucket["url"]}/data'
  result = subprocess.run(
      [sys.executable, '-m', 'pan_jax.data.prepare', '--dataset=synthetic',
       f'--source_dir={bucket["tmp"] / "source"}', f'--data_dir={data_dir}',
       '--num_train=16', f'--num_val={NUM_VAL}', '--num_workers=0',
       f'--cache_dir={bucket["tmp"] / "prepare_cache"}'], cwd=REPO,
      env=bucket['env'], capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'built synthetic at {data_dir}/synthetic/1.0.0' in result.stdout
  return data_dir


@pytest.fixture(scope='module')
def pretrained(bucket):  # pylint: disable=redefined-outer-name
  """An inference checkpoint of configs/smoke.py's network in the bucket."""
  _, config, meta, _, variables = eval_standins.smoke_workdir()
  path = f'{bucket["url"]}/pretrained'
  exported.save(path, config, meta, variables, step=0, source='test')
  return path, variables


def _train_args(workdir, data_dir, init_from, steps=STEPS, cache=None):
  args = ['--config=configs/smoke.py', f'--workdir={workdir}',
          '--config.data.name=synthetic', f'--config.data.data_dir={data_dir}',
          '--config.eval.canvas_size=(128, 128)',
          f'--config.total_steps={steps}', '--config.log_every_steps=1',
          '--config.eval_every_steps=0', '--config.checkpoint_every_steps=100',
          f'--config.model.init_from={init_from}']
  if cache:
    args.append(f'--config.data.cache_dir={cache}')
  return args


def _local_sh(bucket, args, logs, devices, module='pan_jax.main'):  # pylint: disable=redefined-outer-name
  """launch/local.sh: 2 processes of `module` with `devices` CPUs each."""
  num = 2
  result = subprocess.run(
      [os.path.join(REPO, 'launch', 'local.sh'), *args], cwd=REPO,
      env=dict(bucket['env'], PYTHON=sys.executable, LOG_DIR=str(logs),
               NUM_PROCESSES=str(num), DEVICES_PER_PROCESS=str(devices),
               MODULE=module),
      capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
  outputs = [(logs / f'process_{i}.log').read_text() for i in range(num)]
  assert result.returncode == 0, result.stderr + outputs[0][-4000:]
  return outputs


@pytest.fixture(scope='module')
def straight(bucket, dataset, pretrained):  # pylint: disable=redefined-outer-name
  workdir = f'{bucket["url"]}/straight'
  logs = bucket['tmp'] / 'straight'
  cache = bucket['tmp'] / 'cache'
  outputs = _local_sh(bucket, _train_args(workdir, dataset, pretrained[0],
                                          cache=cache), logs, devices=4)
  return {'workdir': workdir, 'outputs': outputs, 'cache': cache}


@pytest.fixture(scope='module')
def one(bucket, dataset, pretrained):  # pylint: disable=redefined-outer-name
  workdir = str(bucket['tmp'] / 'one')
  result = subprocess.run(
      [sys.executable, '-m', 'pan_jax.main',
       *_train_args(workdir, dataset, pretrained[0],
                    cache=bucket['tmp'] / 'cache')],
      cwd=REPO, env=dict(
          bucket['env'],
          XLA_FLAGS='--xla_force_host_platform_device_count=8'),
      capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  return {'workdir': workdir}


def _metrics(workdir):
  return [json.loads(line) for line in
          paths.read_text(os.path.join(workdir, train.METRICS_FILE))
          .splitlines()]


def _val_miou(workdir):
  return [m['val/miou'] for m in _metrics(workdir) if 'val/miou' in m]


def test_two_processes_train_as_one(straight, one, pretrained):  # pylint: disable=redefined-outer-name
  two, two_step = workdir_lib.restore_variables(straight['workdir'])
  single, single_step = workdir_lib.restore_variables(one['workdir'])
  assert two_step == single_step == STEPS
  # The same batches; sums in another order (as tests/test_train.py's 1 vs
  # 8 devices: ~1e-5 after these steps).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3,
                                                       atol=2e-4),
               two, single)
  # Not vacuous: training moved the parameters away from init_from's.
  moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), two['params'],
                       pretrained[1]['params'])
  assert max(jax.tree.leaves(moved)) > 1e-2
  # The same validation (13 images, counted once on either layout).
  two_miou, single_miou = _val_miou(straight['workdir']), _val_miou(
      one['workdir'])
  assert len(two_miou) == len(single_miou) == 1
  assert two_miou[0] == pytest.approx(single_miou[0], abs=1e-3)
  # Logs: the process on every line; process 1 says only the start line
  # and warnings; metrics come from process 0 alone (one line per step).
  zero, first = straight['outputs']
  assert 'Loaded the whole network from gs://' in zero
  assert re.search(r'\[process 0/2\] step 6/6 \| loss', zero)
  assert 'process 1/2, 4 local / 8 global devices' in first
  assert not re.search(r'^I.*\] \[process 1/2\]', first, re.M)
  assert [m['step'] for m in _metrics(straight['workdir'])
          if 'loss' in m] == list(range(1, STEPS + 1))
  # Each process saved its own iterator position.
  assert paths.listdir(f'{straight["workdir"]}/checkpoints/{STEPS}/'
                       'data_iter') == ['commit_success.txt',
                                        'process_0-of-2.json',
                                        'process_1-of-2.json']
  # The host's processes share one verified copy of the dataset.
  bucket_name = straight['workdir'].split('://', 1)[1].split('/', 1)[0]
  assert os.listdir(straight['cache'] / 'gs') == [bucket_name]


def test_a_two_process_checkpoint_restores_in_one_process(straight):  # pylint: disable=redefined-outer-name
  config = smoke.get_config()
  mesh = sharding.make_mesh()  # This process: 8 devices.
  _, init_fn, _ = train._programs(config, mesh, 6, 255)  # pylint: disable=protected-access
  abstract = init_fn.trace(jax.random.key(0)).out_info
  manager = workdir_lib.create_manager(straight['workdir'], config)
  try:
    assert manager.latest_step() == STEPS
    state = workdir_lib.restore_state(manager, STEPS, abstract)
    # The iterator state of 2 processes does not fit 1: it starts afresh.
    assert not workdir_lib.restore_data_iter(
        manager, STEPS, pipeline.build_train_iter(config))
  finally:
    manager.close()
  variables, _ = workdir_lib.restore_variables(straight['workdir'])
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(state.params), variables['params'])
  assert int(state.step) == STEPS


@pytest.fixture(scope='module')
def stopped(bucket, dataset, pretrained):  # pylint: disable=redefined-outer-name
  workdir = f'{bucket["url"]}/stopped'
  args = _train_args(workdir, dataset, pretrained[0],
                     cache=bucket['tmp'] / 'cache')
  with Processes('pan_jax.main', args, 2, 4, bucket['tmp'] / 'stopped',
                 bucket['env']) as first:
    first.wait_for(r'\] \[process 0/2\] step 1/6')
    first.procs[1].send_signal(signal.SIGTERM)
    codes = first.wait()
    logs = [first.log(0), first.log(1)]
  with Processes('pan_jax.main', args, 2, 4, bucket['tmp'] / 'resumed',
                 bucket['env']) as second:
    resumed_codes = second.wait()
    resumed = [second.log(0), second.log(1)]
  return {'workdir': workdir, 'codes': codes, 'logs': logs,
          'resumed_codes': resumed_codes, 'resumed': resumed}


def test_sigterm_to_one_process_stops_both_at_one_step(stopped):  # pylint: disable=redefined-outer-name
  assert stopped['codes'] == [0, 0], stopped['logs'][1][-3000:]
  steps = [re.findall(r'Stopped by .* after step (\d+); checkpoint saved',
                      log) for log in stopped['logs']]
  assert len(steps[0]) == len(steps[1]) == 1 and steps[0] == steps[1]
  saved = int(steps[0][0])
  assert 1 <= saved < STEPS
  # Process 1 got the signal; process 0 learnt it from the coordinator.
  # Each line names its process.
  for index, log in enumerate(stopped['logs']):
    assert re.search(rf'^W.*\] \[process {index}/2\] Stopped by a SIGTERM '
                     r'\(preemption notice\)', log, re.M)
  assert 'To resume, rerun the same command' in stopped['logs'][0]
  assert workdir_lib.restore_variables(stopped['workdir'], saved)[1] == saved


def test_resume_after_sigterm_is_bit_exact(stopped, straight):  # pylint: disable=redefined-outer-name
  assert stopped['resumed_codes'] == [0, 0], stopped['resumed'][0][-3000:]
  assert 'Resuming from the checkpoint of step' in stopped['resumed'][0]
  resumed, step = workdir_lib.restore_variables(stopped['workdir'])
  reference, _ = workdir_lib.restore_variables(straight['workdir'])
  assert step == STEPS
  jax.tree.map(np.testing.assert_array_equal, resumed, reference)
  # metrics.jsonl in the bucket: each step once, the resumed ones rewritten.
  assert [m['step'] for m in _metrics(stopped['workdir'])
          if 'loss' in m] == list(range(1, STEPS + 1))
  events = paths.listdir(f'{stopped["workdir"]}/{train.TENSORBOARD_DIR}')
  assert len(events) == 2 and all(e.startswith('events.out.tfevents.')
                                  for e in events)


def test_evaluation_on_two_processes_counts_each_image_once(bucket, straight):  # pylint: disable=redefined-outer-name
  output, show = f'{bucket["url"]}/eval', f'{bucket["url"]}/show'
  logs = bucket['tmp'] / 'evaluated'
  outputs = _local_sh(bucket, [
      f'--checkpoint={straight["workdir"]}', f'--output={output}',
      '--batch_size=6', '--num_overlays=2', f'--show_dir={show}',
      '--save_predictions',
      f'--config.data.cache_dir={bucket["tmp"] / "cache"}'], logs, devices=3,
                      module='pan_jax.evaluate')
  assert 'process 1/2, 3 local / 6 global devices' in outputs[1]
  assert f'report: {output}/report.json' in outputs[0]
  assert 'report:' not in outputs[1]  # Written by process 0 only.
  report = json.loads(paths.read_text(f'{output}/report.json'))
  assert report['num_images'] == NUM_VAL
  # The validation of training (8 devices) scored the same images alike.
  assert report['miou'] == pytest.approx(_val_miou(straight['workdir'])[0],
                                         abs=1e-3)
  # Every image's pictures, from both processes' shares, once each.
  names = [f'val_{i:06d}' for i in range(NUM_VAL)]
  # Process 0's first two images, by file name (tfds orders the records).
  overlays = paths.listdir(f'{output}/overlays')
  assert len(overlays) == 2 and {n[:-4] for n in overlays} <= set(names)
  assert sorted(paths.listdir(show)) == sorted(
      n + suffix for n in names for suffix in ('_color.png', '_panel.png'))
  assert sorted(paths.listdir(f'{output}/predictions')) == sorted(
      n + '.png' for n in names)


def test_export_and_predict_from_and_into_the_bucket(bucket, straight):  # pylint: disable=redefined-outer-name
  url = bucket['url']
  env = dict(bucket['env'], XLA_FLAGS='--xla_force_host_platform_device_count=1')

  def command(*args):
    result = subprocess.run([sys.executable, '-m', *args], cwd=REPO, env=env,
                            capture_output=True, text=True,
                            timeout=RUN_TIMEOUT, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result

  command('pan_jax.export', f'--checkpoint={straight["workdir"]}',
          f'--output={url}/export', '--platforms=cpu')
  assert paths.listdir(f'{url}/export') == [
      'config.json', 'dataset.json', 'export.json', 'model.json',
      'model.stablehlo', 'variables']
  variables = exported.read(f'{url}/export')[2]
  reference, _ = workdir_lib.restore_variables(straight['workdir'])
  jax.tree.map(np.testing.assert_array_equal, variables, reference)
  source = bucket['tmp'] / 'source'
  images = sorted((p for p in source.rglob('JPEGImages/*.jpg')))[:2]
  for image in images:
    paths.write_bytes(f'{url}/images/{image.name}', image.read_bytes())
  command('pan_jax.predict', f'--checkpoint={url}/export',
          f'--output={url}/predictions', f'{url}/images')
  assert paths.listdir(f'{url}/predictions') == sorted(
      f'{image.stem}{suffix}.png' for image in images
      for suffix in ('', '_color', '_overlay'))


def test_kill_9_of_one_process_stops_the_other_naming_it(bucket, dataset,
                                                          pretrained):  # pylint: disable=redefined-outer-name
  args = _train_args(str(bucket['tmp'] / 'killed'), dataset, pretrained[0],
                     steps=1000, cache=bucket['tmp'] / 'cache')
  with Processes('pan_jax.main', args, 2, 1, bucket['tmp'] / 'killed_logs',
                 bucket['env']) as run:
    run.wait_for(r'\] \[process 0/2\] step 1/1000')
    os.kill(run.procs[1].pid, signal.SIGKILL)
    # The bound (the heartbeat timeout is 20 s): a hang, not a speed.
    try:
      code = run.procs[0].wait(timeout=60)
    except subprocess.TimeoutExpired:
      pytest.fail('process 0 still runs 60 s after process 1 was killed')
    log = run.log(0)
  assert code != 0, code
  # The failed collective is reported at once, before the heartbeat timeout.
  assert re.search(r'pan_jax.main: error: process 0/2: JaxRuntimeError: .*'
                   r'asking the coordinator whether a process of this run '
                   r'is lost', log), log[-3000:]
  # Then the coordinator names process 1, and at that same moment jax's
  # error polling terminates process 0: the lost process is named by
  # pan_jax's line or, where jax's termination came first, by jax's.
  assert ('pan_jax.main: error: lost process 1 of 2' in log or re.search(
      r'Terminating process because the JAX distributed service detected '
      r'fatal errors.*stopped sending heartbeats\):\n1\n', log)), log[-3000:]


def test_a_bug_on_one_process_is_not_taken_for_a_lost_one(tmp_path):
  env = dict(os.environ, PAN_JAX_HEARTBEAT_TIMEOUT='5',
             PAN_JAX_SHUTDOWN_TIMEOUT='10',
             PYTHONPATH=os.path.join(REPO, 'tests'))
  with Processes('multihost_fault', [], 2, 1, tmp_path / 'logs', env) as run:
    # Process 0 waits for the coordinator's answer at most the heartbeat
    # timeout + 10 s (the live process 1 waits in a collective, it does
    # not ask), then raises the bug; it must not hang.
    try:
      codes = run.wait(timeout=120)
    except subprocess.TimeoutExpired:
      pytest.fail('still running 120 s after a bug on process 0')
    log = run.log(0)
  assert codes[0] != 0, codes
  assert ('multihost_fault: error: process 0/2: RuntimeError: a bug on '
          'process 0 only; asking the coordinator') in log, log[-3000:]
  assert 'RuntimeError: a bug on process 0 only' in log.split(
      'asking the coordinator', 1)[1], log[-3000:]
  assert 'lost process' not in log, log[-3000:]


def _all_reduce_bytes(hlo_text):
  """{element type: bytes} of every all-reduce in compiled HLO text."""
  sizes = {'f32': 4, 'bf16': 2, 'f16': 2, 's32': 4}
  found = {}
  for line in hlo_text.splitlines():
    parts = re.split(r' all-reduce(?:-start)?\(', line)
    if len(parts) < 2 or ' = ' not in parts[0]:
      continue
    for kind, dims in re.findall(r'\b(f32|bf16|f16|s32)\[([0-9,]*)\]',
                                 parts[0].split(' = ', 1)[1]):
      count = int(np.prod([int(d) for d in dims.split(',') if d]))
      found[kind] = found.get(kind, 0) + count * sizes[kind]
  return found


def test_the_scaling_arithmetic_of_the_readme():
  """README "Pods and buckets" computes from these: the parameter counts of
  configs/voc.py and configs/smp_pan.py, and one float32 all-reduce of the
  gradients per step whatever compute_dtype is."""
  from configs import smp_pan  # pylint: disable=g-import-not-at-top
  from configs import voc  # pylint: disable=g-import-not-at-top
  from pan_jax import models  # pylint: disable=g-import-not-at-top
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = f.read()
  for module in (voc, smp_pan):
    config = module.get_config()
    model = models.create_model(config, num_classes=21)
    crop = config.data.crop_size
    shapes = jax.eval_shape(lambda m=model, c=crop: m.init(
        jax.random.key(0), jax.numpy.zeros((1, c, c, 3)), train=False))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
        shapes['params']))
    assert f'| {count:,} |' in readme, (module.__name__, count)
  mesh = sharding.make_mesh()
  batch = {key: jax.ShapeDtypeStruct(shape, dtype,
                                     sharding=sharding.batch_sharding(mesh))
           for key, shape, dtype in (('image', (8, 64, 64, 3), np.float32),
                                     ('label', (8, 64, 64), np.int32))}
  for dtype in ('float32', 'bfloat16'):
    config = smoke.get_config()
    config.compute_dtype = dtype
    _, init_fn, step_fn = train._programs(config, mesh, 6, 255)  # pylint: disable=protected-access
    state = init_fn.trace(jax.random.key(0)).out_info
    reduced = _all_reduce_bytes(step_fn.lower(state, batch).compile().as_text())
    parameter_bytes = 4 * sum(x.size for x in jax.tree.leaves(state.params))
    assert set(reduced) == {'f32'}, (dtype, reduced)
    # The gradients, plus the synchronised BatchNorm sums (~1 %).
    assert parameter_bytes <= reduced['f32'] <= 1.02 * parameter_bytes
