"""Tests of cdft.weights.zoo: lookup, verification, local override, download.

Downloads only ever go to a throw-away HTTP server on 127.0.0.1.
"""
import functools
import http.server
import os
import pathlib
import shutil
import socket
import threading

import pytest

from cdft import cachedir
from cdft.errors import WeightError
from cdft.kernels import build as kernel_build
from cdft.weights import zoo

_ENV_VARS = ("CDFT_WEIGHTS_DIR", "CDFT_CACHE_DIR", "CDFT_ZOO_URL_BASE",
             "XDG_CACHE_HOME", "http_proxy", "HTTP_PROXY", "https_proxy",
             "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


@pytest.fixture
def clean_env(monkeypatch):
  """No zoo or proxy settings from the environment of the test run."""
  for name in _ENV_VARS:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
  monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

  def log_message(self, *args):  # pylint: disable=arguments-differ
    pass


class _Server:
  """A static file server on 127.0.0.1 (random free port) in a thread."""

  def __init__(self, root):
    self.root = root
    handler = functools.partial(_QuietHandler, directory=str(root))
    self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
    self._thread = threading.Thread(
        target=functools.partial(self._httpd.serve_forever, poll_interval=0.01),
        daemon=True)
    self._thread.start()

  def put(self, zoo_file, data):
    """Serves ``data`` where the URL of ``zoo_file`` points."""
    path = self.root / zoo_file.source
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)

  def stop(self):
    if self._thread.is_alive():
      self._httpd.shutdown()
      self._httpd.server_close()
      self._thread.join()


@pytest.fixture
def server(tmp_path, clean_env, monkeypatch):
  del clean_env  # Only needed for its effect.
  root = tmp_path / "served"
  root.mkdir()
  httpd = _Server(root)
  monkeypatch.setenv("CDFT_ZOO_URL_BASE", httpd.url)
  yield httpd
  httpd.stop()


def _files_under(folder):
  return sorted(p for p in pathlib.Path(folder).rglob("*") if p.is_file())


def _all_files():
  return [(e.name, f) for e in zoo.entries().values() for f in e.files]


def _one_line(excinfo, *phrases):
  message = str(excinfo.value)
  assert "\n" not in message
  for phrase in phrases:
    assert phrase in message, message
  return message


# The zoo table.


def test_entries_and_describe():
  assert list(zoo.entries()) == ["cd16x", "cd16x_base", "ft_paraphraser"]
  described = zoo.describe()
  assert list(described["cd16x"]) == [
      "1SE.pth", "2SE.pth", "3SE.pth", "4SE.pth", "5SE.pth",
      "1SD.pth", "2SD.pth", "3SD.pth", "4SD.pth", "5SD.pth"]
  assert sorted(described["cd16x_base"]) == sorted(
      [f"e{k}_base.pth" for k in range(1, 6)] +
      [f"d{k}_base.pth" for k in range(1, 6)])
  assert described["ft_paraphraser"] == {"Paraphraser.pth": 1038386}
  assert described["cd16x"]["1SE.pth"] == 10271
  assert zoo.entries()["cd16x"].total_bytes == sum(
      described["cd16x"].values())


def test_urls_are_pinned(clean_env):
  del clean_env
  commits = {"cd16x": "4a269dc90020721ef9b279b2926c62f5bcd6d209",
             "cd16x_base": "4a269dc90020721ef9b279b2926c62f5bcd6d209",
             "ft_paraphraser": "19cce265ebe51c751481041e223a13be2e684322"}
  for entry, f in _all_files():
    url = f.url()
    assert url.startswith("https://raw.githubusercontent.com/"), url
    assert f"/{commits[entry]}/" in url
    assert len(f.sha256) == 64 and int(f.sha256, 16) >= 0
    assert f.path.endswith(f.name)
  cd16x = zoo.entries()["cd16x"]
  # kSE.pth / kSD.pth are symlinks in the repository: URLs name the targets.
  assert cd16x.file("1SE.pth").url() == (
      "https://raw.githubusercontent.com/MingSun-Tse/Collaborative-Distillation"
      "/4a269dc90020721ef9b279b2926c62f5bcd6d209/trained_models/"
      "wct_se_16x_new/20191110-133713_E20.pth")
  assert cd16x.file("cd_wct16x/5SD.pth").url().endswith(
      "trained_models/wct_se_16x_new_sd/20191110-204615_E20.pth")
  assert zoo.entries()["ft_paraphraser"].file("Paraphraser.pth").url() == (
      "https://raw.githubusercontent.com/Jangho-Kim/Factor-Transfer-pytorch/"
      "19cce265ebe51c751481041e223a13be2e684322/trained/Paraphraser.pth")
  assert zoo.entries()["cd16x"].file("1SE.pth").url("http://h:1/") == (
      "http://h:1/MingSun-Tse/Collaborative-Distillation/"
      "4a269dc90020721ef9b279b2926c62f5bcd6d209/trained_models/"
      "wct_se_16x_new/20191110-133713_E20.pth")


def test_zoo_agrees_with_sha256sums(weights_dir):
  in_zoo = {f.path: f.sha256 for _, f in _all_files()}
  listed = {}
  for sums in weights_dir.rglob("SHA256SUMS"):
    folder = sums.parent.relative_to(weights_dir)
    for line in sums.read_text().splitlines():
      digest, name = line.split()
      path = (folder / name).as_posix()
      if path.endswith(".pth"):
        listed[path] = digest
  assert listed == in_zoo


def test_unknown_entry_or_file(clean_env):
  del clean_env
  with pytest.raises(WeightError) as excinfo:
    zoo.fetch("cd32x", "1SE.pth")
  _one_line(excinfo, "cd32x", "cd16x")
  with pytest.raises(WeightError) as excinfo:
    zoo.fetch("cd16x", "6SE.pth")
  _one_line(excinfo, "6SE.pth", "cd16x", "5SE.pth")


# Local weights folder.


def test_fetch_every_file_from_weights_dir(weights_dir, clean_env,
                                           monkeypatch, tmp_path):
  del clean_env
  cache = tmp_path / "cache"
  for entry, f in _all_files():
    path = zoo.fetch(entry, f.name, weights_dir=weights_dir, cache_dir=cache)
    assert path == weights_dir / f.path
    assert path.stat().st_size == f.size
  monkeypatch.setenv("CDFT_WEIGHTS_DIR", str(weights_dir))
  for entry, f in _all_files():
    assert zoo.fetch(entry, f.path, cache_dir=cache) == weights_dir / f.path
  assert zoo.fetch_entry("cd16x_base", cache_dir=cache)["e3_base.pth"] == (
      weights_dir / "cd_wct16x/base/e3_base.pth")
  assert not cache.exists()  # Nothing downloaded.


def _local_copy(weights_dir, tmp_path, relative):
  root = tmp_path / "weights"
  (root / relative).parent.mkdir(parents=True)
  shutil.copyfile(weights_dir / relative, root / relative)
  return root, root / relative


def test_corrupted_copy(weights_dir, clean_env, tmp_path):
  del clean_env
  root, path = _local_copy(weights_dir, tmp_path, "cd_wct16x/2SE.pth")
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01  # One flipped bit.
  path.write_bytes(bytes(data))
  with pytest.raises(WeightError) as excinfo:
    zoo.fetch("cd16x", "2SE.pth", weights_dir=root)
  _one_line(excinfo, str(path), "2SE.pth: sha256 ",
            "does not match the zoo entry cd16x/2SE.pth (cb654af6bae7",
            "wrong or corrupt file")
  # Without verification the file is returned as is.
  assert zoo.fetch("cd16x", "2SE.pth", weights_dir=root, verify=False) == path

  path.write_bytes(bytes(data[:1000]))  # Truncated.
  with pytest.raises(WeightError) as excinfo:
    zoo.fetch("cd16x", "2SE.pth", weights_dir=root)
  _one_line(excinfo, str(path), "1000 bytes", "52833 bytes")


def test_missing_file_in_override(clean_env, monkeypatch, tmp_path):
  del clean_env
  root = tmp_path / "weights"
  root.mkdir()
  cache = tmp_path / "cache"
  monkeypatch.setenv("CDFT_ZOO_URL_BASE", "http://127.0.0.1:9")  # Unused.
  monkeypatch.setenv("CDFT_WEIGHTS_DIR", str(root))
  with pytest.raises(WeightError) as excinfo:
    zoo.fetch("cd16x", "3SD.pth", cache_dir=cache)
  _one_line(excinfo, str(root / "cd_wct16x" / "3SD.pth"), "CDFT_WEIGHTS_DIR",
            "nothing is downloaded")
  monkeypatch.delenv("CDFT_WEIGHTS_DIR")
  with pytest.raises(WeightError) as excinfo:
    zoo.fetch("ft_paraphraser", "Paraphraser.pth", weights_dir=root,
              cache_dir=cache)
  _one_line(excinfo, str(root / "ft" / "Paraphraser.pth"), "weights_dir")
  assert not cache.exists()


def test_verification_is_remembered(weights_dir, clean_env, monkeypatch,
                                    tmp_path):
  del clean_env
  root, path = _local_copy(weights_dir, tmp_path, "cd_wct16x/1SD.pth")
  hashed = []
  original = zoo._file_sha256  # pylint: disable=protected-access

  def counting_sha256(p):
    hashed.append(p)
    return original(p)

  monkeypatch.setattr(zoo, "_file_sha256", counting_sha256)
  for _ in range(3):
    assert zoo.fetch("cd16x", "1SD.pth", weights_dir=root) == path
  assert len(hashed) == 1
  # A changed file (same size) is hashed again and caught.
  data = bytearray(path.read_bytes())
  data[-1] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(WeightError, match="1SD.pth: sha256"):
    zoo.fetch("cd16x", "1SD.pth", weights_dir=root)
  assert len(hashed) == 2


# Download cache.


def test_download_then_cache(weights_dir, server, tmp_path, capsys,
                             monkeypatch):
  zoo_file = zoo.entries()["cd16x"].file("1SD.pth")
  data = (weights_dir / zoo_file.path).read_bytes()
  server.put(zoo_file, data)
  cache = tmp_path / "cache"

  path = zoo.fetch("cd16x", "1SD.pth", cache_dir=cache)
  assert path == cache / "cd_wct16x" / "1SD.pth"
  assert path.read_bytes() == data
  assert _files_under(cache) == [path]  # No temporary file left.
  assert server.url in capsys.readouterr().err

  server.stop()  # Served from the cache from now on (and not rehashed).
  monkeypatch.setattr(zoo, "_file_sha256", None)
  assert zoo.fetch("cd16x", "1SD.pth", cache_dir=cache, progress=False) == path
  monkeypatch.setenv("CDFT_CACHE_DIR", str(cache))
  assert zoo.fetch("cd16x", "1SD.pth") == path
  assert capsys.readouterr().err == ""
  assert zoo.converted_cache_dir() == cache / "converted"


def test_corrupt_cached_file(weights_dir, server, tmp_path):
  zoo_file = zoo.entries()["cd16x_base"].file("d1_base.pth")
  data = (weights_dir / zoo_file.path).read_bytes()
  server.put(zoo_file, data)
  cache = tmp_path / "cache"
  path = zoo.fetch("cd16x_base", "d1_base.pth", cache_dir=cache,
                   progress=False)
  path.write_bytes(data[::-1])
  with pytest.raises(WeightError) as excinfo:
    zoo.fetch("cd16x_base", "d1_base.pth", cache_dir=cache)
  _one_line(excinfo, str(path), "cd16x_base/d1_base.pth", "delete it")


@pytest.mark.parametrize("how", ["same size", "too short", "too long"])
def test_download_wrong_content(weights_dir, server, tmp_path, how):
  zoo_file = zoo.entries()["cd16x"].file("1SD.pth")
  data = (weights_dir / zoo_file.path).read_bytes()
  wrong = {"same size": data[::-1], "too short": data[:-10],
           "too long": data + b"\0" * 5000}[how]
  server.put(zoo_file, wrong)
  cache = tmp_path / "cache"
  with pytest.raises(WeightError) as excinfo:
    zoo.fetch("cd16x", "1SD.pth", cache_dir=cache, progress=False)
  message = _one_line(excinfo, "cd16x/1SD.pth", "not saved")
  if how == "same size":
    assert "sha256" in message and zoo_file.sha256 in message
  else:
    assert "3220 bytes" in message
  assert not _files_under(cache)


def test_download_http_error(server, tmp_path):
  cache = tmp_path / "cache"
  with pytest.raises(WeightError) as excinfo:  # Nothing served: 404.
    zoo.fetch("ft_paraphraser", "Paraphraser.pth", cache_dir=cache,
              progress=False)
  _one_line(excinfo, "ft_paraphraser/Paraphraser.pth", "HTTP 404",
            "CDFT_WEIGHTS_DIR")
  assert not _files_under(cache)


def test_download_connection_refused(clean_env, monkeypatch, tmp_path):
  del clean_env
  with socket.socket() as s:  # A port nobody listens on.
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  monkeypatch.setenv("CDFT_ZOO_URL_BASE", f"http://127.0.0.1:{port}")
  cache = tmp_path / "cache"
  with pytest.raises(WeightError) as excinfo:
    zoo.fetch("cd16x", "1SE.pth", cache_dir=cache, progress=False)
  _one_line(excinfo, "download from http://127.0.0.1", "failed",
            "CDFT_WEIGHTS_DIR")
  assert not _files_under(cache)


def test_cache_dir_resolution(clean_env, monkeypatch, tmp_path):
  del clean_env
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert cachedir.resolve() == tmp_path / "home" / ".cache" / "cdft"
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert cachedir.resolve() == tmp_path / "xdg" / "cdft"
  monkeypatch.setenv("CDFT_CACHE_DIR", str(tmp_path / "env"))
  assert cachedir.resolve() == tmp_path / "env"
  assert cachedir.resolve(tmp_path / "arg") == tmp_path / "arg"
  assert zoo.converted_cache_dir(tmp_path / "arg") == (
      tmp_path / "arg" / "converted")
  assert zoo.converted_cache_dir() == tmp_path / "env" / "converted"
  assert not os.path.exists(tmp_path / "env")  # Not created.
  monkeypatch.setenv("CDFT_CACHE_DIR", "~/cdft-cache")  # as a shell would leave it quoted
  assert cachedir.resolve() == tmp_path / "home" / "cdft-cache"
  # The built kernels live in the same cache (one resolver, cdft.cachedir).
  assert kernel_build.cache_dir() == tmp_path / "home" / "cdft-cache" / "kernels"
