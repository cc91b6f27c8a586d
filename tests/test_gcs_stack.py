"""What the stack can do on gs://, probed against a local GCS server.

These pin down, as regression tests, the facts the library's gs:// support
is built on (etils.epath over gcsfs, Orbax over tensorstore, tensorboardX
over google-cloud-storage, tfds/array_record over google-cloud-cpp), and
check the two tree copies the library builds on them (pan_jax/paths.py): a
dataset upload that commits atomically (GCS cannot rename a prefix) and a
verified copy in a local cache. Each test prints its timings ([gcs] lines, -s shows
them); none asserts on them.

Needs requirements-gcs.txt; skipped without it (see gcs_server.py).
"""

import base64
import os
import struct
import subprocess
import sys
import threading
import time

from etils import epath
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pan_jax import paths
from pan_jax.data import prepare

pytest.importorskip('gcsfs', reason='pip install -r requirements-gcs.txt')
google_crc32c = pytest.importorskip(
    'google_crc32c', reason='pip install -r requirements-gcs.txt')


class _Timer:
  """Prints '[gcs] test: what took S s' lines."""

  def __init__(self, name):
    self._name = name

  def __call__(self, what):
    return _Span(self._name, what)


class _Span:

  def __init__(self, name, what):
    self._label = f'{name}: {what}'

  def __enter__(self):
    self._start = time.perf_counter()

  def __exit__(self, *exc):
    print(f'[gcs] {self._label} took '
          f'{time.perf_counter() - self._start:.3f} s')


@pytest.fixture
def timer(request):
  return _Timer(request.node.name)


def _fs():
  """The gcsfs instance etils.epath uses (its listing cache included)."""
  return epath.backend.fsspec_backend.fs('gs://')


# ------------------------------------------------------------------ epath --
def test_epath_file_operations(gcs_bucket, timer):
  root = epath.Path(gcs_bucket) / 'run'
  with timer('first write (opens the session)'):
    (root / 'a.txt').write_text('alpha')
  with timer('write, read, listdir, glob'):
    (root / 'sub').mkdir(parents=True, exist_ok=True)  # No-op on GCS.
    (root / 'sub' / 'b.json').write_bytes(b'{"b": 1}')
    assert (root / 'a.txt').read_text() == 'alpha'
    assert sorted(p.name for p in root.iterdir()) == ['a.txt', 'sub']
    assert root.is_dir() and (root / 'sub').is_dir()
    assert not (root / 'a.txt').is_dir()
    assert [p.name for p in root.glob('*.txt')] == ['a.txt']
    assert [p.name for p in root.glob('sub/*.json')] == ['b.json']
    assert (root / 'sub' / 'b.json').stat().length == 8
  with timer('rename a file'):
    (root / 'a.txt').rename(root / 'c.txt')
  assert not (root / 'a.txt').exists()
  assert (root / 'c.txt').read_text() == 'alpha'
  with timer('rename a prefix (a copy and a delete per object)'):
    (root / 'sub').rename(root / 'moved')
  assert (root / 'moved' / 'b.json').read_bytes() == b'{"b": 1}'
  assert not (root / 'sub').exists()
  # Recursive globs are refused on gs:// (one request per "directory").
  with pytest.raises(NotImplementedError, match='Recursive'):
    list(root.rglob('*'))
  with timer('rmtree'):
    root.rmtree()
  assert not root.exists()


def test_append_mode_overwrites(gcs_bucket):
  """GCS objects cannot be appended to: gcsfs turns 'a' into 'w' with only a
  warning, so an appended log (metrics.jsonl) would keep its last line."""
  path = epath.Path(gcs_bucket) / 'metrics.jsonl'
  path.write_text('{"step": 1}\n')
  with pytest.warns(UserWarning, match='Append mode'):
    with path.open('a') as f:
      f.write('{"step": 2}\n')
  assert path.read_text() == '{"step": 2}\n'


def test_pil_writes_through_an_open_file_only(gcs_bucket):
  """PIL takes a gs:// path for a local one; an epath file object works."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
  path = epath.Path(gcs_bucket) / 'out' / 'x.png'
  with pytest.raises(FileNotFoundError):
    image.save(path)
  with path.open('wb') as f:
    image.save(f, format='PNG')
  with path.open('rb') as f:
    np.testing.assert_array_equal(np.asarray(Image.open(f)),
                                  np.asarray(image))


def test_epath_resolve_is_not_for_urls():
  """Path.resolve() treats gs://b/x as a relative local path: the library's
  'make absolute' must leave URLs alone (checkpointing's _absolute does)."""
  resolved = os.fspath(epath.Path('gs://bucket/run').resolve())
  assert resolved != 'gs://bucket/run'
  assert resolved.endswith('gs:/bucket/run')


def test_listing_cache_hides_other_processes_writes(gcs_bucket):
  """gcsfs caches listings: after a listing, a file written by another
  process is invisible to listdir() AND exists() in this one, until
  invalidate_cache() (or with use_listings_cache=False)."""
  folder = epath.Path(gcs_bucket) / 'shared'
  (folder / 'mine').write_text('0')
  assert [p.name for p in folder.iterdir()] == ['mine']
  subprocess.run(
      [sys.executable, '-c', 'import sys; from etils import epath; '
       'epath.Path(sys.argv[1]).write_text("1")', str(folder / 'theirs')],
      check=True, timeout=120)
  assert [p.name for p in folder.iterdir()] == ['mine']
  assert not (folder / 'theirs').exists()
  _fs().invalidate_cache()
  assert sorted(p.name for p in folder.iterdir()) == ['mine', 'theirs']
  assert (folder / 'theirs').exists()
  # A subprocess configured without the cache sees what others write.
  script = '\n'.join([
      'import subprocess, sys',
      'from etils import epath',
      'folder = epath.Path(sys.argv[1])',
      'assert len(list(folder.iterdir())) == 2',
      'subprocess.run([sys.executable, "-c", "import sys; from etils import'
      ' epath; epath.Path(sys.argv[1]).write_text(\'2\')",'
      ' str(folder / "third")], check=True)',
      'print(sorted(p.name for p in folder.iterdir()))'])
  out = subprocess.run(
      [sys.executable, '-c', script, str(folder)], check=True, timeout=120,
      capture_output=True, text=True,
      env=dict(os.environ, FSSPEC_GCS='{"use_listings_cache": false}'))
  assert out.stdout.strip() == "['mine', 'theirs', 'third']"


# ------------------------------------------------------------------ Orbax --
def _state(mesh):
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  return {
      'params': {'w': jax.device_put(np.arange(12.0).reshape(3, 4),
                                     replicated),
                 'b': jax.device_put(np.ones(4, np.float32), replicated)},
      'batch_stats': {'mean': jax.device_put(np.full(4, 0.5), replicated)},
      'step': jax.device_put(np.int32(7), replicated),
  }


def _manager(directory, create):
  """A CheckpointManager with pan_jax's two items (checkpointing.py)."""
  return ocp.CheckpointManager(
      directory, item_names=('state', 'data_iter'),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                     'data_iter': grain.checkpoint.CheckpointHandler()},
      options=ocp.CheckpointManagerOptions(
          save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(1),
          preservation_policy=ocp.checkpoint_managers.LatestN(2),
          enable_async_checkpointing=True, create=create))


def test_checkpoint_manager_state_and_grain_iterator(gcs_bucket, timer):
  directory = f'{gcs_bucket}/run/checkpoints'
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  state = _state(mesh)
  dataset = grain.MapDataset.range(50).shuffle(seed=3).to_iter_dataset()
  iterator = iter(dataset)
  manager = _manager(directory, create=True)
  with timer('3 async saves (state + data_iter) and wait'):
    for step in (1, 2, 3):
      next(iterator)
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(state),
          data_iter=grain.checkpoint.CheckpointSave(iterator)), force=True)
    manager.wait_until_finished()
  manager.close()
  expected_next = next(iterator)

  names = sorted(p.name for p in (epath.Path(directory) / '3').iterdir())
  assert names == ['_CHECKPOINT_METADATA', 'commit_success.txt', 'data_iter',
                   'state']
  assert [p.name for p in (epath.Path(directory) / '3' / 'data_iter'
                           ).iterdir()] == ['commit_success.txt',
                                            'process_0-of-1.json']
  with timer('reopen, latest_step, all_steps'):
    manager = _manager(directory, create=False)
    assert manager.latest_step() == 3
    assert manager.all_steps() == [2, 3]  # LatestN(2) deleted step 1.
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state)
  with timer('restore state onto shardings'):
    restored = manager.restore(3, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=ocp.checkpoint_utils.construct_restore_args(
                abstract))))['state']
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert restored['params']['w'].sharding == state['params']['w'].sharding
  with timer('restore the grain iterator'):
    fresh = iter(dataset)
    manager.restore(3, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  assert next(fresh) == expected_next
  with timer('partial NumPy restore of params (restore_variables)'):
    tree = manager.item_metadata(3)['state']
    tree = getattr(tree, 'tree', tree)
    wanted = {'params': tree['params']}
    partial = manager.restore(3, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=wanted, partial_restore=True,
            restore_args=jax.tree.map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                wanted))))['state']
  manager.close()
  assert isinstance(partial['params']['w'], np.ndarray)
  np.testing.assert_array_equal(partial['params']['w'],
                                np.arange(12.0).reshape(3, 4))


def test_standard_checkpointer(gcs_bucket, timer):
  path = epath.Path(gcs_bucket) / 'export' / 'variables'
  variables = {'params': {'w': np.arange(6.0).reshape(2, 3)},
               'batch_stats': {'var': np.ones(3, np.float32)}}
  checkpointer = ocp.StandardCheckpointer()
  with timer('save and wait'):
    checkpointer.save(path, variables)
    checkpointer.wait_until_finished()
  with timer('metadata and NumPy restore'):
    metadata = checkpointer.metadata(path).item_metadata
    tree = getattr(metadata, 'tree', metadata)
    target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree)
    restored = checkpointer.restore(path, target)
  checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal, restored, variables)


# ------------------------------------------------------------ tensorboard --
def _read_events(data):
  """The Event protos of a TFRecord-framed events file."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  events, offset = [], 0
  while offset < len(data):
    length, = struct.unpack('<Q', data[offset:offset + 8])
    offset += 12  # length and its masked crc
    events.append(event_pb2.Event.FromString(data[offset:offset + length]))
    offset += length + 4  # data and its masked crc
  return events


def test_tensorboardx_writes_events(gcs_bucket, timer):
  logdir = f'{gcs_bucket}/run/tensorboard'
  # In a subprocess: tensorboardX keeps every writer alive until exit (an
  # atexit hook), and its GCS file uploads itself once more when collected
  # at exit -- that must happen while the server is up (against a server
  # that is gone it retries for 120 s).
  script = '\n'.join([
      'import sys, tensorboardX',
      'writer = tensorboardX.SummaryWriter(sys.argv[1], purge_step=1)',
      'for step in range(1, 6):',
      '  writer.add_scalar("train/loss", 1.0 / step, step)',
      '  writer.flush()  # Each flush uploads the whole file again.',
      'writer.close()'])
  with timer('subprocess: SummaryWriter, 5 scalars each flushed, exit'):
    subprocess.run([sys.executable, '-c', script, logdir], check=True,
                   timeout=300)
  files = list(epath.Path(logdir).iterdir())
  assert len(files) == 1 and files[0].name.startswith('events.out.tfevents.')
  scalars = [(e.step, v.simple_value) for e in _read_events(
      files[0].read_bytes()) for v in e.summary.value]
  assert [s for s, _ in scalars] == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([v for _, v in scalars],
                             [1.0 / s for s in range(1, 6)], rtol=1e-6)


# ------------------------------------------------------- tfds and copies --
def _crc32c(path):
  """base64 CRC32C of a local file, as GCS reports it."""
  checksum = google_crc32c.Checksum()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      checksum.update(chunk)
  return base64.b64encode(checksum.digest()).decode()


def _local_files(local_dir):
  """Every file under local_dir but the copy's manifest, relative, sorted."""
  out = []
  for root, _, names in os.walk(local_dir):
    out.extend(os.path.relpath(os.path.join(root, n), local_dir)
               for n in names if n != '.pan_jax_copy.json')
  return sorted(out)


@pytest.fixture(scope='module')
def built_dataset(tmp_path_factory):
  """A tiny synthetic dataset built locally: (data_dir, dataset dir)."""
  root = tmp_path_factory.mktemp('synthetic')
  path, *_ = prepare.prepare('synthetic', str(root / 'src'),
                             str(root / 'data'), num_train=6, num_val=3)
  return str(root / 'data'), path


def _first_example(dataset_dir, split='train'):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.builder_from_directory(dataset_dir).as_data_source(split=split)
  return len(source), source[0]


def test_tfds_reads_array_record_from_gcs(gcs_bucket, built_dataset, timer):
  """tfds reads a gs:// copy directly: array_record's reader has its own
  GCS client (google-cloud-cpp, CLOUD_STORAGE_EMULATOR_ENDPOINT here)."""
  _, local = built_dataset
  remote = f'{gcs_bucket}/data/synthetic/1.0.0'
  with timer('upload the dataset (fs.put, recursive)'):
    _fs().put(local + '/', remote + '/', recursive=True)
  with timer('builder_from_directory + as_data_source + [0]'):
    size, example = _first_example(remote)
  local_size, local_example = _first_example(local)
  assert size == local_size == 6
  for key in ('image', 'label'):
    np.testing.assert_array_equal(example[key], local_example[key])
  assert example['file_name'] == local_example['file_name']


def test_array_record_cannot_write_to_gcs(gcs_bucket):
  """Why `prepare` must build locally and upload: the writer opens local
  files only."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  with pytest.raises(RuntimeError, match='Failed to create the file header'):
    writer = array_record_module.ArrayRecordWriter(
        f'{gcs_bucket}/x.array_record', 'group_size:1')
    writer.write(b'record')
    writer.close()


def test_upload_commits_last_and_download_verifies(gcs_bucket, built_dataset,
                                                   tmp_path, timer,
                                                   monkeypatch):
  """paths.upload_tree / paths.mirror, the copies builder.py makes."""
  _, local = built_dataset
  remote = f'{gcs_bucket}/data/synthetic/1.0.0'
  marker = 'dataset_info.json'  # What builder.built_dir looks for.
  # An upload that dies half way leaves no marker: readers see no dataset.
  fs = _fs()
  real_put, calls = fs.put_file, []

  def failing_put(lpath, rpath, *args, **kwargs):
    calls.append(rpath)
    if len(calls) == 3:
      raise ConnectionError('simulated interruption')
    return real_put(lpath, rpath, *args, **kwargs)

  monkeypatch.setattr(fs, 'put_file', failing_put)
  with pytest.raises(ConnectionError):
    paths.upload_tree(local, remote, marker)
  monkeypatch.undo()
  assert not paths.exists(f'{remote}/{marker}')
  assert len(paths.listdir(remote)) == 2
  with pytest.raises(FileNotFoundError, match='not a complete upload'):
    paths.mirror(remote, str(tmp_path / 'cache' / 'synthetic'), marker)

  with timer('upload_tree (verified, marker last)'):
    paths.upload_tree(local, remote, marker)
  cache = str(tmp_path / 'cache' / 'synthetic')
  with timer('mirror (verified, renamed into place)'):
    assert paths.mirror(remote, cache, marker)
  assert _local_files(cache) == _local_files(local)
  for rel in _local_files(local):
    assert _crc32c(os.path.join(cache, rel)) == _crc32c(
        os.path.join(local, rel))
  with timer('mirror of a current copy (one listing)'):
    assert not paths.mirror(remote, cache, marker)
  assert _first_example(cache)[1]['file_name'] == _first_example(
      local)[1]['file_name']
  # The remote changed (a rebuild): the copy is replaced.
  features = epath.Path(remote) / 'features.json'
  features.write_bytes(features.read_bytes() + b' ')
  assert paths.mirror(remote, cache, marker)
  assert os.path.getsize(os.path.join(cache, 'features.json')) == (
      os.path.getsize(os.path.join(local, 'features.json')) + 1)
  # A truncated local file makes the copy out of date too.
  with open(os.path.join(cache, 'features.json'), 'wb'):
    pass
  assert paths.mirror(remote, cache, marker)
  paths.upload_tree(local, remote, marker)

  # Four concurrent copies into one cache: one copy, no error, no leftovers.
  shared = str(tmp_path / 'shared_cache' / 'synthetic')
  results, errors = [], []

  def stage():
    try:
      results.append(paths.mirror(remote, shared, marker))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=stage) for _ in range(4)]
  with timer('4 concurrent mirror'):
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join(timeout=120)
  assert not errors and results.count(True) == 1 and len(results) == 4
  assert sorted(os.listdir(os.path.dirname(shared))) == [
      '.synthetic.lock', 'synthetic']
  assert _local_files(shared) == _local_files(local)


def test_download_rejects_a_corrupt_copy(gcs_bucket, built_dataset, tmp_path,
                                         monkeypatch):
  _, local = built_dataset
  remote = f'{gcs_bucket}/data/synthetic/1.0.0'
  marker = 'dataset_info.json'
  paths.upload_tree(local, remote, marker)
  fs = _fs()
  real_get = fs.get_file

  def corrupting_get(rpath, lpath, *args, **kwargs):
    real_get(rpath, lpath, *args, **kwargs)
    if rpath.endswith('features.json'):
      with open(lpath, 'ab') as f:
        f.write(b' ')

  monkeypatch.setattr(fs, 'get_file', corrupting_get)
  cache = tmp_path / 'cache' / 'synthetic'
  with pytest.raises(OSError, match='features.json.*size or CRC32C'):
    paths.mirror(remote, str(cache), marker)
  assert not cache.exists()
  # The temporary copy is gone; the lock file stays.
  assert os.listdir(tmp_path / 'cache') == ['.synthetic.lock']
