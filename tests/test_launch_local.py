"""Tests for launch/local.sh: N processes of pan_jax.main on this machine.

The failure and signal cases use a stand-in interpreter (PYTHON=a bash
script) so they take seconds; real multi-process runs through it (training
and evaluation) are in tests/test_multihost.py.
"""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'launch', 'local.sh')


def _launch(env, *args, timeout=120):
  return subprocess.run([SCRIPT, *args], cwd=REPO, env=dict(os.environ, **env),
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def _stand_in(tmp_path, body):
  """A PYTHON for local.sh: records its pid and argv, then runs `body`."""
  path = tmp_path / 'python'
  path.write_text(
      '#!/usr/bin/env bash\n'
      f'dir={shlex.quote(str(tmp_path))}\n'
      'echo $$ > "$dir/pid_$PAN_JAX_PROCESS_ID"\n'
      'env | grep -E "^(PAN_JAX|JAX_|XLA_FLAGS)" | sort'
      ' > "$dir/env_$PAN_JAX_PROCESS_ID"\n'
      f'{body}\n')
  path.chmod(0o755)
  return str(path)


def _pids(tmp_path, count):
  return [int((tmp_path / f'pid_{i}').read_text()) for i in range(count)]


def test_dry_run_prints_one_command_per_process():
  result = _launch({'DRY_RUN': '1', 'NUM_PROCESSES': '3',
                    'DEVICES_PER_PROCESS': '2', 'PYTHON': '/opt/py/python'},
                   '--config=configs/smoke.py', '--workdir=/runs/a b',
                   '--config.total_steps=2')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 3
  ports = set()
  for index, line in enumerate(lines):
    words = shlex.split(line)
    assert words[:3] == ['cd', REPO, '&&']
    assert words[3] == 'env'
    env = dict(w.split('=', 1) for w in words[4:11])
    assert env['PAN_JAX_DISTRIBUTED'] == '1'
    assert env['PAN_JAX_NUM_PROCESSES'] == '3'
    assert env['PAN_JAX_PROCESS_ID'] == str(index)
    assert env['JAX_PLATFORMS'] == 'cpu'
    # conftest's device count is replaced, not kept.
    assert env['XLA_FLAGS'] == '--xla_force_host_platform_device_count=2'
    host, port = env['JAX_COORDINATOR_ADDRESS'].split(':')
    assert host == '127.0.0.1' and int(port) > 0
    assert env['JAX_COORDINATOR_BIND_ADDRESS'] == f'127.0.0.1:{port}'
    ports.add(port)
    assert words[11:] == ['/opt/py/python', '-m', 'pan_jax.main',
                          '--config=configs/smoke.py', '--workdir=/runs/a b',
                          '--config.total_steps=2']
  assert len(ports) == 1  # One coordinator for all.


def test_dry_run_of_another_command():
  result = _launch({'DRY_RUN': '1', 'MODULE': 'pan_jax.evaluate',
                    'PYTHON': '/py'}, '--checkpoint=gs://b/run')
  for line in result.stdout.splitlines():
    assert shlex.split(line)[-4:] == ['/py', '-m', 'pan_jax.evaluate',
                                      '--checkpoint=gs://b/run']


def test_dry_run_keeps_the_users_xla_flags_and_port():
  result = _launch({'DRY_RUN': '1', 'COORDINATOR_PORT': '4321',
                    'XLA_FLAGS': '--xla_force_host_platform_device_count=8 '
                                 '--xla_dump_to=/tmp/d'}, '--workdir=w')
  lines = result.stdout.splitlines()
  assert len(lines) == 2  # NUM_PROCESSES defaults to 2.
  assert 'JAX_COORDINATOR_ADDRESS=127.0.0.1:4321' in lines[0]
  assert ('XLA_FLAGS=--xla_dump_to=/tmp/d '
          '--xla_force_host_platform_device_count=4') in shlex.split(lines[1])


@pytest.mark.parametrize('name,value', [('NUM_PROCESSES', '0'),
                                        ('DEVICES_PER_PROCESS', 'two'),
                                        ('KILL_AFTER', '-1')])
def test_bad_settings_are_refused(name, value):
  result = _launch({'DRY_RUN': '1', name: value}, '--workdir=w')
  assert result.returncode == 2
  assert f'{name}={value}' in result.stderr and result.stdout == ''


def test_every_process_gets_its_environment(tmp_path):
  python = _stand_in(tmp_path, 'exit 0')
  result = _launch({'PYTHON': python, 'NUM_PROCESSES': '2',
                    'DEVICES_PER_PROCESS': '3',
                    'LOG_DIR': str(tmp_path / 'logs')}, '--workdir=w')
  assert result.returncode == 0, result.stderr
  # LOG_DIR has each process's pid (to signal one of them).
  assert [int((tmp_path / 'logs' / f'process_{i}.pid').read_text())
          for i in (0, 1)] == _pids(tmp_path, 2)
  envs = [(tmp_path / f'env_{i}').read_text().splitlines() for i in (0, 1)]
  for index, env in enumerate(envs):
    assert f'PAN_JAX_PROCESS_ID={index}' in env
    assert 'PAN_JAX_NUM_PROCESSES=2' in env and 'PAN_JAX_DISTRIBUTED=1' in env
    assert 'XLA_FLAGS=--xla_force_host_platform_device_count=3' in env
  address = [l for l in envs[0] if l.startswith('JAX_COORDINATOR_ADDRESS=')]
  assert address and address[0] in envs[1]


def test_a_failing_process_stops_the_others(tmp_path):
  # Process 1 fails at once; process 0 would run for 10 minutes.
  python = _stand_in(tmp_path, '[ "$PAN_JAX_PROCESS_ID" = 1 ] && '
                     '{ sleep 1; exit 3; }\nsleep 600 & wait')
  result = _launch({'PYTHON': python, 'NUM_PROCESSES': '3'}, '--workdir=w',
                   timeout=60)
  assert result.returncode == 3
  assert 'process 1' in result.stderr and 'status 3' in result.stderr
  assert 'stopping the other 2' in result.stderr
  assert not any(_alive(pid) for pid in _pids(tmp_path, 3))


def test_pan_jax_waiting_for_a_failed_peer_is_stopped(tmp_path):
  # Process 0 is the real command, waiting in jax.distributed.initialize for
  # process 1, which fails once process 0 is there.
  log = shlex.quote(str(tmp_path / 'logs' / 'process_0.log'))
  python = _stand_in(
      tmp_path, '[ "$PAN_JAX_PROCESS_ID" = 1 ] && {\n'
      '  for _ in $(seq 600); do\n'
      f'    grep -q "Connecting to JAX distributed" {log} && exit 4\n'
      '    sleep 0.1\n'
      '  done\n'
      '  exit 9\n'
      '}\n'
      f'exec {shlex.quote(sys.executable)} "$@"')
  result = _launch({'PYTHON': python, 'DEVICES_PER_PROCESS': '1',
                    'LOG_DIR': str(tmp_path / 'logs')},
                   '--config=configs/smoke.py',
                   f'--workdir={tmp_path / "run"}', timeout=120)
  assert result.returncode == 4, result.stderr
  assert 'process 1' in result.stderr and 'stopping the other 1' in (
      result.stderr)
  assert not _alive(_pids(tmp_path, 1)[0])
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_a_process_that_ignores_sigterm_is_killed(tmp_path):
  python = _stand_in(tmp_path, '[ "$PAN_JAX_PROCESS_ID" = 1 ] && exit 5\n'
                     "trap '' TERM\nsleep 600 & wait")
  result = _launch({'PYTHON': python, 'KILL_AFTER': '1'}, '--workdir=w',
                   timeout=60)
  assert result.returncode == 5, result.stderr
  assert not any(_alive(pid) for pid in _pids(tmp_path, 2))


def test_sigterm_reaches_every_process(tmp_path):
  # Each process writes a file when SIGTERM arrives, then exits 0, as
  # pan_jax.main does after saving a checkpoint.
  python = _stand_in(tmp_path, 'trap \'touch "$dir/term_$PAN_JAX_PROCESS_ID";'
                     ' exit 0\' TERM\nsleep 600 & wait')
  launcher = subprocess.Popen(
      [SCRIPT, '--workdir=w'], cwd=REPO, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, PYTHON=python))
  try:
    deadline = time.monotonic() + 30
    while not all((tmp_path / f'pid_{i}').exists() for i in (0, 1)):
      assert time.monotonic() < deadline, 'the processes did not start'
      time.sleep(0.05)
    time.sleep(0.5)  # Let both reach their trap.
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=30)
  finally:
    launcher.kill()
  assert launcher.returncode == 0, stderr
  assert 'SIGTERM received' in stderr
  assert all((tmp_path / f'term_{i}').exists() for i in (0, 1))
  assert not any(_alive(pid) for pid in _pids(tmp_path, 2))
