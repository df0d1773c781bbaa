"""The model zoo: released PyTorch weights, where to get them, their hashes.

Each zoo entry names a set of files. A file has a path in the local layout
(``cd_wct16x/1SE.pth``; the same layout as a copy of the released weights, see
``../shared/weights/README.md``), a download URL pinned at a commit of the
official repository, its sha256 and its size in bytes.

``fetch(entry, filename)`` returns the local path of a file, looking in order:

1. ``weights_dir`` (argument), else the folder in ``$CDFT_WEIGHTS_DIR``: a local
   copy of the weights for machines without internet access. The file must be
   there (with the zoo layout); nothing is downloaded.
2. The cache folder (``cache_dir`` argument, else ``$CDFT_CACHE_DIR``, else
   ``$XDG_CACHE_HOME/cdft``, else ``~/.cache/cdft``), downloading the file into
   it on first use.

Files are checked against their size and sha256 (hashes are remembered per
(path, size, mtime, ctime, inode) within a process, so repeated fetches do not
re-read the file). Downloads are always checked, go to a temporary file in the
cache folder, and are only renamed into place once they match: a failed or
interrupted download leaves nothing behind. ``$CDFT_ZOO_URL_BASE`` replaces the
``https://raw.githubusercontent.com`` prefix of the URLs (a mirror, or a local
test server).

Converted Flax weights live in ``converted_cache_dir()`` (written elsewhere).
"""

import dataclasses
import hashlib
import http.client
import os
import pathlib
import sys
import threading
import urllib.error
import urllib.request

from cdft import cachedir
from cdft.errors import WeightError
from cdft.io import files

URL_BASE = "https://raw.githubusercontent.com"
URL_BASE_ENV = "CDFT_ZOO_URL_BASE"
WEIGHTS_DIR_ENV = "CDFT_WEIGHTS_DIR"

# Seconds without progress before a download gives up.
DOWNLOAD_TIMEOUT_S = 60
_CHUNK_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class ZooFile:
  """One file of a zoo entry.

  Attributes:
    name: file name, what ``fetch`` is asked for (e.g. ``"1SE.pth"``).
    path: path relative to a weights folder / the cache (e.g.
      ``"cd_wct16x/1SE.pth"``).
    source: the URL without its prefix: ``<owner>/<repo>/<commit>/<path in the
      repository>`` (symlinks in the repository already resolved).
    sha256: hex digest of the file.
    size: size in bytes.
  """
  name: str
  path: str
  source: str
  sha256: str
  size: int

  def url(self, base=None):
    """The download URL under ``base`` (default: $CDFT_ZOO_URL_BASE, GitHub)."""
    if base is None:
      base = os.environ.get(URL_BASE_ENV) or URL_BASE
    return f"{base.rstrip('/')}/{self.source}"


@dataclasses.dataclass(frozen=True)
class ZooEntry:
  """A named set of files from one repository at one commit."""
  name: str
  description: str
  repository: str
  commit: str
  license: str
  files: tuple[ZooFile, ...]

  @property
  def total_bytes(self):
    return sum(f.size for f in self.files)

  def file(self, filename):
    """The ``ZooFile`` called ``filename`` (a name or a layout path)."""
    for f in self.files:
      if filename in (f.name, f.path):
        return f
    names = ", ".join(f.name for f in self.files)
    raise WeightError(f"{filename}: no such file in the zoo entry {self.name} "
                      f"(files: {names})")


_CD_REPO = "MingSun-Tse/Collaborative-Distillation"
_CD_COMMIT = "4a269dc90020721ef9b279b2926c62f5bcd6d209"
_FT_REPO = "Jangho-Kim/Factor-Transfer-pytorch"
_FT_COMMIT = "19cce265ebe51c751481041e223a13be2e684322"


# Files as (local path, path in the source repository at its commit, bytes,
# sha256). In the CD repository kSE.pth / kSD.pth are git symlinks to the dated
# checkpoints named here.
_CD16X_FILES = (
    ("cd_wct16x/1SE.pth",
     "trained_models/wct_se_16x_new/20191110-133713_E20.pth", 10271,
     "f74755a65164a88e0db8cbb7d99d7078b9fa505df0953fac5123bfc7c84e0ea4"),
    ("cd_wct16x/2SE.pth",
     "trained_models/wct_se_16x_new/20191110-132713_E20.pth", 52833,
     "cb654af6bae77176f8c7721c965483e865b987f2f1612dda1ba0d0b5c3819a61"),
    ("cd_wct16x/3SE.pth",
     "trained_models/wct_se_16x_new/20191110-132705_E20.pth", 231124,
     "269cdd0e2634e3e1e5d3005b9e7eca0f4cc8077653fee1ac8c0cf1cbe9ab8758"),
    ("cd_wct16x/4SE.pth",
     "trained_models/wct_se_16x_new/20191110-132643_E20.pth", 1235183,
     "d2f059cbcd6669556a43aadef58d20c8b280462c18b60a9e7424a14dd271cd6b"),
    ("cd_wct16x/5SE.pth",
     "trained_models/wct_se_16x_new/20191109-211322_E20.pth", 3862288,
     "9417c34d0d8d621bc6af78be745f1b8d30f5f210efa01e50655c60eb3770816b"),
    ("cd_wct16x/1SD.pth",
     "trained_models/wct_se_16x_new_sd/20191111-091942_E20.pth", 3220,
     "05f26ad40044c019da0cf731372d5bd2ee4b477825c7f45508da70b1cd5a95fd"),
    ("cd_wct16x/2SD.pth",
     "trained_models/wct_se_16x_new_sd/20191111-091932_E20.pth", 30672,
     "94dd26f0e69857f79bf284a43a3708aa05c09c2593427c7f6e400ad12ce314e6"),
    ("cd_wct16x/3SD.pth",
     "trained_models/wct_se_16x_new_sd/20191111-091929_E20.pth", 142014,
     "005faba27859435762a8a9386116c00629cd8835a01617d0a71defa577c42174"),
    ("cd_wct16x/4SD.pth",
     "trained_models/wct_se_16x_new_sd/20191111-092553_E20.pth", 881308,
     "902f65e2c6033d803d02df552eb898e5985190a7ae67d155e384826eec6f04cb"),
    ("cd_wct16x/5SD.pth",
     "trained_models/wct_se_16x_new_sd/20191110-204615_E20.pth", 3243622,
     "17fd0f81622f01366eb21cb4d40140ee38cf988ed6eaf266629709c397a8b485"),
)
_CD16X_BASE_FILES = (
    ("cd_wct16x/base/e1_base.pth",
     "trained_models/small16x_ae_base/e1_base.pth", 10182,
     "ecb170c31287ef8682d0f8f8fec0c3aebed399ea36a777141e9f825f37e6692d"),
    ("cd_wct16x/base/e2_base.pth",
     "trained_models/small16x_ae_base/e2_base.pth", 52658,
     "117e87cf504fa9fa8fcbad9d34a371183c58905f0a5403824a2325f6d933e66e"),
    ("cd_wct16x/base/e3_base.pth",
     "trained_models/small16x_ae_base/e3_base.pth", 230883,
     "0edf82c0696085d0da9471e62e4becc733d8653ed0be03b0c06352fe43e0a87c"),
    ("cd_wct16x/base/e4_base.pth",
     "trained_models/small16x_ae_base/e4_base.pth", 1234778,
     "1970ae6ed908afa18a8b6c734f01b0e7b27326211f67efdd365b3890ad6c1228"),
    ("cd_wct16x/base/e5_base.pth",
     "trained_models/small16x_ae_base/e5_base.pth", 3861727,
     "a56a7df403821970c13b98e6bc16fce1ace5ee2256a648a15923b7a449b7f2ec"),
    ("cd_wct16x/base/d1_base.pth",
     "trained_models/small16x_ae_base/d1_base.pth", 3175,
     "49f5d5276b9ccd09aa247fe4ef57a00bf245f799ba40be95eb12745a30c99e68"),
    ("cd_wct16x/base/d2_base.pth",
     "trained_models/small16x_ae_base/d2_base.pth", 30557,
     "2914f770a54bd93703f58c9bf6d6090d5d82ca7d89b6dd7a72f561f58f33c7a7"),
    ("cd_wct16x/base/d3_base.pth",
     "trained_models/small16x_ae_base/d3_base.pth", 141855,
     "8d8d4d393de2c252f9520e09eccf3b6f0dae5dfe17b99200403cc41a6644fde9"),
    ("cd_wct16x/base/d4_base.pth",
     "trained_models/small16x_ae_base/d4_base.pth", 881061,
     "b3f2581800cfab60d9bb96951fb445deba5abb63dd1e78e1dbbcd3f745ba661e"),
    ("cd_wct16x/base/d5_base.pth",
     "trained_models/small16x_ae_base/d5_base.pth", 3243313,
     "4da54a833758d25485ba20770524b34782aada89ddde2f07d4fffc92109e69a6"),
)
_FT_PARAPHRASER_FILES = (
    ("ft/Paraphraser.pth",
     "trained/Paraphraser.pth", 1038386,
     "806f9612e98bf9c89ee7a87c351fdf299500d5b54752f24874b2a60b35d37bb4"),
)


def _files(repository, commit, rows):
  return tuple(
      ZooFile(name=path.rsplit("/", 1)[-1], path=path,
              source=f"{repository}/{commit}/{source}", sha256=sha256,
              size=size)
      for path, source, size, sha256 in rows)


_ENTRIES = (
    ZooEntry(
        name="cd16x",
        description=("Collaborative Distillation 16x-compressed small "
                     "encoders (kSE) and decoders (kSD) for the 5 WCT levels"),
        repository=_CD_REPO, commit=_CD_COMMIT, license="MIT",
        files=_files(_CD_REPO, _CD_COMMIT, _CD16X_FILES)),
    ZooEntry(
        name="cd16x_base",
        description=("filter-pruned small encoders (ek_base) and decoders "
                     "(dk_base) used to initialise Collaborative Distillation"),
        repository=_CD_REPO, commit=_CD_COMMIT, license="MIT",
        files=_files(_CD_REPO, _CD_COMMIT, _CD16X_BASE_FILES)),
    ZooEntry(
        name="ft_paraphraser",
        description=("Factor Transfer paraphraser (autoencoder over a "
                     "64-channel teacher feature map)"),
        repository=_FT_REPO, commit=_FT_COMMIT, license="MIT",
        files=_files(_FT_REPO, _FT_COMMIT, _FT_PARAPHRASER_FILES)),
)
_BY_NAME = {e.name: e for e in _ENTRIES}


def entries():
  """The zoo: a dict entry name -> ``ZooEntry`` (in a fixed order)."""
  return dict(_BY_NAME)


def describe():
  """What ``cdft-weights list`` shows: entry name -> {file name: bytes}."""
  return {e.name: {f.name: f.size for f in e.files} for e in _ENTRIES}


def get_entry(entry):
  """The ``ZooEntry`` called ``entry``; WeightError for an unknown name."""
  if isinstance(entry, ZooEntry):
    return entry
  try:
    return _BY_NAME[entry]
  except KeyError:
    known = ", ".join(_BY_NAME)
    raise WeightError(f"{entry}: no such zoo entry (known: {known})") from None


def converted_cache_dir(cache_dir=None):
  """Folder for converted (Flax) weights: ``<cache dir>/converted``.

  Not created here; whoever writes there creates it.
  """
  return cachedir.resolve(cache_dir) / "converted"


# sha256 of files already hashed: (path, size, mtime_ns, ctime_ns, inode,
# device) -> hex digest. Any change to a file changes its ctime.
_HASHES = {}
_HASHES_LOCK = threading.Lock()


def _stat_key(path):
  st = os.stat(path)
  return (str(pathlib.Path(path).resolve()), st.st_size, st.st_mtime_ns,
          st.st_ctime_ns, st.st_ino, st.st_dev)


def _file_sha256(path):
  """Hex sha256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK_BYTES):
      digest.update(chunk)
  return digest.hexdigest()


def file_sha256(path):
  """Hex sha256 of a file, remembered per (path, size, times, inode) in this process."""
  key = _stat_key(path)
  with _HASHES_LOCK:
    digest = _HASHES.get(key)
  if digest is None:
    digest = _file_sha256(path)
    with _HASHES_LOCK:
      _HASHES[key] = digest
  return digest


def _mismatch(where, got, entry, zoo_file, hint=""):
  return WeightError(
      f"{where}: sha256 {got} does not match the zoo entry "
      f"{entry}/{zoo_file.name} ({zoo_file.sha256}): wrong or corrupt file"
      f"{hint}")


def _verify(path, entry, zoo_file, hint=""):
  """Checks size and sha256 of ``path`` (hash remembered across calls)."""
  try:
    key = _stat_key(path)
    size = key[1]
    if size != zoo_file.size:
      raise WeightError(
          f"{path}: {size} bytes, but the zoo entry {entry}/{zoo_file.name} "
          f"has {zoo_file.size} bytes: wrong or truncated file{hint}")
    digest = file_sha256(path)
  except OSError as e:
    raise WeightError(f"{path}: cannot read ({e.strerror or e})") from e
  if digest != zoo_file.sha256:
    raise _mismatch(path, digest, entry, zoo_file, hint)


class _Progress:
  """Download progress on stderr (a percentage line when it is a terminal)."""

  def __init__(self, enabled, url, path, total):
    self._enabled = enabled
    self._total = total
    self._done = 0
    self._shown = -1
    self._tty = enabled and sys.stderr.isatty()
    if enabled:
      sys.stderr.write(f"Downloading {url}\n  to {path} ({total} bytes)\n")
      sys.stderr.flush()

  def update(self, n):
    self._done += n
    if not self._tty:
      return
    percent = min(100, 100 * self._done // max(1, self._total))
    if percent != self._shown:
      self._shown = percent
      sys.stderr.write(f"\r  {percent:3d}% of {self._total} bytes")
      sys.stderr.flush()

  def close(self):
    if self._tty:
      sys.stderr.write("\n")
      sys.stderr.flush()


def _network_error(entry, zoo_file, url, error):
  if isinstance(error, urllib.error.HTTPError):
    reason = f"HTTP {error.code} {error.reason}"
  elif isinstance(error, urllib.error.URLError):
    reason = str(error.reason)
  else:
    reason = str(error) or type(error).__name__
  reason = " ".join(reason.split())
  return WeightError(
      f"{entry}/{zoo_file.name}: download from {url} failed ({reason}); "
      f"without internet access, copy the weight files into a folder laid "
      f"out as <folder>/{zoo_file.path} and set {WEIGHTS_DIR_ENV}=<folder>")


def _download(entry, zoo_file, path, progress):
  """Downloads ``zoo_file`` to ``path``, checked, via a temporary file."""
  url = zoo_file.url()
  folder = path.parent
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise WeightError(f"{folder}: cannot create the cache folder "
                      f"({e.strerror or e})") from e
  digest = hashlib.sha256()
  received = 0
  try:
    response = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S)
  except (OSError, http.client.HTTPException, ValueError) as e:
    raise _network_error(entry, zoo_file, url, e) from e
  report = _Progress(progress, url, path, zoo_file.size)
  try:
    with response, files.atomic_open(path) as out:
      while received <= zoo_file.size:  # Stop early on a too-long file.
        try:
          chunk = response.read(_CHUNK_BYTES)
        except (OSError, http.client.HTTPException) as e:
          raise _network_error(entry, zoo_file, url, e) from e
        if not chunk:
          break
        received += len(chunk)
        digest.update(chunk)
        report.update(len(chunk))
        out.write(chunk)
      # Raising here leaves nothing in the cache.
      if received != zoo_file.size:
        got = (f"only {received}" if received < zoo_file.size else
               f"more than {zoo_file.size}")
        raise WeightError(
            f"{url}: got {got} bytes, but the zoo entry {entry}/{zoo_file.name} "
            f"has {zoo_file.size} bytes: wrong or truncated download (not saved)")
      if digest.hexdigest() != zoo_file.sha256:
        raise _mismatch(url, digest.hexdigest(), entry, zoo_file, " (download not saved)")
    key = _stat_key(path)
  except OSError as e:
    raise WeightError(f"{path}: cannot write to the cache folder "
                      f"({e.strerror or e})") from e
  finally:
    report.close()
  with _HASHES_LOCK:
    _HASHES[key] = zoo_file.sha256


def fetch(entry, filename, weights_dir=None, cache_dir=None, verify=True,
          progress=True):
  """Returns the local path of a zoo file, downloading it if needed.

  Args:
    entry: zoo entry name (``"cd16x"``, ``"cd16x_base"``, ``"ft_paraphraser"``)
      or a ``ZooEntry``.
    filename: a file of the entry, by name (``"1SE.pth"``) or layout path
      (``"cd_wct16x/1SE.pth"``).
    weights_dir: local weights folder with the zoo layout; default
      $CDFT_WEIGHTS_DIR. When either is set the file must be there: nothing is
      downloaded.
    cache_dir: download cache; default $CDFT_CACHE_DIR, else ~/.cache/cdft.
    verify: check the size and sha256 of a file found locally (downloads are
      always checked).
    progress: report downloads on stderr.

  Returns:
    ``pathlib.Path`` of the file.

  Raises:
    WeightError: unknown entry or file; file missing from the local weights
      folder; size or sha256 mismatch; download failure; unwritable cache.
  """
  zoo_entry = get_entry(entry)
  zoo_file = zoo_entry.file(filename)
  name = zoo_entry.name

  if weights_dir is not None or os.environ.get(WEIGHTS_DIR_ENV):
    if weights_dir is not None:
      root, origin = pathlib.Path(weights_dir).expanduser(), "weights_dir"
    else:
      root = pathlib.Path(os.environ[WEIGHTS_DIR_ENV]).expanduser()
      origin = f"${WEIGHTS_DIR_ENV}"
    path = root / zoo_file.path
    if not path.is_file():
      raise WeightError(
          f"{path}: no such file: {origin} points to the local weights folder "
          f"{root}, which must hold {zoo_file.path} (zoo entry "
          f"{name}/{zoo_file.name}); nothing is downloaded while it is set")
    if verify:
      _verify(path, name, zoo_file)
    return path

  path = cachedir.resolve(cache_dir) / zoo_file.path
  if path.is_file():
    if verify:
      _verify(path, name, zoo_file,
              hint="; delete it to download it again")
    return path
  _download(name, zoo_file, path, progress)
  return path


def fetch_entry(entry, **kwargs):
  """Fetches every file of an entry: file name -> path (``fetch``'s kwargs)."""
  zoo_entry = get_entry(entry)
  return {f.name: fetch(zoo_entry, f.name, **kwargs) for f in zoo_entry.files}
