"""A writer of Torch7 ``.t7`` files, for building test inputs in the real format.

cdft only reads ``.t7`` (the original WCT release); the tests write small
files of the same layout with this helper to check the reader.
"""
import pathlib
import struct

import numpy as np

from cdft.weights.t7 import (_BOOLEAN, _ELEMENT_TYPES, _NIL, _NUMBER, _STRING, _TABLE, _TORCH,
                             T7Object, _Storage, _TensorView)


class _Writer:
  """Serialises Python values in the binary ``.t7`` format."""

  def __init__(self):
    self._out = bytearray()
    self._index: dict[int, int] = {}  # id(obj) -> reference index
    self._keep_alive = []

  def getvalue(self) -> bytes:
    return bytes(self._out)

  def _int(self, value: int):
    self._out += struct.pack("<i", value)

  def _long(self, value: int):
    self._out += struct.pack("<q", value)

  def _string(self, value: str):
    raw = value.encode("utf-8")
    self._int(len(raw))
    self._out += raw

  def _reference(self, obj) -> bool:
    """Writes the reference index; True if ``obj`` was written before."""
    if id(obj) in self._index:
      self._int(self._index[id(obj)])
      return True
    self._index[id(obj)] = len(self._index) + 1
    self._keep_alive.append(obj)
    self._int(self._index[id(obj)])
    return False

  def _class(self, class_name: str):
    self._string("V 1")
    self._string(class_name)

  def write(self, obj):
    if obj is None:
      self._int(_NIL)
    elif isinstance(obj, bool):
      self._int(_BOOLEAN)
      self._int(int(obj))
    elif isinstance(obj, (int, float)):
      self._int(_NUMBER)
      self._out += struct.pack("<d", float(obj))
    elif isinstance(obj, str):
      self._int(_STRING)
      self._string(obj)
    elif isinstance(obj, (dict, list)):
      self._int(_TABLE)
      if self._reference(obj):
        return
      items = obj.items() if isinstance(obj, dict) else enumerate(obj, 1)
      items = list(items)
      self._int(len(items))
      for key, value in items:
        self.write(key)
        self.write(value)
    elif isinstance(obj, T7Object):
      self._int(_TORCH)
      if self._reference(obj):
        return
      self._class(obj.class_name)
      self.write(dict(obj.fields))
    elif isinstance(obj, _Storage):
      self._int(_TORCH)
      if self._reference(obj):
        return
      self._class(f"torch.{_element_name(obj.data.dtype)}Storage")
      self._long(obj.data.size)
      self._out += obj.data.astype(obj.data.dtype.newbyteorder("<")).tobytes()
    elif isinstance(obj, (_TensorView, np.ndarray)):
      self._int(_TORCH)
      if self._reference(obj):
        return
      if isinstance(obj, np.ndarray):
        data = np.ascontiguousarray(obj)
        strides = [s // max(data.itemsize, 1) for s in data.strides]
        obj = _TensorView(_Storage(data.reshape(-1)), 0, data.shape, strides)
      self._class(f"torch.{_element_name(obj.storage.data.dtype)}Tensor")
      ndim = len(obj.size) if obj.storage.data.size else 0
      self._int(ndim)
      for n in obj.size[:ndim]:
        self._long(n)
      for s in obj.stride[:ndim]:
        self._long(s)
      self._long(obj.offset + 1)
      self.write(obj.storage if ndim else None)
    else:
      raise TypeError(f"cannot write a {type(obj).__name__} to a .t7 file")


def _element_name(dtype: np.dtype) -> str:
  for name, candidate in _ELEMENT_TYPES.items():
    if not name.startswith("Cuda") and candidate == dtype.newbyteorder("<"):
      return name
  raise TypeError(f"no Torch7 tensor type for {dtype}")


def _empty() -> np.ndarray:
  return np.zeros((0,), np.float32)


def _module(class_name: str, **fields) -> T7Object:
  fields.setdefault("train", True)
  fields.setdefault("_type", "torch.FloatTensor")
  return T7Object(class_name, fields)


def save_sequential(path, layers, *, weight_2d: bool = False,
                    flat_parameters: bool = False) -> None:
  """Writes an ``nn.Sequential`` in the binary ``.t7`` format (for tests).

  The layout follows what Torch7 ``nn`` writes: every module carries its
  ``output`` and ``gradInput`` tensors, and the container's ``output`` and
  ``gradInput`` are the very same objects as those of its last and first
  module (written once, then referenced by index).

  Args:
    path: the file to write.
    layers: ``('conv', weight_OIHW, bias)`` (a 3x3 or 1x1 convolution with
      stride 1 and no padding), ``('relu',)``, ``('pad',)`` (reflection padding
      by 1), ``('pool',)`` (2x2 max-pooling, stride 2) or ``('up',)`` (nearest
      2x upsampling).
    weight_2d: store convolution weights as ``(out, in*kH*kW)`` matrices, as
      older Torch7 models do.
    flat_parameters: put all weights and biases into one shared storage (and
      all gradients into another) like Torch7's ``getParameters()`` does, so
      that tensors are views at non-trivial storage offsets.
  """
  modules = []
  flat_params = []
  offset = 0
  for layer in layers:
    kind = layer[0]
    common = dict(output=_empty(), gradInput=_empty())
    if kind == "conv":
      weight, bias = np.asarray(layer[1]), np.asarray(layer[2])
      n_out, n_in, kh, kw = weight.shape
      shape = (n_out, n_in * kh * kw) if weight_2d else weight.shape
      fields = dict(nInputPlane=n_in, nOutputPlane=n_out, kW=kw, kH=kh, dW=1,
                    dH=1, padW=0, padH=0, **common)
      if flat_parameters:
        tensors = {}
        for field, value, field_shape in (("weight", weight, shape),
                                          ("bias", bias, bias.shape)):
          strides = tuple(int(np.prod(field_shape[i + 1:]))
                          for i in range(len(field_shape)))
          tensors[field] = (offset, tuple(field_shape), strides)
          flat_params.append(value.reshape(-1))
          offset += value.size
        fields["_views"] = tensors
      else:
        fields["weight"] = weight.reshape(shape)
        fields["bias"] = bias
        fields["gradWeight"] = np.zeros(shape, weight.dtype)
        fields["gradBias"] = np.zeros_like(bias)
      modules.append(_module("nn.SpatialConvolution", **fields))
    elif kind == "relu":
      modules.append(_module("nn.ReLU", inplace=False, threshold=0, val=0,
                             **common))
    elif kind == "pad":
      modules.append(_module("nn.SpatialReflectionPadding", pad_l=1, pad_r=1,
                             pad_t=1, pad_b=1, **common))
    elif kind == "pool":
      modules.append(_module("nn.SpatialMaxPooling", kW=2, kH=2, dW=2, dH=2,
                             padW=0, padH=0, ceil_mode=False,
                             indices=_empty(), **common))
    elif kind == "up":
      modules.append(_module("nn.SpatialUpSamplingNearest", scale_factor=2,
                             **common))
    else:
      raise ValueError(f"unknown layer kind {kind!r}")
  if flat_parameters and flat_params:
    params = _Storage(np.concatenate(flat_params).astype(np.float32))
    grads = _Storage(np.zeros_like(params.data))
    for module in modules:
      views = module.fields.pop("_views", None)
      if views is None:
        continue
      for field, (start, shape, strides) in views.items():
        module.fields[field] = _TensorView(params, start, shape, strides)
        grad_field = "grad" + field[0].upper() + field[1:]
        module.fields[grad_field] = _TensorView(grads, start, shape, strides)
  container = _module(
      "nn.Sequential", modules=modules,
      output=modules[-1].fields["output"] if modules else _empty(),
      gradInput=modules[0].fields["gradInput"] if modules else _empty())
  writer = _Writer()
  writer.write(container)
  pathlib.Path(path).write_bytes(writer.getvalue())
