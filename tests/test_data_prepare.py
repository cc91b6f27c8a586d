"""Tests of `pan_jax.data.prepare`: every builder, atomicity, bad inputs."""

import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest
import scipy.io

from pan_jax.data import builder
from pan_jax.data import cityscapes
from pan_jax.data import prepare
from pan_jax.data import records
from pan_jax.data import sources
from pan_jax.data import synthetic
from pan_jax.data import voc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------ tree writers --
def _image(rng, height, width):
  return rng.integers(0, 256, (height, width, 3), np.uint8)


def _save_palette_png(path, label):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  png = Image.frombytes('P', label.shape[::-1], label.tobytes())
  png.putpalette([c for colour in voc.color_map(256) for c in colour])
  png.save(path)


def _save(path, array, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)


def _voc_label(rng, height, width, class_id):
  label = np.zeros((height, width), np.uint8)
  label[height // 4:height // 2, width // 4:width // 2] = class_id
  label[height // 4, width // 4:width // 2] = 255  # boundary band
  return label


def _write_voc(root, lists, labels, rng, sbd=None):
  """VOC tree under root; labels: id -> label array; sbd: (lists, labels)."""
  voc_root = os.path.join(root, 'VOCdevkit', 'VOC2012')
  for image_id, label in labels.items():
    _save(os.path.join(voc_root, 'JPEGImages', image_id + '.jpg'),
          _image(rng, *label.shape))
    _save_palette_png(
        os.path.join(voc_root, 'SegmentationClass', image_id + '.png'), label)
  os.makedirs(os.path.join(voc_root, 'ImageSets', 'Segmentation'),
              exist_ok=True)
  for split, ids in lists.items():
    with open(os.path.join(voc_root, 'ImageSets', 'Segmentation',
                           split + '.txt'), 'w') as f:
      f.write(''.join(i + '\n' for i in ids))
  if sbd:
    sbd_lists, sbd_labels, sbd_only_images = sbd
    sbd_root = os.path.join(root, 'benchmark_RELEASE', 'dataset')
    os.makedirs(os.path.join(sbd_root, 'cls'))
    for image_id, label in sbd_labels.items():
      scipy.io.savemat(os.path.join(sbd_root, 'cls', image_id + '.mat'), {
          'GTcls': {'Segmentation': label, 'Boundaries': np.zeros(1),
                    'CategoriesPresent': np.unique(label)}})
      directory = 'img' if image_id in sbd_only_images else None
      path = (os.path.join(sbd_root, 'img', image_id + '.jpg') if directory
              else os.path.join(voc_root, 'JPEGImages', image_id + '.jpg'))
      if not os.path.exists(path):
        _save(path, _image(rng, *label.shape))
    for split, ids in sbd_lists.items():
      with open(os.path.join(sbd_root, split + '.txt'), 'w') as f:
        f.write(''.join(i + '\n' for i in ids))
  return voc_root


def _write_folder(root, rng, splits=(('train', 4), ('val', 2)),
                  num_classes=3, ignore=255, size=(20, 24)):
  for split, count in splits:
    for i in range(count):
      label = rng.integers(0, num_classes, size).astype(np.uint8)
      label[0, :] = ignore
      _save(os.path.join(root, 'images', split, f'{split}{i}.jpg'),
            _image(rng, *size))
      _save(os.path.join(root, 'labels', split, f'{split}{i}.png'), label)


def _data_config(data_dir, name):
  return ml_collections.ConfigDict({'name': name, 'data_dir': str(data_dir)})


def _read_split(data_dir, name, split):
  source = sources.open_split(_data_config(data_dir, name), split)
  return {source[i]['file_name']: source[i] for i in range(len(source))}


# --------------------------------------------------------------- builders --
def test_voc_with_sbd(tmp_path):
  rng = np.random.default_rng(0)
  labels = {i: _voc_label(rng, 30, 40, c) for i, c in
            (('a', 15), ('b', 1), ('c', 2), ('d', 3))}
  _write_voc(tmp_path / 'src', {'train': ['a', 'b'], 'val': ['c', 'd'],
                                'trainval': ['a', 'b', 'c', 'd']}, labels, rng,
             sbd=({'train': ['b', 'e', 'f'], 'val': ['c', 'g']},
                  {i: np.full((30, 40), k, np.uint8) for i, k in
                   (('b', 7), ('c', 8), ('e', 9), ('f', 10), ('g', 11))},
                  {'g'}))
  path, skipped, notes, _ = prepare.prepare(
      'voc2012_aug', str(tmp_path / 'src'), str(tmp_path / 'data'))
  assert not skipped and not notes
  assert path == str(tmp_path / 'data' / 'voc2012_aug' / '1.0.0')
  train_aug = _read_split(tmp_path / 'data', 'voc2012_aug', 'train_aug')
  # SBD train + val + VOC train, minus VOC val ('c').
  assert sorted(train_aug) == ['a', 'b', 'e', 'f', 'g']
  # 'b' has both: the VOC mask wins. 'e' comes from SBD.
  np.testing.assert_array_equal(train_aug['b']['label'], labels['b'])
  assert (train_aug['e']['label'] == 9).all()
  # The palette trap: stored values are the palette indices (15), not colours.
  np.testing.assert_array_equal(train_aug['a']['label'], labels['a'])
  assert train_aug['a']['image'].shape == (30, 40, 3)
  val = _read_split(tmp_path / 'data', 'voc2012_aug', 'val')
  assert sorted(val) == ['c', 'd']
  config = _data_config(tmp_path / 'data', 'voc2012_aug')
  source = sources.open_split(config, 'val')
  assert sources.file_names(config, 'val') == [
      source[i]['file_name'] for i in range(len(source))]
  meta = sources.get_meta(_data_config(tmp_path / 'data', 'voc2012_aug'))
  assert meta.num_classes == 21 and meta.class_names[15] == 'person'
  assert meta.palette[15] == (192, 128, 128) and meta.ignore_label == 255
  assert sources.DatasetMeta.from_json(meta.to_json()) == meta


def test_voc_without_sbd_skips_train_aug_and_says_so(tmp_path):
  rng = np.random.default_rng(0)
  labels = {i: _voc_label(rng, 20, 20, 1) for i in 'abc'}
  _write_voc(tmp_path / 'src', {'train': ['a', 'b'], 'val': ['c']}, labels,
             rng)
  path, _, notes, already = prepare.prepare(
      'voc2012_aug', str(tmp_path / 'src'), str(tmp_path / 'data'))
  assert not already and len(notes) == 1 and 'train_aug' in notes[0]
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  splits = tfds.builder_from_directory(path).info.splits
  assert sorted(splits) == ['train', 'trainval', 'val']
  assert splits['trainval'].num_examples == 3


def test_rebuild_is_a_noop_and_leftovers_are_removed(tmp_path):
  rng = np.random.default_rng(0)
  _write_folder(tmp_path / 'src', rng)
  leftover = tmp_path / 'data' / 'folder' / 'incomplete.ABC123_1.0.0'
  leftover.mkdir(parents=True)
  path, *_ = prepare.prepare('folder', str(tmp_path / 'src'),
                             str(tmp_path / 'data'), num_classes=3)
  assert not leftover.exists()
  stamp = os.path.getmtime(os.path.join(path, 'dataset_info.json'))
  # Even with the sources gone, a built dataset is not touched.
  shutil.rmtree(tmp_path / 'src')
  again, _, _, already = prepare.prepare(
      'folder', str(tmp_path / 'src'), str(tmp_path / 'data'), num_classes=3)
  assert already and again == path
  assert os.path.getmtime(os.path.join(path, 'dataset_info.json')) == stamp


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path):
  rng = np.random.default_rng(0)
  _write_folder(tmp_path / 'src', rng)
  # The last example of the last split is bad: train is fully written first.
  with open(tmp_path / 'src' / 'images' / 'val' / 'val1.jpg', 'r+b') as f:
    f.truncate(100)
  with pytest.raises(records.BadInputError):
    prepare.prepare('folder', str(tmp_path / 'src'), str(tmp_path / 'data'),
                    num_classes=3)
  assert builder.built_dir(str(tmp_path / 'data'), 'folder') is None
  root = tmp_path / 'data' / 'folder'
  assert not root.exists() or not os.listdir(root)


def test_folder_remaps_ignore_and_converts_images(tmp_path):
  rng = np.random.default_rng(0)
  src = tmp_path / 'src'
  _write_folder(src, rng, splits=(('train', 2), ('val', 1)), num_classes=11,
                ignore=11)
  gray = rng.integers(0, 256, (20, 24), np.uint8)
  _save(str(src / 'images' / 'train' / 'gray.png'), gray)
  _save(str(src / 'labels' / 'train' / 'gray.png'),
        np.full((20, 24), 4, np.uint8))
  rgba = np.dstack([_image(rng, 20, 24), np.full((20, 24), 9, np.uint8)])
  _save(str(src / 'images' / 'train' / 'rgba.png'), rgba)
  _save(str(src / 'labels' / 'train' / 'rgba.png'),
        np.full((20, 24), 5, np.uint8))
  cmyk = Image.fromarray(_image(rng, 20, 24)).convert('CMYK')
  cmyk.save(src / 'images' / 'train' / 'cmyk.jpg')
  _save(str(src / 'labels' / 'train' / 'cmyk.png'),
        np.full((20, 24), 6, np.uint8))
  names = ','.join(f'c{i}' for i in range(11))
  prepare.prepare('folder', str(src), str(tmp_path / 'data'), num_classes=11,
                  ignore_label=11, class_names=names)
  train = _read_split(tmp_path / 'data', 'folder', 'train')
  assert sorted(train) == ['cmyk', 'gray', 'rgba', 'train0', 'train1']
  raw = np.asarray(Image.open(src / 'labels' / 'train' / 'train0.png'))
  expected = np.where(raw == 11, 255, raw)
  np.testing.assert_array_equal(train['train0']['label'], expected)
  np.testing.assert_array_equal(train['gray']['image'],
                                np.repeat(gray[..., None], 3, -1))
  np.testing.assert_array_equal(train['rgba']['image'], rgba[..., :3])
  assert train['cmyk']['image'].shape == (20, 24, 3)
  meta = sources.get_meta(_data_config(tmp_path / 'data', 'folder'))
  assert meta.num_classes == 11 and meta.class_names[3] == 'c3'


def _write_cityscapes(root, rng, split, stems, label_ids):
  for stem in stems:
    city = stem.split('_')[0]
    _save(os.path.join(root, 'leftImg8bit', split, city,
                       stem + '_leftImg8bit.png'), _image(rng, 16, 32))
    _save(os.path.join(root, 'gtFine', split, city,
                       stem + '_gtFine_labelIds.png'), label_ids)


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
  rng = np.random.default_rng(0)
  label_ids = np.arange(16 * 32).reshape(16, 32) % 34
  label_ids[0, 0] = 255
  label_ids = label_ids.astype(np.uint8)
  _write_cityscapes(tmp_path / 'src', rng, 'train',
                    ['aachen_000000_000019', 'bochum_000000_000313'],
                    label_ids)
  _write_cityscapes(tmp_path / 'src', rng, 'val', ['lindau_000000_000019'],
                    label_ids)
  prepare.prepare('cityscapes', str(tmp_path / 'src'), str(tmp_path / 'data'))
  train = _read_split(tmp_path / 'data', 'cityscapes', 'train')
  assert sorted(train) == ['aachen_000000_000019', 'bochum_000000_000313']
  table = np.full(256, 255, np.uint8)
  for label_id, train_id in cityscapes.LABEL_TO_TRAIN_ID.items():
    table[label_id] = train_id
  np.testing.assert_array_equal(train['aachen_000000_000019']['label'],
                                table[label_ids])
  meta = sources.get_meta(_data_config(tmp_path / 'data', 'cityscapes'))
  assert meta.num_classes == 19 and meta.class_names[13] == 'car'


def test_synthetic_is_deterministic_and_built_through_voc(tmp_path):
  kwargs = dict(seed=3, num_train=12, num_val=4)
  path, *_ = prepare.prepare('synthetic', str(tmp_path / 'src'),
                             str(tmp_path / 'data'), **kwargs)
  voc_root = tmp_path / 'src' / 'VOCdevkit' / 'VOC2012'
  png = Image.open(voc_root / 'SegmentationClass' / 'train_000000.png')
  assert png.mode == 'P'  # VOC layout: palette PNG masks, JPEG images
  assert (voc_root / 'JPEGImages' / 'train_000000.jpg').exists()
  train = _read_split(tmp_path / 'data', 'synthetic', 'train')
  assert len(train) == 12
  labels = [example['label'] for example in train.values()]
  sizes = {label.shape for label in labels}
  assert len(sizes) > 6  # varied image sizes
  for label in labels:
    assert synthetic.MIN_SIDE <= min(label.shape) <= synthetic.MAX_SIDE
  values = set(np.unique(np.concatenate([l.ravel() for l in labels])))
  assert values <= set(range(synthetic.NUM_CLASSES)) | {255}
  assert 255 in values and len(values - {0, 255}) >= 4
  # Same seed -> identical files; the other seed -> different images.
  again = synthetic.write_voc_tree(str(tmp_path / 'src2'), **kwargs)
  for name in ('JPEGImages/val_000003.jpg', 'SegmentationClass/val_000003.png'):
    assert (voc_root / name).read_bytes() == (
        (tmp_path / 'src2' / 'VOCdevkit' / 'VOC2012' / name).read_bytes())
  assert again.endswith('VOC2012')
  image_a, _ = synthetic.render(synthetic.example_rng(3, 'val', 0))
  image_b, _ = synthetic.render(synthetic.example_rng(4, 'val', 0))
  assert image_a.shape != image_b.shape or (image_a != image_b).any()
  # Asking for another set in the same source folder is an error.
  with pytest.raises(ValueError, match='already exists'):
    synthetic.write_voc_tree(str(tmp_path / 'src'), seed=4, num_train=12,
                             num_val=4)
  meta = sources.get_meta(_data_config(tmp_path / 'data', 'synthetic'))
  assert meta.class_names == synthetic.CLASS_NAMES
  assert os.path.basename(path) == '1.0.0'


def test_shared_voc_sample(tmp_path, shared_data):
  sample = os.path.join(shared_data, 'voc_sample')
  voc_root = tmp_path / 'src' / 'VOCdevkit' / 'VOC2012'
  (voc_root / 'ImageSets' / 'Segmentation').mkdir(parents=True)
  for sub in ('JPEGImages', 'SegmentationClass'):
    os.symlink(os.path.join(sample, sub), voc_root / sub)
  ids = sorted(os.path.splitext(f)[0] for f in os.listdir(
      os.path.join(sample, 'SegmentationClass')))
  for split, split_ids in (('train', ids[:2]), ('val', ids[2:]),
                           ('trainval', ids)):
    (voc_root / 'ImageSets' / 'Segmentation' / f'{split}.txt').write_text(
        ''.join(i + '\n' for i in split_ids))
  prepare.prepare('voc2012_aug', str(tmp_path / 'src'),
                  str(tmp_path / 'data'))
  trainval = _read_split(tmp_path / 'data', 'voc2012_aug', 'trainval')
  assert sorted(trainval) == ids
  for image_id in ids:
    indices = np.asarray(Image.open(
        os.path.join(sample, 'SegmentationClass', image_id + '.png')))
    np.testing.assert_array_equal(trainval[image_id]['label'], indices)
    image = np.asarray(Image.open(
        os.path.join(sample, 'JPEGImages', image_id + '.jpg')))
    np.testing.assert_array_equal(trainval[image_id]['image'], image)


def test_shared_cityscapes_sample_matches_label_train_ids(tmp_path,
                                                          shared_data):
  sample = os.path.join(shared_data, 'cityscapes_sample')
  prepare.prepare('cityscapes', sample, str(tmp_path / 'data'))
  val = _read_split(tmp_path / 'data', 'cityscapes', 'val')
  stem = 'frankfurt_000000_000294'
  expected = np.asarray(Image.open(os.path.join(
      sample, 'gtFine', 'val', 'frankfurt',
      stem + '_gtFine_labelTrainIds.png')))
  label_ids = np.asarray(Image.open(os.path.join(
      sample, 'gtFine', 'val', 'frankfurt', stem + '_gtFine_labelIds.png')))
  label = val[stem]['label']
  # The sample's two files were downscaled separately (256x128 of 2048x1024):
  # they disagree on 77 pixels, all within a pixel of a class boundary.
  # Everywhere else the mapping must match.
  differ = label != expected
  assert differ.mean() < 0.005
  near_edge = _near_boundary(label_ids)
  assert not (differ & ~near_edge).any()
  for label_id in np.unique(label_ids):
    values, counts = np.unique(expected[label_ids == label_id],
                               return_counts=True)
    assert values[np.argmax(counts)] == cityscapes.LABEL_TO_TRAIN_ID.get(
        int(label_id), 255)


def _near_boundary(label):
  """bool: pixels within one pixel (8-neighbourhood, twice) of a boundary."""
  padded = np.pad(label, 2, mode='edge')
  height, width = label.shape
  near = np.zeros(label.shape, bool)
  for dy in range(-2, 3):
    for dx in range(-2, 3):
      near |= padded[2 + dy:2 + dy + height, 2 + dx:2 + dx + width] != label
  return near


def test_command_line(tmp_path):
  rng = np.random.default_rng(0)
  _write_folder(tmp_path / 'src', rng)
  command = [sys.executable, '-m', 'pan_jax.data.prepare', '--dataset=folder',
             f'--source_dir={tmp_path / "src"}',
             f'--data_dir={tmp_path / "data"}', '--num_classes=3',
             '--num_workers=0']
  env = dict(os.environ, PYTHONPATH=REPO)
  bad = tmp_path / 'src' / 'labels' / 'val' / 'val0.png'
  _save(str(bad), np.full((20, 24), 7, np.uint8))
  result = subprocess.run(command, env=env, capture_output=True, text=True,
                          check=False)
  assert result.returncode == 1
  assert str(bad) in result.stderr and 'expected class ids 0..2' in (
      result.stderr)
  assert '--skip_bad skips such examples' in result.stderr
  result = subprocess.run(command + ['--skip_bad'], env=env,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert 'skipped 1 bad input' in result.stdout and str(bad) in result.stdout
  assert 'split val: 1 examples' in result.stdout
  result = subprocess.run(command, env=env, capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0 and 'nothing to do' in result.stdout


# -------------------------------------------------------------- bad input --
def _corrupt(path):
  with open(path, 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0 this is not really a jpeg' * 3)


def _truncate(path):
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.truncate(size // 2)


def _wrong_size(path):
  _save(path, np.zeros((10, 10), np.uint8))


def _out_of_range(path):
  _save(path, np.full((20, 24), 3, np.uint8))  # num_classes=3, ignore 255


def _sixteen_bit(path):
  Image.fromarray(np.zeros((20, 24), np.uint16)).save(path)


def _rgb_label(path):
  _save(path, np.zeros((20, 24, 3), np.uint8))


def _jpeg_label(path):
  Image.fromarray(np.zeros((20, 24), np.uint8)).save(path, format='JPEG')


def _remove(path):
  os.remove(path)


# (what to break, which file, what the error says). Each breaks one example.
BAD_EXAMPLES = {
    'corrupt image': (_corrupt, 'images/train/train1.jpg', 'not a readable'),
    'truncated image': (_truncate, 'images/train/train1.jpg',
                        'truncated'),
    'size mismatch': (_wrong_size, 'labels/train/train1.png',
                      'expected the same size'),
    'label value out of range': (_out_of_range, 'labels/train/train1.png',
                                 'label values 3 found; expected class ids'),
    '16-bit label': (_sixteen_bit, 'labels/train/train1.png', '16/32-bit'),
    'RGB label': (_rgb_label, 'labels/train/train1.png', 'colour PNG'),
    'JPEG label': (_jpeg_label, 'labels/train/train1.png', 'JPEG file'),
    'image without label': (_remove, 'labels/train/train1.png',
                            'image without label'),
    'label without image': (_remove, 'images/train/train1.jpg',
                            'label without image'),
}


@pytest.mark.parametrize('case', sorted(BAD_EXAMPLES))
def test_bad_example(tmp_path, case):
  rng = np.random.default_rng(0)
  _write_folder(tmp_path / 'src', rng)
  break_it, relative, message = BAD_EXAMPLES[case]
  target = str(tmp_path / 'src' / relative)
  break_it(target)
  with pytest.raises(records.BadInputError, match=message) as error:
    prepare.prepare('folder', str(tmp_path / 'src'), str(tmp_path / 'data'),
                    num_classes=3)
  # The error names the file (a removed one as the expected partner).
  assert target in str(error.value)
  assert error.value.exit_code == 1  # A user error: one line, status 1.
  assert builder.built_dir(str(tmp_path / 'data'), 'folder') is None
  _, skipped, _, _ = prepare.prepare(
      'folder', str(tmp_path / 'src'), str(tmp_path / 'data'), num_classes=3,
      skip_bad=True)
  assert len(skipped) == 1 and message in skipped[0][1]
  train = _read_split(tmp_path / 'data', 'folder', 'train')
  assert sorted(train) == ['train0', 'train2', 'train3']


def test_bad_example_skipped_in_a_worker_pool(tmp_path):
  rng = np.random.default_rng(0)
  _write_folder(tmp_path / 'src', rng, splits=(('train', 8),))
  _truncate(str(tmp_path / 'src' / 'images' / 'train' / 'train5.jpg'))
  _, skipped, _, _ = prepare.prepare(
      'folder', str(tmp_path / 'src'), str(tmp_path / 'data'), num_classes=3,
      skip_bad=True, num_workers=2)
  assert [os.path.basename(path) for path, _ in skipped] == ['train5.jpg']
  assert len(_read_split(tmp_path / 'data', 'folder', 'train')) == 7


def test_empty_split_and_missing_folder(tmp_path):
  rng = np.random.default_rng(0)
  _write_folder(tmp_path / 'src', rng, splits=(('train', 2),))
  os.makedirs(tmp_path / 'src' / 'images' / 'val')
  os.makedirs(tmp_path / 'src' / 'labels' / 'val')
  for skip_bad in (False, True):
    with pytest.raises(records.BadInputError, match='empty split') as error:
      prepare.prepare('folder', str(tmp_path / 'src'), str(tmp_path / 'data'),
                      num_classes=3, skip_bad=skip_bad)
    assert error.value.path == str(tmp_path / 'src' / 'images' / 'val')
  for dataset in ('folder', 'voc2012_aug', 'cityscapes'):
    with pytest.raises(records.BadInputError, match='not found') as error:
      prepare.prepare(dataset, str(tmp_path / 'nowhere'),
                      str(tmp_path / 'data'), num_classes=3)
    assert error.value.path == str(tmp_path / 'nowhere')
  # A VOC list naming an image that does not exist.
  labels = {i: _voc_label(rng, 20, 20, 1) for i in 'ab'}
  _write_voc(tmp_path / 'voc', {'train': ['a', 'x'], 'val': ['b']}, labels,
             rng)
  with pytest.raises(records.BadInputError, match='image not found'):
    prepare.prepare('voc2012_aug', str(tmp_path / 'voc'),
                    str(tmp_path / 'data'))
  # An empty VOC list.
  _write_voc(tmp_path / 'voc2', {'train': [], 'val': ['b']}, labels, rng)
  with pytest.raises(records.BadInputError, match='split list is empty'):
    prepare.prepare('voc2012_aug', str(tmp_path / 'voc2'),
                    str(tmp_path / 'data'))


def test_bad_sbd_mat_and_cityscapes_ids(tmp_path):
  rng = np.random.default_rng(0)
  labels = {i: _voc_label(rng, 20, 20, 1) for i in 'ab'}
  _write_voc(tmp_path / 'src', {'train': ['a'], 'val': ['b']}, labels, rng,
             sbd=({'train': ['c'], 'val': ['b']},
                  {'b': np.ones((20, 20), np.uint8),
                   'c': np.full((20, 20), 30, np.uint8)}, ()))
  with pytest.raises(records.BadInputError, match='label values 30') as error:
    prepare.prepare('voc2012_aug', str(tmp_path / 'src'),
                    str(tmp_path / 'data'))
  assert error.value.path.endswith(os.path.join('cls', 'c.mat'))
  # A .mat without GTcls.
  scipy.io.savemat(str(tmp_path / 'src' / 'benchmark_RELEASE' / 'dataset' /
                       'cls' / 'c.mat'), {'other': np.zeros(3)})
  with pytest.raises(records.BadInputError, match='GTcls'):
    prepare.prepare('voc2012_aug', str(tmp_path / 'src'),
                    str(tmp_path / 'data'))
  label_ids = np.full((16, 32), 40, np.uint8)
  _write_cityscapes(tmp_path / 'city', rng, 'val', ['ulm_000000_000019'],
                    label_ids)
  with pytest.raises(records.BadInputError, match='Cityscapes label ids'):
    prepare.prepare('cityscapes', str(tmp_path / 'city'),
                    str(tmp_path / 'data'))


def test_concurrent_builds_of_one_dataset_wait_for_each_other(tmp_path):
  import threading  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  _write_folder(tmp_path / 'src', rng)
  results, errors = [], []

  def run():
    try:
      results.append(prepare.prepare('folder', str(tmp_path / 'src'),
                                     str(tmp_path / 'data'), num_classes=3))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=run) for _ in range(2)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not errors and len(results) == 2
  assert results[0][0] == results[1][0]
  assert len(_read_split(tmp_path / 'data', 'folder', 'train')) == 4
