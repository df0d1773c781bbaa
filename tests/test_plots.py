"""Tests of cdft.training.plots and launch/plot_metrics.py: loss curves as a PNG, the summary."""
import importlib.util
import json
import math
import pathlib
import re
import sys

import numpy as np
import pytest
from PIL import Image

from cdft.errors import CdftError
from cdft.training import plots

REPO = pathlib.Path(__file__).resolve().parents[1]


def _write(workdir, rows, tail=""):
  workdir.mkdir(parents=True, exist_ok=True)
  text = "".join(json.dumps(r) + "\n" for r in rows) + tail
  (workdir / "metrics.jsonl").write_text(text)
  return workdir


def _train_row(step, scale):
  return {"step": step, "loss": scale * (2.0 + math.cos(step)) / step, "pixel": scale / step,
          "perceptual": 1.0 + scale * step, "grad_norm": 0.5, "learning_rate": 1e-4,
          "data_skipped": 0.0, "steps_per_sec": 3.0, "images_per_sec": 24.0}


@pytest.fixture
def runs_dir(tmp_path):
  """Two runs as MetricWriter writes them: train lines, eval lines, a resumed step."""
  a = [_train_row(s, 1.0) for s in (10, 20, 30, 40)]
  a.insert(2, {"step": 20, "eval/loss": 0.7})  # an eval line after its train line
  a.append({"step": 40, "eval/loss": 0.4})
  b = [_train_row(s, 2.0) for s in (10, 20, 30)]
  b.append(dict(_train_row(20, 2.0), loss=9.0))  # a restart re-logs step 20: the last wins
  b.append({"step": 50, "loss": float("nan")})  # non-finite values are left out
  _write(tmp_path / "run_a", a)
  _write(tmp_path / "run_b", b, tail='{"step": 60, "lo')  # a line being written
  return tmp_path


def test_read_and_summarize(runs_dir):
  runs = plots.read_runs([runs_dir / "run_a", runs_dir / "run_b" / "metrics.jsonl"])
  assert [r.name for r in runs] == ["run_a", "run_b"]
  assert [row["step"] for row in runs[0].rows] == [10, 20, 30, 40]
  assert runs[0].rows[1]["eval/loss"] == 0.7 and "loss" in runs[0].rows[1]  # merged
  assert [row["step"] for row in runs[1].rows] == [10, 20, 30, 50]
  assert plots.metric_keys(runs) == ["loss", "pixel", "perceptual", "grad_norm",
                                     "learning_rate", "eval/loss"]
  keys = plots.metric_keys(runs, ["loss", " eval/loss", "loss", ""])
  assert keys == ["loss", "eval/loss"]
  table = plots.summary(runs, ["loss", "pixel", "eval/loss"])
  losses_a = [(2.0 + math.cos(s)) / s for s in (10, 20, 30, 40)]
  a = table["loss"]["run_a"]
  assert a["first"] == pytest.approx(losses_a[0]) and a["last"] == pytest.approx(losses_a[-1])
  assert a["min"] == pytest.approx(min(losses_a))
  assert a["min_step"] == (10, 20, 30, 40)[int(np.argmin(losses_a))] and a["points"] == 4
  b = table["loss"]["run_b"]
  assert b["points"] == 3 and b["last_step"] == 30  # step 50 is NaN
  assert b["min"] == pytest.approx(2.0 * (2.0 + math.cos(30)) / 30)
  assert max(b["first"], b["last"], b["min"]) < 9.0 + 1e-9
  steps, values = plots.series(runs[1], "loss")
  np.testing.assert_array_equal(steps, [10, 20, 30])
  assert values[1] == 9.0  # the re-logged step 20
  assert table["pixel"]["run_b"] == {"first": 0.2, "last": 2.0 / 30, "min": 2.0 / 30,
                                     "min_step": 30, "first_step": 10, "last_step": 30,
                                     "points": 3}
  assert table["eval/loss"]["run_a"]["min"] == 0.4 and table["eval/loss"]["run_b"] is None
  text = plots.format_summary(table)
  lines = text.splitlines()
  assert lines[0] == "loss" and lines[1].split() == ["run", "first", "last", "min", "(step)",
                                                     "points"]
  assert lines[-1].split() == ["run_b", "-", "-", "-", "0"]
  assert "run_a  " in text and f"{0.4:.6g} (40)" in text


def _colour_pixels(image, hex_colour, tolerance=40):
  rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
  distance = np.abs(np.asarray(image, np.int32) - rgb).sum(-1)
  return int((distance < tolerance).sum())


def _check_png(path, num_keys, num_runs):
  with Image.open(path) as im:
    assert im.format == "PNG"
    assert im.size == plots.figure_size(num_keys)
    pixels = np.asarray(im.convert("RGB"))
  assert (pixels < 128).all(-1).sum() > 500  # text, axes, ticks
  for j in range(num_runs):  # every run's line is drawn in its colour
    assert _colour_pixels(pixels, plots.COLORS[j]) > 200 * num_keys
  return pixels


@pytest.mark.parametrize("log_y", [False, True])
def test_every_panel_is_drawn(runs_dir, tmp_path, log_y):
  runs = plots.read_runs([runs_dir / "run_a", runs_dir / "run_b"])
  keys = ["loss", "pixel", "perceptual", "eval/loss"]
  out = tmp_path / "plots" / "curves.png"
  assert plots.plot(runs, keys, out, log_y=log_y) == keys
  assert plots.figure_size(4) == (3 * 480, 2 * 360 + 32)
  pixels = _check_png(out, len(keys), 2)
  # The unused sixth panel (row 2, column 3) stays white; the fourth is drawn.
  np.testing.assert_array_equal(pixels[32 + 380:-20, 2 * 480 + 20:-20], 255)
  assert (pixels[32 + 360:, :480] < 128).all(-1).sum() > 100
  assert not list(out.parent.glob(".*.part"))


def test_matplotlib_is_named_when_missing(runs_dir, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
  runs = plots.read_runs([runs_dir / "run_a"])
  with pytest.raises(CdftError, match=r"plots need matplotlib: pip install 'cdft\[plots\]'"):
    plots.plot(runs, ["loss"], tmp_path / "m.png")
  assert not (tmp_path / "m.png").exists()


def test_log_y_keeps_non_positive_panels_linear(tmp_path):
  run = _write(tmp_path / "signed", [{"step": s, "loss": 1.0 / s, "delta": s - 2.0}
                                     for s in (1, 2, 3, 4)])
  runs = plots.read_runs([run])
  labels = plots.plot(runs, ["loss", "delta"], tmp_path / "log.png", log_y=True, title="signed")
  assert labels == ["loss", "delta (linear: values <= 0)"]
  with Image.open(tmp_path / "log.png") as im:
    assert im.size == plots.figure_size(2)


def test_read_errors(tmp_path):
  with pytest.raises(CdftError, match=r"^\S+nope/metrics.jsonl: no such file"):
    plots.read_runs([tmp_path / "nope"])
  empty = _write(tmp_path / "empty", [], tail="\n\n")
  with pytest.raises(CdftError, match=r"^\S+empty/metrics.jsonl: no metrics logged$"):
    plots.read_runs([empty])
  bad = _write(tmp_path / "bad", [{"step": 1, "loss": 1.0}], tail="oops\n")
  with pytest.raises(CdftError, match=r"^\S+bad/metrics.jsonl:2: not a JSON line"):
    plots.read_runs([bad])
  stepless = _write(tmp_path / "stepless", [{"loss": 1.0}])
  with pytest.raises(CdftError, match=r"stepless/metrics.jsonl:1: a metrics line needs a "
                     r"numeric 'step'"):
    plots.read_runs([stepless])
  ok = _write(tmp_path / "ok", [{"step": 1, "loss": 1.0, "steps_per_sec": 2.0}])
  with pytest.raises(CdftError, match=r"^a run is given twice"):
    plots.read_runs([ok, ok / "metrics.jsonl"])
  runs = plots.read_runs([ok])
  with pytest.raises(CdftError, match=r"^unknown metric 'pixel': the runs logged loss, "
                     r"steps_per_sec$"):
    plots.metric_keys(runs, ["loss", "pixel"])
  only_timing = _write(tmp_path / "timing", [{"step": 1, "steps_per_sec": 2.0}])
  with pytest.raises(CdftError, match=r"no metrics besides the step"):
    plots.metric_keys(plots.read_runs([only_timing]))


def test_same_folder_names_get_longer_labels(tmp_path):
  a = _write(tmp_path / "seed0" / "run", [{"step": 1, "loss": 1.0}])
  b = _write(tmp_path / "seed1" / "run", [{"step": 1, "loss": 2.0}])
  assert [r.name for r in plots.read_runs([a, b])] == ["seed0/run", "seed1/run"]


@pytest.fixture(scope="module")
def launcher():
  spec = importlib.util.spec_from_file_location("launch_plot_metrics",
                                                REPO / "launch" / "plot_metrics.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_launcher(launcher, runs_dir, tmp_path, capsys):
  out = tmp_path / "curve.png"
  code = launcher.main([str(runs_dir / "run_a"), str(runs_dir / "run_b"), "--out", str(out),
                        "--keys", "loss,pixel,perceptual", "--log-y"])
  assert code == 0
  text = capsys.readouterr().out
  assert text.splitlines()[0] == "loss" and "perceptual" in text.splitlines()
  assert text.rstrip().endswith(f"wrote {out} (3 panels)")
  _check_png(out, 3, 2)


@pytest.mark.parametrize("args,message", [
    (["missing"], r"missing/metrics.jsonl: no such file"),
    (["empty"], r"empty/metrics.jsonl: no metrics logged"),
    (["ok", "--keys", "loss,bogus"], r"unknown metric 'bogus': the runs logged loss"),
])
def test_launcher_errors(launcher, tmp_path, capsys, args, message):
  _write(tmp_path / "empty", [])
  _write(tmp_path / "ok", [{"step": 1, "loss": 1.0}])
  argv = [str(tmp_path / args[0])] + args[1:] + ["--out", str(tmp_path / "x.png")]
  assert launcher.main(argv) == 2
  captured = capsys.readouterr()
  err = captured.err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("plot_metrics: error: ")
  assert re.search(message, err[0]), err[0]
  assert captured.out == "" and not (tmp_path / "x.png").exists()
