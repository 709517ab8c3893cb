"""Reads and writes PyTorch `torch.save` files with numpy only (no torch).

Two on-disk formats exist:

* Zip (torch >= 1.6, the default since): a stored (uncompressed) zip with
  `<archive>/data.pkl` (the pickled object), one `<archive>/data/<key>` file
  of raw bytes per storage, and `<archive>/byteorder` ('little' when absent).
* Legacy (torch < 1.6, `_use_new_zipfile_serialization=False`): consecutive
  pickles in one stream — the magic number 0x1950a86a20f9469cfc6c, the protocol
  version 1001, a `sys_info` dict, the object, and the list of storage keys —
  followed, per key in that list's order, by an int64 element count and the
  raw storage bytes.

In both, a tensor is pickled as a call of `torch._utils._rebuild_tensor_v2(
storage, offset, size, stride, requires_grad, backward_hooks[, metadata])`
and each storage is a persistent id `('storage', torch.<T>Storage, key,
location, numel[, view_metadata])`.

Security: unpickling runs whatever callable a file names, so a `.pth` from an
untrusted source can execute code under a plain `pickle.load`. The unpickler
here resolves only the globals a state dict needs (`collections.OrderedDict`,
the two tensor rebuild functions and the `torch.*Storage` types, which become
inert stand-ins) and raises `UnsafePickleError` naming any other global, before
anything is called. Whole pickled modules, optimizer states with custom
classes, TorchScript archives etc. are therefore refused, by design.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Mapping

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL = 1001

# torch.<name>Storage -> element dtype (little-endian).
STORAGE_DTYPES: dict[str, np.dtype] = {
    'DoubleStorage': np.dtype('<f8'), 'FloatStorage': np.dtype('<f4'),
    'HalfStorage': np.dtype('<f2'), 'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype('<i8'), 'IntStorage': np.dtype('<i4'),
    'ShortStorage': np.dtype('<i2'), 'CharStorage': np.dtype('i1'),
    'ByteStorage': np.dtype('u1'), 'BoolStorage': np.dtype('?'),
}
_STORAGE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}
_REBUILD_FUNCTIONS = ('_rebuild_tensor_v2', '_rebuild_parameter')


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle names a global outside the state-dict allow-list."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Inert stand-in for a `torch.<T>Storage` class: only its dtype matters."""
  name: str

  @property
  def dtype(self) -> np.dtype:
    return STORAGE_DTYPES[self.name]


@dataclasses.dataclass
class _Storage:
  """A storage named by a persistent id; `data` is filled once its bytes are read."""
  key: str
  dtype: np.dtype
  numel: int
  data: np.ndarray | None = None
  view_of: tuple[_Storage, int] | None = None  # legacy storage views: (root, offset)

  def array(self) -> np.ndarray:
    if self.view_of is not None:
      root, offset = self.view_of
      return root.array()[offset:offset + self.numel]
    if self.data is None:
      raise pickle.UnpicklingError(f'storage {self.key!r} has no data in the file')
    return self.data


@dataclasses.dataclass
class _TensorRef:
  """A tensor waiting for its storage bytes (legacy files store them after the pickle)."""
  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]

  def to_numpy(self) -> np.ndarray:
    flat = self.storage.array()
    if 0 in self.size:
      return np.zeros(self.size, flat.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if self.offset < 0 or last >= flat.size or min(self.stride, default=0) < 0:
      raise pickle.UnpicklingError(
          f'tensor of size {self.size} stride {self.stride} offset {self.offset} '
          f'overruns storage {self.storage.key!r} of {flat.size} elements')
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], self.size, [s * flat.itemsize for s in self.stride])
    return np.array(view)  # owns its memory, C-contiguous


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> _TensorRef:
  del requires_grad, backward_hooks, metadata  # training-time state, not values
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f'tensor rebuilt from {type(storage).__name__}, not a storage')
  return _TensorRef(storage, int(storage_offset), tuple(int(n) for n in size),
                    tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the state-dict globals; records storages by persistent id."""

  def __init__(self, file: BinaryIO, storages: dict[str, _Storage]):
    super().__init__(file)
    self._storages = storages

  def find_class(self, module: str, name: str) -> Any:
    if module == 'collections' and name == 'OrderedDict':
      return collections.OrderedDict
    if module == 'torch._utils' and name in _REBUILD_FUNCTIONS:
      return {'_rebuild_tensor_v2': _rebuild_tensor_v2,
              '_rebuild_parameter': _rebuild_parameter}[name]
    if module == 'torch' and name in STORAGE_DTYPES:
      return _StorageType(name)
    raise UnsafePickleError(
        f'refusing to unpickle global {module}.{name}: only collections.OrderedDict, '
        f'torch._utils.{{{", ".join(_REBUILD_FUNCTIONS)}}} and torch.*Storage are '
        'allowed in a weights file (it may execute code)')

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType)):
      raise UnsafePickleError(f'refusing persistent id {pid!r}: only tensor storages '
                              'are allowed in a weights file')
    _, storage_type, key, _location, numel = pid[:5]
    view = pid[5] if len(pid) == 6 else None
    key = str(key)
    storage = self._storages.get(key)
    if storage is None:
      storage = _Storage(key, storage_type.dtype, int(numel))
      self._storages[key] = storage
    if view is None:
      return storage
    view_key, offset, view_size = view  # pre-1.0 files: a slice of a root storage
    return self._storages.setdefault(
        str(view_key), _Storage(str(view_key), storage.dtype, int(view_size),
                                view_of=(storage, int(offset))))


def _materialize(obj: Any) -> Any:
  """Replaces every _TensorRef in nested dicts/lists/tuples by a numpy array."""
  if isinstance(obj, _TensorRef):
    return obj.to_numpy()
  if isinstance(obj, dict):
    out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for key, value in obj.items():
      out[key] = _materialize(value)
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v) for v in obj)
  return obj


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n == 'data.pkl' or n.endswith('/data.pkl')]
    if len(pickles) != 1:
      raise ValueError(f'{path}: a zip without exactly one data.pkl is not a torch.save '
                       f'file (TorchScript archives are not supported); found {pickles}')
    prefix = pickles[0][:-len('data.pkl')]
    byteorder = 'little'
    if prefix + 'byteorder' in names:
      byteorder = archive.read(prefix + 'byteorder').decode().strip()
    storages: dict[str, _Storage] = {}
    obj = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), storages).load()
    for storage in storages.values():
      if storage.view_of is not None:
        continue
      raw = archive.read(f'{prefix}data/{storage.key}')
      dtype = storage.dtype if byteorder == 'little' else storage.dtype.newbyteorder('>')
      count = len(raw) // dtype.itemsize
      if count < storage.numel:
        raise ValueError(f'{path}: storage {storage.key} holds {count} elements, '
                         f'expected {storage.numel}')
      storage.data = np.frombuffer(raw, dtype, storage.numel).astype(storage.dtype)
  return _materialize(obj)


def _load_legacy(path: str) -> Any:
  with open(path, 'rb') as f:
    storages: dict[str, _Storage] = {}

    def next_pickle():
      return _RestrictedUnpickler(f, storages).load()

    if next_pickle() != LEGACY_MAGIC:
      raise ValueError(f'{path}: not a torch.save file (bad magic number)')
    protocol = next_pickle()
    if protocol != LEGACY_PROTOCOL:
      raise ValueError(f'{path}: unsupported legacy protocol version {protocol}')
    sys_info = next_pickle()
    little = sys_info.get('little_endian', True) if isinstance(sys_info, dict) else True
    obj = next_pickle()
    keys = next_pickle()
    for key in keys:
      storage = storages.get(str(key))
      if storage is None:
        raise ValueError(f'{path}: storage {key} is listed but never referenced')
      (count,) = struct.unpack('<q' if little else '>q', f.read(8))
      dtype = storage.dtype if little else storage.dtype.newbyteorder('>')
      raw = f.read(count * dtype.itemsize)
      if len(raw) != count * dtype.itemsize:
        raise ValueError(f'{path}: truncated data for storage {key}')
      storage.data = np.frombuffer(raw, dtype).astype(storage.dtype)
  return _materialize(obj)


def load_torch_file(path: str | os.PathLike) -> Any:
  """Loads a `torch.save` file (zip or legacy) into numpy arrays, torch-free.

  Args:
    path: the file.

  Returns:
    The saved object with every tensor as a numpy array (bfloat16 via
    ml_dtypes); a state dict comes back as an OrderedDict of arrays.

  Raises:
    UnsafePickleError: the file references a global outside the allow-list.
    ValueError: the file is neither format or is truncated.
  """
  path = os.fspath(path)
  try:
    if zipfile.is_zipfile(path):
      return _load_zip(path)
    return _load_legacy(path)
  except UnsafePickleError as e:
    raise UnsafePickleError(f'{path}: {e}') from None
  except (pickle.UnpicklingError, EOFError, struct.error, zipfile.BadZipFile, KeyError) as e:
    raise ValueError(f'{path}: not a readable torch.save file ({e})') from e


# --------------------------------------------------------------------------
# Writing (for tests and for handing our weights to PyTorch code).
# --------------------------------------------------------------------------


class _Global:
  """A reference to a torch global, written as a GLOBAL opcode without importing torch."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle insists that a reduce function be callable
    raise TypeError(f'{self.module}.{self.name} is a placeholder')


class _StorageOut:
  def __init__(self, key: str, array: np.ndarray):
    self.key, self.array = key, array


class _TensorOut:
  def __init__(self, storage: _StorageOut):
    self.storage = storage

  def __reduce__(self):
    array = self.storage.array
    stride = tuple(s // array.itemsize for s in array.strides)
    return (_Global('torch._utils', '_rebuild_tensor_v2'),
            (self.storage, 0, tuple(array.shape), stride, False,
             collections.OrderedDict()))


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler exposes `dispatch`
  """Writes _Global as a GLOBAL opcode and storages as torch's persistent ids."""
  dispatch = dict(pickle._Pickler.dispatch)

  def _save_torch_global(self, obj: _Global) -> None:
    self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode())
    self.memoize(obj)

  dispatch[_Global] = _save_torch_global

  def persistent_id(self, obj: Any) -> Any:
    if isinstance(obj, _StorageOut):
      return ('storage', _Global('torch', _STORAGE_NAMES[obj.array.dtype]), obj.key, 'cpu',
              obj.array.size)
    return None


def _storages_for(state: Mapping[str, Any]):
  tensors, storages = collections.OrderedDict(), []
  for i, (name, value) in enumerate(state.items()):
    array = np.asarray(value)
    if not array.flags.c_contiguous:
      array = array.copy(order='C')  # (np.ascontiguousarray would make scalars 1-d)
    if array.dtype.byteorder == '>':
      array = array.astype(array.dtype.newbyteorder('<'))  # torch files are little-endian here
    if array.dtype not in _STORAGE_NAMES:
      raise ValueError(f'{name}: dtype {array.dtype} has no torch storage type')
    storage = _StorageOut(str(i), array)
    storages.append(storage)
    tensors[name] = _TensorOut(storage)
  return tensors, storages


def _pickle(obj: Any, file: BinaryIO) -> None:
  _TorchPickler(file, protocol=2).dump(obj)


def save_torch_state_dict(path: str | os.PathLike, state: Mapping[str, Any], *,
                          legacy: bool = False, archive_name: str = 'archive') -> None:
  """Writes {name: array} as `torch.load` reads it, without torch.

  Args:
    path: output file.
    state: flat mapping of tensor names to arrays (any shape, incl. scalars).
    legacy: write the pre-1.6 stream format instead of the zip format.
    archive_name: the zip's top directory (torch uses 'archive').
  """
  tensors, storages = _storages_for(state)
  if legacy:
    with open(path, 'wb') as f:
      for header in (LEGACY_MAGIC, LEGACY_PROTOCOL,
                     {'protocol_version': LEGACY_PROTOCOL, 'little_endian': True,
                      'type_sizes': {'short': 2, 'int': 4, 'long': 4}}):
        pickle.dump(header, f, protocol=2)
      _pickle(tensors, f)
      keys = sorted((s.key for s in storages))
      pickle.dump(keys, f, protocol=2)
      by_key = {s.key: s for s in storages}
      for key in keys:
        array = by_key[key].array
        f.write(struct.pack('<q', array.size))
        f.write(array.tobytes())
    return
  buffer = io.BytesIO()
  _pickle(tensors, buffer)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
    archive.writestr(f'{archive_name}/data.pkl', buffer.getvalue())
    archive.writestr(f'{archive_name}/byteorder', 'little')
    for storage in storages:
      archive.writestr(f'{archive_name}/data/{storage.key}', storage.array.tobytes())
    archive.writestr(f'{archive_name}/version', '3\n')
