"""User paths, local or gs://: how pan_jax checks, reads, writes and copies them.

Every path a user gives (data_dir, workdir, checkpoint, export and evaluate
output, init_from, predict inputs and output) may be a local path or a URL
such as gs://BUCKET/dir. The file-system calls on them go through here,
over etils.epath (local files, or gs:// through gcsfs; requirements-gcs.txt
installs it). os.path's string functions (join, basename, splitext) work on
URLs too; its file-system functions do not, and neither does open().

What GCS does differently, and how it is handled here:
* An object is written whole or not at all, but a prefix ("directory")
  cannot be renamed. `write_bytes` is atomic either way (locally a temporary
  file and a rename). A directory of several files is committed by a marker
  file written last, which readers require: `upload_tree` uploads, verifies
  each object's size and CRC32C, then writes the marker.
* gcsfs caches listings: a file another process wrote after this one listed
  its directory is invisible (even to exists()) until the cache is dropped.
  `exists`, `isdir`, `isfile` and `listdir` drop it for their path first.
* There is no append: a log is rewritten whole (see train.py's writer).
* epath's resolve() turns gs://b/x into /cwd/gs:/b/x: `absolute` leaves
  URLs alone.
"""

import base64
import os
import shutil
import tempfile
from typing import Dict, IO, List, Union

from etils import epath

PathLike = Union[str, os.PathLike]
# Bytes per read when checksumming a local file.
_CHUNK = 1 << 20


def is_url(path: PathLike) -> bool:
  """True for gs://... (any scheme://), False for a local path."""
  return '://' in os.fspath(path)


def absolute(path: PathLike) -> str:
  """`path` made absolute (as Orbax requires); URLs are kept as given."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def _fresh(path: PathLike) -> epath.Path:
  """epath.Path(path), with gcsfs's cached listings of it dropped."""
  result = epath.Path(path)
  if is_url(path):
    epath.backend.fsspec_backend.fs(os.fspath(path)).invalidate_cache(
        os.fspath(path))
  return result


def exists(path: PathLike) -> bool:
  """Whether a file or directory (on GCS: object or prefix) is at `path`."""
  return _fresh(path).exists()


def isdir(path: PathLike) -> bool:
  """Whether `path` is a directory (on GCS: a prefix with objects under it)."""
  return _fresh(path).is_dir()


def isfile(path: PathLike) -> bool:
  """Whether `path` is a file (on GCS: an object)."""
  return _fresh(path).is_file()


def listdir(path: PathLike) -> List[str]:
  """The sorted names in directory `path` (FileNotFoundError if absent)."""
  return sorted(p.name for p in _fresh(path).iterdir())


def makedirs(path: PathLike) -> None:
  """Creates directory `path` and its parents (GCS has none to create)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def read_bytes(path: PathLike) -> bytes:
  """The contents of file `path`."""
  return epath.Path(path).read_bytes()


def read_text(path: PathLike) -> str:
  """The contents of text file `path`."""
  return epath.Path(path).read_text()


def open_file(path: PathLike, mode: str = 'rb') -> IO:
  """A file object for `path` (for readers that want one, such as PIL)."""
  return epath.Path(path).open(mode)


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `path` atomically: a reader sees the old file or the new one.

  Locally through a temporary file in the same directory and a rename; on
  GCS one object upload (objects appear whole).
  """
  path = os.fspath(path)
  if is_url(path):
    epath.Path(path).write_bytes(data)
    return
  directory = os.path.dirname(path) or '.'
  os.makedirs(directory, exist_ok=True)
  fd, temporary = tempfile.mkstemp(dir=directory, prefix='.tmp_')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def rmtree(path: PathLike) -> None:
  """Deletes directory `path` and everything under it, if it exists."""
  if exists(path):
    epath.Path(path).rmtree()


def crc32c(path: str) -> str:
  """The base64 CRC32C of local file `path`, as GCS reports an object's."""
  import google_crc32c  # pylint: disable=g-import-not-at-top  (gs:// only)
  checksum = google_crc32c.Checksum()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(_CHUNK), b''):
      checksum.update(chunk)
  return base64.b64encode(checksum.digest()).decode()


def _local_files(directory: str) -> List[str]:
  """Every file under `directory`, relative to it, sorted."""
  found = []
  for root, _, names in os.walk(directory):
    found.extend(os.path.relpath(os.path.join(root, name), directory)
                 for name in names)
  return sorted(found)


def remote_listing(url: str) -> Dict[str, Dict[str, str]]:
  """{path relative to url: {'size', 'crc32c'}} of every object under url.

  Read fresh (gcsfs's listing cache is dropped first).
  """
  fs = epath.backend.fsspec_backend.fs(url)
  fs.invalidate_cache()
  prefix = url.split('://', 1)[1].rstrip('/')  # gcsfs names have no scheme.
  listing = {}
  for name, info in fs.find(url, detail=True).items():
    listing[os.path.relpath(name, prefix)] = {
        'size': str(info['size']), 'crc32c': info.get('crc32c', '')}
  return listing


def upload_tree(local_dir: str, url: str, marker: str) -> None:
  """Copies local_dir to url so that url/marker appears last.

  Every other file is uploaded and checked against the local file (size and
  CRC32C as GCS reports them) before the marker is uploaded; readers treat
  url as absent until the marker is there, so an interrupted upload is
  never read, and redoing it overwrites what it left.

  Args:
    local_dir: a local directory holding `marker`.
    url: the destination (gs://...).
    marker: the commit file, relative to local_dir.

  Raises:
    OSError: an object does not match its local file after the upload.
  """
  fs = epath.backend.fsspec_backend.fs(url)
  names = _local_files(local_dir)
  if marker not in names:
    raise FileNotFoundError(f'{local_dir} has no {marker} to commit with')
  body = [name for name in names if name != marker]
  url = url.rstrip('/')
  for name in body:
    fs.put_file(os.path.join(local_dir, name), f'{url}/{name}')
  listing = remote_listing(url)
  for name in body:
    local = os.path.join(local_dir, name)
    info = listing.get(name)
    if (info is None or int(info['size']) != os.path.getsize(local) or
        info['crc32c'] != crc32c(local)):
      raise OSError(f'{url}/{name} does not match {local} after the upload '
                    '(size or CRC32C); run the command again')
  fs.put_file(os.path.join(local_dir, marker), f'{url}/{marker}')


def download_tree(url: str, local_dir: str, marker: str) -> bool:
  """Makes local_dir a verified copy of url (committed by url/marker).

  Safe when several processes of a host do it at once: each downloads into
  its own temporary sibling, checks every file's size and CRC32C against
  GCS's, and renames it into place; the first rename wins and the others
  discard their copy. A local_dir that holds the marker is kept as it is
  (callers check it is current, see data/builder.py).

  Args:
    url: a committed remote directory (gs://...).
    local_dir: the local copy to make.
    marker: the commit file, relative to url.

  Returns:
    True if this call made the copy, False if local_dir was there already.

  Raises:
    FileNotFoundError: url/marker is missing (nothing committed there).
    OSError: a downloaded file does not match its object.
  """
  if os.path.exists(os.path.join(local_dir, marker)):
    return False
  fs = epath.backend.fsspec_backend.fs(url)
  url = url.rstrip('/')
  listing = remote_listing(url)
  if marker not in listing:
    raise FileNotFoundError(f'{url}/{marker} is missing: {url} is not a '
                            'complete upload')
  parent = os.path.dirname(os.path.abspath(local_dir))
  os.makedirs(parent, exist_ok=True)
  temporary = tempfile.mkdtemp(prefix='.incomplete.', dir=parent)
  try:
    for name, info in listing.items():
      local = os.path.join(temporary, name)
      os.makedirs(os.path.dirname(local), exist_ok=True)
      fs.get_file(f'{url}/{name}', local)
      if (os.path.getsize(local) != int(info['size']) or
          crc32c(local) != info['crc32c']):
        raise OSError(f'{url}/{name}: the downloaded copy does not match '
                      'the size or CRC32C GCS reports; run the command again')
    try:
      os.rename(temporary, local_dir)
    except OSError:
      if not os.path.exists(os.path.join(local_dir, marker)):
        raise
      return False  # Another process finished first.
    return True
  finally:
    shutil.rmtree(temporary, ignore_errors=True)


def cache_path(cache_dir: str, url: str) -> str:
  """Where url is mirrored under a local cache: CACHE/<scheme>/<bucket>/<path>."""
  scheme, rest = url.split('://', 1)
  return os.path.join(os.path.expanduser(cache_dir), scheme,
                      rest.strip('/'))
