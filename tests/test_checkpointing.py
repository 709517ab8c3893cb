"""Tests for efficientnet_jax.checkpointing: atomic saves, resume, corruption and bad metrics."""

import gc
import logging
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from efficientnet_jax import checkpointing

# Failed orbax reads (several tests provoke them) leave coroutines and
# tensorstore callbacks behind that die with "Event loop is closed" whenever
# they are collected, possibly during a later test; harmless noise.
pytestmark = pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning'
)

META = {
    'model': 'b0',
    'config_fingerprint': 'abc123',
    'stage': 1,
    'image_size': 224,
}


def _create_state(key: jax.Array) -> dict:
  """A small train state shaped like the real one.

  The kernel is over 1 KiB, so OCDBT stores it in a data file, not inline.
  """
  k_kernel, k_rng = jax.random.split(key)
  params = {
      'conv': {'kernel': jax.random.normal(k_kernel, (64, 32))},
      'bias': jnp.arange(32, dtype=jnp.float32),
  }
  batch_stats = {'mean': jnp.full((32,), 0.25), 'var': jnp.full((32,), 2.0)}
  opt_state = optax.rmsprop(0.1, decay=0.9, eps=1e-3, momentum=0.9).init(params)
  # Distinct EMA values, so a restore that mixed up the subtrees would show.
  ema = {
      'params': jax.tree.map(lambda x: x * 0.5 + 1.0, params),
      'batch_stats': jax.tree.map(lambda x: x + 3.0, batch_stats),
  }
  return {
      'params': params,
      'batch_stats': batch_stats,
      'opt_state': opt_state,
      'ema': ema,
      'step': jnp.int32(1234),
      'rng': k_rng,  # typed key
  }


def _ckpt_dir(mngr) -> pathlib.Path:
  return pathlib.Path(mngr.directory)


def _mesh(num_devices: int) -> jax.sharding.Mesh:
  return jax.make_mesh(
      (num_devices,),
      ('data',),
      axis_types=(AxisType.Auto,),
      devices=jax.devices()[:num_devices],
  )


def _abstract_state(mesh: jax.sharding.Mesh):
  """eval_shape + shardings: kernels split over 'data', the rest replicated."""

  def sharding(path, x):
    name = jax.tree_util.keystr(path)
    spec = P('data') if name.endswith("['kernel']") else P()
    return jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(mesh, spec)
    )

  return jax.tree_util.tree_map_with_path(
      sharding, jax.eval_shape(_create_state, jax.random.key(0))
  )


def _make_state(seed: int = 0, mesh: jax.sharding.Mesh | None = None) -> dict:
  abstract = _abstract_state(mesh or _mesh(8))
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  return jax.jit(_create_state, out_shardings=shardings)(jax.random.key(seed))


def _host(tree) -> list[np.ndarray]:
  def to_numpy(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)

  return [to_numpy(x) for x in jax.tree.leaves(tree)]


def _assert_bit_exact(actual, expected) -> None:
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(_host(actual), _host(expected), strict=True):
    assert a.dtype == e.dtype
    np.testing.assert_array_equal(a, e)


@pytest.fixture
def failing_reads():
  """Collects what a failed orbax read leaves behind (see `pytestmark`).

  Collecting it here keeps it from surfacing in another test module, where
  the warning is not filtered.
  """
  yield
  gc.collect()


@pytest.fixture
def manager(tmp_path):
  mngr = checkpointing.make_checkpoint_manager(tmp_path, save_interval_steps=1)
  yield mngr
  mngr.close()


def _save(mngr, step, state=None, metrics=None, force=True):
  saved = checkpointing.save(
      mngr, step, state if state is not None else _make_state(step),
      meta={**META, 'step': step}, metrics=metrics, force=force,
  )
  checkpointing.wait(mngr)
  return saved


def test_round_trip_is_bit_exact_with_meta(manager, tmp_path):
  state = _make_state(seed=7)
  assert checkpointing.save(manager, 1234, state, meta=META)
  # Stands in for donation to the next train step: the save must already
  # hold its own copy of the arrays.
  expected = jax.device_get(jax.tree.map(lambda x: x.copy(), state))
  jax.tree.map(lambda x: x.delete(), state)
  checkpointing.wait(manager)
  assert _ckpt_dir(manager) == tmp_path.absolute() / 'checkpoints'

  abstract = _abstract_state(_mesh(8))
  restored, meta = checkpointing.restore(manager, abstract)

  assert meta == META
  _assert_bit_exact(restored, expected)
  _assert_bit_exact(restored['ema'], expected['ema'])
  assert restored['rng'].dtype == expected['rng'].dtype  # still a typed key
  assert restored['step'].dtype == jnp.int32 and int(restored['step']) == 1234
  for leaf, target in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
    assert leaf.sharding == target.sharding
  # The corruption check relies on orbax never writing an empty file.
  step_dir = _ckpt_dir(manager) / '1234'
  assert all(p.stat().st_size > 0 for p in step_dir.rglob('*') if p.is_file())


@pytest.mark.parametrize('num_devices', [4, 1])
def test_restore_onto_fewer_devices(manager, num_devices):
  state = _make_state(seed=3)
  _save(manager, 10, state)
  mesh = _mesh(num_devices)

  restored, _ = checkpointing.restore(manager, _abstract_state(mesh))

  _assert_bit_exact(restored, state)
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding.mesh.devices.size == num_devices
  kernel = restored['params']['conv']['kernel']
  assert kernel.sharding.spec == P('data')
  assert len(kernel.addressable_shards) == num_devices


def test_restore_needs_target_shardings(manager):
  _save(manager, 1)
  bare = jax.eval_shape(_create_state, jax.random.key(0))
  with pytest.raises(ValueError, match='with a sharding'):
    checkpointing.restore(manager, bare)


@pytest.mark.usefixtures('failing_reads')
def test_mismatched_abstract_state_is_not_called_corruption(manager):
  _save(manager, 1)
  abstract = _abstract_state(_mesh(8))
  kernel = abstract['params']['conv']['kernel']
  abstract['params']['conv']['kernel'] = jax.ShapeDtypeStruct(
      (128, 32), kernel.dtype, sharding=kernel.sharding
  )
  with pytest.raises(ValueError) as info:
    checkpointing.restore(manager, abstract)
  assert not isinstance(info.value, checkpointing.CheckpointError)
  assert any('step 1' in note for note in info.value.__notes__)


def test_keeps_last_n_plus_best_across_restarts(tmp_path):
  mngr = checkpointing.make_checkpoint_manager(
      tmp_path, max_to_keep=2, save_interval_steps=1
  )
  state = _make_state()
  for step, top1 in zip(range(1, 7), [0.1, 0.9, 0.2, 0.3, 0.4, 0.5]):
    _save(mngr, step, state, metrics={'eval/top1': top1, 'train/loss': 1.0})
  assert checkpointing.all_steps(mngr) == [2, 5, 6]
  assert checkpointing.best_step(mngr) == 2
  mngr.close()

  # The ranking survives a restart only because the metrics are on disk.
  mngr = checkpointing.make_checkpoint_manager(
      tmp_path, max_to_keep=2, save_interval_steps=1
  )
  assert checkpointing.all_steps(mngr) == [2, 5, 6]
  _save(mngr, 7, state, metrics={'eval/top1': 0.6})
  _save(mngr, 8, state)  # e.g. a pre-emption save: no metrics
  assert checkpointing.all_steps(mngr) == [2, 7, 8]
  _save(mngr, 9, state, metrics={'eval/top1': 0.95})
  assert checkpointing.all_steps(mngr) == [8, 9]
  on_disk = [p.name for p in _ckpt_dir(mngr).iterdir() if p.name.isdigit()]
  assert sorted(on_disk) == ['8', '9']
  mngr.close()


def test_without_keep_best_only_latest_are_kept(tmp_path):
  mngr = checkpointing.make_checkpoint_manager(
      tmp_path, max_to_keep=2, keep_best=False, save_interval_steps=1
  )
  for step, top1 in zip(range(1, 5), [0.9, 0.1, 0.2, 0.3]):
    _save(mngr, step, _make_state(), metrics={'eval/top1': top1})
  assert checkpointing.all_steps(mngr) == [3, 4]
  mngr.close()


def test_retention_deletes_by_rename_and_a_killed_purge_is_finished(tmp_path):
  # A kill while old steps are being removed must never leave a half-deleted
  # step that still lists as a checkpoint: removal starts with one rename into
  # `.deleting` (created by that rename), emptied after each save.
  mngr = checkpointing.make_checkpoint_manager(
      tmp_path, max_to_keep=1, keep_best=False, save_interval_steps=1
  )
  for step in (1, 2, 3):
    _save(mngr, step)
  checkpointing.wait(mngr)
  trash = _ckpt_dir(mngr) / checkpointing.DELETING_DIR
  assert trash.is_dir()
  assert checkpointing.all_steps(mngr) == [3]
  assert list(trash.iterdir()) == []
  mngr.close()

  # What a kill half-way through emptying `.deleting` leaves behind.
  (trash / '2' / 'state').mkdir(parents=True)
  (trash / '2' / 'state' / 'half_deleted').write_bytes(b'x')
  mngr = checkpointing.make_checkpoint_manager(tmp_path, max_to_keep=1, save_interval_steps=1)
  assert checkpointing.all_steps(mngr) == [3]
  assert list(trash.iterdir()) == []
  mngr.close()


def test_interval_and_forced_save_mid_interval(tmp_path):
  """The SIGTERM path: save(force=True) + wait between two periodic saves."""
  mngr = checkpointing.make_checkpoint_manager(
      tmp_path, save_interval_steps=100, async_save=True
  )
  state = _make_state()
  assert checkpointing.save(mngr, 100, state, meta=META)
  assert not checkpointing.save(mngr, 150, state, meta=META)
  assert checkpointing.save(mngr, 150, state, meta=META, force=True)
  checkpointing.wait(mngr)
  # A second SIGTERM save at the same step is a no-op, not an error.
  assert not checkpointing.save(mngr, 150, state, meta=META, force=True)
  assert not checkpointing.save(mngr, 100, state, meta=META, force=True)
  assert checkpointing.all_steps(mngr) == [100, 150]
  assert checkpointing.latest_step(mngr) == 150
  mngr.close()


@pytest.mark.usefixtures('failing_reads')
def test_read_meta_does_not_read_arrays(manager, tmp_path):
  with pytest.raises(FileNotFoundError):
    checkpointing.read_meta(manager)
  _save(manager, 5)
  _save(manager, 6)
  # With the arrays gone, only a meta-only read can still succeed.
  shutil.rmtree(_ckpt_dir(manager) / '6' / 'state')
  reopened = checkpointing.make_checkpoint_manager(tmp_path)
  assert checkpointing.read_meta(reopened) == {**META, 'step': 6}
  assert checkpointing.read_meta(reopened, step=5) == {**META, 'step': 5}
  with pytest.raises(checkpointing.CheckpointError, match='step 6'):
    checkpointing.restore(reopened, _abstract_state(_mesh(8)))
  reopened.close()


def _truncate_data(step_dir: pathlib.Path) -> None:
  data = [p for p in (step_dir / 'state' / 'd').iterdir() if p.is_file()]
  assert data
  for path in data:
    os.truncate(path, path.stat().st_size // 2)


def _zero_length(step_dir: pathlib.Path) -> None:
  (step_dir / 'state' / '_METADATA').write_bytes(b'')


def _flip_bytes(step_dir: pathlib.Path) -> None:
  path = step_dir / 'state' / 'manifest.ocdbt'
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


def _partial_copy(step_dir: pathlib.Path) -> None:
  (step_dir / 'commit_success.txt').unlink()


@pytest.mark.usefixtures('failing_reads')
@pytest.mark.parametrize(
    'corrupt', [_truncate_data, _zero_length, _flip_bytes, _partial_copy]
)
def test_corrupt_latest_step_raises_naming_it(manager, tmp_path, corrupt):
  good = _make_state(seed=1)
  _save(manager, 1, good)
  _save(manager, 2, _make_state(seed=2))
  corrupt(_ckpt_dir(manager) / '2')
  reopened = checkpointing.make_checkpoint_manager(tmp_path)
  abstract = _abstract_state(_mesh(8))

  with pytest.raises(checkpointing.CheckpointError) as info:
    checkpointing.restore(reopened, abstract)
  assert 'step 2' in str(info.value)
  assert str(_ckpt_dir(manager) / '2') in str(info.value)
  assert checkpointing.all_steps(reopened) == [1, 2]  # nothing was deleted
  # The meta is intact (or the damage is step-wide), so this still answers
  # or names the step.
  try:
    assert checkpointing.read_meta(reopened)['step'] == 2
  except checkpointing.CheckpointError as e:
    assert 'step 2' in str(e)
  restored, meta = checkpointing.restore(reopened, abstract, step=1)
  assert meta['step'] == 1
  _assert_bit_exact(restored, good)
  reopened.close()


def test_damaged_metrics_file_names_the_step(manager, tmp_path):
  _save(manager, 1, metrics={'eval/top1': 0.5})
  manager.close()
  (_ckpt_dir(manager) / '1' / 'metrics' / 'metrics').write_bytes(b'')
  # Orbax reads all metrics when opening the directory.
  with pytest.raises(checkpointing.CheckpointError, match='step 1'):
    checkpointing.make_checkpoint_manager(tmp_path)


@pytest.mark.usefixtures('failing_reads')
def test_fallback_to_previous_keeps_the_corrupt_step(manager, tmp_path, caplog):
  good = _make_state(seed=1)
  _save(manager, 1, good)
  _save(manager, 2, _make_state(seed=2))
  _truncate_data(_ckpt_dir(manager) / '2')
  reopened = checkpointing.make_checkpoint_manager(
      tmp_path, save_interval_steps=1
  )

  with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
    restored, meta = checkpointing.restore(
        reopened, _abstract_state(_mesh(8)), fallback_to_previous=True
    )

  assert meta['step'] == 1
  _assert_bit_exact(restored, good)
  assert 'Restored step 1 instead of corrupt step(s) [2]' in caplog.text
  assert checkpointing.all_steps(reopened) == [1]
  moved = list(_ckpt_dir(reopened).glob('2.corrupt-*'))
  assert len(moved) == 1 and (moved[0] / 'state').is_dir()  # kept, renamed
  # Training resumes from 1 and can save step 2 again.
  assert _save(reopened, 2, good, force=False)
  assert checkpointing.all_steps(reopened) == [1, 2]
  reopened.close()


def test_unfinalized_save_is_ignored(manager, tmp_path):
  state = _make_state(seed=1)
  _save(manager, 1, state)
  # kill -9 after the data (even commit_success.txt) was written, before the
  # atomic rename: only the tmp dir exists.
  ckpt_dir = _ckpt_dir(manager)
  shutil.copytree(ckpt_dir / '1', ckpt_dir / '2.orbax-checkpoint-tmp')
  reopened = checkpointing.make_checkpoint_manager(
      tmp_path, save_interval_steps=1
  )
  assert checkpointing.latest_step(reopened) == 1
  restored, meta = checkpointing.restore(reopened, _abstract_state(_mesh(8)))
  assert meta['step'] == 1
  _assert_bit_exact(restored, state)
  # Saving that step again replaces the stale tmp dir.
  assert _save(reopened, 2, state, force=False)
  assert checkpointing.all_steps(reopened) == [1, 2]
  assert not (_ckpt_dir(reopened) / '2.orbax-checkpoint-tmp').exists()
  reopened.close()


def test_async_write_error_surfaces_in_wait(tmp_path, monkeypatch):
  mngr = checkpointing.make_checkpoint_manager(
      tmp_path, max_to_keep=1, save_interval_steps=1
  )
  state = _make_state(seed=1)
  _save(mngr, 1, state)
  real_rename = os.rename

  def failing_rename(src, dst, *args, **kwargs):
    if '.orbax-checkpoint-tmp' in os.fspath(src):
      raise OSError(28, 'No space left on device (simulated)')
    return real_rename(src, dst, *args, **kwargs)

  monkeypatch.setattr(os, 'rename', failing_rename)
  assert checkpointing.save(mngr, 2, _make_state(seed=2), meta=META, force=True)
  with pytest.raises(
      checkpointing.CheckpointError, match='step 2.*No space left'
  ):
    checkpointing.wait(mngr)
  monkeypatch.undo()

  # Step 1 was due for deletion after step 2 committed; it must still be
  # there and known to the manager, and the half-written step 2 ignored.
  assert checkpointing.all_steps(mngr) == [1]
  assert (_ckpt_dir(mngr) / '2.orbax-checkpoint-tmp').is_dir()
  reopened = checkpointing.make_checkpoint_manager(tmp_path)
  assert checkpointing.latest_step(reopened) == 1
  restored, _ = checkpointing.restore(reopened, _abstract_state(_mesh(8)))
  _assert_bit_exact(restored, state)
  reopened.close()
  mngr.close()


def test_save_refuses_to_overwrite_unknown_step_dir(manager):
  (_ckpt_dir(manager) / '3').mkdir(parents=True)
  with pytest.raises(checkpointing.CheckpointError, match='Refusing .* step 3'):
    checkpointing.save(manager, 3, _make_state(), meta=META, force=True)
  assert (_ckpt_dir(manager) / '3').is_dir()


def test_meta_must_be_json(manager):
  with pytest.raises(TypeError, match='JSON'):
    checkpointing.save(
        manager, 1, _make_state(), meta={'bad': object()}, force=True
    )


@pytest.mark.usefixtures('failing_reads')
@pytest.mark.parametrize('damage', ['flip_unread', 'truncate_unread', 'flip_data'])
def test_manifest_catches_damage_a_restore_would_not_see(manager, damage, caplog):
  # A restore with target shardings never reads state/_sharding or
  # state/commit_success.txt; a flipped byte in OCDBT array data can restore as
  # other values without an error. The manifest covers every file.
  good = _make_state(seed=1)
  _save(manager, 1, good)
  _save(manager, 2, _make_state(seed=2))
  step_dir = _ckpt_dir(manager) / '2'
  assert checkpointing.verify_manifest(step_dir) == []
  if damage == 'flip_data':
    target = max((p for p in (step_dir / 'state').rglob('*')
                  if p.is_file() and p.parent.name == 'd'), key=lambda p: p.stat().st_size)
  else:
    target = step_dir / 'state' / ('_sharding' if damage == 'flip_unread'
                                   else 'commit_success.txt')
  data = bytearray(target.read_bytes())
  if damage == 'truncate_unread':
    data = data[:len(data) // 2]
  else:
    data[len(data) // 2] ^= 0x20
  target.write_bytes(bytes(data))
  name = str(target.relative_to(step_dir))
  problems = checkpointing.verify_manifest(step_dir)
  assert len(problems) == 1 and problems[0].startswith(name), problems
  abstract = _abstract_state(_mesh(8))
  with pytest.raises(checkpointing.CheckpointError, match=f'step 2 .*corrupt.*{name}'):
    checkpointing.restore(manager, abstract, 2)
  with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
    restored, meta = checkpointing.restore(manager, abstract, fallback_to_previous=True)
  assert meta['step'] == 1 and name in caplog.text
  _assert_bit_exact(restored, good)
  assert checkpointing.all_steps(manager) == [1]  # step 2 kept aside, not deleted
  assert len(list(_ckpt_dir(manager).glob('2.corrupt-*'))) == 1
