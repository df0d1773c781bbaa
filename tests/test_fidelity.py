"""Port fidelity against the official PyTorch code (../shared/golden), with the released weights.

Targets (issue 2; reachable per ../shared/baselines/README.md): features within
1e-5 * max|ref| + 1e-5; single levels max-abs <= 5e-4; the cascade max-abs <= 2e-3
and PSNR >= 80 dB on the float output.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from cdft import models
from cdft.stylize import cascade
from cdft.weights import pretrained


@pytest.fixture(scope="module")
def levels(weights_dir, tmp_path_factory):
  return pretrained.load_levels("cd16x", weights_dir=weights_dir,
                                cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def stylizer(levels):
  return cascade.Stylizer(levels)


@pytest.fixture(scope="module")
def inputs(golden_dir):
  return np.load(golden_dir / "content_256.npy"), np.load(golden_dir / "style_256.npy")


def _feature_tol(ref):
  return 1e-5 * np.abs(ref).max() + 1e-5


def _psnr(a, b):
  return 10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - b) ** 2))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_small_encoder_embedding_and_decoder(k, weights_dir, golden_dir, inputs, tmp_path):
  trees = pretrained.load_cd16x(k, weights_dir, cache_dir=tmp_path)
  content, style = inputs
  enc = models.get_model("encoder", k, "16x")
  feats = enc.apply(trees["encoder"], content, return_all=True)
  for name, got in [(f"se{k}_relu{k}_1", feats[-1]),
                    (f"se{k}_relu{k}_1_style", enc.apply(trees["encoder"], style))]:
    ref = np.load(golden_dir / f"{name}.npy")
    assert np.abs(np.asarray(got) - ref).max() <= _feature_tol(ref), name
  embedded = models.get_model("embedding", k, "16x").apply(trees["embedding"], feats)
  ref = np.load(golden_dir / f"se{k}_aux_relu{k}_1.npy")
  assert np.abs(np.asarray(embedded[-1]) - ref).max() <= _feature_tol(ref)
  dec_in = jnp.asarray(np.load(golden_dir / f"se{k}_relu{k}_1.npy"))
  rec = models.get_model("decoder", k, "16x").apply(trees["decoder"], dec_in)
  ref = np.load(golden_dir / f"sd{k}_recon.npy")
  assert np.abs(np.asarray(rec) - ref).max() <= _feature_tol(ref)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_single_level(k, stylizer, golden_dir, inputs):
  content, style = inputs
  got = np.asarray(stylizer.level(k, content, [style]))
  ref = np.load(golden_dir / f"wct16x_level{k}.npy")
  assert got.shape == ref.shape
  assert np.abs(got - ref).max() <= 5e-4


@pytest.mark.parametrize("alpha,name", [(1.0, "a1"), (0.6, "a06")])
def test_cascade(alpha, name, stylizer, golden_dir, inputs):
  content, style = inputs
  seen = []
  got = stylizer.stylize(content, style, alpha=alpha, callback=lambda k, s: seen.append(k))
  assert seen == [5, 4, 3, 2, 1]
  ref = np.load(golden_dir / f"wct16x_cascade_{name}.npy")[0]
  assert np.abs(got - ref).max() <= 2e-3
  assert _psnr(got, ref) >= 80.0


def test_cascade_intermediate_images(stylizer, golden_dir, inputs):
  content, style = inputs
  img = content  # the golden arrays are already batched, (1, H, W, 3)
  for k in (5, 4, 3, 2):
    img = stylizer.level(k, img, [style])
    ref = np.load(golden_dir / f"wct16x_cascade_a1_after_stage{k}.npy")
    assert np.abs(np.asarray(img) - ref).max() <= 2e-3, k


def test_portrait_runs_transposed_through_the_landscape_programs(stylizer, inputs):
  """A portrait is stylized as its transpose (one compile for both orientations): the
  same picture as the untransposed levels chained, to float rounding."""
  content, style = inputs
  portrait = content[0, :, :192]  # 256 x 192
  got = stylizer.stylize(portrait, style)
  img = portrait[None]
  for k in (5, 4, 3, 2, 1):
    img = stylizer.level(k, img, [style])
  want = np.asarray(img)[0]
  assert got.shape == want.shape == (256, 192, 3)
  assert np.abs(got - want).max() <= 2e-4
  assert _psnr(got, want) >= 100.0
