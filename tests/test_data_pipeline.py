"""Tests of the grain pipelines and transforms (pan_jax.data)."""

import os

import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import smoke
from pan_jax.data import builder
from pan_jax.data import folder
from pan_jax.data import pipeline
from pan_jax.data import sources
from pan_jax.data import transforms


def _ramp_example(height, width, axis):
  """Image whose red channel and mask both encode the x (or y) coordinate."""
  coordinate = np.arange(width if axis == 'x' else height)
  if axis == 'x':
    grid = np.broadcast_to(coordinate[None, :], (height, width))
  else:
    grid = np.broadcast_to(coordinate[:, None], (height, width))
  image = np.zeros((height, width, 3), np.uint8)
  image[..., 0] = grid
  image[..., 1] = 200  # B = 0 and G = 200: never the padding colour
  return {'image': image, 'label': grid.astype(np.uint8), 'file_name': 'x'}


@pytest.mark.parametrize('axis', ['x', 'y'])
def test_scale_crop_flip_keep_image_and_mask_aligned(axis):
  example = _ramp_example(90, 120, axis)
  scale_crop = transforms.RandomScaleCrop(64, 0.5, 2.0)
  flip = transforms.RandomFlip()
  padded_any = False
  for seed in range(40):
    rng = np.random.default_rng(seed)
    out = flip.random_map(scale_crop.random_map(example, rng), rng)
    image, label = out['image'], out['label']
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert label.shape == (64, 64) and label.dtype == np.uint8
    padding = (image == transforms.MEAN_PIXEL).all(-1)
    # 255 exactly where padded (the source has no ignore pixels) ...
    np.testing.assert_array_equal(label == 255, padding)
    padded_any |= padding.any()
    # ... and elsewhere the mask (nearest) and the image (bilinear) sample the
    # same source position: the coordinate ramp agrees to within a pixel.
    valid = ~padding
    difference = np.abs(image[..., 0].astype(float) - label)[valid]
    assert difference.max() <= 1.5, (seed, difference.max())
  assert padded_any


def test_ignore_pixels_survive_and_stay_in_place():
  example = _ramp_example(64, 64, 'x')
  example['label'][20:40, 10:30] = 255
  example['image'][20:40, 10:30, 2] = 255  # blue marks the ignored block
  scale_crop = transforms.RandomScaleCrop(48, 0.5, 2.0)
  for seed in range(20):
    out = scale_crop.random_map(example, np.random.default_rng(seed))
    padding = (out['image'] == transforms.MEAN_PIXEL).all(-1)
    ignored = (out['label'] == 255) & ~padding
    # Ignored pixels come from the blue block: their (bilinear, antialiased)
    # image pixel has some of its blue.
    assert (out['image'][..., 2][ignored] > 0).all()
    inside = (out['image'][..., 2] == 255) & ~padding
    assert (out['label'][inside] == 255).all()


def test_normalize_and_pad():
  mean_pixel = np.array([[transforms.MEAN_PIXEL]], np.uint8)
  assert np.abs(transforms.normalize(mean_pixel)).max() < 0.01
  white = transforms.normalize(np.full((2, 2, 3), 255, np.uint8))
  np.testing.assert_allclose(white[0, 0], (255 - transforms.IMAGENET_MEAN) /
                             transforms.IMAGENET_STD, rtol=1e-6)
  example = transforms.Normalize().map(
      {'image': np.zeros((3, 5, 3), np.uint8),
       'label': np.ones((3, 5), np.uint8)})
  assert example['image'].dtype == np.float32
  assert example['label'].dtype == np.int32
  padded = transforms.PadToSize(4, 8).map(example)
  assert padded['image'].shape == (4, 8, 3) and (padded['image'][3:] == 0).all()
  assert (padded['label'][:, 5:] == 255).all() and (
      padded['label'][:3, :5] == 1).all()
  np.testing.assert_array_equal(padded['image_size'], [3, 5])
  with pytest.raises(ValueError, match='larger than the evaluation canvas'):
    transforms.PadToSize(2, 8).map(example)


class _IndexSource:
  """Examples whose label is their index everywhere (to trace them)."""

  def __init__(self, size, side=16):
    self._size, self._side = size, side

  def __len__(self):
    return self._size

  def __getitem__(self, index):
    return {'image': np.full((self._side, self._side, 3), index, np.uint8),
            'label': np.full((self._side, self._side), index, np.uint8),
            'file_name': str(index)}


def _index_config(global_batch_size):
  config = smoke.get_config()
  config.global_batch_size = global_batch_size
  config.data.crop_size = 16
  config.data.min_scale = config.data.max_scale = 1.0
  return config


def _labels(iterator, batches):
  """The example indices of the next `batches` batches, one list each."""
  return [[int(v) for v in next(iterator)['label'][:, 0, 0]]
          for _ in range(batches)]


def test_train_batches_do_not_depend_on_the_process_count(monkeypatch):
  monkeypatch.setattr(sources, 'open_split',
                      lambda data, split: _IndexSource(30))
  config = _index_config(global_batch_size=9)
  one = pipeline.build_train_iter(config, 0, 1)
  batch = next(pipeline.build_train_iter(config))
  assert batch['image'].shape == (9, 16, 16, 3)
  assert batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32
  single = _labels(one, 7)  # 63 examples: two epochs and a bit.
  per_process = [_labels(pipeline.build_train_iter(config, p, 3), 7)
                 for p in range(3)]
  for i, global_batch in enumerate(single):
    rows = [per_process[p][i] for p in range(3)]
    assert all(len(r) == 3 for r in rows)
    # Process p holds rows p, p + 3, p + 6 of the global batch.
    assert [global_batch[j] for j in range(9)] == [
        rows[j % 3][j // 3] for j in range(9)]
  stream = sum(single, [])
  epochs = stream[:30], stream[30:60]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(30))
  assert epochs[0] != epochs[1]  # A new order each epoch.


class _GradientSource(_IndexSource):
  """Examples with a horizontal gradient: crops and flips show."""

  def __getitem__(self, index):
    example = super().__getitem__(index)
    ramp = np.arange(self._side, dtype=np.uint8)[None, :, None] * 7
    example['image'] = example['image'] + ramp
    return example


def test_augmentation_does_not_depend_on_the_process_count(monkeypatch):
  monkeypatch.setattr(sources, 'open_split',
                      lambda data, split: _GradientSource(30, side=24))
  config = _index_config(global_batch_size=4)
  config.data.min_scale, config.data.max_scale = 0.5, 2.0
  single = next(pipeline.build_train_iter(config))
  halves = [next(pipeline.build_train_iter(config, p, 2)) for p in (0, 1)]
  for key in ('image', 'label'):
    np.testing.assert_array_equal(single[key][0::2], halves[0][key])
    np.testing.assert_array_equal(single[key][1::2], halves[1][key])


def test_train_iterator_restores_to_the_next_batches():
  config = smoke.get_config()
  iterator = pipeline.build_train_iter(config)
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(2)]
  restored = pipeline.build_train_iter(config)
  restored.set_state(state)
  for batch in expected:
    actual = next(restored)
    for key in ('image', 'label'):
      np.testing.assert_array_equal(actual[key], batch[key])
  # A different seed gives different batches.
  config.seed = 1
  other = next(pipeline.build_train_iter(config))
  assert not np.array_equal(other['label'], expected[0]['label'])


@pytest.mark.parametrize('process_count,batch_size', [(1, 3), (3, 4), (3, 2)])
def test_eval_yields_every_example_once(process_count, batch_size):
  config = smoke.get_config()
  source = sources.open_split(config.data, 'val')  # 10 examples
  seen, lengths = [], set()
  for process in range(process_count):
    batches = pipeline.build_eval_iter(config, None, batch_size, process,
                                       process_count)
    count = 0
    for batch in batches:
      count += 1
      assert batch['image'].shape == (batch_size, 96, 96, 3)
      assert batch['label'].shape == (batch_size, 96, 96)
      for i in range(batch_size):
        if not batch['valid'][i]:
          assert batch['index'][i] == -1 and (batch['label'][i] == 255).all()
          continue
        index = int(batch['index'][i])
        seen.append(index)
        example = source[index]
        height, width = example['label'].shape
        np.testing.assert_array_equal(batch['image_size'][i], [height, width])
        np.testing.assert_allclose(batch['image'][i, :height, :width],
                                   transforms.normalize(example['image']))
        assert (batch['image'][i, height:] == 0).all()
        np.testing.assert_array_equal(batch['label'][i, :height, :width],
                                      example['label'])
        assert (batch['label'][i, :, width:] == 255).all()
    assert count == len(batches)
    lengths.add(count)
  assert sorted(seen) == list(range(10))
  assert len(lengths) == 1  # the same number of batches on every process


def test_eval_canvas_too_small_is_an_error():
  config = smoke.get_config()
  config.eval.canvas_size = [64, 64]  # a list, as a config read from JSON
  with pytest.raises(ValueError, match='canvas_size'):
    pipeline.build_eval_iter(config)


def test_meta_and_errors():
  config = smoke.get_config()
  meta = sources.get_meta(config.data)
  assert meta.num_classes == 6 and len(meta.palette) == 6
  assert meta.ignore_label == 255
  with pytest.raises(ValueError, match='no split'):
    sources.open_split(config.data, 'test')
  val = sources.open_split(config.data, 'val')
  assert sources.file_names(config.data, 'val') == [
      val[i]['file_name'] for i in range(len(val))]
  data = ml_collections.ConfigDict({'name': 'voc2012_aug',
                                    'data_dir': '/nonexistent'})
  with pytest.raises(FileNotFoundError, match='pan_jax.data.prepare'):
    sources.get_meta(data)


def _build_folder(root, count=12):
  rng = np.random.default_rng(0)
  for split, number in (('train', count), ('val', 3)):
    for i in range(number):
      for kind, array in (
          ('images', rng.integers(0, 256, (40, 50, 3), np.uint8)),
          ('labels', rng.integers(0, 3, (40, 50), np.uint8))):
        path = os.path.join(root, 'src', kind, split,
                            f'{i}.{"jpg" if kind == "images" else "png"}')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(array).save(path)
  spec = folder.scan(os.path.join(root, 'src'), num_classes=3)
  builder.build(spec, os.path.join(root, 'data'))


def test_worker_processes_and_checkpoint_restore(tmp_path):
  """mp_prefetch with a tfds source; state saved and restored via Orbax."""
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  _build_folder(str(tmp_path))
  config = smoke.get_config()
  config.data.name = 'folder'
  config.data.data_dir = str(tmp_path / 'data')
  config.data.crop_size = 32
  config.data.num_workers = 1
  config.global_batch_size = 4
  iterator = pipeline.build_train_iter(config)
  try:
    first = next(iterator)
    assert first['image'].shape == (4, 32, 32, 3)
    manager = ocp.CheckpointManager(tmp_path / 'ckpt',
                                    item_names=('data_iter',))
    manager.save(1, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = [next(iterator) for _ in range(2)]
  finally:
    iterator.close()
  restored = pipeline.build_train_iter(config)
  try:
    manager.restore(1, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(restored)))
    for batch in expected:
      actual = next(restored)
      np.testing.assert_array_equal(actual['label'], batch['label'])
      np.testing.assert_array_equal(actual['image'], batch['image'])
  finally:
    restored.close()
  manager.close()
  # Same batches without workers: their content does not depend on them.
  config.data.num_workers = 0
  in_process = pipeline.build_train_iter(config)
  np.testing.assert_array_equal(next(in_process)['label'], first['label'])
