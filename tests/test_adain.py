"""AdaIN and CD-AdaIN against the original PyTorch code (../shared/golden/adain), random weights.

The weights are regenerated from the golden set's numpy recipe (tests/adain_golden.py)
and checked bit for bit against its weights_check.json first; every output is
compared within 1e-5 of the golden's largest magnitude.
"""
import json

import jax
import numpy as np
import pytest

import adain_golden
from cdft import losses
from cdft.errors import WeightError
from cdft.models import adain, vgg
from cdft.weights import adain as adain_weights
from cdft.weights import convert, torch_format

RTOL = 1e-5


@pytest.fixture(scope="module")
def golden(golden_dir):
  return golden_dir / "adain"


@pytest.fixture(scope="module")
def nets(golden):
  """The golden set's networks as cdft modules and parameters."""
  state = adain_golden.generate(golden)
  adain_golden.check(state, golden)
  se = state["se"]
  enc16 = vgg.adain_encoder("16x")
  probe = jax.ShapeDtypeStruct((1, 16, 16, 3), np.float32)
  se_enc = convert.from_torch_state(se, convert.abstract_params(enc16, probe), "se")
  feats = jax.eval_shape(lambda p, x: enc16.apply(p, x, return_all=True), se_enc, probe)
  aux = {}
  for relu in (False, True):
    emb = vgg.Embedding(stage=4, widths=vgg.CD16X_WIDTHS, relu=relu)
    aux[relu] = (emb, convert.from_torch_state(se, convert.abstract_params(emb, feats), "se"))
  return {
      "vgg": (vgg.adain_encoder("vgg19"), adain_weights.encoder_from_state(state["vgg"])),
      "decoder": (vgg.adain_decoder("vgg19"), adain_weights.decoder_from_state(state["decoder"])),
      "se": (enc16, se_enc),
      "aux": aux,
  }


def load(golden, name):
  return np.load(golden / f"{name}.npy")


def assert_close(got, want, rtol=RTOL):
  got = np.asarray(got)[..., :want.shape[-1]]
  assert got.shape == want.shape
  scale = max(float(np.max(np.abs(want))), 1e-6)
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


def encode(nets, x, which="vgg"):
  module, params = nets[which]
  return jax.jit(lambda p, x: module.apply(p, x, return_all=True))(params, x)


def decode(nets, feat):
  module, params = nets["decoder"]
  return jax.jit(module.apply)(params, feat)


@pytest.mark.parametrize("size", [64, 100])
def test_vgg_features_and_statistics(golden, nets, size):
  for image in ("content", "style"):
    feats = encode(nets, load(golden, f"{image}_{size}"))
    for i, f in enumerate(feats, start=1):
      name = f"vgg_relu{i}_1_{image}_{size}"
      want = load(golden, name if i == 4 else f"{name}_c{4 if i == 1 else 8}")
      assert_close(f, want)
      mean, std = adain.mean_std(f)
      assert_close(mean, load(golden, f"{name}_mean"))
      assert_close(std, load(golden, f"{name}_std"))
  assert feats[-1].shape[1:3] == {64: (8, 8), 100: (13, 13)}[size]  # ceil-mode pooling


@pytest.mark.parametrize("size", [64, 100])
def test_adain_of_relu4_1(golden, size):
  got = adain.adain(load(golden, f"vgg_relu4_1_content_{size}"),
                    load(golden, f"vgg_relu4_1_style_{size}"))
  assert_close(got, load(golden, f"adain_{size}"))


@pytest.mark.parametrize("alpha,tag", [(1.0, "a1"), (0.6, "a06")])
def test_net_forward_decoder_output_and_losses(golden, nets, alpha, tag):
  """pytorch-AdaIN train.py's Net.forward at 64x64: g_t and both losses."""
  content, style = load(golden, "content_64"), load(golden, "style_64")
  c4 = encode(nets, content)[-1]
  s_feats = encode(nets, style)
  t = alpha * adain.adain(c4, s_feats[-1]) + (1 - alpha) * c4
  g_t = decode(nets, t)
  assert_close(g_t, load(golden, f"net_forward_g_t_{tag}_64"))
  g_feats = encode(nets, g_t)
  scalars = json.loads((golden / "scalars.json").read_text())[f"net_forward_64_{tag}"]
  np.testing.assert_allclose(losses.mse(g_feats[-1], t), scalars["loss_c"], rtol=RTOL)
  total, terms = losses.adain_style(g_feats, s_feats)
  np.testing.assert_allclose(terms, scalars["loss_s_terms_extra"], rtol=RTOL)
  np.testing.assert_allclose(total, scalars["loss_s"], rtol=RTOL)


@pytest.mark.parametrize("size", [64, 100])
def test_style_transfer_with_alpha_and_interpolation(golden, nets, size):
  """test.py's style_transfer: the decoder output is not cropped (100 -> 104)."""
  content, style = load(golden, f"content_{size}"), load(golden, f"style_{size}")
  c4 = encode(nets, content[:1])[-1]
  s4 = encode(nets, style)[-1]
  for alpha, tag in ((1.0, "a1"), (0.6, "a06")):
    out = decode(nets, adain.mix(c4, adain.mean_std(s4[:1]), alpha))
    assert_close(out, load(golden, f"style_transfer_{tag}_{size}"))
  out = decode(nets, adain.mix(c4, adain.mean_std(s4), 1.0, weights=(0.7, 0.3)))
  want = load(golden, f"style_transfer_interp_{size}")
  assert out.shape == want.shape == (1, 8 * -(-size // 8), 8 * -(-size // 8), 3)
  assert_close(out, want)


def test_mix_refuses_missing_weights():
  stats = (np.zeros((2, 1, 1, 4), np.float32), np.ones((2, 1, 1, 4), np.float32))
  with pytest.raises(ValueError, match="2 styles need 2 interpolation weights"):
    adain.mix(np.ones((1, 3, 3, 4), np.float32), stats)
  with pytest.raises(ValueError, match="1 interpolation weights for 2 styles"):
    adain.mix(np.ones((1, 3, 3, 4), np.float32), stats, weights=(1.0,))


@pytest.mark.parametrize("relu", [False, True])
def test_cd_adain_student_features_losses_and_output(golden, nets, relu):
  """CD's TrainSE_With_AdaINDecoder2.forward at 64x64 (iter 0), both updim_relu settings."""
  content, style = load(golden, "content_64"), load(golden, "style_64")
  emb, emb_params = nets["aux"][relu]
  se, se_params = nets["se"]
  aux = {}
  for image, x in (("content", content), ("style", style)):
    feats = jax.jit(lambda p, x: se.apply(p, x, return_all=True))(se_params, x)
    if not relu and image == "content":
      assert_close(feats[-1], load(golden, "se4_relu4_1_content_64"))
    aux[image] = jax.jit(emb.apply)(emb_params, feats)
    for i, a in enumerate(aux[image], start=1):
      name = f"cd_se_aux{i}_{image}_64_relu{int(relu)}"
      assert_close(a, load(golden, name if i == 4 and not relu else
                           f"{name}_c{4 if i == 1 else 8}"))
  be_c, be_s = encode(nets, content), encode(nets, style)
  sd = decode(nets, adain.adain(aux["content"][-1], aux["style"][-1]))
  assert_close(sd, load(golden, f"cd_sd_64_relu{int(relu)}"))
  sd_feats = encode(nets, sd)
  terms = losses.cd_adain(aux["content"], aux["style"], be_c, be_s, sd_feats)
  want = json.loads((golden / "scalars.json").read_text())[f"cd_64_updim_relu_{str(relu).lower()}"]
  for name in ("feat_loss", "content_loss", "style_loss"):
    np.testing.assert_allclose(terms[name.split("_")[0]], want[name], rtol=RTOL)


def test_sd_be_is_the_adain_decode(golden, nets):
  content, style = load(golden, "content_64"), load(golden, "style_64")
  sd_be = decode(nets, adain.adain(encode(nets, content)[-1], encode(nets, style)[-1]))
  assert_close(sd_be, load(golden, "cd_sd_BE_64"))


def test_wrong_files_are_named(golden):
  state = adain_golden.generate(golden)
  with pytest.raises(WeightError, match=r"decoder.pth: convolutions at modules \[0, 2, 5"):
    adain_weights.decoder_from_state(state["vgg"])
  with pytest.raises(WeightError, match="'conv0.weight' is not an nn.Sequential entry"):
    adain_weights.encoder_from_state(state["se"])
  bad = dict(state["vgg"], **{"2.weight": state["vgg"]["2.weight"][:32]})
  with pytest.raises(WeightError, match=r"vgg_normalised.pth: tensor 'conv11.weight' has shape "
                     r"\(32, 3, 3, 3\), the model expects \(64"):
    adain_weights.encoder_from_state(bad)
  with pytest.raises(WeightError, match="no adain/vgg_normalised.pth and adain/decoder.pth"):
    adain_weights.load(golden)


def test_released_file_layouts_load(golden, tmp_path):
  """vgg_normalised.pth as the full legacy-format Sequential (modules past relu4_1 ignored),
  decoder.pth in the zip format, found under <weights dir>/adain."""
  state = adain_golden.generate(golden)
  (tmp_path / "adain").mkdir()
  full_vgg = dict(state["vgg"], **{"32.weight": np.ones((512, 512, 3, 3), np.float32),
                                   "32.bias": np.zeros(512, np.float32)})
  torch_format.save(full_vgg, tmp_path / "adain" / "vgg_normalised.pth", legacy=True)
  torch_format.save(state["decoder"], tmp_path / "adain" / "decoder.pth")
  encoder, decoder = adain_weights.load(tmp_path)
  for got, want in ((encoder, adain_weights.encoder_from_state(state["vgg"])),
                    (decoder, adain_weights.decoder_from_state(state["decoder"]))):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
