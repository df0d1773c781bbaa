"""Reads (and, for tests, writes) Torch7 ``.t7`` files in the binary format.

The original WCT release (Li et al. 2017) ships its normalised VGG-19 encoders
and decoders as Lua Torch7 files, ``vgg_normalised_conv{k}_1.t7`` and
``feature_invertor_conv{k}_1.t7``: each an ``nn.Sequential`` of
``nn.SpatialConvolution``, ``nn.SpatialReflectionPadding``, ``nn.ReLU``,
``nn.SpatialMaxPooling`` and ``nn.SpatialUpSamplingNearest`` modules.

Format (``torch.File`` ``writeObject``, binary mode, little-endian): every value
is an int32 type tag followed by its payload --

* ``0`` nil; ``1`` number (float64); ``5`` boolean (int32 0/1);
* ``2`` string: int32 length, bytes;
* ``3`` table: int32 reference index, then (first time only) int32 number of
  pairs and that many key, value objects;
* ``4`` torch object: int32 reference index, then (first time only) the class
  version string ``'V <n>'`` (int32 length + bytes) and the class name (same
  encoding; very old files give the class name directly). Tensors and storages
  carry their own payload (below), every other class (``nn.*``) a table of its
  fields.
* Tensor: int32 nDimension, int64 size[n], int64 stride[n], int64 storage
  offset (1-based), then the storage object (or nil).
* Storage: int64 number of elements, then the raw little-endian elements.

Tables and torch objects share one reference-index space: an index seen
before refers to the object already read (repeated and cyclic references).
"""
import dataclasses
import os
import struct
from typing import Any

import numpy as np

from cdft.errors import WeightError
from cdft.weights import torch_format

__all__ = ["T7Object", "load", "sequential_convs"]

_NIL, _NUMBER, _STRING, _TABLE, _TORCH, _BOOLEAN = 0, 1, 2, 3, 4, 5
_FUNCTIONS = (6, 7, 8)  # Lua functions (and the two recursive variants).

_ELEMENT_TYPES = {
    "Float": np.dtype("<f4"),
    "Double": np.dtype("<f8"),
    "Half": np.dtype("<f2"),
    "Long": np.dtype("<i8"),
    "Int": np.dtype("<i4"),
    "Short": np.dtype("<i2"),
    "Char": np.dtype("i1"),
    "Byte": np.dtype("u1"),
    "Cuda": np.dtype("<f4"),  # cutorch's torch.CudaTensor holds float32.
    "CudaDouble": np.dtype("<f8"),
    "CudaLong": np.dtype("<i8"),
}
_TENSOR_CLASSES = {f"torch.{k}Tensor": v for k, v in _ELEMENT_TYPES.items()}
_STORAGE_CLASSES = {f"torch.{k}Storage": v for k, v in _ELEMENT_TYPES.items()}

_CONV_CLASSES = ("nn.SpatialConvolution", "nn.SpatialConvolutionMM",
                 "cudnn.SpatialConvolution")


@dataclasses.dataclass(eq=False)
class T7Object:
  """A Torch7 object other than a tensor or storage (e.g. an ``nn`` module).

  Attributes:
    class_name: the Torch class, e.g. ``'nn.SpatialConvolution'``.
    fields: the object's fields (``weight``, ``nInputPlane``, ``modules``, ...).
      Lua numbers are Python floats; tensors are NumPy arrays; Lua tables are
      dicts (integral number keys become ints, so ``modules`` is ``{1: ...,
      2: ...}``).
  """
  class_name: str
  fields: dict


@dataclasses.dataclass(eq=False)
class _Storage:
  """Writer side: a storage shared by several tensors."""
  data: np.ndarray  # 1-D


@dataclasses.dataclass(eq=False)
class _TensorView:
  """Writer side: a tensor that views ``storage`` (offset is 0-based)."""
  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


# ----------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------


class _Reader:
  """Reads one object graph from the bytes of a binary ``.t7`` file."""

  def __init__(self, data: bytes, path: str, long_size: int):
    self._data = data
    self._view = memoryview(data)
    self._path = path
    self._pos = 0
    self._long = "<q" if long_size == 8 else "<i"
    self._long_size = long_size
    self._objects: dict[int, Any] = {}

  def _fail(self, what: str):
    raise WeightError(f"{self._path}: corrupt .t7 file: {what} (at byte "
                      f"{self._pos})")

  def _take(self, n: int, what: str) -> memoryview:
    left = len(self._data) - self._pos
    if n < 0 or left < n:
      raise WeightError(
          f"{self._path}: truncated .t7 file: {what} needs {n} bytes at byte "
          f"{self._pos}, {left} left")
    out = self._view[self._pos:self._pos + n]
    self._pos += n
    return out

  def _int(self, what: str) -> int:
    return struct.unpack("<i", self._take(4, what))[0]

  def _longs(self, n: int, what: str) -> list[int]:
    raw = self._take(n * self._long_size, what)
    return list(struct.unpack(f"<{n}{self._long[1]}", raw))

  def _string(self, what: str) -> str:
    n = self._int(what)
    raw = bytes(self._take(n, what))
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError:
      return raw.decode("latin1")

  def read(self) -> Any:
    tag = self._int("type tag")
    if tag == _NIL:
      return None
    if tag == _NUMBER:
      return struct.unpack("<d", self._take(8, "number"))[0]
    if tag == _BOOLEAN:
      return self._int("boolean") != 0
    if tag == _STRING:
      return self._string("string")
    if tag == _TABLE:
      index = self._int("table index")
      if index in self._objects:
        return self._objects[index]
      table = self._objects[index] = {}
      n = self._int("table size")
      if n < 0:
        self._fail(f"negative table size {n}")
      for _ in range(n):
        key = self.read()
        if isinstance(key, float) and key.is_integer():
          key = int(key)
        value = self.read()
        try:
          table[key] = value
        except TypeError:
          self._fail(f"unsupported table key of type {type(key).__name__}")
      return table
    if tag == _TORCH:
      index = self._int("object index")
      if index in self._objects:
        return self._objects[index]
      version = self._string("class version")
      if version.startswith("V "):
        class_name = self._string("class name")
      else:
        class_name = version  # Files from before class versions existed.
      if class_name in _TENSOR_CLASSES:
        obj = self._objects[index] = self._tensor(class_name)
        return obj
      if class_name in _STORAGE_CLASSES:
        obj = self._objects[index] = self._storage(class_name)
        return obj
      obj = self._objects[index] = T7Object(class_name, {})
      fields = self.read()
      if not isinstance(fields, dict):
        self._fail(f"{class_name} object without a field table (a class with "
                   "its own serialisation is not supported)")
      obj.fields.update(fields)
      return obj
    if tag in _FUNCTIONS:
      self._fail("the file contains a Lua function (not supported)")
    self._fail(f"unknown type tag {tag}")

  def _storage(self, class_name: str) -> np.ndarray:
    dtype = _STORAGE_CLASSES[class_name]
    (n,) = self._longs(1, f"{class_name} size")
    if n < 0:
      self._fail(f"negative {class_name} size {n}")
    raw = self._take(n * dtype.itemsize, f"{class_name} of {n} elements")
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))

  def _tensor(self, class_name: str) -> np.ndarray:
    dtype = _TENSOR_CLASSES[class_name]
    ndim = self._int(f"{class_name} nDimension")
    if not 0 <= ndim <= 64:
      self._fail(f"{class_name} with {ndim} dimensions")
    size = self._longs(ndim, f"{class_name} size")
    stride = self._longs(ndim, f"{class_name} stride")
    (offset,) = self._longs(1, f"{class_name} storage offset")
    offset -= 1  # Lua counts from 1.
    storage = self.read()
    if ndim == 0 or 0 in size:
      if any(s < 0 for s in size):
        self._fail(f"{class_name} of size {size}")
      return np.zeros(size if ndim else (0,), dtype.newbyteorder("="))
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
      self._fail(f"{class_name} of size {size} without a storage")
    if (offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride)
        or offset + sum((n - 1) * s for n, s in zip(size, stride))
        >= storage.size):
      self._fail(f"{class_name} (size {size}, stride {stride}, offset "
                 f"{offset + 1}) overruns its storage of {storage.size} "
                 "elements")
    if storage.dtype != dtype.newbyteorder("="):
      self._fail(f"{class_name} on a storage of {storage.dtype}")
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size,
        strides=[s * storage.itemsize for s in stride], writeable=False)
    return np.array(view, order="C")

  @property
  def pos(self) -> int:
    return self._pos


def load(path, long_size: int = 8) -> Any:
  """Reads a binary Torch7 ``.t7`` file.

  Args:
    path: the file.
    long_size: bytes of a C ``long`` on the machine that wrote it (8 on 64-bit
      Linux and macOS, 4 for files written on Windows).

  Returns:
    The stored object: torch classes other than tensors as :class:`T7Object`,
    tensors as NumPy arrays (C-contiguous copies honouring size, stride and the
    1-based storage offset), storages as 1-D arrays, tables as dicts, numbers as
    floats, strings, booleans and None.

  Raises:
    WeightError: missing, truncated, corrupt or unsupported (ASCII or with Lua
      functions) files.
  """
  if long_size not in (4, 8):
    raise ValueError(f"long_size must be 4 or 8, not {long_size}")
  name, data = torch_format.read_bytes(path, "a Torch7 .t7 file")
  if data[:1].isdigit() and data[1:2] == b"\n":
    raise WeightError(f"{name}: ASCII .t7 files are not supported (save it "
                      "in binary mode)")
  reader = _Reader(data, name, long_size)
  try:
    obj = reader.read()
  except RecursionError:
    raise WeightError(f"{name}: corrupt .t7 file: nested too deeply") from None
  if reader.pos != len(data):
    raise WeightError(f"{name}: corrupt .t7 file: {len(data) - reader.pos} "
                      "unexpected bytes after the object")
  return obj


def _as_list(table, path: str, what: str) -> list:
  """A Lua array (a table with keys 1..n) as a Python list."""
  if isinstance(table, list):
    return table
  if not isinstance(table, dict) or set(table) != set(
      range(1, len(table) + 1)):
    raise WeightError(f"{path}: {what} is not a Lua array")
  return [table[i] for i in range(1, len(table) + 1)]


def sequential_convs(path) -> list[tuple[int, np.ndarray, np.ndarray]]:
  """The convolutions of the ``nn.Sequential`` stored in a ``.t7`` file.

  Args:
    path: e.g. ``vgg_normalised_conv5_1.t7`` or ``feature_invertor_conv5_1.t7``.

  Returns:
    ``[(index, weight, bias), ...]`` in module order, where ``index`` is the
    0-based position of the convolution in the ``modules`` list (the encoder's
    conv0 is 0, conv1_1 is 2, conv1_2 is 5, ...), ``weight`` is float32 OIHW
    (a 2-D ``(out, in*kH*kW)`` weight is reshaped with the module's
    ``nInputPlane``, ``kH`` and ``kW``) and ``bias`` float32 ``(out,)`` (zeros
    for a convolution without bias).

  Raises:
    WeightError: unreadable file, no ``nn.Sequential`` at the top, or a
      convolution whose tensors do not fit its declared shape.
  """
  name = os.fspath(path)
  root = load(path)
  if not isinstance(root, T7Object) or root.class_name != "nn.Sequential":
    found = root.class_name if isinstance(root, T7Object) else type(
        root).__name__
    raise WeightError(f"{name}: expected an nn.Sequential, found {found}")
  modules = _as_list(root.fields.get("modules"), name, "nn.Sequential.modules")
  convs = []
  for index, module in enumerate(modules):
    if not isinstance(module, T7Object):
      raise WeightError(f"{name}: module {index} is not a torch object")
    if module.class_name not in _CONV_CLASSES:
      continue
    where = f"{name}: module {index} ({module.class_name})"
    f = module.fields
    try:
      n_out, n_in, kh, kw = (int(f[k]) for k in ("nOutputPlane", "nInputPlane",
                                                 "kH", "kW"))
    except (KeyError, TypeError, ValueError):
      raise WeightError(
          f"{where} lacks nOutputPlane/nInputPlane/kH/kW") from None
    weight, bias = f.get("weight"), f.get("bias")
    if not isinstance(weight, np.ndarray):
      raise WeightError(f"{where} has no weight tensor")
    if weight.ndim == 2 and weight.shape == (n_out, n_in * kh * kw):
      weight = weight.reshape(n_out, n_in, kh, kw)
    if weight.shape != (n_out, n_in, kh, kw):
      raise WeightError(
          f"{where}: weight of shape {weight.shape} does not fit "
          f"{n_in}->{n_out} channels with a {kh}x{kw} kernel")
    if bias is None:
      bias = np.zeros((n_out,), np.float32)
    elif not isinstance(bias, np.ndarray) or bias.shape != (n_out,):
      shape = (bias.shape if isinstance(bias, np.ndarray)
               else type(bias).__name__)
      raise WeightError(f"{where}: bias of shape {shape}, expected ({n_out},)")
    convs.append((index, weight.astype(np.float32), bias.astype(np.float32)))
  return convs
