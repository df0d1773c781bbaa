"""End-to-end tests of ``cdft-stylize`` with the released weights on real images."""
import shutil

import numpy as np
import pytest
from PIL import Image

from cdft.stylize import cli

CONTENT = "content/adain_avril.jpg"
STYLE = "style/adain_la_muse.jpg"
STYLE2 = "style/adain_mondrian.jpg"


@pytest.fixture(autouse=True)
def _no_user_cache(monkeypatch, tmp_path):
  monkeypatch.setenv("CDFT_NO_COMPILE_CACHE", "1")
  monkeypatch.setenv("CDFT_CACHE_DIR", str(tmp_path / "cache"))


def _run(capsys, *argv):
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def test_one_pair_full_cascade(capsys, tmp_path, images_dir, weights_dir):
  out_file = tmp_path / "out.png"
  code, out, err = _run(capsys, "--content", images_dir / CONTENT, "--style", images_dir / STYLE,
                        "--output", out_file, "--content-size", 64, "--style-size", 64,
                        "--weights-dir", weights_dir)
  assert code == 0, err
  for k in (5, 4, 3, 2, 1):
    assert f"level {k}:" in out
  assert "wrote" in out and "[1/1]" in out
  img = np.asarray(Image.open(out_file))
  # 819x512 resized to a 64 px shorter side is 102x64; level 5 keeps multiples of 16.
  assert img.shape == (64, 96, 3)
  assert img.std() > 10  # an image, not a flat field


def test_folders_make_every_pair(capsys, tmp_path, images_dir, weights_dir):
  contents, styles = tmp_path / "c", tmp_path / "s"
  contents.mkdir()
  styles.mkdir()
  photo = Image.open(images_dir / CONTENT)
  photo.convert("L").save(contents / "gray.png")  # grayscale input
  rgba = photo.convert("RGBA")
  rgba.putalpha(128)
  rgba.save(contents / "alpha.png")  # RGBA input
  shutil.copy(images_dir / STYLE, styles / "muse.jpg")
  code, out, err = _run(capsys, "--content", contents, "--style", styles, "--output",
                        tmp_path / "results", "--content-size", 64, "--style-size", 64,
                        "--levels", "2,1", "--weights-dir", weights_dir)
  assert code == 0, err
  written = sorted(p.name for p in (tmp_path / "results").iterdir())
  assert written == ["alpha_stylized_muse.jpg", "gray_stylized_muse.jpg"]
  assert "[2/2]" in out and "level 5" not in out


def test_style_blend_and_preserve_color(capsys, tmp_path, images_dir, weights_dir):
  out_file = tmp_path / "blend.png"
  code, _, err = _run(capsys, "--content", images_dir / CONTENT, "--style", images_dir / STYLE,
                      images_dir / STYLE2, "--style-weights", "0.7,0.3", "--preserve-color",
                      "--output", out_file, "--content-size", 64, "--style-size", 64,
                      "--levels", "2,1", "--weights-dir", weights_dir)
  assert code == 0, err
  result = np.asarray(Image.open(out_file), np.float32) / 255
  from cdft.io import images
  content = images.load_image(images_dir / CONTENT, 64)[:result.shape[0], :result.shape[1]]
  # Preserved colour: the chroma (Cb, Cr) of the result is the content's.
  to_cbcr = np.array([[-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
  inside = (result > 0.02).all(-1) & (result < 0.98).all(-1)  # unclipped pixels
  diff = np.abs(result @ to_cbcr.T - content @ to_cbcr.T)[inside]
  assert np.median(diff) < 0.01


def _tiny(path):
  Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(path)
  return path


def _corrupt(path):
  path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
  return path


@pytest.mark.parametrize("case,expect", [
    ("missing", "no such file"),
    ("corrupt", "corrupt.jpg"),
    ("tiny", "too small"),
    ("weights_count", "--style-weights"),
    ("bad_weights", "1SE.pth"),
])
def test_bad_input_is_one_line_and_nonzero(case, expect, capsys, tmp_path, images_dir,
                                           weights_dir):
  content, style = images_dir / CONTENT, images_dir / STYLE
  extra = ["--content-size", 32]
  wdir = weights_dir
  if case == "missing":
    content = tmp_path / "nope.jpg"
  elif case == "corrupt":
    content = _corrupt(tmp_path / "corrupt.jpg")
  elif case == "tiny":
    content = _tiny(tmp_path / "tiny.png")
    extra = []  # at its own size: 10x12 px
  elif case == "weights_count":
    extra += ["--style-weights", "0.5,0.5"]
  elif case == "bad_weights":
    wdir = tmp_path / "weights"
    (wdir / "cd_wct16x").mkdir(parents=True)
    data = (weights_dir / "cd_wct16x/1SE.pth").read_bytes()
    (wdir / "cd_wct16x/1SE.pth").write_bytes(data[:-100])
    shutil.copy(weights_dir / "cd_wct16x/1SD.pth", wdir / "cd_wct16x/1SD.pth")
  code, _, err = _run(capsys, "--content", content, "--style", style, "--output",
                      tmp_path / "o.jpg", "--levels", "1", "--weights-dir", wdir, *extra)
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("cdft-stylize: error:"), err
  assert expect in lines[0]
  assert not (tmp_path / "o.jpg").exists()


def test_bad_flag_values_are_rejected(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--content", "a.jpg", "--style", "b.jpg", "--output", "o.jpg", "--alpha", "2"])
  assert e.value.code == 2
  assert "--alpha must be in [0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("flags, expect, progress", [
    # --tile: square 64-px tiles, 3 x 4 of them on the 240 x 150 image.
    (("--tile", 64), "tile 64 px (level 2: 3x4, level 1: 3x4 tiles)", "tile 12/12"),
    # 710M leaves (710M - BASE_BYTES) / BYTES_PER_WINDOW_PIXEL ~ 25k window px:
    # the image (36k px) does not fit one window, but two side by side.
    (("--max-memory", "710M"), "tiles for a 0.7 GiB budget (level 2: 1x2, level 1: 1x2 tiles)",
     "tile 2/2"),
])
def test_tiling_gives_the_whole_image_result(capsys, tmp_path, images_dir, weights_dir, flags,
                                             expect, progress):
  common = ["--content", images_dir / CONTENT, "--style", images_dir / STYLE,
            "--content-size", 150, "--style-size", 64, "--levels", "2,1",
            "--weights-dir", weights_dir]
  code, _, err = _run(capsys, *common, "--output", tmp_path / "whole.png")
  assert code == 0, err
  code, out, err = _run(capsys, *common, "--output", tmp_path / "tiled.png", *flags)
  assert code == 0, err
  assert f"tiled (exact statistics), {expect}" in out and progress in out
  whole = np.asarray(Image.open(tmp_path / "whole.png"), np.int16)
  tiles = np.asarray(Image.open(tmp_path / "tiled.png"), np.int16)
  assert whole.shape == tiles.shape
  assert np.abs(whole - tiles).max() <= 1  # the same picture, up to 8-bit rounding


def test_memory_budget_too_small_for_any_tile(capsys, tmp_path, images_dir, weights_dir):
  code, _, err = _run(capsys, "--content", images_dir / CONTENT, "--style", images_dir / STYLE,
                      "--content-size", 64, "--levels", "1", "--max-memory", "200M",
                      "--weights-dir", weights_dir, "--output", tmp_path / "o.png")
  assert code == 2
  assert "too small for tiling" in err.strip().splitlines()[-1]


# A cdft-stylize process whose JAX compile events are counted, printed as JSON
# with whether it imported Flax (a run on a warm cache builds no module).
_COUNTED_CLI = """
import json, sys
from jax import monitoring
events = {}
monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: events.__setitem__(name, events.get(name, 0) + 1))
from cdft.stylize import cli
code = cli.main(sys.argv[1:])
print(json.dumps({"code": code, "compiles": events.get("/jax/core/compile/backend_compile_duration", 0),
                  "flax": "flax" in sys.modules}))
"""


def test_warmup_fills_the_cache_for_later_photos(tmp_path, images_dir, weights_dir, monkeypatch):
  import json  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  monkeypatch.delenv("CDFT_NO_COMPILE_CACHE")
  sizes = ["--content-size", "64", "--style-size", "64", "--levels", "2,1",
           "--weights-dir", str(weights_dir)]

  def counted(*argv):
    proc = subprocess.run([sys.executable, "-c", _COUNTED_CLI, *argv, *sizes],
                          capture_output=True, text=True, check=True)
    return proc.stdout.splitlines()[:-1], json.loads(proc.stdout.splitlines()[-1])

  lines, warm = counted("--warmup")
  assert warm["code"] == 0 and warm["compiles"] > 0 and warm["flax"]
  assert lines[0].startswith("compiling ") and lines[-1].startswith("cache ready in ")
  # A landscape and a portrait photo and a style of other shapes: nothing left to compile.
  for content in ("content/adain_avril.jpg", "content/adain_blonde_girl.jpg"):
    _, run = counted("--content", str(images_dir / content), "--style",
                     str(images_dir / "style/adain_mondrian.jpg"),
                     "--output", str(tmp_path / "out.png"))
    assert run == {"code": 0, "compiles": 0, "flax": False}, content
  monkeypatch.setenv("CDFT_NO_COMPILE_CACHE", "1")
  with pytest.raises(SystemExit):
    cli.main(["--content", "x.jpg"])  # --style and --output missing, and no --warmup


def test_command_exits_promptly_with_every_output_written(tmp_path, images_dir, weights_dir):
  # The installed command (cli.entry) leaves through os._exit on success: the
  # output file and every progress line must be complete; a failure still
  # exits normally with its message and code.
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  out_file = tmp_path / "out.png"
  argv = [sys.executable, "-m", "cdft.stylize.cli", "--style", str(images_dir / STYLE),
          "--content-size", "64", "--style-size", "64", "--levels", "2,1",
          "--weights-dir", str(weights_dir)]
  proc = subprocess.run(argv + ["--content", str(images_dir / CONTENT), "--output", str(out_file)],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[-1].startswith(f"    wrote {out_file} (102x64)"), proc.stdout
  assert np.asarray(Image.open(out_file)).shape == (64, 102, 3)
  proc = subprocess.run(argv + ["--content", str(tmp_path / "missing.jpg"), "--output",
                                str(tmp_path / "o2.png")], capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("cdft-stylize: error:") and "missing.jpg" in proc.stderr
