"""Builds and loads ``onednn_conv.cc``: oneDNN convolutions as XLA FFI handlers.

The shared library is compiled on first use with the machine's C++ compiler
(``$CXX``, else ``c++`` / ``g++``) against jaxlib's FFI headers and oneDNN
(``pip install 'cdft[onednn]'``: the ``onednn-cpu-gomp`` library and the
``onednn-devel-cpu-gomp`` headers, or ``$CDFT_ONEDNN_ROOT`` with ``include/``
and ``lib/``), and kept in the cdft cache (``$CDFT_CACHE_DIR`` or
~/.cache/cdft, ``kernels/``) under a name that hashes the source, the jaxlib
version, oneDNN's library and the compiler: a later process loads it in
milliseconds. Two processes building at once each write their own temporary
file and rename it into place.
"""
import ctypes
import hashlib
import os
import pathlib
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading

from cdft import cachedir
from cdft.errors import CdftError

SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
TARGETS = ("CdftConvForward", "CdftConvBackwardData", "CdftConvBackwardWeights")
INSTALL_HINT = "pip install 'cdft[onednn]'"

_lock = threading.Lock()
_loaded = None  # the ctypes library once registered


class KernelUnavailable(CdftError):
  """The oneDNN kernels cannot be built or loaded here (the message says why)."""


def cache_dir():
  """``kernels/`` of the cdft cache (cdft.cachedir)."""
  return cachedir.resolve() / "kernels"


def _onednn_roots():
  roots = []
  if os.environ.get("CDFT_ONEDNN_ROOT"):
    roots.append(os.environ["CDFT_ONEDNN_ROOT"])
  roots += [sysconfig.get_paths()["data"], sys.prefix, site.getuserbase()]
  return [pathlib.Path(r) for r in dict.fromkeys(roots)]


def find_onednn():
  """(include dir, library file) of oneDNN, or raises KernelUnavailable."""
  tried = []
  for root in _onednn_roots():
    header, lib = root / "include" / "dnnl.hpp", root / "lib" / "libdnnl.so"
    if header.is_file() and lib.exists():
      return header.parent, lib.resolve()
    tried.append(str(root))
  raise KernelUnavailable(
      f"oneDNN's headers and library were not found (looked in {', '.join(tried)}: "
      f"include/dnnl.hpp, lib/libdnnl.so); {INSTALL_HINT} or set CDFT_ONEDNN_ROOT")


def find_compiler():
  for name in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")):
    path = shutil.which(name)
    if path:
      return path
  raise KernelUnavailable("no C++ compiler found ($CXX, c++, g++ or clang++) to build cdft's "
                          "oneDNN kernels")


def _library_path():
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  include, lib = find_onednn()
  cxx = find_compiler()
  digest = hashlib.sha256()
  for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), str(lib).encode(),
               str(lib.stat().st_size).encode(), cxx.encode()):
    digest.update(part)
  out = cache_dir() / f"libcdft_onednn-{digest.hexdigest()[:16]}.so"
  if out.is_file():
    return out
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".so.tmp", dir=out.parent)
  except OSError as e:
    raise KernelUnavailable(f"cannot write the kernel cache {out.parent} ({e}); set "
                            "CDFT_CACHE_DIR to a writable folder") from e
  os.close(fd)
  cmd = [cxx, "-O2", "-std=c++17", "-fopenmp", "-shared", "-fPIC", "-w", str(SOURCE),
         f"-I{jax.ffi.include_dir()}", f"-I{include}", f"-L{lib.parent}", "-ldnnl",
         f"-Wl,-rpath,{lib.parent}", "-o", tmp]
  print(f"cdft: building the oneDNN convolution kernels into {out.parent} (once)",
        file=sys.stderr, flush=True)
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
      raise KernelUnavailable(f"building {SOURCE.name} failed ({' '.join(cmd)}):\n"
                              f"{proc.stderr[-2000:]}")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


def load():
  """Builds (once per machine) and registers the kernels; returns the library.

  Raises:
    KernelUnavailable: no oneDNN, no compiler, a failed build or load.
  """
  global _loaded
  with _lock:
    if _loaded is None:
      import jax  # pylint: disable=import-outside-toplevel
      path = _library_path()
      try:
        lib = ctypes.CDLL(str(path))
      except OSError as e:
        raise KernelUnavailable(f"loading {path} failed: {e}") from e
      for name in TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)),
                                    platform="cpu")
      _loaded = lib
    return _loaded
