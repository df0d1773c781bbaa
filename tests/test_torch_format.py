"""Tests of cdft.weights.torch_format: torch.save files without torch."""
import collections
import io
import pickle
import struct
import zipfile

import numpy as np
import pytest

from cdft.errors import WeightError
from cdft.weights import torch_format

# (file, number of tensors, number of parameters) from weights/README.md.
RELEASED = [
    ("cd_wct16x/1SE.pth", 6, 2284), ("cd_wct16x/1SD.pth", 2, 651),
    ("cd_wct16x/2SE.pth", 12, 12732), ("cd_wct16x/2SD.pth", 6, 7379),
    ("cd_wct16x/3SE.pth", 18, 57116), ("cd_wct16x/3SD.pth", 10, 35091),
    ("cd_wct16x/4SE.pth", 28, 307804), ("cd_wct16x/4SD.pth", 18, 219667),
    ("cd_wct16x/5SE.pth", 38, 964188), ("cd_wct16x/5SD.pth", 26, 810003),
    ("cd_wct16x/base/e1_base.pth", 6, 2284),
    ("cd_wct16x/base/e2_base.pth", 12, 12732),
    ("cd_wct16x/base/e3_base.pth", 18, 57116),
    ("cd_wct16x/base/e4_base.pth", 28, 307804),
    ("cd_wct16x/base/e5_base.pth", 38, 964188),
    ("cd_wct16x/base/d1_base.pth", 2, 651),
    ("cd_wct16x/base/d2_base.pth", 6, 7379),
    ("cd_wct16x/base/d3_base.pth", 10, 35091),
    ("cd_wct16x/base/d4_base.pth", 18, 219667),
    ("cd_wct16x/base/d5_base.pth", 26, 810003),
    ("ft/Paraphraser.pth", 12, 129312),
]


# ----------------------------------------------------------------------------
# Hand-built files (the format written opcode by opcode, independent of save).
# ----------------------------------------------------------------------------


def _op_str(s):
  raw = s.encode()
  return b"X" + struct.pack("<I", len(raw)) + raw


def _op_int(i):
  return b"J" + struct.pack("<i", i)


def _op_tuple(items):
  return b"(" + b"".join(items) + b"t"


def _tensor_ops(key, storage, numel, offset, size, stride, legacy, view=None):
  """Pickle opcodes of torch._utils._rebuild_tensor_v2(storage, ...)."""
  pid = [_op_str("storage"), b"ctorch\n" + storage.encode() + b"\n",
         _op_str(key), _op_str("cpu"), _op_int(numel)]
  if legacy:
    if view is None:
      pid.append(b"N")
    else:
      pid.append(_op_tuple([_op_str(view[0]), _op_int(view[1]),
                            _op_int(view[2])]))
  return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + _op_tuple(pid) + b"Q"
          + _op_int(offset) + _op_tuple([_op_int(n) for n in size])
          + _op_tuple([_op_int(n) for n in stride])
          + b"\x89ccollections\nOrderedDict\n)Rt" + b"R")


def _dict_pickle(entries):
  """Protocol-2 pickle of {name: <opcodes>} (values given as raw opcodes)."""
  body = b"".join(_op_str(k) + v for k, v in entries.items())
  return b"\x80\x02}(" + body + b"u."


def _legacy_file(obj_pickle, storages, sys_info=None, key_list=None):
  """A legacy torch.save stream: storages is {key: (count, raw bytes)}."""
  out = io.BytesIO()
  out.write(pickle.dumps(torch_format.MAGIC_NUMBER, protocol=2))
  out.write(pickle.dumps(torch_format.PROTOCOL_VERSION, protocol=2))
  out.write(pickle.dumps(sys_info or {
      "protocol_version": 1001, "little_endian": True,
      "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2))
  out.write(obj_pickle)
  keys = list(storages) if key_list is None else key_list
  out.write(pickle.dumps(keys, protocol=2))
  for key in keys:
    count, raw = storages[key]
    out.write(struct.pack("<q", count) + raw)
  return out.getvalue()


def _zip_file(obj_pickle, storages, byteorder=b"little"):
  """A zip-format torch.save archive: storages is {key: raw bytes}."""
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w") as z:
    z.writestr("arch/data.pkl", obj_pickle)
    if byteorder is not None:
      z.writestr("arch/byteorder", byteorder)
    for key, raw in storages.items():
      z.writestr(f"arch/data/{key}", raw)
    z.writestr("arch/version", b"3\n")
  return out.getvalue()


def _write(tmp_path, name, data):
  path = tmp_path / name
  path.write_bytes(data)
  return path


# ----------------------------------------------------------------------------
# The released files.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,num_tensors,num_params", RELEASED)
def test_released_file_loads_completely(weights_dir, name, num_tensors,
                                        num_params):
  path = weights_dir / name
  obj, info = torch_format.load_with_info(path)
  assert info.format == "legacy"
  assert info.trailing_bytes == 0
  params = torch_format.state_dict(obj, path)
  assert len(params) == num_tensors
  assert sum(v.size for v in params.values()) == num_params
  for key, value in params.items():
    assert value.dtype == np.float32, key
    assert np.isfinite(value).all(), key
    assert value.flags.c_contiguous and value.flags.writeable
  if name.startswith("cd_wct16x/") and "base" not in name:
    assert obj["epoch"] == 20 and set(obj) == {"epoch", "model"}
    assert isinstance(obj["model"], collections.OrderedDict)
  elif "base" in name:
    assert isinstance(obj, collections.OrderedDict)


def test_released_shapes(weights_dir):
  se1 = torch_format.state_dict(
      torch_format.load(weights_dir / "cd_wct16x/1SE.pth"))
  assert {k: v.shape for k, v in se1.items()} == {
      "conv0.weight": (3, 3, 1, 1), "conv0.bias": (3,),
      "conv11.weight": (24, 3, 3, 3), "conv11.bias": (24,),
      "conv11_aux.weight": (64, 24, 1, 1), "conv11_aux.bias": (64,)}
  assert list(se1) == ["conv0.weight", "conv0.bias", "conv11.weight",
                       "conv11.bias", "conv11_aux.weight", "conv11_aux.bias"]
  # conv0 drifted slightly from the Caffe mean during distillation.
  np.testing.assert_allclose(se1["conv0.bias"], [-104.00, -116.79, -123.59],
                             atol=0.01)

  sd5 = torch_format.state_dict(
      torch_format.load(weights_dir / "cd_wct16x/5SD.pth"))
  assert list(sd5)[:2] == ["conv51.weight", "conv51.bias"]
  assert sd5["conv51.weight"].shape == (128, 128, 3, 3)
  assert sd5["conv41.weight"].shape == (64, 128, 3, 3)
  assert sd5["conv11.weight"].shape == (3, 16, 3, 3)

  e1 = torch_format.load(weights_dir / "cd_wct16x/base/e1_base.pth")
  np.testing.assert_allclose(
      e1["conv0.weight"][:, :, 0, 0], [[0, 0, 255], [0, 255, 0], [255, 0, 0]],
      atol=1e-3)
  np.testing.assert_allclose(e1["conv0.bias"], [-103.939, -116.779, -123.68],
                             atol=1e-3)


def test_paraphraser_checkpoint(weights_dir):
  path = weights_dir / "ft/Paraphraser.pth"
  obj = torch_format.load(path)
  assert obj["epoch"] == 5
  params = torch_format.state_dict(obj, path)
  assert params["deconv1.weight"].shape == (32, 64, 3, 3)  # ConvTranspose: IOHW
  assert params["deconv1.bias"].shape == (64,)
  group = obj["optimizer"]["param_groups"][0]
  assert group["lr"] == 0.1 and group["momentum"] == 0.9
  assert group["weight_decay"] == 0.0005 and group["nesterov"] is False
  buffers = [s["momentum_buffer"] for s in obj["optimizer"]["state"].values()]
  assert sorted(b.shape for b in buffers) == sorted(
      v.shape for v in params.values())


@pytest.mark.parametrize("legacy", [False, True])
def test_round_trip_released_file(weights_dir, tmp_path, legacy):
  source = weights_dir / "cd_wct16x/5SE.pth"
  obj = torch_format.load(source)
  out = tmp_path / "5SE_copy.pth"
  torch_format.save(obj, out, legacy=legacy)
  copy, info = torch_format.load_with_info(out)
  assert info.format == ("legacy" if legacy else "zip")
  assert info.trailing_bytes == 0 and info.num_storages == 38
  assert copy["epoch"] == 20
  assert isinstance(copy["model"], collections.OrderedDict)
  assert list(copy["model"]) == list(obj["model"])
  for key, value in obj["model"].items():
    assert copy["model"][key].dtype == value.dtype
    np.testing.assert_array_equal(copy["model"][key], value)


def test_truncated_released_file(weights_dir, tmp_path):
  data = (weights_dir / "cd_wct16x/5SE.pth").read_bytes()
  cut = _write(tmp_path, "5SE_cut.pth", data[:-1000])
  with pytest.raises(WeightError, match=r"5SE_cut\.pth: truncated: storage "
                     r"'\d+' needs \d+ bytes, \d+ left"):
    torch_format.load(cut)
  cut = _write(tmp_path, "5SE_cut_pickle.pth", data[:400])
  with pytest.raises(WeightError, match=r"5SE_cut_pickle\.pth: truncated"):
    torch_format.load(cut)
  # The last storage (a 512-float bias) keeps 4 of its 8 header bytes.
  cut = _write(tmp_path, "5SE_cut_header.pth", data[:len(data) - 2048 - 4])
  with pytest.raises(WeightError, match=r"5SE_cut_header\.pth: truncated: "
                     "storage '.*' needs an 8-byte header, 4 left"):
    torch_format.load(cut)


# ----------------------------------------------------------------------------
# Synthetic files (no weights needed).
# ----------------------------------------------------------------------------


def test_zip_layout_is_torchs(tmp_path):
  path = tmp_path / "params.pth"
  torch_format.save({"a": np.ones((2, 3), np.float32),
                     "b": np.arange(4, dtype=np.int64)}, path)
  raw = path.read_bytes()
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
    assert names == ["params/data.pkl", "params/byteorder", "params/data/0",
                     "params/data/1", "params/version"]
    assert z.read("params/version") == b"3\n"
    assert z.read("params/byteorder") == b"little"
    assert z.read("params/data/1") == np.arange(4, dtype="<i8").tobytes()
    assert z.read("params/data.pkl").startswith(b"\x80\x02")
    for info in z.infolist():
      assert info.compress_type == zipfile.ZIP_STORED
      name_len, extra_len = struct.unpack_from("<HH", raw,
                                               info.header_offset + 26)
      assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0


def test_legacy_layout_is_torchs(tmp_path):
  path = tmp_path / "params.pth"
  torch_format.save({"w": np.full((2, 2), 7, np.float32)}, path, legacy=True)
  raw = path.read_bytes()
  # pickle(MAGIC_NUMBER) with protocol 2: PROTO 2, LONG1 of 10 bytes.
  assert raw.startswith(b"\x80\x02\x8a\x0a")
  assert raw.endswith(struct.pack("<q", 4) + np.full(4, 7, "<f4").tobytes())


@pytest.mark.parametrize("legacy", [False, True])
def test_round_trip_dtypes_and_plain_data(tmp_path, legacy):
  obj = {
      "epoch": 3,
      "nested": collections.OrderedDict(
          f32=np.arange(6, dtype=np.float32).reshape(2, 3),
          f64=np.random.default_rng(0).standard_normal((3, 4)).T,
          f16=np.array([1.5, -2], np.float16),
          i64=np.array([-(2**40), 5]), i32=np.array([1, -2], np.int32),
          i16=np.array([3], np.int16), i8=np.array([-4], np.int8),
          u8=np.arange(5, dtype=np.uint8), b=np.array([True, False]),
          scalar=np.array(2.5, np.float32),
          empty=np.zeros((0, 3), np.float32),
          big_endian=np.arange(3, dtype=">f4")),
      "misc": [1, -7, 2**70, 0.25, "text", None, True, False, (1, 2, 3, 4),
               b"\x00\xff"],
  }
  path = tmp_path / "mixed.pth"
  torch_format.save(obj, path, legacy=legacy)
  copy = torch_format.load(path)
  assert copy["epoch"] == 3 and copy["misc"] == obj["misc"]
  assert isinstance(copy["nested"], collections.OrderedDict)
  assert list(copy["nested"]) == list(obj["nested"])
  for key, value in obj["nested"].items():
    got = copy["nested"][key]
    assert got.shape == value.shape, key
    assert got.dtype == value.dtype.newbyteorder("="), key
    np.testing.assert_array_equal(got, value)


def test_save_rejects_unsupported_objects(tmp_path):
  with pytest.raises(TypeError):
    torch_format.save({"f": object()}, tmp_path / "x.pth")
  with pytest.raises(TypeError):
    torch_format.save({"u16": np.zeros(2, np.uint16)}, tmp_path / "y.pth")


@pytest.mark.parametrize("legacy", [False, True])
def test_offset_stride_and_shared_storage(tmp_path, legacy):
  storage = np.arange(24, dtype=np.float32)
  pkl = _dict_pickle({
      "view": _tensor_ops("0", "FloatStorage", 24, 5, (3, 2), (1, 4), legacy),
      "full": _tensor_ops("0", "FloatStorage", 24, 0, (4, 6), (6, 1), legacy),
      "double": _tensor_ops("1", "DoubleStorage", 3, 1, (2,), (1,), legacy),
      "expanded": _tensor_ops("1", "DoubleStorage", 3, 0, (2, 3), (0, 1),
                              legacy),
  })
  doubles = np.array([1.0, 2.0, 3.0])
  if legacy:
    data = _legacy_file(pkl, {"0": (24, storage.tobytes()),
                              "1": (3, doubles.tobytes())})
  else:
    data = _zip_file(pkl, {"0": storage.tobytes(), "1": doubles.tobytes()})
  obj = torch_format.load(_write(tmp_path, "views.pth", data))
  np.testing.assert_array_equal(
      obj["view"], np.lib.stride_tricks.as_strided(
          storage[5:], (3, 2), (4, 16)))
  np.testing.assert_array_equal(obj["full"], storage.reshape(4, 6))
  np.testing.assert_array_equal(obj["double"], [2.0, 3.0])
  np.testing.assert_array_equal(obj["expanded"], [[1, 2, 3], [1, 2, 3]])
  assert obj["double"].dtype == np.float64
  obj["view"][0, 0] = -1  # copies, not views of each other
  assert obj["full"][0, 5] == 5


def test_legacy_storage_view_metadata(tmp_path):
  """PyTorch < 0.4 files could name a slice of a storage (view metadata)."""
  pkl = _dict_pickle({"t": _tensor_ops("0", "FloatStorage", 10, 1, (3,), (1,),
                                       True, view=("9", 4, 5))})
  data = _legacy_file(pkl, {"0": (10, np.arange(10, dtype="<f4").tobytes())})
  obj = torch_format.load(_write(tmp_path, "view_meta.pth", data))
  np.testing.assert_array_equal(obj["t"], [5, 6, 7])


def test_big_endian_zip(tmp_path):
  pkl = _dict_pickle({"t": _tensor_ops("0", "FloatStorage", 3, 0, (3,), (1,),
                                       False)})
  data = _zip_file(pkl, {"0": np.array([1, 2, 3], ">f4").tobytes()},
                   byteorder=b"big")
  obj = torch_format.load(_write(tmp_path, "big.pth", data))
  np.testing.assert_array_equal(obj["t"], [1, 2, 3])


def test_tensor_overrunning_storage(tmp_path):
  pkl = _dict_pickle({"bad": _tensor_ops("0", "FloatStorage", 4, 1, (2, 2),
                                         (2, 1), False)})
  data = _zip_file(pkl, {"0": np.zeros(4, np.float32).tobytes()})
  with pytest.raises(WeightError,
                     match=r"overrun\.pth: tensor 'bad'.*overruns"):
    torch_format.load(_write(tmp_path, "overrun.pth", data))


def test_missing_and_short_storages(tmp_path):
  pkl = _dict_pickle({"t": _tensor_ops("0", "FloatStorage", 4, 0, (4,), (1,),
                                       False)})
  with pytest.raises(WeightError, match=r"no_record\.pth: missing archive "
                     r"record 'arch/data/0'"):
    torch_format.load(_write(tmp_path, "no_record.pth", _zip_file(pkl, {})))
  with pytest.raises(WeightError, match=r"short\.pth: truncated: storage '0' "
                     r"needs 16 bytes, record has 8"):
    torch_format.load(_write(tmp_path, "short.pth",
                             _zip_file(pkl, {"0": b"\x00" * 8})))
  legacy_pkl = _dict_pickle({"t": _tensor_ops("0", "FloatStorage", 4, 0, (4,),
                                              (1,), True)})
  data = _legacy_file(legacy_pkl, {"0": (4, b"")}, key_list=[])
  with pytest.raises(WeightError, match=r"unlisted\.pth: storage '0' is used "
                     r"by a tensor but missing"):
    torch_format.load(_write(tmp_path, "unlisted.pth", data))
  data = _legacy_file(legacy_pkl, {"0": (3, b"\x00" * 12)})
  with pytest.raises(WeightError, match=r"count\.pth: storage '0' holds 3 "
                     r"elements, the pickle declares 4"):
    torch_format.load(_write(tmp_path, "count.pth", data))


def test_truncated_zip(tmp_path):
  path = tmp_path / "whole.pth"
  torch_format.save({"w": np.ones(1000, np.float32)}, path)
  cut = _write(tmp_path, "cut_zip.pth", path.read_bytes()[:-50])
  with pytest.raises(WeightError, match=r"cut_zip\.pth: truncated or corrupt"):
    torch_format.load(cut)


@pytest.mark.parametrize("data,message", [
    (b"", "empty file"),
    (b"hello, I am a text file\n", "not a torch.save file"),
    (bytes(range(256)) * 10, "not a torch.save file"),
    (b"\x80\x02\x8a\x0a" + b"\x01" * 10 + b".", "wrong magic number: 0x"),
    (b"\x80\x02\x8a\x0a\x6c\xfc", "truncated"),
    (b"\x80\x02\xff\xfe.", "corrupt magic number pickle"),
    (pickle.dumps({"a": 1}, protocol=2), "wrong magic number"),
    (pickle.dumps(torch_format.MAGIC_NUMBER, protocol=2)
     + pickle.dumps(7, protocol=2), "protocol version 7"),
    (b"PK\x03\x04" + b"\x00" * 100, "truncated or corrupt zip"),
])
def test_not_a_torch_file(tmp_path, data, message):
  path = _write(tmp_path, "garbage.pth", data)
  with pytest.raises(WeightError, match=message) as info:
    torch_format.load(path)
  assert str(path) in str(info.value)
  assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
  with pytest.raises(WeightError, match=r"nothing\.pth: no such file"):
    torch_format.load(tmp_path / "nothing.pth")


def test_refuses_code(tmp_path):
  marker = tmp_path / "pwned"
  # os.system(f"touch {marker}") as a pickle, in both file formats.
  evil = (b"\x80\x02cos\nsystem\n" + _op_str(f"touch {marker}")
          + b"\x85R.")
  legacy = _legacy_file(evil, {})
  with pytest.raises(WeightError,
                     match=r"evil\.pth: refuses to unpickle os\.system"):
    torch_format.load(_write(tmp_path, "evil.pth", legacy))
  with pytest.raises(WeightError,
                     match=r"evil_zip\.pth: refuses to unpickle os\.system"):
    torch_format.load(_write(tmp_path, "evil_zip.pth", _zip_file(evil, {})))
  # Also when hidden in the header pickles, or as a module's pickle.
  with pytest.raises(WeightError, match="refuses to unpickle os.system"):
    torch_format.load(_write(tmp_path, "evil_header.pth", evil))
  module = _dict_pickle({"m": b"ctorch.nn.modules.conv\nConv2d\n)R"})
  with pytest.raises(WeightError, match="refuses to unpickle torch.nn.modules"
                     r"\.conv\.Conv2d"):
    torch_format.load(_write(tmp_path, "module.pth",
                             _legacy_file(module, {})))
  assert not marker.exists()


def test_state_dict_selection():
  w = np.zeros((2,), np.float32)
  assert list(torch_format.state_dict({"epoch": 1, "model": {"a": w, "b": w}})
             ) == ["a", "b"]
  assert list(torch_format.state_dict({"state_dict": {"c": w},
                                       "optimizer": {}})) == ["c"]
  assert list(torch_format.state_dict(
      collections.OrderedDict(z=w, y=w))) == ["z", "y"]
  with pytest.raises(WeightError, match=r"f\.pth: no state dict found"):
    torch_format.state_dict([w], "f.pth")
  with pytest.raises(WeightError, match=r"g\.pth: no state dict found: entry "
                     "'epoch'"):
    torch_format.state_dict({"epoch": 1, "w": w}, "g.pth")
  with pytest.raises(WeightError, match="no state dict found"):
    torch_format.state_dict({})
