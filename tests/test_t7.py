"""Tests of cdft.weights.t7: the Torch7 .t7 reader (and its small writer)."""
import struct

import numpy as np
import pytest

from cdft.errors import WeightError
from cdft.weights import t7

import t7_writer  # tests/t7_writer.py

# The encoder of vgg_normalised_conv2_1.t7 (layer kinds only; widths shrunk):
# conv0, pad, conv11, relu, pad, conv12, relu, pool, pad, conv21, relu.
_CHANNELS = [(3, 3, 1), (8, 3, 3), (8, 8, 3), (16, 8, 3)]


def _encoder_layers(seed=0):
  rng = np.random.default_rng(seed)
  convs = [(rng.standard_normal((o, i, k, k)).astype(np.float32),
            rng.standard_normal(o).astype(np.float32))
           for o, i, k in _CHANNELS]
  layers = [("conv", *convs[0]), ("pad",), ("conv", *convs[1]), ("relu",),
            ("pad",), ("conv", *convs[2]), ("relu",), ("pool",), ("pad",),
            ("conv", *convs[3]), ("relu",), ("up",)]
  return layers, convs


@pytest.mark.parametrize("weight_2d", [False, True])
@pytest.mark.parametrize("flat_parameters", [False, True])
def test_sequential_convs_round_trip(tmp_path, weight_2d, flat_parameters):
  layers, convs = _encoder_layers()
  path = tmp_path / "vgg_normalised_conv2_1.t7"
  t7_writer.save_sequential(path, layers, weight_2d=weight_2d,
                     flat_parameters=flat_parameters)
  got = t7.sequential_convs(path)
  # Same indexing as the CD code: conv0=0, conv11=2, conv12=5, conv21=9.
  assert [index for index, _, _ in got] == [0, 2, 5, 9]
  for (_, weight, bias), (want_w, want_b) in zip(got, convs):
    assert weight.dtype == np.float32 and bias.dtype == np.float32
    assert weight.shape == want_w.shape
    np.testing.assert_array_equal(weight, want_w)
    np.testing.assert_array_equal(bias, want_b)


def test_load_structure_and_repeated_references(tmp_path):
  layers, convs = _encoder_layers()
  path = tmp_path / "net.t7"
  t7_writer.save_sequential(path, layers, weight_2d=True, flat_parameters=True)
  root = t7.load(path)
  assert isinstance(root, t7.T7Object) and root.class_name == "nn.Sequential"
  modules = root.fields["modules"]
  assert sorted(modules) == list(range(1, len(layers) + 1))
  assert [modules[i].class_name for i in (1, 2, 4, 8, 12)] == [
      "nn.SpatialConvolution", "nn.SpatialReflectionPadding", "nn.ReLU",
      "nn.SpatialMaxPooling", "nn.SpatialUpSamplingNearest"]
  # The container's output is the last module's output: one object, read once.
  assert root.fields["output"] is modules[12].fields["output"]
  assert root.fields["gradInput"] is modules[1].fields["gradInput"]
  conv = modules[3].fields
  assert conv["nInputPlane"] == 3.0 and conv["kH"] == 3.0
  assert conv["weight"].shape == (8, 27)  # 2-D layout kept by load()
  np.testing.assert_array_equal(conv["weight"], convs[1][0].reshape(8, 27))
  assert conv["gradWeight"].shape == (8, 27)
  assert not conv["gradWeight"].any()


def _int(i):
  return struct.pack("<i", i)


def _str(s):
  return _int(len(s)) + s.encode()


def _long(*values):
  return b"".join(struct.pack("<q", v) for v in values)


def _str_obj(s):
  return _int(2) + _str(s)


def _num_obj(x):
  return _int(1) + struct.pack("<d", x)


def test_reads_hand_written_bytes(tmp_path):
  """The format byte by byte, independent of the writer."""
  storage = _int(4) + _int(2) + _str("V 1") + _str("torch.DoubleStorage")
  storage += _long(8) + np.arange(8, dtype="<f8").tobytes()
  # A 2x3 DoubleTensor with stride (1, 2), 1-based offset 3 -> elements 2...
  tensor = _int(4) + _int(3) + _str("V 1") + _str("torch.DoubleTensor")
  tensor += _int(2) + _long(2, 3) + _long(1, 2) + _long(3) + storage
  # ... and a second tensor on the same storage (referenced by index 2).
  tensor2 = _int(4) + _int(4) + _str("torch.DoubleTensor")  # no version
  tensor2 += _int(1) + _long(2) + _long(1) + _long(7) + _int(4) + _int(2)
  inner = _int(3) + _int(5) + _int(1) + _str_obj("x") + _num_obj(1.5)
  table = _int(3) + _int(1) + _int(6)
  table += _str_obj("t") + tensor
  table += _str_obj("t2") + tensor2
  table += _str_obj("flag") + _int(5) + _int(1)
  table += _num_obj(1) + inner
  table += _num_obj(2) + _int(3) + _int(5)  # the same inner table again
  table += _str_obj("nothing") + _int(0)
  path = tmp_path / "hand.t7"
  path.write_bytes(table)
  obj = t7.load(path)
  np.testing.assert_array_equal(obj["t"], [[2, 4, 6], [3, 5, 7]])
  assert obj["t"].dtype == np.float64
  np.testing.assert_array_equal(obj["t2"], [6, 7])
  assert obj["flag"] is True and obj["nothing"] is None
  assert obj[1] == {"x": 1.5} and obj[2] is obj[1]


def test_truncated_file(tmp_path):
  layers, _ = _encoder_layers()
  path = tmp_path / "whole.t7"
  t7_writer.save_sequential(path, layers)
  data = path.read_bytes()
  for cut in (len(data) - 100, 2, 300):
    short = tmp_path / "feature_invertor_conv2_1.t7"
    short.write_bytes(data[:cut])
    with pytest.raises(WeightError, match=r"feature_invertor_conv2_1\.t7: "
                       "truncated .t7 file"):
      t7.load(short)
    with pytest.raises(WeightError, match="truncated"):
      t7.sequential_convs(short)


def test_corrupt_files(tmp_path):
  path = tmp_path / "bad.t7"
  path.write_bytes(_int(42) + b"\x00" * 16)
  with pytest.raises(WeightError, match=r"bad\.t7: corrupt .t7 file: unknown "
                     "type tag 42"):
    t7.load(path)
  path.write_bytes(_int(6) + b"\x00" * 16)
  with pytest.raises(WeightError, match="Lua function"):
    t7.load(path)
  path.write_bytes(b"4\n1\n3\nV 1\n")
  with pytest.raises(WeightError, match="ASCII .t7 files are not supported"):
    t7.load(path)
  path.write_bytes(_num_obj(1) + b"extra")
  with pytest.raises(WeightError, match="5 unexpected bytes"):
    t7.load(path)
  path.write_bytes(b"")
  with pytest.raises(WeightError, match="empty file"):
    t7.load(path)
  with pytest.raises(WeightError, match=r"absent\.t7: no such file"):
    t7.load(tmp_path / "absent.t7")


def test_tensor_overrunning_storage(tmp_path):
  storage = _int(4) + _int(2) + _str("V 1") + _str("torch.FloatStorage")
  storage += _long(4) + np.zeros(4, "<f4").tobytes()
  tensor = _int(4) + _int(1) + _str("V 1") + _str("torch.FloatTensor")
  tensor += _int(1) + _long(4) + _long(1) + _long(2) + storage
  path = tmp_path / "overrun.t7"
  path.write_bytes(tensor)
  with pytest.raises(WeightError, match=r"overrun\.t7: .*overruns"):
    t7.load(path)


def test_sequential_convs_rejects_wrong_structures(tmp_path):
  path = tmp_path / "table.t7"
  writer = t7_writer._Writer()  # pylint: disable=protected-access
  writer.write({"modules": []})
  path.write_bytes(writer.getvalue())
  with pytest.raises(WeightError, match=r"table\.t7: expected an "
                     "nn.Sequential, found dict"):
    t7.sequential_convs(path)

  conv = t7.T7Object("nn.SpatialConvolution", {
      "nInputPlane": 3, "nOutputPlane": 4, "kH": 3, "kW": 3,
      "weight": np.zeros((4, 3, 1, 1), np.float32),
      "bias": np.zeros(4, np.float32)})
  writer = t7_writer._Writer()  # pylint: disable=protected-access
  writer.write(t7.T7Object("nn.Sequential", {"modules": [conv]}))
  path = tmp_path / "shape.t7"
  path.write_bytes(writer.getvalue())
  with pytest.raises(WeightError, match=r"shape\.t7: module 0 "
                     r"\(nn.SpatialConvolution\): weight of shape"):
    t7.sequential_convs(path)


def test_conv_without_bias_gets_zeros(tmp_path):
  conv = t7.T7Object("nn.SpatialConvolution", {
      "nInputPlane": 2, "nOutputPlane": 3, "kH": 1, "kW": 1,
      "weight": np.ones((3, 2), np.float32), "bias": None})
  writer = t7_writer._Writer()  # pylint: disable=protected-access
  writer.write(t7.T7Object("nn.Sequential", {"modules": [
      t7.T7Object("nn.ReLU", {}), conv]}))
  path = tmp_path / "nobias.t7"
  path.write_bytes(writer.getvalue())
  ((index, weight, bias),) = t7.sequential_convs(path)
  assert index == 1 and weight.shape == (3, 2, 1, 1)
  np.testing.assert_array_equal(bias, np.zeros(3))
