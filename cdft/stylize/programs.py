"""Compiled stylization programs that outlive the process.

A stylization program (a level's encoder and content statistics, the WCT
matrix, a level's decoder, a style's statistics, a tiled level) is compiled
once per input shape. Two on-disk caches keep that work from being repeated by
the next process:

* JAX's **persistent compilation cache** (``<cdft cache>/xla``) keeps the
  compiled executables. JAX does not write programs that hold host callbacks,
  so no stylization program holds one: progress is reported by the host
  between programs (see :mod:`cdft.stylize.cascade`).
* The **export store** (``<cdft cache>/programs``) keeps each program's traced
  StableHLO (:mod:`jax.export`), keyed by its name, its static configuration,
  the shapes and dtypes of its arguments, the source of the modules that define
  it and the jax version. A later process deserializes it instead of tracing
  and lowering the Flax modules again (0.05-0.5 s a program, as long as the
  compile of a small one), then finds the executable in the persistent cache.

Programs are built on a small thread pool (:func:`compile_async`), so the
programs of a new image shape compile concurrently, and later levels compile
while the first ones already run. Set ``CDFT_NO_COMPILE_CACHE=1`` to keep
everything in memory.
"""
import concurrent.futures
import hashlib
import os
import pathlib
import threading

import jax
import numpy as np

from cdft.io import files

# Bump to invalidate every stored program (a change of the key scheme).
STORE_VERSION = 1
# The sources whose code the stored programs are traced from.
_SOURCE_PACKAGES = ("models", "stylize")

_LOCK = threading.Lock()
_STATE = {"store": None, "pool": None, "fingerprint": None}
_PROGRAMS = {}  # key -> Future of a compiled program, oldest first
# Compiled programs kept in memory (a folder of photos of many shapes would
# otherwise keep every shape's); the oldest finished ones go first.
MAX_PROGRAMS = 256


def enable_compile_cache(cache_dir=None):
  """Keeps compiled programs in ``<cdft cache>/xla`` and their traces in ``<cdft cache>/programs``.

  Call before the first stylization of the process. ``CDFT_NO_COMPILE_CACHE=1``
  turns both off.

  Args:
    cache_dir: the cdft cache (default ``$CDFT_CACHE_DIR`` or ~/.cache/cdft).

  Returns:
    The cache folder, or None when turned off.
  """
  if os.environ.get("CDFT_NO_COMPILE_CACHE"):
    return None
  from cdft.weights import zoo  # pylint: disable=import-outside-toplevel
  root = zoo.resolve_cache_dir(cache_dir)
  jax.config.update("jax_compilation_cache_dir", str(root / "xla"))
  # Every stylization program is worth keeping: the small shape-independent
  # ones (the WCT matrix) compile in well under JAX's default 1 s threshold.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  with _LOCK:
    _STATE["store"] = root / "programs"
  return root


def cache_root():
  """The cdft cache folder of :func:`enable_compile_cache`, or None when it is off."""
  store = _STATE["store"]
  return None if store is None else store.parent


def fingerprint():
  """A hash of the sources the programs are traced from, and of the jax version."""
  if _STATE["fingerprint"] is None:
    h = hashlib.sha256(f"v{STORE_VERSION} jax {jax.__version__}".encode())
    package = pathlib.Path(__file__).resolve().parent.parent
    for sub in _SOURCE_PACKAGES:
      for path in sorted((package / sub).glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    _STATE["fingerprint"] = h.hexdigest()
  return _STATE["fingerprint"]


def _spec(x):
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):
    x = np.asarray(x)
  return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)


def _key(name, static, specs, x64):
  leaves, treedef = jax.tree.flatten(specs)
  text = repr((name, static, str(treedef), [(tuple(s.shape), str(s.dtype)) for s in leaves],
               bool(x64), jax.default_backend()))
  return hashlib.sha256((fingerprint() + text).encode()).hexdigest()[:32]


def _exported(key, fn, specs):
  """The traced program: from the export store, or traced now (and stored)."""
  store = _STATE["store"]
  path = None if store is None else store / f"{key}.jaxexport"
  if path is not None and path.exists():
    try:
      return jax.export.deserialize(bytearray(path.read_bytes()))
    except Exception:  # pylint: disable=broad-except
      path.unlink(missing_ok=True)  # a damaged entry is traced again, never trusted
  exported = jax.export.export(jax.jit(fn))(*specs)
  if path is not None:
    try:
      with files.atomic_open(path) as f:
        f.write(exported.serialize())
    except OSError:
      pass  # a read-only cache: the program still runs, it is just traced again next time
  return exported


def _build(key, fn, specs, x64):
  with jax.enable_x64(x64):
    if _STATE["store"] is None:
      return jax.jit(fn).lower(*specs).compile()
    exported = _exported(key, fn, specs)
    return jax.jit(exported.call).lower(*specs).compile()


def _pool():
  if _STATE["pool"] is None:
    _STATE["pool"] = concurrent.futures.ThreadPoolExecutor(
        max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="cdft-compile")
  return _STATE["pool"]


def compile_async(name, fn, args, static=()):
  """A future of ``fn`` compiled for the shapes and dtypes of ``args``.

  Args:
    name: the program's name (part of its key).
    fn: the function; it must be fully determined by ``name``, ``static`` and
      the code of :mod:`cdft.models` / :mod:`cdft.stylize` (modules, dtypes).
    args: example arguments or ``jax.ShapeDtypeStruct`` trees.
    static: hashable configuration the function closes over (module
      definitions, dtypes, plans), part of its key.

  Returns:
    A :class:`concurrent.futures.Future` of the compiled program, shared by
    every caller asking for the same program in this process.
  """
  x64 = bool(jax.config.jax_enable_x64)
  specs = jax.tree.map(_spec, args)
  key = _key(name, static, specs, x64)
  with _LOCK:
    future = _PROGRAMS.pop(key, None)
    if future is None:
      future = _pool().submit(_build, key, fn, specs, x64)
      excess = len(_PROGRAMS) + 1 - MAX_PROGRAMS
      for old in [k for k, f in _PROGRAMS.items() if f.done()][:max(0, excess)]:
        del _PROGRAMS[old]
    _PROGRAMS[key] = future  # (re)inserted last: the most recently used
  return future

