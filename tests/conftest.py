"""Test set-up: CPU only, 8 fake devices, fast compiles.

The environment must be set before jax is imported anywhere, which is why it
happens at the top of conftest (pytest imports it before any test module).
"""

import os

os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') +
    ' --xla_force_host_platform_device_count=8').strip()

# The local GCS server's fixtures (gcs_server, gcs_bucket) for every test.
from gcs_server import gcs_bucket, gcs_server  # pylint: disable=g-import-not-at-top,unused-import
import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

# Tests compile many tiny programs; optimisation time dominates their run time.
jax.config.update('jax_disable_most_optimizations', True)
jax.config.update('jax_threefry_partitionable', True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), 'shared', 'data')


def pytest_collection_modifyitems(config, items):
  """Tests marked `slow` run only with PAN_JAX_TEST_SLOW=1 (launch/test.sh --all)."""
  del config
  if os.environ.get('PAN_JAX_TEST_SLOW') == '1':
    return
  skip = pytest.mark.skip(
      reason='slow (a training, multi-scale or end-to-end program; minutes on '
      '2 cores): launch/test.sh --all or PAN_JAX_TEST_SLOW=1 runs it')
  for item in items:
    if 'slow' in item.keywords:
      item.add_marker(skip)


@pytest.fixture
def shared_data():
  """Path of ../shared/data (real VOC / Cityscapes samples); skips if absent."""
  if not os.path.isdir(SHARED_DATA):
    pytest.skip(f'{SHARED_DATA} not present')
  return SHARED_DATA
