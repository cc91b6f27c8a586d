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
    ('', runtime.cpu_xla_flags()),
    ('--xla_force_host_platform_device_count=8',
     '--xla_force_host_platform_device_count=8 ' + runtime.cpu_xla_flags()),
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


def test_this_jaxlib_knows_the_cpu_flags():
  # The tested jaxlib (constraints.txt) gets the whole tuning, and the
  # search does not find just any name.
  assert runtime.cpu_xla_flags() == runtime.CPU_XLA_FLAGS
  names = ['xla_cpu_experimental_ynn_fusion_type', 'xla_backend_extra_options',
           'xla_cpu_flag_pan_jax_made_up']
  assert runtime.known_xla_flags(names) == set(names[:2])


def test_flags_unknown_to_jaxlib_are_left_out(tmp_path, monkeypatch):
  # A jaxlib whose XLA knows only one of the two flags (as an older or newer
  # one may): only that one is set, and XLA starts.
  (tmp_path / 'libxla_stand_in.so').write_bytes(
      b'\x7fELF...--xla_backend_extra_options\x00xla_cpu_use_thunk_runtime')
  (tmp_path / 'empty.so').write_bytes(b'')
  assert runtime.known_xla_flags(
      ['xla_backend_extra_options', 'xla_cpu_experimental_ynn_fusion_type'],
      library_dir=str(tmp_path)) == {'xla_backend_extra_options'}
  real = runtime.known_xla_flags
  monkeypatch.setattr(runtime, 'known_xla_flags', lambda names: real(
      names, library_dir=str(tmp_path)))
  runtime.cpu_xla_flags.cache_clear()
  try:
    chosen = runtime.cpu_xla_flags()
    monkeypatch.setenv('XLA_FLAGS', '')
    runtime.set_cpu_flags()
    assert os.environ['XLA_FLAGS'] == chosen == (
        '--xla_backend_extra_options=xla_cpu_use_multi_output_fusion')
  finally:
    runtime.cpu_xla_flags.cache_clear()


def _start_xla(xla_flags):
  return subprocess.run(
      [sys.executable, '-c',
       'import jax; jax.numpy.ones(1).block_until_ready()'],
      env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags),
      capture_output=True, text=True, timeout=120, check=False)


def test_xla_starts_with_the_chosen_flags_and_aborts_on_unknown_ones():
  started = _start_xla(runtime.cpu_xla_flags())
  assert started.returncode == 0, started.stderr
  # Why the check exists: an unknown flag kills the process.
  aborted = _start_xla('--xla_cpu_flag_pan_jax_made_up=1')
  assert aborted.returncode != 0
  assert 'Unknown flag in XLA_FLAGS' in aborted.stderr


def test_library_noise_is_dropped_and_the_rest_kept():
  # pylint: disable=g-import-not-at-top
  import logging as py_logging
  from absl import logging as absl_logging
  # pylint: enable=g-import-not-at-top
  runtime.quiet_library_logs()
  runtime.quiet_library_logs()  # Idempotent: one filter.
  logger = absl_logging.get_absl_logger()

  def record(message, level=py_logging.WARNING):
    return py_logging.LogRecord('absl', level, 'image_feature.py', 1,
                                message, (), None)

  assert not logger.filter(record('OpenCV is not installed. We recommend'))
  assert logger.filter(record('a warning that matters'))
  assert sum(f is runtime.quiet_library_logs or 'opencv' in getattr(
      f, '__name__', '') for f in logger.filters) == 1
