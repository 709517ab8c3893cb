"""The dry run (`train.py --dry_run --json`) against the official recipes; split presets; BN groups.

Each config test pins the values the official code runs, written as literals
with their upstream source: tensorflow/tpu `models/official/efficientnet`
(commit 7dc921f) for V1 and Lite, google/automl `efficientnetv2` (commit
6a54c87) for V2. The dry run sees the 8 simulated CPU devices of conftest.py.
"""

import json
import os
import subprocess
import sys

import pytest

from efficientnet_jax import bn_groups
from efficientnet_jax.data import splits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry_run(name: str, tmp_path) -> dict:
  workdir = tmp_path / 'workdir'
  proc = subprocess.run(
      [sys.executable, 'train.py', f'--config=configs/{name}.py', f'--workdir={workdir}',
       '--dry_run', '--json'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not workdir.exists()  # nothing written, not even the directory
  return json.loads(proc.stdout)


def _sizes(desc: dict) -> list[int]:
  return [s['image_size'] for s in desc['stages']]


def _check_common_v1(desc: dict) -> None:
  # main.py: base_learning_rate 0.016 per 256 (lines 234-237, scaled at line 437),
  # num_train_images 1,281,167 with --holdout_shards unset (lines 73-76, 138-139).
  assert desc['schedule']['peak_lr'] == pytest.approx(0.016 * desc['batch_size'] / 256)
  assert (desc['splits']['train']['name'], desc['splits']['train']['num_examples']) == (
      'train', 1_281_167)
  assert desc['splits']['eval']['num_examples'] == 50_000
  # efficientnet_builder.py lines 187-188 (lite_builder lines 64-65): BN 0.99 / 1e-3.
  assert (desc['bn']['momentum'], desc['bn']['epsilon']) == (0.99, 1e-3)
  # utils.py TpuBatchNormalization lines 147-151: <= 8 replicas, each its own batch;
  # the default keeps the global batch there (bn_groups.py), bn_group_size=1 is official.
  assert (desc['bn']['replicas'], desc['bn']['group_size']) == (8, 8)
  # main.py line 420: L2 on every variable not named batch_normalization.
  assert set(desc['weight_decay_mask']['excluded_kinds']) == {'bn_bias', 'bn_scale'}


def _check_autoaugment(stage: dict) -> None:
  # autoaugment.py lines 669-670 (tensorflow/tpu) / 658 (google/automl): policy v0,
  # cutout_const=100, translate_const=250, in pixels at every image size.
  aug = stage['augment']
  assert (aug['name'], aug['policy'], aug['translate_const'], aug['cutout_const']) == (
      'autoaugment', 'v0', 250, 100)
  assert (stage['mixup_alpha'], stage['cutmix_alpha']) == (0, 0)


def test_dry_run_b0_is_the_official_v1_recipe(tmp_path):
  desc = _dry_run('b0', tmp_path)
  # efficientnet_builder.py line 39: 'efficientnet-b0': (1.0, 1.0, 224, 0.2).
  assert (desc['model']['width'], desc['model']['depth'], desc['model']['dropout']) == (
      1.0, 1.0, 0.2)
  assert _sizes(desc) == [224] and desc['eval']['image_size'] == 224
  assert desc['model']['params'] == 5_288_548
  _check_common_v1(desc)
  _check_autoaugment(desc['stages'][0])
  # preprocessing.py line 93: tf.compat.v1 resize_bicubic for train and eval.
  assert desc['stages'][0]['resize'] == desc['eval']['resize'] == 'bicubic_tf1'
  # preprocessing.py lines 99-105: area 0.08-1, aspect 3/4-4/3, min_object_covered 0.1.
  crop = desc['stages'][0]['crop']
  assert (crop['area_range'], crop['min_object_covered']) == ([0.08, 1.0], 0.1)
  # preprocessing.py lines 125-129: crop_padding round(224 * (1/0.875 - 1)) = 32.
  assert (desc['eval']['crop']['kind'], desc['eval']['crop']['crop_padding']) == ('centre', 32)
  assert desc['eval']['crop']['fraction'] == pytest.approx(0.875)


def test_dry_run_b4_is_the_official_v1_recipe(tmp_path):
  desc = _dry_run('b4', tmp_path)
  # efficientnet_builder.py line 43: 'efficientnet-b4': (1.4, 1.8, 380, 0.4).
  assert (desc['model']['width'], desc['model']['depth'], desc['model']['dropout']) == (
      1.4, 1.8, 0.4)
  assert _sizes(desc) == [380] and desc['eval']['image_size'] == 380
  _check_common_v1(desc)
  _check_autoaugment(desc['stages'][0])
  assert desc['stages'][0]['resize'] == desc['eval']['resize'] == 'bicubic_tf1'
  # CROP_PADDING = 32 at every size: tensorflow/tpu preprocessing.py lines 26 and
  # 125 at commit 80c0773, the code of the released B4 checkpoints. (7dc921f has
  # round(380/7) = 54 since commit 22d5cab, Nov 2021.)
  assert desc['eval']['crop']['crop_padding'] == 32
  assert desc['eval']['crop']['fraction'] == pytest.approx(380 / 412)


def test_dry_run_lite0_is_the_official_lite_recipe(tmp_path):
  desc = _dry_run('lite0', tmp_path)
  # lite/efficientnet_lite_builder.py line 40: 'efficientnet-lite0': (1.0, 1.0, 224, 0.2);
  # lines 30-31: inputs (x - 127) / 128.
  assert (desc['model']['family'], desc['model']['dropout']) == ('lite', 0.2)
  assert desc['model']['normalization'] == 'lite' and desc['model']['activation'] == 'relu6'
  assert _sizes(desc) == [224] and desc['eval']['image_size'] == 224
  _check_common_v1(desc)
  _check_autoaugment(desc['stages'][0])
  assert desc['eval']['crop']['crop_padding'] == 32
  # main.py lines 720-725: Lite resizes with ResizeMethod.BILINEAR through
  # tf.compat.v1 `tf.image.resize` (preprocessing.py line 91), i.e. TF1
  # resize_bilinear without half-pixel centres, for train and eval.
  assert desc['stages'][0]['resize'] == desc['eval']['resize'] == 'bilinear_tf1'


def _check_common_v2(desc: dict) -> None:
  # datasets.py lines 83-90 and main.py lines 336-339: train on 'train' (shards
  # [20:), minus the 25,021-image minival), report on 'eval' (50,000).
  assert (desc['splits']['train']['name'], desc['splits']['train']['tfds_split']) == (
      'train_minus_minival', 'train[25021:]')
  assert desc['splits']['train']['num_examples'] == 1_281_167 - 25_021
  assert (desc['splits']['eval']['name'], desc['splits']['eval']['num_examples']) == (
      'validation', 50_000)
  # hparams.py lines 228-229: BN momentum 0.9, epsilon 1e-3; line 259: no decay on
  # .*(bias|gamma|beta).*.
  assert (desc['bn']['momentum'], desc['bn']['epsilon']) == (0.9, 1e-3)
  assert set(desc['weight_decay_mask']['excluded_kinds']) == {'bias', 'bn_bias', 'bn_scale'}
  # utils.py line 189: groups of min(8, replicas); 8 simulated devices -> global.
  assert (desc['bn']['replicas'], desc['bn']['group_size']) == (8, 8)
  # main.py lines 470-474: four stages, each ending at int((s+1)/4 * train_steps).
  total = desc['total_steps']
  assert [s['end_step'] for s in desc['stages']] == [total * (k + 1) // 4 for k in range(4)]


def test_dry_run_v2_s_is_the_official_v2_recipe(tmp_path):
  desc = _dry_run('v2_s', tmp_path)
  _check_common_v2(desc)
  # effnetv2_configs.py line 193: train 300, eval 384, dropout 0.2, RandAugment 10;
  # main.py lines 464 and 474: sizes int(128 + 172 (s+1)/4), magnitude linspace(5, 10).
  assert _sizes(desc) == [171, 214, 257, 300] and desc['eval']['image_size'] == 384
  for stage, magnitude in zip(desc['stages'], [5, 20 / 3, 25 / 3, 10]):
    aug = stage['augment']
    assert (aug['name'], aug['layers']) == ('randaugment', 2)
    assert aug['magnitude'] == pytest.approx(magnitude)
    # autoaugment.py line 682: cutout_const=40, translate_const=100.
    assert (aug['translate_const'], aug['cutout_const']) == (100, 40)
    assert (stage['mixup_alpha'], stage['cutmix_alpha'], stage['dropout']) == (0, 0, 0.2)
    # preprocessing.py lines 32-41: area 0.05-1, min_object_covered 0, tf.image.resize.
    assert stage['resize'] == 'bilinear'
    assert (stage['crop']['area_range'], stage['crop']['min_object_covered']) == (
        [0.05, 1.0], 0.0)
  # preprocessing.py lines 60 and 70: no centre crop at 384 >= 320, bilinear resize.
  assert (desc['eval']['crop']['kind'], desc['eval']['resize']) == ('none', 'bilinear')


def test_dry_run_v2_b0_is_the_official_v2_b_recipe(tmp_path):
  desc = _dry_run('v2_b0', tmp_path)
  _check_common_v2(desc)
  # effnetv2_configs.py lines 204 and 227: train 192, eval 224, dropout 0.2,
  # 'effnetv1_autoaug', stages=4; main.py line 474: int(128 + 64 (s+1)/4).
  assert _sizes(desc) == [144, 160, 176, 192] and desc['eval']['image_size'] == 224
  for stage in desc['stages']:
    _check_autoaugment(stage)
    assert stage['dropout'] == 0.2  # main.py line 463: the dropout list is deleted
    # preprocess_legacy.py lines 85 and 91-98: resize_bicubic, the V1 inception crop.
    assert stage['resize'] == 'bicubic_tf1'
    assert (stage['crop']['area_range'], stage['crop']['min_object_covered']) == (
        [0.08, 1.0], 0.1)
  # preprocess_legacy.py lines 116-126: centre crop 224/(224+32), bicubic.
  assert (desc['eval']['crop']['crop_padding'], desc['eval']['resize']) == (32, 'bicubic_tf1')
  assert desc['model']['normalization'] == 'v1'  # lines 240-243: ImageNet mean/std


def test_dry_run_text_and_bad_config(tmp_path):
  workdir = tmp_path / 'w'
  ok = subprocess.run([sys.executable, 'train.py', '--config=configs/v2_b3.py', '--dry_run'],
                      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert 'train_minus_minival = train[25021:] (1,256,146)' in ok.stdout
  assert '156 px' in ok.stdout and '240 px' in ok.stdout
  bad = subprocess.run([sys.executable, 'train.py', '--config=configs/b0.py', '--dry_run',
                        f'--workdir={workdir}', '--config.data.train_split=train[:10%]'],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and 'is not known without reading the data' in bad.stderr
  assert not workdir.exists()


def test_split_presets_are_disjoint_slices_with_the_official_counts():
  # google/automl efficientnetv2/datasets.py lines 85-89: minival 25,021, eval
  # 50,000, trainval 1,281,167 (its 'train' constant, 1,256,144, is two short).
  assert splits.num_examples('imagenet2012', 'minival') == 25_021
  assert splits.num_examples('imagenet2012', 'train_minus_minival') == 1_256_146
  assert splits.num_examples('imagenet2012', 'validation') == 50_000
  assert splits.num_examples('imagenet2012', 'train') == 1_281_167
  assert splits.OFFICIAL_IMAGENET_TRAIN_MINUS_MINIVAL == 1_256_144
  assert splits.tfds_split('imagenet2012', 'minival') == 'train[:25021]'
  assert splits.tfds_split('imagenet2012', 'train_minus_minival') == 'train[25021:]'
  assert splits.tfds_split('fashion_mnist', 'minival') == 'minival'  # presets: imagenet only
  with pytest.raises(ValueError, match="split 'train\\[:5%\\]'.*known splits: minival, "):
    splits.num_examples('imagenet2012', 'train[:5%]')


def test_sources_read_the_preset_slices_and_tfds_counts_them():
  # TFDS's own slicing arithmetic over the imagenet2012 split sizes, no data read.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import naming  # pylint: disable=g-import-not-at-top
  from efficientnet_jax.data import sources  # pylint: disable=g-import-not-at-top

  def info(name, count):
    template = naming.ShardedFileTemplate(data_dir='/nonexistent', dataset_name='imagenet2012',
                                          split=name, filetype_suffix='tfrecord')
    return tfds.core.SplitInfo(name=name, shard_lengths=[count], num_bytes=0,
                               filename_template=template)

  known = tfds.core.SplitDict([info('train', 1_281_167), info('validation', 50_000)])
  for name in ('minival', 'train_minus_minival', 'validation'):
    preset = splits.preset('imagenet2012', name)
    assert known[preset.tfds_split].num_examples == preset.num_examples

  class Builder:  # records what the source asks TFDS for
    name, calls = 'imagenet2012', []

    def as_dataset(self, split, **kwargs):
      del kwargs
      self.calls.append(split)
      return split

  source = sources.TfdsSource(builder=Builder(), class_names=(), image_format='jpeg',
                              channels=3, image_key='image', label_key='label')
  assert source._dataset('minival', 0, 1, False, None) == 'train[:25021]'
  second = source._dataset('train_minus_minival', 1, 2, True, None)
  assert (second.split, second.index, second.count) == ('train[25021:]', 1, 2)


@pytest.mark.parametrize('family,replicas,expected', [
    # tensorflow/tpu utils.py lines 147-151: 1 up to 8, then max(8, n // 8).
    ('v1', 1, 1), ('v1', 8, 1), ('v1', 16, 8), ('v1', 32, 8), ('v1', 256, 32),
    ('lite', 1024, 128),
    # google/automl efficientnetv2/utils.py line 189: min(8, n).
    ('v2', 1, 1), ('v2', 4, 4), ('v2', 8, 8), ('v2', 32, 8), ('v2', 1024, 8),
])
def test_official_bn_group_size(family, replicas, expected):
  assert bn_groups.official_bn_group_size(family, replicas) == expected
  # The default (-1) follows the official rule above 8 replicas and keeps the
  # global batch up to 8 (V1's per-replica statistics there: bn_group_size=1).
  default = expected if replicas > 8 else replicas
  assert bn_groups.resolve_bn_group_size(-1, family, replicas) == default


def test_bn_group_size_values():
  assert bn_groups.resolve_bn_group_size(0, 'v1', 32) == 32  # global
  assert bn_groups.bn_group_count(0, 'v1', 32) == 1
  assert bn_groups.bn_group_count(-1, 'v1', 32) == 4 and bn_groups.bn_group_count(-1, 'v1', 8) == 1
  assert bn_groups.bn_group_count(1, 'v1', 8) == 8
  assert bn_groups.resolve_bn_group_size(4, 'v2', 32) == 4
  with pytest.raises(ValueError, match='groups of 3 replicas, which do not divide the 8'):
    bn_groups.resolve_bn_group_size(3, 'v1', 8)
  with pytest.raises(ValueError, match='groups of 8 replicas \\(the official rule\\)'):
    bn_groups.resolve_bn_group_size(-1, 'v1', 12)  # tensorflow/tpu raises here too
  with pytest.raises(ValueError, match='bn_group_size=-2; accepted'):
    bn_groups.resolve_bn_group_size(-2, 'v2', 8)


def test_the_dry_run_does_not_import_tensorflow():
  code = ('import sys; from configs import v2_s; from efficientnet_jax import recipe; '
          'recipe.describe(v2_s.get_config(), 8); print("tensorflow" in sys.modules)')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == 'False'
