"""Tests of pan_jax.runtime: the start-up and error reporting of every command."""

import os
import subprocess
import sys

import pytest

from pan_jax import errors
from pan_jax import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(*args, **env):
  return subprocess.run(
      [sys.executable, '-m', *args], cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS='cpu', **env), capture_output=True,
      text=True, timeout=300, check=False)


def test_a_user_error_is_one_line_without_traceback(tmp_path):
  missing = tmp_path / 'missing'
  result = _command('pan_jax.export', f'--checkpoint={missing}',
                    f'--output={tmp_path / "out"}')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f"pan_jax.export: error: checkpoint directory '{missing}' does not "
      'exist')
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'out')
  # For a bug report the traceback is one variable away.
  result = _command('pan_jax.export', f'--checkpoint={missing}',
                    f'--output={tmp_path / "out"}', PAN_JAX_TRACEBACK='1')
  assert result.returncode != 0 and 'Traceback' in result.stderr


@pytest.mark.parametrize('user_flags, expected', [
    ('', runtime.CPU_XLA_FLAGS),
    ('--xla_force_host_platform_device_count=8',
     '--xla_force_host_platform_device_count=8 ' + runtime.CPU_XLA_FLAGS),
    # The user chose CPU options: they are kept as they are.
    ('--xla_cpu_use_thunk_runtime=false', '--xla_cpu_use_thunk_runtime=false'),
])
def test_cpu_flags_respect_the_user(monkeypatch, user_flags, expected):
  monkeypatch.setenv('XLA_FLAGS', user_flags)
  runtime.set_cpu_flags()
  assert os.environ['XLA_FLAGS'] == expected


def test_distributed_arguments_from_the_environment():
  assert runtime.distributed_arguments({}) == {
      'heartbeat_timeout_seconds': 20, 'shutdown_timeout_seconds': 60,
      'initialization_timeout': 300}
  arguments = runtime.distributed_arguments({
      'PAN_JAX_NUM_PROCESSES': '4', 'PAN_JAX_PROCESS_ID': '0',
      'PAN_JAX_HEARTBEAT_TIMEOUT': '7'})
  assert arguments['num_processes'] == 4 and arguments['process_id'] == 0
  assert arguments['heartbeat_timeout_seconds'] == 7
  for variable, value in (('PAN_JAX_HEARTBEAT_TIMEOUT', '0'),
                          ('PAN_JAX_NUM_PROCESSES', 'two'),
                          ('PAN_JAX_PROCESS_ID', '-1')):
    with pytest.raises(errors.UsageError,
                       match=f'{variable}={value!r}'):
      runtime.distributed_arguments({variable: value})


def test_a_single_process_has_lost_nobody():
  assert runtime.lost_processes() == ''
