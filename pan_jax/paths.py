"""User paths, local or gs://: how pan_jax checks, reads, writes and copies them.

Every path a user gives (data_dir, workdir, checkpoint, export and evaluate
output, init_from, predict inputs and output) may be a local path or a URL
such as gs://BUCKET/dir. The file-system calls on them go through here,
over etils.epath (local files, or gs:// through gcsfs; the `gcs` extra
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
* Reading many small records over the network is slow: `mirror` keeps a
  verified local copy of a remote directory (a dataset), once per host.
* There is no append: a log is rewritten whole (see train.py's writer).
* epath's resolve() turns gs://b/x into /cwd/gs:/b/x: `absolute` leaves
  URLs alone.
"""

import base64
import fcntl
import json
import os
import shutil
import tempfile
from typing import Dict, IO, List, Optional, Union

from etils import epath

PathLike = Union[str, os.PathLike]
# Bytes per read when checksumming a local file.
_CHUNK = 1 << 20
# In a local copy of a remote directory: the listing it was checked against.
_MANIFEST = '.pan_jax_copy.json'


def is_url(path: PathLike) -> bool:
  """True for gs://... (any scheme://), False for a local path."""
  return '://' in os.fspath(path)


def absolute(path: PathLike) -> str:
  """`path` made absolute (as Orbax requires); URLs are kept as given."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def realpath(path: PathLike) -> str:
  """`path` absolute with symbolic links resolved; URLs are kept as given."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.realpath(path)


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
  never read, and redoing it overwrites what it left. local_dir is then
  recorded as a current copy of url (see `mirror`).

  Args:
    local_dir: a local directory holding `marker`.
    url: the destination (gs://...).
    marker: the commit file, relative to local_dir.

  Raises:
    OSError: an object does not match its local file after the upload.
  """
  fs = epath.backend.fsspec_backend.fs(url)
  names = [n for n in _local_files(local_dir) if n != _MANIFEST]
  if marker not in names:
    raise FileNotFoundError(f'{local_dir} has no {marker} to commit with')
  body = [name for name in names if name != marker]
  url = url.rstrip('/')
  for name in body:
    fs.put_file(os.path.join(local_dir, name), f'{url}/{name}')
  listing = remote_listing(url)
  for name in body:
    if not _matches(os.path.join(local_dir, name), listing.get(name)):
      raise OSError(f'{url}/{name} does not match {local_dir}/{name} after '
                    'the upload (size or CRC32C); run the command again')
  fs.put_file(os.path.join(local_dir, marker), f'{url}/{marker}')
  _write_manifest(local_dir, remote_listing(url))


def mirror(url: str, local_dir: str, marker: str) -> bool:
  """Makes local_dir a current, verified copy of url (committed by marker).

  The copy records GCS's listing (sizes, CRC32C) it was checked against; it
  is kept while that listing is unchanged and its files have their sizes,
  and replaced otherwise (e.g. the dataset was rebuilt). Processes of one
  host that call this at once take turns (a lock file beside local_dir):
  the first copies, the others find the copy current. A copy is made in a
  temporary sibling, each file checked against its object's size and CRC32C,
  and renamed into place, so a killed copy leaves no half directory.

  Args:
    url: a committed remote directory (gs://...).
    local_dir: the local copy.
    marker: the commit file, relative to url.

  Returns:
    True if this call copied, False if local_dir was current.

  Raises:
    FileNotFoundError: url/marker is missing (nothing committed there).
    OSError: a downloaded file does not match its object.
  """
  fs = epath.backend.fsspec_backend.fs(url)
  url = url.rstrip('/')
  local_dir = os.path.abspath(local_dir)
  parent, base = os.path.split(local_dir)
  os.makedirs(parent, exist_ok=True)
  with open(os.path.join(parent, f'.{base}.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released by the kernel if we die.
    for entry in os.listdir(parent):  # What killed copies left.
      if entry.startswith(f'.{base}.incomplete.'):
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    listing = remote_listing(url)
    if marker not in listing:
      raise FileNotFoundError(f'{url}/{marker} is missing: {url} is not a '
                              'complete upload')
    if _is_copy(local_dir, listing):
      return False
    temporary = tempfile.mkdtemp(prefix=f'.{base}.incomplete.', dir=parent)
    try:
      for name, info in listing.items():
        local = os.path.join(temporary, name)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        fs.get_file(f'{url}/{name}', local)
        if not _matches(local, info):
          raise OSError(f'{url}/{name}: the downloaded copy does not match '
                        'the size or CRC32C GCS reports; run it again')
      _write_manifest(temporary, listing)
      if os.path.exists(local_dir):
        shutil.rmtree(local_dir)  # Out of date.
      os.rename(temporary, local_dir)
      return True
    finally:
      shutil.rmtree(temporary, ignore_errors=True)


def _matches(local: str, info: Optional[Dict[str, str]]) -> bool:
  """Whether local file `local` has the size and CRC32C of listing `info`."""
  return (info is not None and os.path.getsize(local) == int(info['size']) and
          crc32c(local) == info['crc32c'])


def _write_manifest(local_dir: str, listing: Dict[str, Dict[str, str]]):
  with open(os.path.join(local_dir, _MANIFEST), 'w') as f:
    json.dump(listing, f, indent=1, sort_keys=True)


def _is_copy(local_dir: str, listing: Dict[str, Dict[str, str]]) -> bool:
  """Whether local_dir was copied from `listing` and still has its sizes."""
  try:
    with open(os.path.join(local_dir, _MANIFEST)) as f:
      if json.load(f) != listing:
        return False
    return all(os.path.getsize(os.path.join(local_dir, name)) ==
               int(info['size']) for name, info in listing.items())
  except (OSError, ValueError):
    return False


def cache_path(cache_dir: str, url: str) -> str:
  """Where url is mirrored under a local cache: CACHE/<scheme>/<bucket>/<path>."""
  scheme, rest = url.split('://', 1)
  return os.path.join(os.path.expanduser(cache_dir), scheme,
                      rest.strip('/'))
