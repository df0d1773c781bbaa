"""Reads and writes ``torch.save`` files without PyTorch.

Two on-disk layouts exist and both are supported:

* **Legacy** (PyTorch < 1.6, or ``_use_new_zipfile_serialization=False``): a
  stream of pickles -- the magic number, the protocol version (1001), a
  ``sys_info`` dict, the object itself, the list of storage keys -- followed,
  for every key in that list, by an int64 element count and the storage's raw
  bytes.
* **Zip** (PyTorch >= 1.6): an uncompressed zip archive whose entries all live
  under one folder (``<archive>/``): ``data.pkl`` holds the object pickle,
  ``data/<key>`` the raw bytes of each storage, ``byteorder`` (optional) the
  byte order and ``version`` the format version.

In both, tensors are pickled as calls of ``torch._utils._rebuild_tensor_v2``
whose first argument is a *persistent id* ``('storage', <StorageType>, key,
location, numel[, view_metadata])``. The object pickle is read with a
restricted unpickler that only knows the few globals a tensor checkpoint needs
(the tensor rebuild functions, the storage types, ``collections.OrderedDict``
and some harmless builtins); anything else is refused, so loading a file never
runs code from it. Tensors come back as NumPy arrays (copies, C-contiguous),
everything else as plain Python objects.

Typical use::

  obj = torch_format.load('5SE.pth')          # {'epoch': 20, 'model': {...}}
  params = torch_format.state_dict(obj, '5SE.pth')
  torch_format.save(params, 'export.pth')     # readable by torch.load
"""
import collections
import dataclasses
import io
import os
import pathlib
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

from cdft import errors
from cdft.errors import WeightError

try:  # Installed with jax; only needed for bfloat16 tensors.
  import ml_dtypes
  _BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
  _BFLOAT16 = None

__all__ = ["FileInfo", "load", "load_with_info", "save", "state_dict"]

# pickle(MAGIC_NUMBER) starts every legacy file; 1001 is its protocol version.
MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_ZIP_ALIGNMENT = 64  # PyTorch aligns every record's data to 64 bytes.

_STORAGE_NAMES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}
if _BFLOAT16 is not None:
  _STORAGE_NAMES["BFloat16Storage"] = _BFLOAT16


@dataclasses.dataclass(frozen=True)
class FileInfo:
  """What :func:`load_with_info` learnt about a file besides its content.

  Attributes:
    format: ``'legacy'`` or ``'zip'``.
    num_storages: number of tensor storages in the file.
    trailing_bytes: bytes after the last storage (legacy format; always 0 for
      zip archives). PyTorch ignores them, but a sound file has none.
  """
  format: str
  num_storages: int
  trailing_bytes: int


# ----------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------


class _StorageType:
  """Stand-in for ``torch.<Name>Storage`` classes inside the unpickler."""

  def __init__(self, name: str, dtype: np.dtype):
    self.name = name
    self.dtype = dtype

  def __repr__(self):
    return f"torch.{self.name}"


class _Marker:
  """Stand-in for a class that may be named but never called (torch.Tensor)."""

  def __init__(self, name: str):
    self.name = name

  def __repr__(self):
    return self.name


@dataclasses.dataclass(eq=False)
class _StorageRef:
  """A storage named by a persistent id; its bytes are attached later."""
  key: str
  dtype: np.dtype
  numel: int
  data: np.ndarray | None = None  # 1-D, native byte order, set when read.


@dataclasses.dataclass(eq=False)
class _StorageView:
  """Part of a storage (legacy files of PyTorch < 0.4 could contain these)."""
  root: _StorageRef
  offset: int
  numel: int


@dataclasses.dataclass(eq=False)
class _TensorRef:
  """A tensor whose storage may not have been read yet."""
  storage: Any
  offset: Any
  size: Any
  stride: Any


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride,
                       requires_grad=False, backward_hooks=None,
                       metadata=None):
  del requires_grad, backward_hooks, metadata  # Irrelevant for NumPy arrays.
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  del requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  del state
  if new_type not in (_TORCH_TENSOR, _TORCH_PARAMETER):
    raise pickle.UnpicklingError(f"cannot rebuild tensor subclass {new_type!r}")
  return func(*args)


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
  """``_codecs.encode`` for text encodings only (pickle 2 stores bytes so)."""
  if not isinstance(obj, str):
    raise pickle.UnpicklingError("_codecs.encode of a non-string")
  return obj.encode(encoding, errors)


_TORCH_TENSOR = _Marker("torch.Tensor")
_TORCH_PARAMETER = _Marker("torch.nn.parameter.Parameter")

_HARMLESS_BUILTINS = {
    "set": set,
    "frozenset": frozenset,
    "complex": complex,
    "bytearray": bytearray,
    "slice": slice,
    "tuple": tuple,
    "list": list,
    "dict": dict,
    "int": int,
    "float": float,
    "bool": bool,
    "str": str,
}

_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"):
        _rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TORCH_TENSOR,
    ("torch._tensor", "Tensor"): _TORCH_TENSOR,
    ("torch.nn.parameter", "Parameter"): _TORCH_PARAMETER,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _codecs_encode,
}
for _name, _dtype in _STORAGE_NAMES.items():
  _ALLOWED_GLOBALS[("torch", _name)] = _StorageType(_name, _dtype)
  _ALLOWED_GLOBALS[("torch.cuda", _name)] = _StorageType(_name, _dtype)
for _name, _obj in _HARMLESS_BUILTINS.items():
  _ALLOWED_GLOBALS[("builtins", _name)] = _obj


def _as_str(value) -> str:
  return value.decode("ascii") if isinstance(value, bytes) else value


class _Unpickler(pickle.Unpickler):
  """Unpickler that knows only the globals of a tensor checkpoint."""

  def __init__(self, file, path: str, storages: dict[str, _StorageRef]):
    # latin1 keeps Python 2 byte strings readable (as NumPy does).
    super().__init__(file, encoding="latin1")
    self._path = path
    self._storages = storages
    self._views: dict[str, _StorageView] = {}

  def find_class(self, module, name):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise WeightError(
          f"{self._path}: refuses to unpickle {module}.{name} (only tensors, "
          "numbers, strings and containers are allowed)") from None

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid:
      raise pickle.UnpicklingError(f"bad persistent id {pid!r}")
    tag = _as_str(pid[0])
    if tag != "storage":
      raise WeightError(
          f"{self._path}: refuses to unpickle persistent object {tag!r} "
          "(only tensor storages are allowed)")
    if len(pid) == 5:
      _, storage_type, key, _, numel = pid
      view = None
    elif len(pid) == 6:
      _, storage_type, key, _, numel, view = pid
    else:
      raise pickle.UnpicklingError(f"bad storage id of length {len(pid)}")
    key = _as_str(key)
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"storage '{key}' has no storage type")
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
      raise pickle.UnpicklingError(f"bad storage id {pid!r}")
    ref = self._storages.get(key)
    if ref is None:
      ref = self._storages[key] = _StorageRef(key, storage_type.dtype, numel)
    elif ref.dtype != storage_type.dtype or ref.numel != numel:
      raise pickle.UnpicklingError(
          f"storage '{key}' is declared twice with different types or sizes")
    if view is None:
      return ref
    view_key, offset, view_numel = view
    view_key = _as_str(view_key)
    if view_key not in self._views:
      if not 0 <= offset <= offset + view_numel <= numel:
        raise pickle.UnpicklingError(
            f"storage view '{view_key}' lies outside storage '{key}'")
      self._views[view_key] = _StorageView(ref, offset, view_numel)
    return self._views[view_key]


def _unpickle(stream, path: str, storages: dict[str, _StorageRef], what: str):
  """Loads one pickle from ``stream``; any failure becomes a WeightError."""
  try:
    return _Unpickler(stream, path, storages).load()
  except WeightError:
    raise
  except EOFError:
    raise WeightError(
        f"{path}: truncated: the {what} pickle ends early") from None
  except RecursionError:
    raise WeightError(
        f"{path}: the {what} pickle is nested too deeply") from None
  except Exception as e:  # pylint: disable=broad-except
    if "truncated" in str(e):
      raise WeightError(
          f"{path}: truncated: the {what} pickle ends early") from None
    raise WeightError(
        f"{path}: corrupt {what} pickle ({type(e).__name__}: {errors.one_line(e)})"
    ) from None


def _storage_array(raw, dtype: np.dtype, numel: int, big_endian: bool):
  """Native-order 1-D array over ``numel`` elements of ``raw`` (a buffer)."""
  arr = np.frombuffer(raw, dtype=dtype, count=numel)
  if big_endian and dtype.itemsize > 1:
    if dtype == _BFLOAT16:
      arr = arr.view(np.uint16).byteswap().view(dtype)
    else:
      arr = arr.byteswap()
  return arr


def _tensor_array(ref: _TensorRef, path: str, where: str) -> np.ndarray:
  """Materialises a tensor as a C-contiguous NumPy copy (checks all bounds)."""
  name = f"tensor '{where}'" if where else "a tensor"
  storage, offset = ref.storage, ref.offset
  if isinstance(storage, _StorageView):
    base, offset = storage.root, offset + storage.offset
    limit = storage.offset + storage.numel
  elif isinstance(storage, _StorageRef):
    base, limit = storage, storage.numel
  else:
    raise WeightError(f"{path}: {name} has no storage")
  try:
    size = tuple(int(s) for s in ref.size)
    stride = tuple(int(s) for s in ref.stride)
    offset = int(offset)
  except (TypeError, ValueError):
    raise WeightError(f"{path}: {name} has a malformed size/stride") from None
  if (len(size) != len(stride) or offset < 0 or any(s < 0 for s in size)
      or any(s < 0 for s in stride)):
    raise WeightError(
        f"{path}: {name} has an invalid size {size} / stride {stride} / "
        f"offset {offset}")
  if base.data is None:
    raise WeightError(f"{path}: storage '{base.key}' of {name} was never read")
  if 0 in size:
    return np.zeros(size, base.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= limit:
    raise WeightError(
        f"{path}: {name} (size {size}, stride {stride}, offset {offset}) "
        f"overruns its storage '{base.key}' of {limit} elements")
  itemsize = base.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      base.data[offset:], shape=size, strides=[s * itemsize for s in stride],
      writeable=False)
  return np.array(view, order="C")


def _resolve(obj, path: str, where: str = "", memo=None):
  """Replaces tensor placeholders by arrays (dicts and lists in place)."""
  if memo is None:
    memo = {}
  if isinstance(obj, (str, bytes, int, float, complex, type(None))):
    return obj
  if id(obj) in memo:
    return memo[id(obj)]
  if isinstance(obj, _TensorRef):
    out = _tensor_array(obj, path, where)
  elif isinstance(obj, _StorageRef):
    out = _tensor_array(_TensorRef(obj, 0, (obj.numel,), (1,)), path, where)
  elif isinstance(obj, _StorageView):
    out = _tensor_array(_TensorRef(obj, 0, (obj.numel,), (1,)), path, where)
  elif isinstance(obj, dict):
    memo[id(obj)] = obj
    for k, v in obj.items():
      obj[k] = _resolve(v, path, f"{where}.{k}" if where else str(k), memo)
    return obj
  elif isinstance(obj, list):
    memo[id(obj)] = obj
    for i, v in enumerate(obj):
      obj[i] = _resolve(v, path, f"{where}[{i}]", memo)
    return obj
  elif isinstance(obj, tuple):
    out = tuple(_resolve(v, path, f"{where}[{i}]", memo)
                for i, v in enumerate(obj))
  elif isinstance(obj, (set, frozenset)):
    out = type(obj)(_resolve(v, path, where, memo) for v in obj)
  elif isinstance(obj, (_StorageType, _Marker)) or callable(obj):
    raise WeightError(f"{path}: unexpected object {obj!r} at '{where}'")
  else:
    return obj
  memo[id(obj)] = out
  return out


def _load_legacy(data: bytes, path: str):
  stream = io.BytesIO(data)
  magic = _unpickle(stream, path, {}, "magic number")
  if magic != MAGIC_NUMBER:
    found = hex(magic) if isinstance(magic, int) else type(magic).__name__
    raise WeightError(
        f"{path}: not a torch.save file (wrong magic number: {found})")
  version = _unpickle(stream, path, {}, "protocol version")
  if version != PROTOCOL_VERSION:
    found = version if isinstance(version, int) else type(version).__name__
    raise WeightError(
        f"{path}: unsupported torch.save protocol version {found}")
  sys_info = _unpickle(stream, path, {}, "sys_info")
  if not isinstance(sys_info, dict):
    raise WeightError(f"{path}: corrupt sys_info header")
  big_endian = not sys_info.get("little_endian", True)
  storages: dict[str, _StorageRef] = {}
  obj = _unpickle(stream, path, storages, "object")
  keys = _unpickle(stream, path, {}, "storage key list")
  if (not isinstance(keys, (list, tuple))
      or not all(isinstance(k, (str, bytes)) for k in keys)):
    raise WeightError(f"{path}: corrupt storage key list")
  pos = stream.tell()
  view = memoryview(data)
  for key in keys:
    key = _as_str(key)
    ref = storages.get(key)
    if ref is None:
      raise WeightError(
          f"{path}: storage '{key}' is listed but no tensor uses it")
    if ref.data is not None:
      raise WeightError(f"{path}: storage '{key}' is listed twice")
    left = len(data) - pos
    if left < 8:
      raise WeightError(
          f"{path}: truncated: storage '{key}' needs an 8-byte header, "
          f"{left} left")
    (count,) = struct.unpack_from(">q" if big_endian else "<q", data, pos)
    pos += 8
    if count != ref.numel:
      raise WeightError(
          f"{path}: storage '{key}' holds {count} elements, the pickle "
          f"declares {ref.numel}")
    nbytes = count * ref.dtype.itemsize
    left = len(data) - pos
    if left < nbytes:
      raise WeightError(
          f"{path}: truncated: storage '{key}' needs {nbytes} bytes, "
          f"{left} left")
    ref.data = _storage_array(view[pos:pos + nbytes], ref.dtype, count,
                              big_endian)
    pos += nbytes
  missing = [k for k, r in storages.items() if r.data is None]
  if missing:
    raise WeightError(
        f"{path}: storage '{missing[0]}' is used by a tensor but missing "
        f"from the file ({len(missing)} missing)")
  obj = _resolve(obj, path)
  return obj, FileInfo("legacy", len(keys), len(data) - pos)


def _load_zip(data: bytes, path: str):
  try:
    archive = zipfile.ZipFile(io.BytesIO(data))
  except (zipfile.BadZipFile, OSError, ValueError) as e:
    raise WeightError(
        f"{path}: truncated or corrupt zip archive ({errors.one_line(e)})") from None
  with archive:
    names = archive.namelist()
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
      raise WeightError(
          f"{path}: not a torch.save zip archive (no <archive>/data.pkl)")
    prefix = pkl[0][:-len("data.pkl")]

    def read(name: str) -> bytes:
      try:
        return archive.read(prefix + name)
      except KeyError:
        raise WeightError(
            f"{path}: missing archive record '{prefix + name}'") from None
      except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise WeightError(
            f"{path}: truncated or corrupt archive record '{prefix + name}' "
            f"({errors.one_line(e)})") from None

    big_endian = False
    if prefix + "byteorder" in names:
      order = read("byteorder").decode("ascii", "replace").strip()
      if order not in ("little", "big"):
        raise WeightError(f"{path}: unknown byteorder record {order!r}")
      big_endian = order == "big"
    storages: dict[str, _StorageRef] = {}
    obj = _unpickle(io.BytesIO(read("data.pkl")), path, storages, "object")
    for key, ref in storages.items():
      raw = read(f"data/{key}")
      nbytes = ref.numel * ref.dtype.itemsize
      if len(raw) < nbytes:
        raise WeightError(
            f"{path}: truncated: storage '{key}' needs {nbytes} bytes, "
            f"record has {len(raw)}")
      ref.data = _storage_array(raw, ref.dtype, ref.numel, big_endian)
  obj = _resolve(obj, path)
  return obj, FileInfo("zip", len(storages), 0)


def read_bytes(path, kind):
  """``(name, bytes)`` of a weight file; WeightError if missing, unreadable or empty."""
  name = os.fspath(path)
  try:
    data = pathlib.Path(path).read_bytes()
  except FileNotFoundError:
    raise WeightError(f"{name}: no such file") from None
  except OSError as e:
    raise WeightError(f"{name}: cannot read ({e.strerror or e})") from None
  if not data:
    raise WeightError(f"{name}: empty file, not {kind}")
  return name, data


def load_with_info(path) -> tuple[Any, FileInfo]:
  """Like :func:`load`, also returning a :class:`FileInfo` about the file."""
  name, data = read_bytes(path, "a torch.save file")
  if data[:4] in _ZIP_MAGIC:
    return _load_zip(data, name)
  if data[0] == 0x80:  # pickle PROTO opcode
    return _load_legacy(data, name)
  raise WeightError(
      f"{name}: not a torch.save file (neither a zip archive nor a pickle "
      "stream)")


def load(path) -> Any:
  """Reads a ``torch.save`` file (legacy or zip format) without PyTorch.

  Args:
    path: the file.

  Returns:
    The saved object with every tensor replaced by a NumPy array (a C-contiguous
    copy with the tensor's dtype, size, stride and offset honoured). Dicts,
    OrderedDicts, lists, tuples, numbers and strings stay what they are.

  Raises:
    WeightError: the file is missing, not a ``torch.save`` file, truncated or
      corrupt, or its pickle references anything but tensors and plain data.
  """
  return load_with_info(path)[0]


def state_dict(obj, path="") -> dict[str, np.ndarray]:
  """The flat ``{name: array}`` parameter dict inside a loaded checkpoint.

  Looks, in this order, at ``obj['model']`` (Collaborative Distillation
  checkpoints ``{'epoch': 20, 'model': state_dict}``), ``obj['state_dict']``
  (e.g. Factor Transfer's ``Paraphraser.pth``), and ``obj`` itself.

  Args:
    obj: what :func:`load` returned.
    path: the file it came from, for error messages.

  Returns:
    A new dict with the same keys, in the same order.

  Raises:
    WeightError: no dict of tensors was found.
  """
  prefix = f"{os.fspath(path)}: " if path else ""
  if not isinstance(obj, dict):
    raise WeightError(
        f"{prefix}no state dict found (the file holds a "
        f"{type(obj).__name__}, not a dict)")
  for field in ("model", "state_dict"):
    if isinstance(obj.get(field), dict):
      candidate, where = obj[field], f"'{field}' "
      break
  else:
    candidate, where = obj, ""
  for key, value in candidate.items():
    if not isinstance(key, str) or not isinstance(value, np.ndarray):
      raise WeightError(
          f"{prefix}no state dict found: entry {key!r} of the {where}dict is "
          f"a {type(value).__name__}, not a tensor")
  if not candidate:
    raise WeightError(f"{prefix}no state dict found: the {where}dict is empty")
  return dict(candidate)


# ----------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------

_DTYPE_TO_STORAGE = {dtype: name for name, dtype in _STORAGE_NAMES.items()}


class _PickleWriter:
  """Emits protocol-2 pickles of plain data and tensors, opcode by opcode.

  Python's own pickler cannot be used: it insists on importing the globals it
  names (``torch._utils._rebuild_tensor_v2``), and torch is not installed.
  """

  def __init__(self, legacy: bool):
    self._legacy = legacy
    self._out = bytearray()
    self.storages: dict[str, np.ndarray] = {}  # key -> little-endian 1-D data
    self._storage_of: dict[int, tuple[str, np.ndarray]] = {}  # by id(obj)
    self._keep_alive = []  # so that the ids in _storage_of stay unique

  def dumps(self, obj) -> bytes:
    self._out = bytearray(b"\x80\x02")
    self._save(obj)
    self._out += b"."
    return bytes(self._out)

  def _global(self, module: str, name: str):
    self._out += b"c" + f"{module}\n{name}\n".encode("ascii")

  def _int(self, value: int):
    if 0 <= value < 0x100:
      self._out += b"K" + bytes([value])
    elif 0 <= value < 0x10000:
      self._out += b"M" + struct.pack("<H", value)
    elif -0x80000000 <= value < 0x80000000:
      self._out += b"J" + struct.pack("<i", value)
    else:
      nbytes = (value.bit_length() + 8) // 8  # room for the sign bit
      encoded = value.to_bytes(nbytes, "little", signed=True)
      if nbytes < 256:
        self._out += b"\x8a" + bytes([nbytes]) + encoded
      else:
        self._out += b"\x8b" + struct.pack("<i", nbytes) + encoded

  def _str(self, value: str):
    encoded = value.encode("utf-8", "surrogatepass")
    self._out += b"X" + struct.pack("<I", len(encoded)) + encoded

  def _tuple(self, items):
    if not items:
      self._out += b")"
      return
    if len(items) > 3:
      self._out += b"("
    for item in items:
      self._save(item)
    self._out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(items), b"t")

  def _save(self, obj):
    if obj is None:
      self._out += b"N"
    elif obj is True or obj is False or isinstance(obj, np.bool_):
      self._out += b"\x88" if obj else b"\x89"
    elif isinstance(obj, (int, np.integer)):
      self._int(int(obj))
    elif isinstance(obj, (float, np.floating)):
      self._out += b"G" + struct.pack(">d", float(obj))
    elif isinstance(obj, str):
      self._str(obj)
    elif isinstance(obj, bytes):
      # How protocol 2 stores bytes: _codecs.encode(latin1 text, 'latin1').
      self._global("_codecs", "encode")
      self._tuple((obj.decode("latin1"), "latin1"))
      self._out += b"R"
    elif isinstance(obj, tuple):
      self._tuple(obj)
    elif isinstance(obj, list):
      self._out += b"]"
      for start in range(0, len(obj), 1000):
        self._out += b"("
        for item in obj[start:start + 1000]:
          self._save(item)
        self._out += b"e"
    elif isinstance(obj, dict):
      if isinstance(obj, collections.OrderedDict):
        self._global("collections", "OrderedDict")
        self._out += b")R"
      else:
        self._out += b"}"
      items = list(obj.items())
      for start in range(0, len(items), 1000):
        self._out += b"("
        for key, value in items[start:start + 1000]:
          self._save(key)
          self._save(value)
        self._out += b"u"
    elif isinstance(obj, np.ndarray) or (
        hasattr(obj, "__array__") and hasattr(obj, "shape")
        and hasattr(obj, "dtype")):
      self._tensor(obj)
    else:
      raise TypeError(
          f"cannot save a {type(obj).__name__} in a torch file (only tensors, "
          "numbers, strings, None, and dicts/lists/tuples of them)")

  def _tensor(self, obj):
    if id(obj) in self._storage_of:
      key, arr = self._storage_of[id(obj)]
    else:
      arr = np.asarray(obj)
      if not arr.flags.c_contiguous:  # (np.ascontiguousarray makes 0-d 1-d)
        arr = np.array(arr, order="C")
      storage_name = _DTYPE_TO_STORAGE.get(arr.dtype.newbyteorder("="))
      if storage_name is None:
        raise TypeError(f"cannot save a tensor of dtype {arr.dtype}")
      if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
      key = str(len(self.storages))
      self.storages[key] = arr.reshape(-1)
      self._storage_of[id(obj)] = (key, arr)
      self._keep_alive.append(obj)
    storage_name = _DTYPE_TO_STORAGE[arr.dtype.newbyteorder("=")]
    stride, step = [], 1
    for n in reversed(arr.shape):
      stride.append(step)
      step *= max(n, 1)
    self._global("torch._utils", "_rebuild_tensor_v2")
    self._out += b"("
    # The persistent id of the storage.
    self._out += b"("
    self._str("storage")
    self._global("torch", storage_name)
    self._str(key)
    self._str("cpu")
    self._int(arr.size)
    if self._legacy:
      self._out += b"N"
    self._out += b"tQ"
    self._int(0)
    self._tuple(tuple(int(n) for n in arr.shape))
    self._tuple(tuple(reversed(stride)))
    self._out += b"\x89"
    self._global("collections", "OrderedDict")
    self._out += b")R"
    self._out += b"tR"


def _dumps_plain(obj) -> bytes:
  return _PickleWriter(legacy=True).dumps(obj)


def _write_zip(path: pathlib.Path, records: list[tuple[str, bytes]]):
  """Writes an uncompressed zip whose record data are 64-byte aligned."""
  with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
    for name, payload in records:
      info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_STORED
      header_end = f.tell() + 30 + len(name.encode("utf-8")) + 4
      pad = -header_end % _ZIP_ALIGNMENT
      info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
      z.writestr(info, payload)


def save(obj, path, legacy: bool = False) -> None:
  """Writes ``obj`` as a ``torch.save`` file that ``torch.load`` can read.

  Args:
    obj: NumPy arrays (or objects with ``__array__``, e.g. jax arrays), numbers,
      strings, None, bytes, and dicts / OrderedDicts / lists / tuples of them.
      Arrays become contiguous CPU tensors, each with its own storage (an array
      object that occurs twice shares its storage).
    path: the file to write.
    legacy: write the pre-1.6 pickle-stream format instead of the zip format.

  Raises:
    TypeError: ``obj`` contains something that cannot be saved.
  """
  path = pathlib.Path(path)
  writer = _PickleWriter(legacy=legacy)
  pickled = writer.dumps(obj)
  if legacy:
    with open(path, "wb") as f:
      f.write(_dumps_plain(MAGIC_NUMBER))
      f.write(_dumps_plain(PROTOCOL_VERSION))
      f.write(_dumps_plain({
          "protocol_version": PROTOCOL_VERSION,
          "little_endian": True,
          "type_sizes": {"short": 2, "int": 4, "long": 4},
      }))
      f.write(pickled)
      f.write(_dumps_plain(list(writer.storages)))
      for arr in writer.storages.values():
        f.write(struct.pack("<q", arr.size))
        f.write(arr.tobytes())
    return
  archive = path.stem or "archive"
  records = [(f"{archive}/data.pkl", pickled),
             (f"{archive}/byteorder", b"little")]
  records += [(f"{archive}/data/{key}", arr.tobytes())
              for key, arr in writer.storages.items()]
  records.append((f"{archive}/version", b"3\n"))
  _write_zip(path, records)
