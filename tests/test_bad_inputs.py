"""Bad inputs and faults, tried as a hostile user would (issue 13).

Every case asserts the message (what is wrong, named), the exit status and
that nothing was written or lost. In-process cases check the exception: a
`pan_jax.errors.UserError`, whose `exit_code` is what `runtime.run` exits
with after printing the one-line message; the subprocess cases
(`python -m pan_jax.X`) check the process itself: the status, one line
`pan_jax.X: error: ...` and no traceback.

The training cases share one compiled program (one config, the 'fake'
dataset) and the evaluation / prediction cases the smoke workdir of
eval_standins. Cases tested elsewhere are listed in the issue's report; the
ones here are those that were missing.
"""

import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib

from configs import smoke
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

import eval_standins
from pan_jax import checkpoints
from pan_jax import defaults
from pan_jax import errors
from pan_jax import evaluate
from pan_jax import inference
from pan_jax import models
from pan_jax import predict
from pan_jax import sharding
from pan_jax import train
from pan_jax.checkpoints import exported
from pan_jax.checkpoints import workdir as workdir_lib
from pan_jax.convert import readers
from pan_jax.data import builder
from pan_jax.data import prepare
from pan_jax.data import records
from pan_jax.data import sources
from pan_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- helpers --
def _command(module, *args, timeout=300, **env):
  """`python -m module args` from the repo root, CPU, fast compiles."""
  return subprocess.run(
      [sys.executable, '-m', module, *map(str, args)], cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS='cpu',
               JAX_DISABLE_MOST_OPTIMIZATIONS='1', **env),
      capture_output=True, text=True, timeout=timeout, check=False)


def _one_line_error(result, module, status):
  """The message of a command that failed as a user error should."""
  assert result.returncode == status, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  prefix = f'{module.removesuffix(".__main__")}: error: '
  assert last.startswith(prefix), result.stderr[-3000:]
  return last[len(prefix):]


def _user_error(info, kind, status=1):
  """The exception of pytest.raises: a UserError of `kind`, exit `status`."""
  assert isinstance(info.value, errors.UserError), repr(info.value)
  assert isinstance(info.value, kind), repr(info.value)
  assert info.value.exit_code == status
  return str(info.value)


def _snapshot(path):
  """{relative path: sha256} of every file under `path` (nothing: {})."""
  found = {}
  for directory, _, names in os.walk(path):
    for name in names:
      full = os.path.join(directory, name)
      with open(full, 'rb') as f:
        found[os.path.relpath(full, path)] = hashlib.sha256(
            f.read()).hexdigest()
  return found


def _save(path, array, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)


def _write_folder(root, seed=0, splits=(('train', 3), ('val', 2)),
                  num_classes=3, size=(20, 24), stems=None):
  """A 'folder' source tree: images/<split>/*.jpg, labels/<split>/*.png."""
  rng = np.random.default_rng(seed)
  for split, count in splits:
    for i, stem in enumerate(stems or [f'{split}{i}' for i in range(count)]):
      label = rng.integers(0, num_classes, size).astype(np.uint8)
      _save(os.path.join(root, 'images', split, f'{stem}.jpg'),
            rng.integers(0, 256, size + (3,), np.uint8))
      _save(os.path.join(root, 'labels', split, f'{stem}.png'), label)
  return str(root)


def _prepare_folder(src, data, **kwargs):
  kwargs.setdefault('num_classes', 3)
  return prepare.prepare('folder', str(src), str(data), **kwargs)


@pytest.fixture(scope='module')
def smoke_run():
  """eval_standins.smoke_workdir(): (workdir, config, meta, model, vars)."""
  return eval_standins.smoke_workdir()


@pytest.fixture(scope='module')
def export_dir(smoke_run, tmp_path_factory):
  """An inference checkpoint of the smoke model (6 'fake' classes)."""
  workdir, config, meta, _, variables = smoke_run
  path = str(tmp_path_factory.mktemp('bad_export') / 'export')
  exported.save(path, config, meta, variables, step=4, source=workdir)
  return path


def _mount_tmpfs(path, options):
  """Mounts a tmpfs at `path` (root only); False where that is not allowed."""
  os.makedirs(path, exist_ok=True)
  result = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs',
                           str(path)], capture_output=True, check=False)
  return result.returncode == 0


def _unmount(path):
  subprocess.run(['umount', '-l', str(path)], capture_output=True,
                 check=False)


# ------------------------------------------------------- data (prepare) --
def _png_header_only(path, width, height):
  """A PNG whose header claims width x height (decoders refuse it first)."""
  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data +
            struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))
  ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) +
            chunk(b'IDAT', zlib.compress(b'')) + chunk(b'IEND', b''))


def _zero_bytes(path):
  open(path, 'wb').close()


def _symlink_loop(path):
  os.remove(path)
  os.symlink(os.path.basename(path), path)  # Points at itself.


def _huge(path):
  _png_header_only(path, 40000, 40000)  # 1.6 gigapixels, a few bytes.


def _jpeg_named_png(path):
  Image.open(path).save(path, format='JPEG')


# (what to break, which file, what the message says). Each breaks one
# example of a 3-class folder tree; the build must stop naming the file.
BROKEN_FILES = {
    'zero-byte image': (_zero_bytes, 'images/train/train1.jpg',
                        'not a readable image'),
    'zero-byte label': (_zero_bytes, 'labels/train/train1.png',
                        'not a readable PNG'),
    'symlink loop': (_symlink_loop, 'images/train/train1.jpg',
                     'cannot read the image'),
    'huge image': (_huge, 'images/train/train1.jpg', 'not a readable image'),
    'JPEG label named .png': (_jpeg_named_png, 'labels/train/train1.png',
                              'label is a JPEG file'),
}


@pytest.mark.parametrize('case', sorted(BROKEN_FILES))
def test_broken_source_file_stops_the_build(tmp_path, case):
  src = _write_folder(tmp_path / 'src')
  break_it, relative, expected = BROKEN_FILES[case]
  target = os.path.join(src, relative)
  break_it(target)
  with pytest.raises(records.BadInputError) as info:
    _prepare_folder(src, tmp_path / 'data', num_workers=0)
  message = _user_error(info, errors.DataError)
  assert message.startswith(f'{target}: ') and expected in message
  assert '--skip_bad skips such examples' in message
  assert builder.built_dir(str(tmp_path / 'data'), 'folder') is None
  assert not os.path.exists(tmp_path / 'data' / 'folder' / '1.0.0')


def test_mislabelled_image_non_ascii_and_exif_rotated_are_built(tmp_path):
  src = _write_folder(tmp_path / 'src', stems=['straße_ü', 'b', 'c'],
                      splits=(('train', 3),), size=(20, 24))
  # An image whose extension lies (PNG bytes in a .jpg): read by content.
  rng = np.random.default_rng(1)
  png_as_jpg = rng.integers(0, 256, (20, 24, 3), np.uint8)
  Image.fromarray(png_as_jpg).save(
      os.path.join(src, 'images', 'train', 'b.jpg'), format='PNG')
  # A photo with an EXIF rotation: pixels are stored (and labelled) as they
  # are in the file, as in VOC, whatever a viewer shows.
  photo = rng.integers(0, 256, (20, 24, 3), np.uint8)
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view.
  Image.fromarray(photo).save(os.path.join(src, 'images', 'train', 'c.jpg'),
                              exif=exif, quality=100)
  path, skipped, _, already = _prepare_folder(src, tmp_path / 'data')
  assert not skipped and not already
  data_config = defaults.get_config().data
  data_config.name, data_config.data_dir = 'folder', str(tmp_path / 'data')
  source = sources.open_split(data_config, 'train')
  examples = {source[i]['file_name']: source[i] for i in range(len(source))}
  assert sorted(examples) == ['b', 'c', 'straße_ü']
  np.testing.assert_array_equal(examples['b']['image'], png_as_jpg)
  assert examples['c']['image'].shape == (20, 24, 3)  # As stored.
  assert path.endswith(os.path.join('folder', '1.0.0'))


@pytest.mark.parametrize('names, expected', [
    ('bg,bg,bg', "'bg' named more than once"),
    ('bg,road,', 'class 2 has an empty name'),
    ('bg,road', '2 names for --num_classes=3'),
])
def test_class_names_must_be_unique_and_non_empty(tmp_path, names, expected):
  src = _write_folder(tmp_path / 'src')
  with pytest.raises(errors.ConfigError) as info:
    _prepare_folder(src, tmp_path / 'data', class_names=names)
  assert expected in _user_error(info, errors.ConfigError)
  assert not os.path.exists(tmp_path / 'data' / 'folder')


def test_prepare_refuses_a_dataset_built_from_something_else(tmp_path):
  first = _write_folder(tmp_path / 'a', seed=0)
  other = _write_folder(tmp_path / 'b', seed=1, splits=(('train', 2),))
  data = tmp_path / 'data'
  path, _, _, _ = _prepare_folder(first, data, class_names='x,y,z')
  built = _snapshot(path)
  for kwargs, expected in (
      ({'source_dir': other}, f'--source_dir: built from {first}, now '
       f'{other}'),
      ({'num_classes': 4}, '--num_classes: built with 3, now 4'),
      ({'class_names': 'x,y,w'}, "--class_names: built with ['x', 'y', 'z']"),
  ):
    arguments = {'source_dir': first, 'class_names': 'x,y,z', **kwargs}
    with pytest.raises(errors.MismatchError) as info:
      prepare.prepare('folder', arguments.pop('source_dir'), str(data),
                      num_classes=arguments.pop('num_classes', 3),
                      **arguments)
    message = _user_error(info, errors.MismatchError)
    assert expected in message and '--overwrite' in message, message
    assert _snapshot(path) == built
  # The same inputs: nothing to do.
  assert _prepare_folder(first, data, class_names='x,y,z')[3] is True
  # --overwrite that fails half-way (a bad image) keeps the old build.
  _zero_bytes(os.path.join(other, 'images', 'train', 'train1.jpg'))
  with pytest.raises(records.BadInputError, match='not a readable image'):
    _prepare_folder(other, data, class_names='x,y,z', overwrite=True)
  assert _snapshot(path) == built
  assert sorted(os.listdir(data / 'folder')) == ['1.0.0']
  # --overwrite rebuilds from the new source.
  _prepare_folder(other, data, class_names='x,y,z', overwrite=True,
                  skip_bad=True)
  info = json.loads(open(os.path.join(path, 'dataset_info.json')).read())
  assert info['splits'][0]['name'] == 'train'
  assert len(info['splits']) == 1  # b has no val split.
  assert sorted(os.listdir(data / 'folder')) == ['1.0.0']


def test_interrupted_overwrite_puts_the_old_build_back(tmp_path):
  src = _write_folder(tmp_path / 'src')
  data = tmp_path / 'data'
  path, _, _, _ = _prepare_folder(src, data)
  built = _snapshot(path)
  # What a kill -9 during an --overwrite rebuild leaves.
  os.rename(path, os.path.join(data, 'folder', '.replaced.1.0.0'))
  os.makedirs(os.path.join(data, 'folder', 'incomplete.abc_1.0.0'))
  assert _prepare_folder(src, data)[0] == path
  assert _snapshot(path) == built
  assert sorted(os.listdir(data / 'folder')) == ['1.0.0']


def _run_python(code, timeout=300):
  """Runs `code` in a fresh interpreter from the repo root."""
  return subprocess.run(
      [sys.executable, '-c', textwrap.dedent(code)], cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO),
      capture_output=True, text=True, timeout=timeout, check=False)


def test_kill_9_during_a_build_leaves_nothing_built(tmp_path):
  src = _write_folder(tmp_path / 'src', splits=(('train', 6),))
  data = tmp_path / 'data'
  killed = _run_python(f'''
      import os, signal
      from pan_jax.data import prepare, records
      make_record = records.make_record
      done = []
      def dying(example, mapping):
        done.append(example)
        if len(done) == 4:
          os.kill(os.getpid(), signal.SIGKILL)
        return make_record(example, mapping)
      records.make_record = dying
      prepare.prepare('folder', {str(src)!r}, {str(data)!r}, num_classes=3,
                      num_workers=0)
  ''')
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert builder.built_dir(str(data), 'folder') is None
  assert [e for e in os.listdir(data / 'folder') if e.startswith('incomplete')]
  path, _, _, already = _prepare_folder(src, data)
  assert not already
  assert sorted(os.listdir(data / 'folder')) == ['1.0.0']
  assert path == str(data / 'folder' / '1.0.0')


def test_kill_9_during_synthetic_generation_is_cleaned_up(tmp_path):
  src = tmp_path / 'src'
  killed = _run_python(f'''
      import os, signal
      from pan_jax.data import synthetic
      render = synthetic.render
      count = []
      def dying(*args, **kwargs):
        count.append(1)
        if len(count) == 3:
          os.kill(os.getpid(), signal.SIGKILL)
        return render(*args, **kwargs)
      synthetic.render = dying
      synthetic.write_voc_tree({str(src)!r}, num_train=4, num_val=2)
  ''')
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  left = [e for e in os.listdir(src) if e.startswith('.incomplete_synthetic')]
  assert len(left) == 1
  synthetic.write_voc_tree(str(src), num_train=4, num_val=2)
  assert not [e for e in os.listdir(src) if e.startswith('.incomplete')]
  images = os.listdir(src / 'VOCdevkit' / 'VOC2012' / 'JPEGImages')
  assert len(images) == 6


def test_synthetic_generation_waits_for_a_live_one(tmp_path):
  """A run that is writing is not taken for a dead one's leftovers."""
  src = tmp_path / 'src'
  os.makedirs(src)
  # A live writer: holds the lock with its temporary folder for 3 s, then
  # checks the folder is still there and finishes the tree.
  live = subprocess.Popen(
      [sys.executable, '-c', textwrap.dedent(f'''
      import os, sys, tempfile, time
      from pan_jax.data import builder, synthetic
      with builder.build_lock({str(src)!r}, 'synthetic'):
        temp = tempfile.mkdtemp(prefix='.incomplete_synthetic_',
                                dir={str(src)!r})
        print('started', flush=True)
        time.sleep(3)
        if not os.path.isdir(temp):
          sys.exit(3)
        os.rmdir(temp)
      synthetic.write_voc_tree({str(src)!r}, num_train=2, num_val=1)
      ''')], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert live.stdout.readline().strip() == 'started'
    synthetic.write_voc_tree(str(src), num_train=2, num_val=1)
    assert live.wait(timeout=120) == 0, live.stderr.read()[-2000:]
  finally:
    if live.poll() is None:
      live.kill()
  assert not [e for e in os.listdir(src) if e.startswith('.incomplete')]


def test_prepare_command_errors_are_one_line(tmp_path):
  src = _write_folder(tmp_path / 'src')
  result = _command('pan_jax.data.prepare', '--dataset=folder',
                    f'--source_dir={src}', f'--data_dir={tmp_path / "data"}',
                    '--num_classes=3', '--class_names=bg,bg,bg',
                    '--num_workers=0')
  message = _one_line_error(result, 'pan_jax.data.prepare', 1)
  assert "'bg' named more than once" in message
  assert not os.path.exists(tmp_path / 'data' / 'folder')
  result = _command('pan_jax.data.prepare', '--dataset=folder',
                    f'--source_dir={src}', f'--data_dir={tmp_path / "data"}')
  assert 'needs --num_classes' in _one_line_error(
      result, 'pan_jax.data.prepare', 2)


# ------------------------------------------------------------- commands --
@pytest.mark.parametrize('flags, status, expected', [
    (['--config.optim.learnin_rate=1'], 2,
     '--config.optim.learnin_rate=1: the config has no field '
     '\'learnin_rate\'. Did you mean "learning_rate" instead of '
     '"learnin_rate"?'),
    (['--bogus=1'], 2, "Unknown command line flag 'bogus'"),
    (['--config=configs/nowhere.py'], 2,
     "--config=configs/nowhere.py: cannot load the config file ([Errno 2] "
     "No such file or directory: 'configs/nowhere.py')"),
    (['--config.global_batch_size=12'], 1,
     'config.global_batch_size=12 must be a positive multiple of the number '
     'of devices (8'),
    (['--config.data.name=folder', '--config.data.data_dir=/nonexistent'], 1,
     "dataset 'folder' is not prepared in /nonexistent"),
])
def test_training_flag_errors_are_one_line(tmp_path, flags, status,
                                            expected):
  workdir = tmp_path / 'run'
  if not any(flag.startswith('--config=') for flag in flags):
    flags = ['--config=configs/smoke.py'] + flags
  result = _command('pan_jax.main', f'--workdir={workdir}', *flags)
  message = _one_line_error(result, 'pan_jax.main', status)
  assert expected in message, message
  assert not os.path.exists(workdir)


def test_workdir_that_is_a_file_is_one_line(tmp_path):
  workdir = tmp_path / 'run'
  workdir.write_text('not a directory')
  result = _command('pan_jax.main', '--config=configs/smoke.py',
                    f'--workdir={workdir}')
  message = _one_line_error(result, 'pan_jax.main', 1)
  assert message.startswith(f'--workdir={workdir} is a file')
  assert workdir.read_text() == 'not a directory'


def test_read_only_workdir_is_refused_before_compiling(tmp_path):
  workdir = tmp_path / 'ro'
  if os.geteuid() == 0:
    if not _mount_tmpfs(workdir, 'ro,size=1m'):
      pytest.skip('cannot mount a read-only tmpfs here')
  else:
    os.makedirs(workdir)
    os.chmod(workdir, 0o555)
  try:
    with pytest.raises(errors.StorageError) as info:
      train.train_and_evaluate(_train_config(), str(workdir / 'run'))
    message = _user_error(info, errors.StorageError)
    assert message.startswith(f'--workdir={workdir / "run"} cannot be '
                              'written: ')
    assert 'Read-only file system' in message or 'ermission' in message
  finally:
    if os.geteuid() == 0:
      _unmount(workdir)
  assert not os.path.exists(workdir / 'run')


def test_missing_checkpoint_and_unknown_split_are_one_line(smoke_run,
                                                           tmp_path):
  result = _command('pan_jax.predict', f'--checkpoint={tmp_path / "none"}',
                    f'--output={tmp_path / "out"}', tmp_path)
  assert _one_line_error(result, 'pan_jax.predict', 1) == (
      f"checkpoint directory '{tmp_path / 'none'}' does not exist")
  result = _command('pan_jax.predict', f'--checkpoint={smoke_run[0]}',
                    f'--output={tmp_path / "out"}')
  assert 'give at least one IMAGE_OR_DIR' in _one_line_error(
      result, 'pan_jax.predict', 2)
  result = _command('pan_jax.evaluate', f'--checkpoint={smoke_run[0]}',
                    '--split=nope', f'--output={tmp_path / "out"}')
  assert "dataset 'fake' has no split 'nope'" in _one_line_error(
      result, 'pan_jax.evaluate', 1)
  assert not os.path.exists(tmp_path / 'out')


def test_a_bug_keeps_its_traceback(tmp_path):
  """Only user errors are shortened: an internal error shows where it was."""
  result = _run_python('''
      import sys
      from pan_jax import runtime
      def main(argv):
        raise RuntimeError('an internal error')
      sys.argv = ['pan_jax.fake']
      runtime.run(main)
  ''')
  assert result.returncode == 1
  assert 'Traceback' in result.stderr and 'an internal error' in (
      result.stderr)


# -------------------------------------------------------------- training --
def _train_config(**overrides):
  """One config for every training case here, so they share one compile."""
  config = smoke.get_config()
  config.total_steps = 6
  config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.eval_every_steps = 0  # Only at the end.
  defaults.override(config, overrides)
  return config


class _Hook:
  """Stands in for sharding.to_global: runs `action` before batch `at`."""

  def __init__(self, at, action):
    self.count, self._at, self._action = 0, at, action
    self._to_global = sharding.to_global

  def __call__(self, batch, mesh):
    self.count += 1
    batch = {k: np.array(v) for k, v in batch.items()}
    if self.count == self._at:
      batch = self._action(batch) or batch
    return self._to_global(batch, mesh)


def _train(config, workdir, hook=None):
  with pytest.MonkeyPatch.context() as patch:
    if hook is not None:
      patch.setattr(sharding, 'to_global', hook)
    patch.setattr(train, 'validate', lambda *args: {'miou': 0.5})
    return train.train_and_evaluate(config, str(workdir))


def _overflow_batch_norm(batch):
  # Squares of such values overflow float32: BatchNorm's running variance
  # becomes inf while the loss (normalised by the batch's statistics), the
  # gradients and the parameters stay finite (measured: 1e18 to 3e19 do
  # this after 2 steps; 1e20 makes everything NaN). A huge learning rate
  # reaches the same state through huge weights.
  batch['image'] = batch['image'] * np.float32(1e18)
  return batch


def test_non_finite_batch_norm_statistics_are_never_saved(tmp_path):
  with pytest.raises(errors.DivergedError) as info:
    _train(_train_config(), tmp_path, _Hook(3, _overflow_batch_norm))
  message = _user_error(info, FloatingPointError)
  assert message.startswith('Non-finite training values at step 3: '
                            "{'batch_stats': 'inf/NaN'}"), message
  assert 'Non-finite now: batch_stats/backbone/' in message
  assert 'the last good checkpoint is step 2' in message
  variables, step = workdir_lib.restore_variables(str(tmp_path))
  assert step == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(l)['step'] for l in lines] == [1, 2]


def test_resume_with_other_classes_says_classes(smoke_run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(smoke_run[0], workdir)
  saved = json.loads((workdir / 'dataset.json').read_text())
  saved['num_classes'] = 3
  saved['class_names'] = saved['class_names'][:3]
  saved['palette'] = saved['palette'][:3]
  (workdir / 'dataset.json').write_text(json.dumps(saved))
  before = _snapshot(workdir)
  config = smoke_run[1]
  with pytest.raises(errors.MismatchError) as info:
    train.train_and_evaluate(config, str(workdir))
  message = _user_error(info, errors.MismatchError)
  assert message.startswith(f'workdir {workdir} has 3 classes but dataset '
                            'fake in ')
  assert "classes ['background', 'circle', 'square']" in message
  assert _snapshot(workdir) == before


@pytest.fixture
def small_disk(tmp_path):
  """A 16 MiB tmpfs (root), or None where mounting is not allowed."""
  path = tmp_path / 'disk'
  if os.geteuid() != 0 or not _mount_tmpfs(path, 'size=16m'):
    yield None
    return
  try:
    yield path
  finally:
    _unmount(path)


def _fill(directory, leave):
  """Fills the file system of `directory` but for `leave` bytes."""
  filler = os.path.join(directory, 'filler')
  with open(filler, 'wb') as f:
    try:
      while True:
        f.write(b'\0' * (1 << 20))
        f.flush()
    except OSError as e:
      assert e.errno == errno.ENOSPC
  os.truncate(filler, max(os.path.getsize(filler) - leave, 0))


@pytest.mark.parametrize('leave', [
    0,            # The save fails at once (its first metadata file).
    256 * 1024,   # The save fails in Orbax's background threads.
])
def test_disk_full_during_a_save_stops_the_run(small_disk, tmp_path, leave):
  config = _train_config()
  workdir = (small_disk or tmp_path) / 'run'
  save = workdir_lib.save

  def save_on_a_full_disk(manager, step, *args, **kwargs):
    if step == 4:
      if small_disk is not None:
        _fill(small_disk, leave)
      else:  # No tmpfs here: the same failure, injected.
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                      os.path.join(workdir, 'checkpoints', '4'))
    return save(manager, step, *args, **kwargs)

  # Step 5 takes 2 s, time for a background save to fail before it ends.
  hook = _Hook(5, lambda batch: time.sleep(2))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(workdir_lib, 'save', save_on_a_full_disk)
    with pytest.raises(errors.StorageError) as info:
      _train(config, workdir, hook)
  message = _user_error(info, OSError)
  assert message.startswith('saving the checkpoint of step 4 in '
                            f'{workdir / "checkpoints"} failed: No space '
                            'left on device'), message
  assert 'the last complete checkpoint, step 2, is as it was' in message
  # It stopped at once: step 5 was neither logged nor validated.
  steps = [json.loads(l)['step'] for l in
           (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert steps == [1, 2, 3, 4], steps
  variables, step = workdir_lib.restore_variables(str(workdir))
  assert step == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))


def test_kill_9_during_a_save_keeps_the_last_complete_checkpoint(tmp_path):
  workdir = tmp_path / 'run'
  # A tiny state with one large array, so that the kill lands mid-write.
  killed = _run_python(f'''
      import os, signal
      import grain, jax, ml_collections, numpy as np
      from pan_jax.checkpoints import workdir as workdir_lib
      config = ml_collections.ConfigDict(
          {{'checkpoint_every_steps': 1, 'max_checkpoints_to_keep': 3}})
      manager = workdir_lib.create_manager({str(workdir)!r}, config)
      data_iter = iter(grain.MapDataset.range(8).to_iter_dataset())
      state = {{'w': jax.numpy.full((4096, 4096), 1.0)}}
      workdir_lib.save(manager, 1, state, data_iter, force=True)
      manager.wait_until_finished()
      # Random values: zstd cannot shrink them, so the write takes a while.
      state = {{'w': jax.random.normal(jax.random.key(0), (4096, 4096))}}
      workdir_lib.save(manager, 2, state, data_iter, force=True)
      os.kill(os.getpid(), signal.SIGKILL)
  ''')
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert '2' not in os.listdir(workdir / 'checkpoints')  # Not committed.
  config = _train_config(checkpoint_every_steps=1)
  manager = workdir_lib.create_manager(str(workdir), config)
  try:
    assert manager.latest_step() == 1
    restored = workdir_lib.restore_state(
        manager, 1, {'w': jax.ShapeDtypeStruct(
            (4096, 4096), jnp.float32,
            sharding=sharding.replicated(sharding.make_mesh()))})
  finally:
    manager.close()
  np.testing.assert_array_equal(np.asarray(restored['w'][:2, :2]), 1.0)


@pytest.mark.slow
def test_huge_learning_rate_is_one_line_and_saves_nothing_bad(tmp_path):
  """The real thing end to end: --config.optim.learning_rate=1e6."""
  workdir = tmp_path / 'run'
  result = _command('pan_jax.main', '--config=configs/smoke.py',
                    f'--workdir={workdir}', '--config.total_steps=6',
                    '--config.optim.learning_rate=1e6',
                    '--config.checkpoint_every_steps=1',
                    '--config.eval_every_steps=0', timeout=900)
  message = _one_line_error(result, 'pan_jax.main', 1)
  assert message.startswith('Non-finite training values at step '), message
  saved = os.listdir(workdir / 'checkpoints')
  if saved:
    variables, _ = workdir_lib.restore_variables(str(workdir))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))


# ---------------------------------------------------- evaluate / predict --
def _folder_dataset(root, num_classes, class_names=None):
  """A prepared 'folder' dataset (data_dir) with `num_classes` classes."""
  src = _write_folder(root / 'src', num_classes=num_classes)
  _prepare_folder(src, root / 'data', num_classes=num_classes,
                  class_names=class_names)
  return str(root / 'data')


@pytest.mark.parametrize('num_classes, names, expected', [
    (5, None, 'has 6 classes but dataset folder in {data} has 5'),
    (6, 'a,b,c,d,e,f', "have 6 classes each but other class names (class 0 "
     "is 'background' in one, 'a' in the other)"),
])
def test_evaluate_refuses_a_dataset_of_other_classes(smoke_run, tmp_path,
                                                     num_classes, names,
                                                     expected):
  data = _folder_dataset(tmp_path, num_classes, names)
  output = tmp_path / 'out'
  with pytest.raises(errors.MismatchError) as info:
    evaluate.run(smoke_run[0], data_dir=data, output=str(output),
                 config_overrides={'data.name': 'folder'}, progress=False)
  message = _user_error(info, errors.MismatchError)
  assert message.startswith(f'checkpoint {smoke_run[0]} ')
  assert expected.format(data=data) in message, message
  assert "checkpoint " + smoke_run[0] + " classes ['background', 'circle'" in (
      message)
  assert not os.path.exists(output)


def test_evaluate_class_mismatch_is_one_line(smoke_run, tmp_path):
  data = _folder_dataset(tmp_path, 3)
  result = _command('pan_jax.evaluate', f'--checkpoint={smoke_run[0]}',
                    f'--data_dir={data}', '--config.data.name=folder',
                    f'--output={tmp_path / "out"}')
  message = _one_line_error(result, 'pan_jax.evaluate', 1)
  assert f'has 6 classes but dataset folder in {data} has 3' in message
  assert not os.path.exists(tmp_path / 'out')


def _copy_export(export_dir, path, variables=None, meta=None):
  """`export_dir` saved again with other variables or metadata."""
  config, saved_meta, saved, step = checkpoints.load(export_dir)
  exported.save(str(path), config, meta or saved_meta,
                variables if variables is not None else saved, step=step)
  return str(path)


def test_a_checkpoint_with_inf_or_wrong_classes_is_refused(export_dir,
                                                           tmp_path):
  _, meta, variables, _ = checkpoints.load(export_dir)
  broken = jax.tree.map(np.array, variables)
  broken['batch_stats']['gau1']['context']['bn']['var'][0] = np.inf
  bad = _copy_export(export_dir, tmp_path / 'inf', variables=broken)
  with pytest.raises(errors.DataError) as info:
    predict.run(bad, str(tmp_path / 'out'), [str(tmp_path)])
  message = _user_error(info, errors.DataError)
  assert message.startswith(f'the checkpoint in {bad} (step 4) holds inf/NaN '
                            'values in 1 array(s), e.g. batch_stats/gau1/'
                            'context/bn/var')
  fewer = sources.DatasetMeta(name=meta.name, num_classes=3,
                              class_names=meta.class_names[:3],
                              palette=meta.palette[:3])
  bad = _copy_export(export_dir, tmp_path / 'classes', meta=fewer)
  with pytest.raises(errors.MismatchError) as info:
    evaluate.run(bad, output=str(tmp_path / 'out'), progress=False)
  assert _user_error(info, errors.MismatchError) == (
      f'the network in {bad} predicts 6 classes but '
      f'{os.path.join(bad, "dataset.json")} lists 3: '
      "['background', 'circle', 'square']")
  assert not os.path.exists(tmp_path / 'out')


def _photos(directory, names, size=(30, 40)):
  rng = np.random.default_rng(0)
  os.makedirs(directory, exist_ok=True)
  for name in names:
    Image.fromarray(rng.integers(0, 256, size + (3,), np.uint8)).save(
        os.path.join(directory, name))
  return str(directory)


def test_predict_refuses_an_output_folder_holding_an_input(export_dir,
                                                           tmp_path):
  photos = _photos(tmp_path / 'photos', ['a_good.png', 'b.jpg'])
  before = _snapshot(photos)
  with pytest.raises(errors.UsageError) as info:
    predict.run(export_dir, photos, [photos])
  message = _user_error(info, errors.UsageError, status=2)
  assert message == (f'--output={photos} holds the input '
                     f'{os.path.join(photos, "a_good.png")} and 1 more: '
                     'predictions written there could replace inputs. '
                     'Choose another --output.')
  assert _snapshot(photos) == before
  # The same through a symlink and on the command line (exit status 2).
  os.symlink(photos, tmp_path / 'link')
  result = _command('pan_jax.predict', f'--checkpoint={export_dir}',
                    f'--output={tmp_path / "link"}',
                    os.path.join(photos, 'b.jpg'))
  assert 'holds the input' in _one_line_error(result, 'pan_jax.predict', 2)
  assert _snapshot(photos) == before


@pytest.mark.parametrize('names, clash', [
    (['x.png', 'x_color.jpg'], 'x_color.png'),
    (['x.png', 'x.jpg'], 'x.png'),
    (['y.jpg', 'y_overlay.png'], 'y_overlay.png'),
])
def test_predict_refuses_inputs_whose_outputs_collide(export_dir, tmp_path,
                                                      names, clash):
  photos = _photos(tmp_path / 'photos', names)
  output = tmp_path / 'out'
  with pytest.raises(errors.UsageError) as info:
    predict.run(export_dir, str(output), [photos])
  message = _user_error(info, errors.UsageError, status=2)
  first, second = sorted(names)
  assert message.startswith(
      f'{os.path.join(photos, first)} and {os.path.join(photos, second)} '
      f'would both be written to {os.path.join(output, clash)}'), message
  assert message.endswith('nothing was written.')
  assert not os.path.exists(output)


def test_predict_odd_inputs(export_dir, tmp_path, capsys):
  """Non-ASCII names, an EXIF-rotated photo, a huge image, a file twice."""
  photos = _photos(tmp_path / 'photos', ['café_ü.jpg'])
  rotated = np.random.default_rng(1).integers(0, 256, (30, 40, 3), np.uint8)
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(rotated).save(os.path.join(photos, 'rotated.jpg'),
                                exif=exif)
  _png_header_only(os.path.join(photos, 'huge.png'), 40000, 40000)
  output = tmp_path / 'out'
  status = predict.run(export_dir, str(output),
                       [photos, os.path.join(photos, 'café_ü.jpg')])
  assert status == 1
  assert 'huge.png: cannot read it as an image' in capsys.readouterr().err
  assert sorted(os.listdir(output)) == sorted(
      f'{stem}{suffix}.png' for stem in ('café_ü', 'rotated')
      for suffix in predict.OUTPUT_SUFFIXES)
  # Outputs have the size of the pixels as stored (EXIF is not applied,
  # as in prepare, so masks and predictions line up with the data).
  with Image.open(output / 'rotated.png') as ids:
    assert ids.size == (40, 30)


# --------------------------------------------------------------- convert --
def _convert(tmp_path, path):
  from pan_jax import convert  # pylint: disable=g-import-not-at-top
  output = tmp_path / 'converted'
  with pytest.raises(readers.ConversionError) as info:
    convert.convert('torchvision', str(path), str(output))
  assert not os.path.exists(output)
  return _user_error(info, readers.ConversionError)


def test_random_and_empty_weight_files_are_not_pickles(tmp_path):
  random_bytes = tmp_path / 'weights.pth'
  data = np.random.default_rng(0).bytes(4096)
  assert data[:1] not in (b'P', b'\x80')  # Not a zip or a pickle by chance.
  random_bytes.write_bytes(data)
  message = _convert(tmp_path, random_bytes)
  assert message.startswith(f'{random_bytes} is not a PyTorch checkpoint: '
                            'torch.save writes a zip archive'), message
  assert 'weights_only' not in message
  empty = tmp_path / 'empty.pth'
  empty.write_bytes(b'')
  assert _convert(tmp_path, empty) == (
      f'{empty} is empty (0 bytes): not a PyTorch checkpoint')
  result = _command('pan_jax.convert', '--format=torchvision',
                    f'--input={random_bytes}', f'--output={tmp_path / "o"}')
  assert 'is not a PyTorch checkpoint' in _one_line_error(
      result, 'pan_jax.convert', 1)


def test_truncated_legacy_pickle_is_truncated_not_pickled_code(tmp_path):
  torch = pytest.importorskip('torch')
  path = tmp_path / 'legacy.pth'
  torch.save({'conv1.weight': torch.zeros(8, 3, 7, 7)}, str(path),
             _use_new_zipfile_serialization=False)
  path.write_bytes(path.read_bytes()[:300])
  message = _convert(tmp_path, path)
  assert message.endswith('The file is truncated or corrupted.'), message


# -------------------------------------------------------------- inference --
def _smp_mode_model():
  """A tiny network in smp's mode (floor pooling: minimum side 128)."""
  config = defaults.get_config()
  defaults.use_smp_pan(config.model, 'resnet18')
  config.model.base_width = 4
  config.model.decoder_channels = 8
  model = models.create_model(config, num_classes=3)
  min_size = models.min_input_size(config)
  variables = model.init(jax.random.key(0),
                         jnp.zeros((1, min_size, min_size, 3)), train=False)
  return model, variables, min_size


def _smp_mode_probs(scales):
  """predict_probs of the smp-mode network on a 180x240 image, with flip."""
  model, variables, min_size = _smp_mode_model()
  assert min_size == 128
  # Jitted per input shape: each scale compiles the small network once.
  apply_fn = jax.jit(lambda images, image_sizes: model.apply(
      variables, images, train=False, image_sizes=image_sizes))
  images = np.random.default_rng(0).normal(size=(1, 180, 240, 3)).astype(
      np.float32)
  sizes = np.array([[180, 240]], np.int32)
  # Without the padding the model refuses the 90x120 canvas of scale 0.5.
  with pytest.raises(ValueError, match='smaller than this model'):
    inference.predict_probs(apply_fn, images, sizes,
                            inference.InferenceOptions(scales=(0.5,)))
  options = inference.InferenceOptions(scales=scales, flip=True,
                                       min_size=min_size)
  probs = np.asarray(inference.predict_probs(apply_fn, images, sizes,
                                             options))
  assert probs.shape == (1, 180, 240, 3)
  assert np.all(np.isfinite(probs))
  np.testing.assert_allclose(np.sum(probs, -1), 1.0, atol=1e-5)


def test_a_small_scale_works_on_a_small_image_smp_mode():
  _smp_mode_probs((0.5,))  # The 90x120 canvas, padded up to 128x128.


@pytest.mark.slow
def test_the_paper_protocol_works_on_a_small_image_smp_mode():
  _smp_mode_probs((0.5, 0.75, 1.0, 1.25, 1.5, 1.75))


def test_padding_up_to_the_minimum_changes_no_prediction(smoke_run):
  """Where the image is large enough, padding it further changes nothing."""
  model, variables = smoke_run[3], smoke_run[4]
  # Random weights give logits in the hundreds (one-hot softmax); scaling
  # them down keeps the probabilities sensitive to any difference.
  apply_fn = jax.jit(lambda images, image_sizes: model.apply(
      variables, images, train=False, image_sizes=image_sizes) / 100)
  images = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(
      np.float32)
  sizes = np.array([[64, 64]], np.int32)
  plain = inference.predict_probs(apply_fn, images, sizes,
                                  inference.InferenceOptions())
  padded = inference.predict_probs(apply_fn, images, sizes,
                                   inference.InferenceOptions(min_size=96))
  assert padded.shape == plain.shape == (1, 64, 64, 6)
  np.testing.assert_allclose(padded, plain, atol=1e-5)


def test_six_scales_and_flip_never_give_the_model_a_small_input():
  """The paper's protocol on a 180x240 image, every input at least 128."""
  module = eval_standins.ConvPool(num_classes=3)
  variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  seen = []

  def apply_fn(images, image_sizes):
    seen.append(images.shape[1:3])
    if min(images.shape[1:3]) < 128:
      raise ValueError(f'images of {images.shape[1:3]} are too small')
    return module.apply(variables, images, image_sizes=image_sizes)

  options = inference.InferenceOptions(
      scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True, min_size=128)
  images = np.random.default_rng(0).normal(size=(2, 180, 240, 3)).astype(
      np.float32)
  sizes = np.array([[180, 240], [100, 150]], np.int32)
  probs = jax.jit(lambda x, s: inference.predict_probs(
      apply_fn, x, s, options))(images, sizes)
  assert len(seen) == 12 and (128, 128) in seen
  assert np.all(np.isfinite(probs))
  # Sliding windows smaller than the minimum are padded the same way.
  seen.clear()
  options = inference.InferenceOptions(
      mode='slide', scales=(0.5, 1.0), window_size=(64, 64),
      window_stride=(48, 48), min_size=128)
  probs = jax.jit(lambda x, s: inference.predict_probs(
      apply_fn, x, s, options))(images, sizes)
  assert seen and all(min(s) >= 128 for s in seen)
  assert np.all(np.isfinite(probs))
