"""Checkpoints of the training state; the only module that imports orbax.

The state is a plain dict pytree (`params`, `batch_stats`, `opt_state`, `ema`,
`step`), saved under `<workdir>/checkpoints/<step>/` as two orbax items:
`state` (arrays, OCDBT/zarr) and `meta` (a small JSON dict such as
`{'model': 'b0', 'config_fingerprint': ..., 'stage': 0, 'image_size': 224}`).

Retention: the last `max_to_keep` steps plus the best step by `eval/top1`.

Crash safety, as orbax 0.12 does it on a local filesystem: a save is written to
`<step>.orbax-checkpoint-tmp/`, `commit_success.txt` is written into it, and the
directory is then renamed to `<step>/`. A save killed half-way therefore leaves
only a `*.orbax-checkpoint-tmp` directory, which orbax never lists as a step
(and replaces when that step is saved again). On GCS there is no rename; the
step directory counts as finalized only once `commit_success.txt` exists.
Retention deletes old steps the same way round: orbax renames a step to
`.deleting/<step>` (`todelete_subdir`, one atomic rename) and this module
empties `.deleting` after each save. Orbax's own deletion removes the files of
`<step>/` in place (orbax-checkpoint 0.12.8, `_src/path/deleter.py`), so a kill
during it would leave a half-deleted step that still lists as a checkpoint.
The checks below walk the directory with `os`/`pathlib`, so workdirs must be
on a local or mounted filesystem (not `gs://`).

Corruption after the fact (a flipped byte, a truncated or emptied file, a
partial copy between buckets) is not caught by orbax, or only when tensorstore
fails half-way through a restore. Every step therefore carries a manifest,
`<step>/manifest.json`: the size and CRC-32 of every file of the step, written
by the step's commit (`_ManifestedTemporaryPath.finalize`) after every other
file and before `commit_success.txt` and the rename, so a finalized step always
has one. `restore` checks the manifest (all files, not only those it reads) on
a thread beside the orbax restore, so the check overlaps the reads instead of
adding to them. A mismatch raises `CheckpointError` naming the step and the
damaged files; nothing is ever deleted. With `fallback_to_previous=True`,
`restore` takes the newest intact step instead and renames the corrupt newer
ones to `<step>.corrupt-<time>` (see `restore`).

Pre-emption (SIGTERM): `runtime.Preemption` stops the loop at a step boundary
(the same step on every process), where it calls `save(..., force=True)` and then `wait(manager)`.
`force=True` bypasses `save_interval_steps`, and `save` returns False instead of
failing when that step is already on disk (e.g. SIGTERM right after a periodic
save). Arrays are copied to host before `save` returns, so the state may be
donated to the next train step straight away.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
import os
import pathlib
import shutil
import time
import zlib
from collections.abc import Mapping
from typing import Any

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies
from orbax.checkpoint._src.metadata import checkpoint as ocp_step_metadata
from orbax.checkpoint._src.path import atomicity as ocp_atomicity

logger = logging.getLogger(__name__)

CheckpointManager = ocp.CheckpointManager

# Where retention moves old steps before they are removed (not a step name).
DELETING_DIR = '.deleting'

# Metric that ranks checkpoints for `keep_best`; higher is better.
BEST_METRIC = 'eval/top1'

_STATE = 'state'
_META = 'meta'
# Files every finalized step written by this module contains (orbax 0.12.8).
# `commit_success.txt` is written before the tmp dir is renamed, so its absence
# in a step directory means a partial copy rather than an orbax save.
_STEP_FILES = ('commit_success.txt', '_CHECKPOINT_METADATA')
_ITEM_FILES = {
    _STATE: ('commit_success.txt', '_METADATA'),
    _META: ('commit_success.txt', 'metadata'),
}
# Tensorstore reports unreadable data as a ValueError whose message starts with
# an absl status code; these codes mean the files are damaged, whereas e.g. a
# shape or tree mismatch with `abstract_state` is the caller's error.
_CORRUPTION_CODES = ('DATA_LOSS', 'OUT_OF_RANGE', 'NOT_FOUND', 'UNKNOWN')


# What a run does with a corrupt newest checkpoint (config.corrupt_checkpoint).
ON_CORRUPT = ('fallback', 'error')


class CheckpointError(Exception):
  """A checkpoint cannot be written or read: truncated, corrupt or failed save."""


# --------------------------------------------------------------------------
# The manifest: size and CRC-32 of every file of a step, written in its commit.

MANIFEST_FILE = 'manifest.json'
_MANIFEST_FORMAT = 'efficientnet_jax/checkpoint-manifest/1'
# Written by the commit after the manifest, so not listed in it.
_UNLISTED = (MANIFEST_FILE, 'commit_success.txt')
_CHUNK = 8 << 20  # bytes read at a time while checksumming


def _file_crc32(path: pathlib.Path) -> int:
  # zlib releases the GIL on large buffers: several files checksum in parallel,
  # and beside orbax's own reads.
  crc = 0
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def _step_files(step_dir: pathlib.Path) -> list[str]:
  files = []
  for dirpath, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(dirpath, name), step_dir)
      if rel not in _UNLISTED:
        files.append(rel)
  return sorted(files)


def write_manifest(step_dir: str | os.PathLike[str]) -> dict:
  """Writes `<step_dir>/manifest.json` (size and CRC-32 of every file) and returns it."""
  step_dir = pathlib.Path(step_dir)
  names = _step_files(step_dir)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    crcs = list(pool.map(lambda n: _file_crc32(step_dir / n), names))
  files = {n: {'size': (step_dir / n).stat().st_size, 'crc32': f'{c:08x}'}
           for n, c in zip(names, crcs)}
  manifest = {'format': _MANIFEST_FORMAT, 'files': files}
  tmp = step_dir / (MANIFEST_FILE + '.tmp')
  tmp.write_text(json.dumps(manifest, indent=0, sort_keys=True))
  tmp.rename(step_dir / MANIFEST_FILE)
  return manifest


def verify_manifest(step_dir: str | os.PathLike[str]) -> list[str] | None:
  """What differs from the step's manifest ([] if nothing); None if it has no manifest.

  Every listed file is checked, whether or not a restore would read it: a file
  missing, of another size, or with another CRC-32 is reported by its path.
  """
  step_dir = pathlib.Path(step_dir)
  try:
    manifest = json.loads((step_dir / MANIFEST_FILE).read_text())
    files = manifest['files']
  except FileNotFoundError:
    return None
  except (OSError, ValueError, KeyError, TypeError) as e:
    return [f'{MANIFEST_FILE} unreadable ({type(e).__name__}: {_first_line(e)})']

  def check(item) -> str | None:
    name, want = item
    path = step_dir / name
    if not path.is_file():
      return f'{name} missing'
    size = path.stat().st_size
    if size != want['size']:
      return f'{name} has {size} bytes, the manifest says {want["size"]}'
    crc = f'{_file_crc32(path):08x}'
    if crc != want['crc32']:
      return f'{name} has CRC-32 {crc}, the manifest says {want["crc32"]}'
    return None

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    return [p for p in pool.map(check, sorted(files.items())) if p]


class _ManifestedTemporaryPath(ocp_atomicity.AtomicRenameTemporaryPath):
  """Orbax's atomic-rename commit with the manifest written just before it.

  Orbax's `finalize` updates `_CHECKPOINT_METADATA`, writes
  `commit_success.txt` and renames `<step>.orbax-checkpoint-tmp` to `<step>`
  (orbax-checkpoint 0.12.8, `_src/path/atomicity.py`). This does the metadata
  update itself, then the manifest over every file now in the tmp directory,
  then hands over to orbax's commit with the update already done. It runs on
  orbax's background thread (async saves) and on the primary process only.
  """

  async def finalize(self):
    if not _is_step_dir(self._final_path):  # an item's directory inside the step
      return await super().finalize()
    store = self._checkpoint_metadata_store
    if store is not None:
      await asyncio.to_thread(store.wait_until_finished)
      await asyncio.to_thread(
          store.update,
          file_path=ocp_step_metadata.step_metadata_file_path(self._tmp_path),
          commit_timestamp_nsecs=time.time_ns())
      await asyncio.to_thread(store.wait_until_finished)
      self._checkpoint_metadata_store = None  # done: orbax's finalize skips it
    await asyncio.to_thread(write_manifest, self._tmp_path)
    await super().finalize()


def _is_step_dir(path) -> bool:
  """Step directories are named by the step; items (`state`, `meta`) are not."""
  return pathlib.Path(str(path)).name.isdigit()


def make_checkpoint_manager(
    workdir: str | os.PathLike[str],
    *,
    max_to_keep: int | None = 3,
    keep_best: bool = True,
    save_interval_steps: int = 1000,
    async_save: bool = True,
) -> CheckpointManager:
  """Opens (creating if needed) the checkpoint directory `<workdir>/checkpoints`.

  Opening does not modify existing checkpoints: old steps are only removed by
  a later successful `save`. Call `read_meta` first to refuse a workdir that
  holds another model's checkpoints.

  Args:
    workdir: run directory; made absolute, as orbax requires.
    max_to_keep: number of most recent steps kept; None keeps all.
    keep_best: also keep the step with the highest `eval/top1` among the
      saves that passed `metrics`.
    save_interval_steps: `save` without `force` writes only at multiples of
      this (and the very first save of a run).
    async_save: write in a background thread; `wait` blocks until done.

  Returns:
    An orbax `CheckpointManager`; pass it to the functions of this module.

  Raises:
    ValueError: if `max_to_keep` or `save_interval_steps` is not positive.
  """
  if max_to_keep is not None and max_to_keep < 1:
    raise ValueError(f'max_to_keep must be >= 1 or None, got {max_to_keep}')
  if save_interval_steps < 1:
    raise ValueError(
        f'save_interval_steps must be >= 1, got {save_interval_steps}'
    )
  directory = pathlib.Path(workdir).absolute() / 'checkpoints'
  # `best_fn`/`max_to_keep` alone would build BestN(n=max_to_keep), which keeps
  # the best N and may delete the newest step, the one we resume from.
  # LatestN and BestN(n=1) under AnyPreservationPolicy keep both.
  policies: list[ocp_policies.PreservationPolicy] = [
      ocp_policies.LatestN(n=max_to_keep)
  ]
  if keep_best and max_to_keep is not None:
    policies.append(
        ocp_policies.BestN(
            get_metric_fn=_best_metric,
            reverse=False,  # ascending sort, the last n are kept: higher wins
            n=1,
            # `save` always writes metrics (maybe `{}`, ranked -inf), so this
            # only concerns steps whose metrics file is missing: LatestN
            # covers them, and True would keep them forever.
            keep_checkpoints_without_metrics=False,
        )
    )
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_interval_steps,
      preservation_policy=ocp_policies.AnyPreservationPolicy(policies),
      # Orbax writes `metrics` to disk only when `best_fn` is set. Without them
      # a restarted run would no longer know which step was best.
      best_fn=_best_metric,
      best_mode='max',
      enable_async_checkpointing=async_save,
      # Tmp dirs of killed saves are ignored and replaced when that step is
      # saved again; removing them at start-up is not worth a deletion path.
      cleanup_tmp_directories=False,
      temporary_path_class=_ManifestedTemporaryPath,
      todelete_subdir=DELETING_DIR,
  )
  _purge_deleted(directory)
  try:
    return ocp.CheckpointManager(
        directory, options=options, item_names=(_STATE, _META)
    )
  except (json.JSONDecodeError, OSError) as e:
    # Opening reads every step's `metrics` file and fails on a damaged one.
    raise CheckpointError(
        f'Cannot open {directory}: {_find_bad_metrics(directory)}'
        f' ({type(e).__name__}: {_first_line(e)}). Move that step directory'
        ' out of the way to continue.'
    ) from e


def save(
    manager: CheckpointManager,
    step: int,
    state: Any,
    *,
    meta: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
    force: bool = False,
) -> bool:
  """Saves `state` and `meta` at `step` if the save interval (or `force`) says so.

  Waits for the previous asynchronous save first, so its failure is raised
  here rather than lost.

  Args:
    manager: from `make_checkpoint_manager`.
    step: training step; the name of the step directory.
    state: pytree of jax arrays (any sharding).
    meta: JSON-serialisable dict stored next to the state.
    metrics: scalars for this step, e.g. {'eval/top1': 0.77}; `eval/top1`
      decides which step `keep_best` keeps.
    force: save even off the interval (pre-emption, end of training).

  Returns:
    True if a save was started, False if skipped (off interval, or `step` is
    already saved).

  Raises:
    CheckpointError: the previous asynchronous save failed, or a directory for
      `step` exists on disk that the manager does not know (orbax would
      silently replace it).
    TypeError: `meta` or `metrics` is not JSON-serialisable.
  """
  step = int(step)
  meta = dict(meta)
  try:
    json.dumps(meta)
  except TypeError as e:
    raise TypeError(f'checkpoint meta must be JSON-serialisable: {e}') from e
  metrics_json = {k: float(v) for k, v in (metrics or {}).items()}
  wait(manager)
  if step in manager.all_steps():
    logger.info('Checkpoint step %d already exists; not saving again.', step)
    return False
  step_dir = _step_dir(manager, step)
  if step_dir.exists():
    raise CheckpointError(
        f'Refusing to save step {step}: {step_dir} exists but is not a'
        ' checkpoint this manager tracks (orbax would overwrite it). Move it'
        ' away or use another workdir.'
    )
  return manager.save(
      step,
      args=ocp.args.Composite(
          **{
              _STATE: ocp.args.StandardSave(state),
              _META: ocp.args.JsonSave(meta),
          }
      ),
      # An empty dict rather than None: orbax warns on every save without
      # metrics, and the ranking treats the missing metric as -inf anyway.
      metrics=metrics_json,
      force=force,
  )


def wait(manager: CheckpointManager) -> None:
  """Blocks until the pending asynchronous save is on disk.

  Raises:
    CheckpointError: the pending save failed (orbax only reports an async
      failure to whoever waits next; google/orbax#605).
  """
  pending = manager.latest_step()
  try:
    manager.wait_until_finished()
  except Exception as e:
    # Orbax forgets the steps it meant to delete after this save even though
    # they are still on disk; re-reading the directory brings them back.
    manager.reload()
    raise CheckpointError(
        f'Asynchronous save of step {pending} to {manager.directory} failed:'
        f' {type(e).__name__}: {_first_line(e)}'
    ) from e
  _purge_deleted(pathlib.Path(manager.directory))


def _purge_deleted(directory: pathlib.Path) -> None:
  """Removes the steps retention moved to `.deleting` (primary process only).

  Run between saves, when orbax's background thread is not renaming into it;
  a kill half-way leaves only files under `.deleting`, removed next time.
  """
  trash = directory / DELETING_DIR
  if jax.process_index() != 0 or not trash.is_dir():
    return
  for entry in trash.iterdir():
    shutil.rmtree(entry, ignore_errors=True)


def close(manager: CheckpointManager) -> None:
  """Waits for the pending save (raising its error) and releases the manager."""
  try:
    wait(manager)
  finally:
    manager.close()


def latest_step(manager: CheckpointManager) -> int | None:
  """Returns the newest finalized step, or None; half-written saves are ignored."""
  return manager.latest_step()


def all_steps(manager: CheckpointManager) -> list[int]:
  """Returns the finalized steps, oldest first."""
  return list(manager.all_steps())


def best_step(manager: CheckpointManager) -> int | None:
  """Returns the kept step with the highest `eval/top1` (latest if none has it)."""
  return manager.best_step()


def read_meta(
    manager: CheckpointManager, step: int | None = None
) -> dict[str, Any]:
  """Reads only the JSON `meta` of a step (latest by default); no arrays.

  Args:
    manager: from `make_checkpoint_manager`.
    step: step to read; None means the latest.

  Returns:
    The dict passed as `meta` to `save`.

  Raises:
    FileNotFoundError: there is no such step.
    CheckpointError: the step's meta is missing or unreadable.
  """
  step = _resolve_step(manager, step)
  _check_step_dir(manager, step, items=(_META,))
  restored = _orbax_restore(
      manager, step, ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
  )
  return dict(restored[_META])


def restore(
    manager: CheckpointManager,
    abstract_state: Any,
    step: int | None = None,
    *,
    fallback_to_previous: bool = False,
) -> tuple[Any, dict[str, Any]]:
  """Restores `(state, meta)` with the shardings of `abstract_state`.

  The arrays are read straight into the target shardings, so a checkpoint
  saved on one mesh restores onto another (e.g. 8 devices -> 1).

  Args:
    manager: from `make_checkpoint_manager`.
    abstract_state: pytree like the saved state whose leaves are
      `jax.ShapeDtypeStruct`s with `.sharding` set (e.g. `jax.eval_shape` of
      the init function plus shardings) or concrete `jax.Array`s.
    step: step to restore; None means the latest.
    fallback_to_previous: if the chosen step is corrupt, log it and restore
      the newest intact older step instead. Corrupt steps newer than the
      restored one are renamed to `<step>.corrupt-<unix time>` (kept, not
      deleted): left in place, they would make orbax skip every periodic save
      up to their step and refuse a save at it.

  Returns:
    The restored state (same tree structure as `abstract_state`) and meta.

  Raises:
    FileNotFoundError: no checkpoint (or no such step) exists.
    CheckpointError: the step is truncated or corrupt (every candidate step,
      with `fallback_to_previous`); the message names the step and path.
    ValueError: `abstract_state` lacks shardings or does not match the
      checkpoint (shape or tree structure).
  """
  abstract_state = _as_abstract(abstract_state)
  wait(manager)
  step = _resolve_step(manager, step)
  candidates = [step]
  if fallback_to_previous:
    candidates += sorted((s for s in manager.all_steps() if s < step), reverse=True)
  corrupt: list[int] = []
  for candidate in candidates:
    try:
      state, meta = _restore_step(manager, candidate, abstract_state)
    except CheckpointError as e:
      if not fallback_to_previous:
        raise CheckpointError(
            f'{str(e).rstrip(".")}. {_how_to_proceed(manager, candidate)}'
        ) from e
      logger.warning('%s; trying an older step.', e)
      corrupt.append(candidate)
      continue
    if corrupt:
      logger.warning(
          'Restored step %d instead of corrupt step(s) %s.', candidate, corrupt
      )
      _quarantine(manager, corrupt)
    return state, meta
  raise CheckpointError(
      f'No intact checkpoint at or before step {step} in {manager.directory};'
      f' corrupt steps: {corrupt}'
  )


def _restore_step(
    manager: CheckpointManager, step: int, abstract_state: Any
) -> tuple[Any, dict[str, Any]]:
  """Restores one step while its manifest is checked on a thread alongside."""
  _check_step_dir(manager, step, items=(_STATE, _META))
  step_dir = _step_dir(manager, step)
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    check = pool.submit(verify_manifest, step_dir)
    try:
      restored = _orbax_restore(
          manager,
          step,
          ocp.args.Composite(
              **{
                  _STATE: ocp.args.StandardRestore(abstract_state),
                  _META: ocp.args.JsonRestore(),
              }
          ),
      )
    except CheckpointError as e:
      # The manifest names every damaged file; tensorstore only the first read.
      _raise_if_damaged(step, step_dir, check.result(), cause=e)
      raise
    _raise_if_damaged(step, step_dir, check.result())
  return restored[_STATE], dict(restored[_META])


def _raise_if_damaged(step: int, step_dir: pathlib.Path, problems: list[str] | None,
                      cause: BaseException | None = None) -> None:
  if problems is None:
    logger.warning('Checkpoint step %d has no %s (saved before manifests); '
                   'its files were not verified.', step, MANIFEST_FILE)
  elif problems:
    raise CheckpointError(
        f'Checkpoint step {step} at {step_dir} is corrupt: {"; ".join(problems[:5])}'
        + (f' (and {len(problems) - 5} more)' if len(problems) > 5 else '')
    ) from cause


def _orbax_restore(
    manager: CheckpointManager, step: int, args: ocp.args.Composite
) -> Any:
  """Runs an orbax restore, turning unreadable-file errors into CheckpointError."""
  try:
    return manager.restore(step, args=args)
  except Exception as e:
    if _is_corruption(e):
      raise CheckpointError(
          f'Checkpoint step {step} at {_step_dir(manager, step)} is corrupt:'
          f' {_describe(_corruption_cause(e))}'
      ) from e
    e.add_note(f'while restoring step {step} from {_step_dir(manager, step)}')
    raise


def _is_corruption(e: BaseException) -> bool:
  # Orbax wraps tensorstore's error (e.g. OUT_OF_RANGE reading a file cut in
  # half) in a plain Exception, so the cause chain and the text are checked.
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, (json.JSONDecodeError, OSError, KeyError)):
      # KeyError: orbax's "Item 'state' was not found in the checkpoint".
      return True
    text = str(e)
    if isinstance(e, ValueError) and text.startswith(_CORRUPTION_CODES):
      return True
    if any(f'{code}: Error reading' in text for code in ('DATA_LOSS', 'OUT_OF_RANGE')):
      return True
    e = e.__cause__ or e.__context__
  return False


def _corruption_cause(e: BaseException) -> BaseException:
  """The innermost error of the chain that says what is damaged (tensorstore's), else `e`.

  Orbax's own wrapper only names the array slice it was reading.
  """
  found, seen = e, set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, (json.JSONDecodeError, OSError)) or (
        isinstance(e, ValueError) and str(e).startswith(_CORRUPTION_CODES)):
      found = e
    e = e.__cause__ or e.__context__
  return found


def _describe(e: BaseException) -> str:
  return f'{type(e).__name__}: {_first_line(e)}'


def _check_step_dir(
    manager: CheckpointManager, step: int, *, items: tuple[str, ...]
) -> None:
  """Raises CheckpointError if files of `step` are missing or empty.

  Orbax never writes an empty file, so a zero-length one means truncation
  (disk full, partial copy). This costs a directory walk, no data reads.
  """
  step_dir = _step_dir(manager, step)
  if not step_dir.is_dir():
    raise CheckpointError(f'Checkpoint step {step}: {step_dir} is gone')
  required = [step_dir / name for name in _STEP_FILES]
  for item in items:
    required += [step_dir / item / name for name in _ITEM_FILES[item]]
  missing = [str(p.relative_to(step_dir)) for p in required if not p.is_file()]
  # Top-level files plus everything under the items asked for: `read_meta`
  # must still work when only the (much larger) state is damaged.
  files = [p for p in step_dir.iterdir() if p.is_file()]
  for item in items:
    for dirpath, _, filenames in os.walk(step_dir / item):
      files += [pathlib.Path(dirpath, name) for name in filenames]
  empty = sorted(
      str(p.relative_to(step_dir)) for p in files if p.stat().st_size == 0
  )
  if missing or empty:
    raise CheckpointError(
        f'Checkpoint step {step} at {step_dir} is truncated or corrupt:'
        f' missing files {missing}, zero-length files {empty}'
    )


def _how_to_proceed(manager: CheckpointManager, step: int) -> str:
  """The advice appended to a corrupt-step error: which step a resume would use instead."""
  src = _step_dir(manager, step)
  older = [s for s in manager.all_steps() if s < step]
  then = (f'to resume from step {max(older)}' if older else 'to start from scratch')
  return f'Move it aside {then}: mv {src} {src}.corrupt'


def _quarantine(manager: CheckpointManager, steps: list[int]) -> None:
  """Renames corrupt step dirs so orbax stops listing them; deletes nothing."""
  if jax.process_index() == 0:
    stamp = int(time.time())
    for step in steps:
      src = _step_dir(manager, step)
      dst = src.with_name(f'{src.name}.corrupt-{stamp}')
      logger.warning('Moving corrupt checkpoint %s to %s.', src, dst)
      src.rename(dst)
  if jax.process_count() > 1:
    # Other hosts must not reload the directory before the rename is done.
    multihost_utils.sync_global_devices(
        'checkpointing_quarantine'
    )
  manager.reload()


def _resolve_step(manager: CheckpointManager, step: int | None) -> int:
  steps = manager.all_steps()
  if step is None:
    if not steps:
      raise FileNotFoundError(f'No checkpoint in {manager.directory}')
    return max(steps)
  step = int(step)
  if step not in steps:
    raise FileNotFoundError(
        f'No checkpoint for step {step} in {manager.directory};'
        f' available steps: {list(steps)}'
    )
  return step


def _as_abstract(tree: Any) -> Any:
  """Maps leaves to ShapeDtypeStructs and checks that each carries a sharding."""

  def leaf(path, x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if not isinstance(x, jax.ShapeDtypeStruct) or x.sharding is None:
      # Without a target sharding orbax falls back to the saved one, which
      # names devices that may not exist on this machine (google/orbax#648).
      raise ValueError(
          f'abstract_state leaf {jax.tree_util.keystr(path)} must be a jax.Array'
          f' or a jax.ShapeDtypeStruct with a sharding, got {x!r}'
      )
    return x

  return jax.tree_util.tree_map_with_path(leaf, tree)


def _best_metric(metrics: Any) -> float:
  """Ranking value of a step for `keep_best`; a missing or NaN metric ranks last."""
  value = metrics.get(BEST_METRIC) if isinstance(metrics, Mapping) else None
  if value is None:
    return -math.inf
  value = float(value)
  return -math.inf if math.isnan(value) else value


def _find_bad_metrics(directory: pathlib.Path) -> str:
  """Names the step directories whose `metrics` JSON cannot be parsed."""
  bad = []
  for path in sorted(directory.glob('*/metrics/metrics')):
    try:
      json.loads(path.read_text())
    except (ValueError, OSError):
      bad.append(f'step {path.parent.parent.name} ({path})')
  return 'unreadable metrics in ' + ', '.join(bad) if bad else 'unknown cause'


def _step_dir(manager: CheckpointManager, step: int) -> pathlib.Path:
  # Default orbax step naming: no prefix, no zero padding.
  return pathlib.Path(manager.directory) / str(step)


def _first_line(e: BaseException) -> str:
  # Tensorstore errors append a multi-kilobyte JSON spec after the first line.
  text = str(e).split('\n', 1)[0].split(' [tensorstore_spec', 1)[0]
  # Orbax appends the bound `spec` method's repr of the whole TensorStore.
  text = text.split(' See full TensorStore details:', 1)[0]
  return text if len(text) <= 500 else text[:500] + '...'
