"""The tf.data pipeline: shapes, exact eval counts, determinism, resume, errors."""
import io
import itertools
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from efficientnet_jax import data
from efficientnet_jax.data import preprocessing
from tests.smoke_run import fake_image_value
from tests.smoke_run import write_fake_fashion_mnist


@pytest.fixture(scope='module')
def fake_fashion(tmp_path_factory):
  """DataSpec of a prepared fake Fashion-MNIST: 20 train / 10 test images."""
  root = tmp_path_factory.mktemp('fashion')
  source = write_fake_fashion_mnist(root / 'idx', num_train=20, num_test=10)
  spec = data.DataSpec('fashion_mnist', data_dir=str(root / 'tfds'),
                       source_dir=source)
  data.dataset_info(spec)  # prepares it once for the module
  return spec


def pixel_values(images, normalization='lite'):
  """Recovers each image's constant 0..255 value from normalised batches."""
  mean, std = (127.0, 128.0) if normalization == 'lite' else (128.0, 128.0)
  return np.rint(images.mean(axis=(1, 2, 3)) * std + mean).astype(int)


def train(spec, **kwargs):
  args = dict(image_size=16, batch_size=4, seed=0, normalization='v2',
              num_classes=10)
  return data.make_train_iterator(spec, **{**args, **kwargs})


def test_dataset_info(fake_fashion):
  info = data.dataset_info(fake_fashion)
  assert info['num_classes'] == 10 and info['num_skipped'] == 0
  assert (info['num_train'], info['num_eval']) == (20, 10)
  assert info['class_names'][0] == 'T-shirt/top'
  assert info['class_names'][9] == 'Ankle boot'


def test_mocked_tfds_dataset_shapes_dtypes_and_normalisation():
  with tfds.testing.mock_data(num_examples=10):
    spec = data.DataSpec('mnist')
    batch = next(train(spec, augment='randaugment', normalization='v2'))
    assert batch['image'].shape == (4, 16, 16, 3)
    assert batch['image'].dtype == np.float32
    assert -1.0 <= batch['image'].min() and batch['image'].max() <= 1.0
    assert batch['label'].shape == (4, 10) and batch['label'].dtype == np.float32
    np.testing.assert_array_equal(batch['label'].sum(-1), 1.0)
    batches = list(data.make_eval_iterator(spec, image_size=16, batch_size=4,
                                           normalization='v1'))
  assert [b['mask'].sum() for b in batches] == [4, 4, 2]
  for b in batches:
    assert b['image'].shape == (4, 16, 16, 3) and b['image'].dtype == np.float32
    assert b['label'].dtype == np.int32 and b['mask'].dtype == bool
  np.testing.assert_array_equal(batches[-1]['image'][2:], 0.0)


def test_eval_sees_every_example_once(fake_fashion):
  batches = list(data.make_eval_iterator(
      fake_fashion, image_size=28, batch_size=4, normalization='lite',
      crop_padding=0))
  assert len(batches) == 3  # 10 examples, batch 4: padded, never dropped
  images = np.concatenate([b['image'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == 10 and not mask[10:].any()
  got = sorted(zip(pixel_values(images[mask]), labels[mask]))
  assert got == [(fake_image_value('test', i), i % 10) for i in range(10)]


@pytest.mark.parametrize('batch_size', [3, 4])
def test_eval_across_two_processes(fake_fashion, batch_size):
  seen, lengths = [], []
  for process in range(2):
    batches = list(data.make_eval_iterator(
        fake_fashion, image_size=28, batch_size=batch_size,
        normalization='lite', crop_padding=0, process_index=process,
        process_count=2))
    lengths.append(len(batches))
    for b in batches:
      assert b['image'].shape[0] == batch_size
      seen.extend(pixel_values(b['image'][b['mask']]))
  assert lengths[0] == lengths[1]  # collectives never wait on a short process
  assert sorted(seen) == [fake_image_value('test', i) for i in range(10)]


def test_same_seed_same_batches_other_seed_differs(fake_fashion):
  kwargs = dict(augment='autoaugment', mixup_alpha=0.2, cutmix_alpha=0.2)
  first = [next(train(fake_fashion, **kwargs)) for _ in range(2)]
  np.testing.assert_array_equal(first[0]['image'], first[1]['image'])
  np.testing.assert_array_equal(first[0]['label'], first[1]['label'])
  other = next(train(fake_fashion, seed=1, **kwargs))
  assert not np.array_equal(first[0]['image'], other['image'])


def test_start_step_resumes_the_same_batches(fake_fashion):
  # 20 examples, batch 4: 5 steps per epoch, so step 7 is inside epoch 1.
  kwargs = dict(augment='randaugment', randaug_magnitude=5.0, mixup_alpha=0.5)
  full = list(itertools.islice(train(fake_fashion, **kwargs), 9))
  resumed = list(itertools.islice(train(fake_fashion, start_step=7, **kwargs),
                                  2))
  for a, b in zip(full[7:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_each_epoch_is_a_permutation_split_across_processes(fake_fashion):
  per_process = []
  for process in range(2):
    it = train(fake_fashion, image_size=28, batch_size=5, inception_crop=False,
               normalization='lite', process_index=process, process_count=2)
    epochs = [np.concatenate([pixel_values(next(it)['image'])
                              for _ in range(2)]) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1])  # same examples ...
    assert not np.array_equal(epochs[0], epochs[1])  # ... reshuffled
    per_process.append(set(epochs[0]))
  assert not per_process[0] & per_process[1]
  assert per_process[0] | per_process[1] == {
      fake_image_value('train', i) for i in range(20)}


def write_image(path, array, fmt):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  with open(path, 'wb') as f:
    f.write(buffer.getvalue())
  return buffer.getvalue()


def test_image_folder_skips_and_counts_corrupt_files(tmp_path):
  rng = np.random.default_rng(0)
  for name in ('cat', 'dog'):
    os.makedirs(tmp_path / name)
    for i in range(3):
      fmt, ext = ('JPEG', 'jpg') if i % 2 else ('PNG', 'png')
      write_image(tmp_path / name / f'{i}.{ext}',
                  rng.integers(0, 256, (20 + i, 30, 3), np.uint8), fmt)
  jpeg = write_image(tmp_path / 'dog' / 'truncated.jpg',
                     rng.integers(0, 256, (40, 40, 3), np.uint8), 'JPEG')
  with open(tmp_path / 'dog' / 'truncated.jpg', 'wb') as f:
    f.write(jpeg[:len(jpeg) // 2])
  with open(tmp_path / 'cat' / 'corrupt.jpg', 'wb') as f:
    f.write(b'this is not an image')
  (tmp_path / 'cat' / 'notes.txt').write_text('not an image file')

  spec = data.DataSpec('folder', folder=str(tmp_path))
  info = data.dataset_info(spec)
  assert info['class_names'] == ['cat', 'dog']
  assert (info['num_train'], info['num_eval'], info['num_skipped']) == (6, 6, 2)
  assert sorted(os.path.basename(p) for p in data.skipped_examples(spec)) == [
      'corrupt.jpg', 'truncated.jpg']
  batches = list(data.make_eval_iterator(spec, image_size=8, batch_size=4,
                                         normalization='v1'))
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
  batch = next(train(spec, image_size=8, batch_size=3, num_classes=2,
                     augment='autoaugment'))
  assert batch['image'].shape == (3, 8, 8, 3)


def test_image_folder_with_split_subfolders(tmp_path):
  for split, count in (('train', 4), ('test', 2)):
    for name in ('a', 'b'):
      os.makedirs(tmp_path / split / name)
      for i in range(count):
        write_image(tmp_path / split / name / f'{i}.png',
                    np.full((5, 5, 3), i, np.uint8), 'PNG')
  info = data.dataset_info(data.DataSpec('folder', folder=str(tmp_path)))
  assert (info['num_train'], info['num_eval']) == (8, 4)
  with pytest.raises(FileNotFoundError, match='validation'):
    data.dataset_info(data.DataSpec('folder', folder=str(tmp_path),
                                    eval_split='validation'))


def test_unknown_names_raise(fake_fashion):
  with pytest.raises(ValueError, match="'autoaug'.*'none', 'autoaugment', "
                     "'randaugment'"):
    train(fake_fashion, augment='autoaug')
  with pytest.raises(ValueError, match="'v9'"):
    data.make_eval_iterator(fake_fashion, image_size=8, batch_size=2,
                            normalization='v9')
  with pytest.raises(ValueError, match='num_classes=5'):
    train(fake_fashion, num_classes=5)


def test_missing_dataset_errors(tmp_path):
  with pytest.raises(ValueError, match="'no_such_dataset_xyz'"):
    data.dataset_info(data.DataSpec('no_such_dataset_xyz'))
  # A real TFDS name that is not prepared: never downloaded, clear error.
  with pytest.raises(FileNotFoundError, match="'mnist'.*tfds build mnist"):
    data.dataset_info(data.DataSpec('mnist', data_dir=str(tmp_path)))
  with pytest.raises(FileNotFoundError,
                     match='apt-get install dataset-fashion-mnist'):
    data.dataset_info(data.DataSpec('fashion_mnist', data_dir=str(tmp_path),
                                    source_dir=str(tmp_path / 'nothing')))


def test_imagenet_without_manual_download_says_where_the_tars_go(tmp_path):
  manual = tmp_path / 'manual'
  with pytest.raises(FileNotFoundError) as e:
    data.make_eval_iterator(
        data.DataSpec('imagenet2012', data_dir=str(tmp_path / 'tfds'),
                      manual_dir=str(manual), eval_split='validation'),
        image_size=224, batch_size=8, normalization='v1')
  message = str(e.value)
  assert str(manual / 'ILSVRC2012_img_train.tar') in message
  assert str(manual / 'ILSVRC2012_img_val.tar') in message
  assert 'scripts/prepare_imagenet.sh' in message


def test_eval_pipeline_equals_the_standalone_ops(tmp_path):
  rng = np.random.default_rng(1)
  os.makedirs(tmp_path / 'only')
  arrays = [rng.integers(0, 256, (30 + 5 * i, 40, 3), np.uint8)
            for i in range(3)]
  for i, array in enumerate(arrays):
    write_image(tmp_path / 'only' / f'{i}.png', array, 'PNG')
  batch = next(data.make_eval_iterator(
      data.DataSpec('folder', folder=str(tmp_path)), image_size=12,
      batch_size=3, normalization='v1'))
  for array, image in zip(arrays, batch['image']):
    expected = preprocessing.normalize(
        preprocessing.center_crop(array, 12, crop_padding=32), 'v1')
    np.testing.assert_allclose(image, expected, atol=1e-5)


def test_jpeg_tfds_dataset_uses_the_fused_crops():
  with tfds.testing.mock_data(num_examples=3):
    spec = data.DataSpec('imagenette', eval_split='validation')
    batch = next(data.make_eval_iterator(spec, image_size=12, batch_size=3,
                                         normalization='v2'))
    raw = tfds.builder('imagenette').as_dataset(
        split='validation',
        decoders={'image': tfds.decode.SkipDecoding()}).as_numpy_iterator()
    for ex, image in zip(raw, batch['image']):
      assert ex['image'][:2] == b'\xff\xd8'  # a JPEG: the fused path runs
      expected = preprocessing.normalize(
          preprocessing.decode_and_center_crop_jpeg(ex['image'], 12), 'v2')
      np.testing.assert_allclose(image, expected, atol=1e-5)
    train_batch = next(train(spec, image_size=12, batch_size=2,
                             augment='randaugment'))
  assert train_batch['image'].shape == (2, 12, 12, 3)


def test_fashion_mnist_under_mock_data_needs_no_files(tmp_path):
  # Trainer tests can run the default dataset on fake examples.
  with tfds.testing.mock_data(num_examples=6):
    spec = data.DataSpec('fashion_mnist', data_dir=str(tmp_path),
                         source_dir=str(tmp_path / 'none'))
    assert data.dataset_info(spec)['num_classes'] == 10
    batch = next(train(spec, batch_size=3))
  assert batch['image'].shape == (3, 16, 16, 3)
