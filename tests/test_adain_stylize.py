"""AdaIN stylization (``Stylizer(method='adain')``, ``cdft-stylize --method adain``).

Against the golden outputs of pytorch-AdaIN's ``test.py`` (random weights
regenerated from the golden recipe and written in the released files'
layouts), through the bucketed canvas, at the image's own shape and in tiles.
"""
import jax
import numpy as np
import pytest
from PIL import Image

import adain_golden
from cdft.models import adain
from cdft.stylize import cascade, cli, tiled
from cdft.weights import pretrained, torch_format

RTOL = 1e-5


@pytest.fixture(autouse=True)
def _no_user_cache(monkeypatch, tmp_path):
  monkeypatch.setenv("CDFT_NO_COMPILE_CACHE", "1")
  monkeypatch.setenv("CDFT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def golden(golden_dir):
  return golden_dir / "adain"


@pytest.fixture(scope="module")
def adain_dir(golden, tmp_path_factory):
  """A weights folder with the golden networks as adain/vgg_normalised.pth and decoder.pth."""
  state = adain_golden.generate(golden)
  adain_golden.check(state, golden)
  root = tmp_path_factory.mktemp("adain_weights")
  (root / "adain").mkdir()
  torch_format.save(state["vgg"], root / "adain" / "vgg_normalised.pth", legacy=True)
  torch_format.save(state["decoder"], root / "adain" / "decoder.pth")
  return root


@pytest.fixture(scope="module")
def teacher(adain_dir):
  return cascade.Stylizer(pretrained.load_adain("adain-vgg", str(adain_dir),
                                                cache_dir=adain_dir / "cache"), method="adain")


def load(golden, name):
  return np.load(golden / f"{name}.npy")


def assert_close(got, want, rtol=RTOL):
  assert got.shape == want.shape
  scale = float(np.max(np.abs(want)))
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


def test_stylizer_matches_style_transfer_at_100_px(golden, teacher):
  """100 px: ceil pooling (relu4_1 13x13) inside a 128-px canvas; test.py decodes 104 px,
  the stylizer returns its top-left 100 x 100."""
  content, style = load(golden, "content_100"), load(golden, "style_100")
  for alpha, tag in ((1.0, "a1"), (0.6, "a06")):
    got = teacher.stylize(content[0], [style[0]], alpha, levels=(4,))
    assert_close(got, load(golden, f"style_transfer_{tag}_100")[0, :100, :100])
  got = teacher.stylize(content[0], list(style), 1.0, levels=(4,), style_weights=[0.7, 0.3])
  assert_close(got, load(golden, "style_transfer_interp_100")[0, :100, :100])
  # test.py normalizes --style_interpolation_weights: 7,3 is 0.7,0.3.
  again = teacher.stylize(content[0], list(style), 1.0, levels=(4,), style_weights=[7, 3])
  assert_close(again, got)


def test_portrait_in_canvas_and_at_own_shape_are_test_py(golden, teacher, monkeypatch):
  """A 100x76 portrait (ceil pooling on both sides) runs transposed inside a canvas, or
  (no buckets) at its own shape: both are test.py's formula on the networks."""
  content, style = load(golden, "content_100")[0, :, :76], load(golden, "style_64")[0]
  level = teacher.levels[4]
  enc, dec = level.encoder.build(), level.decoder.build()

  @jax.jit
  def test_py(c, s):
    c4, s4 = enc.apply(level.encoder_params, c), enc.apply(level.encoder_params, s)
    return dec.apply(level.decoder_params, adain.mix(c4, adain.mean_std(s4), 0.8))

  want = np.asarray(test_py(content[None], style[None]))
  assert want.shape == (1, 104, 80, 3)
  in_canvas = teacher.stylize(content, [style], 0.8, levels=(4,))
  assert_close(in_canvas, want[0, :100, :76])
  monkeypatch.setattr(cascade, "BUCKET_MAX_PIXELS", 0)  # every image at its own shape
  own = cascade.Stylizer(teacher.levels, method="adain").stylize(content, [style], 0.8,
                                                                 levels=(4,))
  assert_close(own, want[0, :100, :76])


def test_tiles_give_the_whole_image(golden, teacher):
  """Exact tiled AdaIN: relu4_1 statistics merged over tiles in float64 (the
  style's last, partial ceil-pooled cells included), tile by tile and in the one-program
  path."""
  content = np.tile(load(golden, "content_100")[0], (2, 2, 1))[:160, :200]
  style = np.tile(load(golden, "style_100")[0], (2, 2, 1))[:164, :158]  # 2 x 2 windows
  whole = teacher.stylize(content, [style], 1.0, levels=(4,))
  for kw in ({"tile": 64}, {"tile": 64, "on_disk": True}):
    runner = tiled.TiledStylizer(teacher, **kw)
    tiles = []
    got = runner.stylize(content, [style], 1.0, (4,),
                         progress=lambda *a: tiles.append(a[-1])).to_array()
    assert tiles[-1] > 1
    assert_close(got, whole)
  with pytest.raises(ValueError, match="multiples of 8"):
    tiled.TiledStylizer(teacher, tile=64).stylize(content[:, :198], [style], 1.0, (4,))


def test_cli_adain_writes_test_py_output(capsys, tmp_path, golden, adain_dir):
  out_file = tmp_path / "out.png"
  code = cli.main(["--method", "adain", "--model", "adain-vgg", "--weights-dir", str(adain_dir),
                   "--content", str(golden / "content_100_0.png"),
                   "--style", str(golden / "style_100_0.png"), "--alpha", "0.6",
                   "--output", str(out_file)])
  out, err = capsys.readouterr()
  assert code == 0, err
  assert "loaded adain-vgg AdaIN" in out and "level 4:" in out
  want = load(golden, "style_transfer_a06_100")[0, :100, :100]
  want = np.floor(np.clip(want, 0, 1) * 255 + 0.5)
  got = np.asarray(Image.open(out_file), np.float64)
  assert got.shape == (100, 100, 3)
  assert np.abs(got - want).max() <= 1


@pytest.mark.parametrize("argv, message", [
    (["--method", "adain", "--levels", "5,4"], "--levels is for --method wct"),
    (["--method", "adain", "--model", "cd16x"], "cd16x: not an AdaIN model"),
    (["--model", "adain-vgg"], "'adain-vgg' is not a WCT model"),
])
def test_bad_method_and_model_pairs_fail_in_one_line(argv, message, capsys, tmp_path, golden,
                                                     adain_dir):
  code = cli.main(argv + ["--weights-dir", str(adain_dir), "--content",
                          str(golden / "content_64_0.png"), "--style",
                          str(golden / "style_64_0.png"), "--output", str(tmp_path / "o.png")])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and message in err[0], err


def test_missing_adain_files_are_named(capsys, tmp_path, golden):
  code = cli.main(["--method", "adain", "--weights-dir", str(tmp_path), "--content",
                   str(golden / "content_64_0.png"), "--style", str(golden / "style_64_0.png"),
                   "--output", str(tmp_path / "o.png")])
  err = capsys.readouterr().err.strip()
  assert code == 2 and "adain/vgg_normalised.pth" in err and "README" in err


def test_evaluate_launcher_reports_adains_losses(capsys, tmp_path, golden, adain_dir, teacher):
  """launch/evaluate.py --method adain: AdaIN's style terms and content loss (against t),
  recomputed here with the training losses on the stylized image it wrote."""
  from test_evaluation import _run_launcher  # pylint: disable=import-outside-toplevel
  from cdft import losses  # pylint: disable=import-outside-toplevel
  contents, styles = tmp_path / "contents", tmp_path / "styles"
  contents.mkdir()
  styles.mkdir()
  for i in (0, 1):
    (contents / f"c{i}.png").symlink_to(golden / f"content_64_{i}.png")
  (styles / "s0.png").symlink_to(golden / "style_64_0.png")
  _run_launcher([f"--content_dir={contents}", f"--style_dir={styles}", "--method=adain",
                 "--models=adain-vgg", "--teacher=adain-vgg", f"--weights_dir={adain_dir}",
                 f"--out_dir={tmp_path / 'out'}", "--content_size=64", "--style_size=64"])
  text = capsys.readouterr().out
  assert "| adain-vgg | 2 |" in text and "S relu4_1" in text
  report = __import__("json").loads((tmp_path / "out" / "results.json").read_text())
  assert report["method"] == "adain" and report["layers"] == [f"relu{i}_1" for i in (1, 2, 3, 4)]
  row = report["pairs"][0]
  level = teacher.levels[4]
  enc = level.encoder.build()
  feats = jax.jit(lambda x: enc.apply(level.encoder_params, x, return_all=True))
  out = np.asarray(Image.open(tmp_path / "out" / row["image"]), np.float32)[None] / 255
  content = load(golden, "content_64")[:1]
  fo, fc, fs = feats(out), feats(content), feats(load(golden, "style_64")[:1])
  _, terms = losses.adain_style(fo, fs)
  np.testing.assert_allclose([row["style_distance"][f"relu{i}_1"] for i in (1, 2, 3, 4)],
                             terms, rtol=2e-3)  # the PNG's 8-bit rounding
  target = adain.adain(fc[3], fs[3])
  assert row["content_loss"] == pytest.approx(float(losses.mse(fo[3], target)), rel=2e-3)


def test_wider_networks_get_smaller_tiles_for_a_budget(teacher):
  """The VGG's 64-filter full-resolution layers take ~3x the 16x students' bytes per pixel:
  the memory estimates scale with that width (tile_plan.bytes_per_window_pixel)."""
  from cdft.stylize import tile_plan  # pylint: disable=import-outside-toplevel
  runner = tiled.TiledStylizer(teacher, max_memory=2 << 30)
  assert runner.net_width == 64
  assert tile_plan.bytes_per_window_pixel(64) == 420 * 64 // 24
  vgg = runner.cores(4, 4000, 4000)
  narrow = tile_plan.cores_for_budget(2 << 30, 4000, 4000, 4)
  assert vgg[0] * vgg[1] < narrow[0] * narrow[1] / 2
  assert tile_plan.whole_image_bytes(2000, 2000, 64) > 2.5 * (
      tile_plan.whole_image_bytes(2000, 2000) - tile_plan.BASE_BYTES)


def test_cli_adain_blends_styles_keeps_colours_and_tiles(capsys, tmp_path, golden, adain_dir):
  """--style-weights, --preserve-color and --stats thumbnail (tiled) with --method adain."""
  common = ["--method", "adain", "--weights-dir", str(adain_dir),
            "--content", str(golden / "content_64_0.png"),
            "--style", str(golden / "style_64_0.png"), str(golden / "style_64_1.png")]
  code = cli.main(common + ["--style-weights", "3,1", "--preserve-color",
                            "--output", str(tmp_path / "kept.png")])
  out, err = capsys.readouterr()
  assert code == 0, err
  kept = np.asarray(Image.open(tmp_path / "kept.png"), np.float64) / 255
  content = load(golden, "content_64")[0]
  ycc = np.array([[-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
  # The content's chroma (BT.601 Cb, Cr) survives, up to 8-bit rounding and clipping.
  assert np.median(np.abs(kept @ ycc.T - content @ ycc.T)) < 0.01
  code = cli.main(common + ["--stats", "thumbnail", "--output", str(tmp_path / "thumb.png")])
  out, err = capsys.readouterr()
  assert code == 0, err
  assert "tiled (thumbnail statistics)" in out
  assert Image.open(tmp_path / "thumb.png").size == (64, 64)
