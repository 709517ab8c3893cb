"""Reads and writes `.safetensors` files with numpy (no safetensors package).

Layout (huggingface/safetensors): an unsigned little-endian int64 N, then N
bytes of UTF-8 JSON mapping each tensor name to {"dtype", "shape",
"data_offsets": [begin, end]} (offsets into the byte buffer that follows the
header; an optional "__metadata__" entry maps strings to strings), then the
buffer of raw little-endian C-order tensor bytes. Nothing is executed on load,
so unlike pickled `.pth` files these are safe from any source.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    'F64': np.dtype('<f8'), 'F32': np.dtype('<f4'), 'F16': np.dtype('<f2'),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype('<i8'), 'I32': np.dtype('<i4'),
    'I16': np.dtype('<i2'), 'I8': np.dtype('i1'), 'U8': np.dtype('u1'),
    'BOOL': np.dtype('?'),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# The format caps the header at 100 MB; anything larger is a corrupt length.
_MAX_HEADER = 100_000_000


def _tensor(info: Mapping[str, Any], buffer: bytes) -> np.ndarray:
  """One tensor from its header entry and the byte buffer."""
  if info.get('dtype') not in DTYPES:
    raise ValueError(f'unsupported dtype {info.get("dtype")!r}')
  dtype = DTYPES[info['dtype']]
  shape = tuple(int(n) for n in info['shape'])
  begin, end = (int(o) for o in info['data_offsets'])
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if not 0 <= begin <= end <= len(buffer) or end - begin != expected:
    raise ValueError(f'offsets [{begin}, {end}) do not fit shape {shape} {info["dtype"]} '
                     f'in a {len(buffer)}-byte buffer')
  return np.frombuffer(buffer, dtype, expected // dtype.itemsize, begin).reshape(shape).copy()


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Loads every tensor of a `.safetensors` file.

  Args:
    path: the file.

  Returns:
    (tensors, metadata): {name: array} in file order and the "__metadata__" dict.

  Raises:
    ValueError: a malformed header, an unknown dtype or out-of-range offsets.
  """
  path = os.fspath(path)
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) != 8:
      raise ValueError(f'{path}: too short for a safetensors file')
    (size,) = struct.unpack('<Q', head)
    if size > _MAX_HEADER:
      raise ValueError(f'{path}: header length {size} is not plausible; not a safetensors file')
    try:
      header = json.loads(f.read(size).decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f'{path}: unreadable safetensors header ({e})') from e
    buffer = f.read()
  if not isinstance(header, dict):
    raise ValueError(f'{path}: the safetensors header is not a JSON object')
  metadata = header.pop('__metadata__', None) or {}
  tensors = {}
  for name, info in header.items():
    try:
      tensors[name] = _tensor(info, buffer)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise ValueError(f'{path}: tensor {name!r}: {e}') from e
  return tensors, metadata


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                     metadata: Mapping[str, str] | None = None) -> None:
  """Writes {name: array} as a `.safetensors` file (tensors in the given order)."""
  header: dict[str, Any] = {}
  if metadata:
    header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
  blobs, offset = [], 0
  for name, value in tensors.items():
    array = np.asarray(value)
    if array.dtype.byteorder == '>':
      array = array.astype(array.dtype.newbyteorder('<'))
    if array.dtype not in _NAMES:
      raise ValueError(f'{name}: dtype {array.dtype} has no safetensors equivalent')
    blob = array.tobytes(order='C')
    header[name] = {'dtype': _NAMES[array.dtype], 'shape': list(array.shape),
                    'data_offsets': [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
  text = json.dumps(header, separators=(',', ':')).encode('utf-8')
  text += b' ' * (-len(text) % 8)  # the reference writer pads the header to 8 bytes
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(text)))
    f.write(text)
    for blob in blobs:
      f.write(blob)
