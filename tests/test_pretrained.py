"""Pretrained loaders: released files, pruned inits, Torch7 VGG-19, converted cache, wrong files."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdft import models
from cdft.errors import WeightError
from cdft.models import vgg
from cdft.stylize import cli
from cdft.weights import pretrained, torch_format

import t7_writer  # tests/t7_writer.py


def test_pruned_initialisations_load(weights_dir, tmp_path):
  for k in (1, 3, 5):
    trees = pretrained.load_cd16x_base(k, weights_dir, tmp_path)
    assert set(trees) == {"encoder", "embedding", "decoder"}
    # The pruned conv0 is the exact Caffe pre-processing (spec 2.1).
    np.testing.assert_allclose(trees["encoder"]["params"]["conv0"]["bias"],
                               [-103.939, -116.779, -123.68], rtol=1e-6)


@pytest.mark.parametrize("stage,file,message", [
    (1, "2SE.pth", "'conv11.weight' has shape (16, 3, 3, 3), the model expects (24, 3, 3, 3)"),
    (2, "3SE.pth", "unexpected tensor 'conv22.weight'"),
    (3, "3SD.pth", "'conv31.weight' has shape (32, 64, 3, 3), the model expects (64, 32, 3, 3)"),
])
def test_wrong_file_names_file_and_tensor(stage, file, message, weights_dir):
  path = weights_dir / "cd_wct16x" / file
  with pytest.raises(WeightError) as e:
    pretrained.convert_student_files(stage, path, None)
  assert str(path) in str(e.value) and message in str(e.value)
  assert "\n" not in str(e.value)


def test_converted_cache_is_used(weights_dir, tmp_path, monkeypatch):
  first = pretrained.load_cd16x(2, weights_dir, tmp_path)
  assert list((tmp_path / "converted").glob("*.npz"))

  def no_parsing(*args, **kwargs):
    raise AssertionError("the PyTorch file was parsed again")

  monkeypatch.setattr(torch_format, "load", no_parsing)
  second = pretrained.load_cd16x(2, weights_dir, tmp_path)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(a, b)


def _write_vgg19_t7(folder, stage, key):
  """Random stage-k VGG-19 encoder/decoder written as the original WCT .t7 Sequentials."""
  x = jnp.zeros((1, 16, 16, 3))
  enc = models.get_model("encoder", stage, "vgg19")
  pe = enc.init(key, x)["params"]
  dec = models.get_model("decoder", stage, "vgg19")
  pd = dec.init(key, enc.apply({"params": pe}, x))["params"]
  oihw = lambda p: np.transpose(np.asarray(p["kernel"]), (3, 2, 0, 1))
  layers = [("conv", oihw(pe["conv0"]), np.asarray(pe["conv0"]["bias"]))]
  prev_block = 1
  for name in vgg.encoder_layer_names(stage):
    if int(name[4]) != prev_block:
      layers.append(("pool",))
      prev_block = int(name[4])
    layers += [("pad",), ("conv", oihw(pe[name]), np.asarray(pe[name]["bias"])), ("relu",)]
  t7_writer.save_sequential(folder / f"vgg_normalised_conv{stage}_1.t7", layers)
  layers, prev_block = [], stage
  for name in vgg.decoder_layer_names(stage):
    if int(name[4]) != prev_block:
      layers.append(("up",))
      prev_block = int(name[4])
    layers += [("pad",), ("conv", oihw(pd[name]), np.asarray(pd[name]["bias"])), ("relu",)]
  t7_writer.save_sequential(folder / f"feature_invertor_conv{stage}_1.t7", layers, weight_2d=True)
  return pe, pd


def test_vgg19_torch7_models_load_and_stylize(tmp_path, images_dir, capsys, monkeypatch):
  folder = tmp_path / "original_wct_models"
  folder.mkdir()
  written = {k: _write_vgg19_t7(folder, k, jax.random.key(k)) for k in (1, 2)}
  trees = pretrained.load_vgg19_t7(2, *pretrained.vgg19_files(2, tmp_path))
  for tree, ref in zip((trees["encoder"], trees["decoder"]), written[2]):
    for a, b in zip(jax.tree.leaves(tree["params"]), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-6)
  # Stage 2 files given for stage 1: the conv count does not match.
  with pytest.raises(WeightError, match="4 convolutions, the model has 2"):
    pretrained.load_vgg19_t7(1, folder / "vgg_normalised_conv2_1.t7")

  monkeypatch.setenv("CDFT_NO_COMPILE_CACHE", "1")
  out = tmp_path / "out.png"
  code = cli.main(["--model", "vgg19", "--weights-dir", str(tmp_path), "--levels", "2,1",
                   "--content", str(images_dir / "content/adain_avril.jpg"),
                   "--style", str(images_dir / "style/adain_la_muse.jpg"),
                   "--content-size", "32", "--style-size", "32", "--output", str(out)])
  assert code == 0, capsys.readouterr().err
  assert out.exists()
  # Level 3 files are absent: a clear one-line error.
  code = cli.main(["--model", "vgg19", "--weights-dir", str(tmp_path), "--levels", "3",
                   "--content", str(images_dir / "content/adain_avril.jpg"),
                   "--style", str(images_dir / "style/adain_la_muse.jpg"), "--output", str(out)])
  assert code == 2
  assert "vgg_normalised_conv3_1.t7" in capsys.readouterr().err
