"""Compiled stylization programs that outlive the process.

A stylization program (a level's encoder and content statistics, the WCT
matrix, a level's decoder, a style's statistics, a tiled level) is compiled
once per input shape. Two on-disk caches keep that work from being repeated by
the next process:

* JAX's **persistent compilation cache** (``<cdft cache>/xla-v2``) keeps the
  compiled executables. JAX does not write programs that hold host callbacks,
  so no stylization program holds one: progress is reported by the host
  between programs (see :mod:`cdft.stylize.cascade`).
* The **program store** (``<cdft cache>/programs``) keeps, for each program of
  :func:`compile_async`, its compiled executable (``.jaxexec``, through
  :mod:`jax.experimental.serialize_executable`) and its traced StableHLO
  (``.jaxexport``, :mod:`jax.export`), keyed by its name, its static
  configuration, the shapes and dtypes of its arguments, the source of the
  modules that define it and the jax version; the executable's key adds what
  compiled code depends on (backend and its version, jaxlib, ``XLA_FLAGS``, the
  CPU's instruction set). A later process loads the executable directly: no
  tracing, no lowering, no cache lookup (6 programs of a 512x512 cascade load
  in 0.09 s instead of 0.34 s through the export and the persistent cache).
  Where only the trace fits (another XLA flag, another CPU), it is lowered from
  the export and compiled, or found in the persistent cache.

Programs are built on a small thread pool (:func:`compile_async`), so the
programs of a new image shape compile concurrently, and later levels compile
while the first ones already run. Set ``CDFT_NO_COMPILE_CACHE=1`` to keep
everything in memory.
"""
import concurrent.futures
import hashlib
import os
import pathlib
import pickle
import threading

import jax
from jax.experimental import serialize_executable
import numpy as np

from cdft import cachedir
from cdft.io import files

# Bump to invalidate every stored program (a change of the key scheme).
STORE_VERSION = 1
# The sources whose code the stored programs are traced from.
_SOURCE_PACKAGES = ("models", "stylize")

_LOCK = threading.Lock()
_STATE = {"store": None, "pool": None, "fingerprint": None, "machine": None,
          "listening": False}
_PROGRAMS = {}  # key -> Future of a compiled program, oldest first
_THREAD = threading.local()  # persistent_hit: this thread's last compile came from JAX's cache
# Compiled programs kept in memory (a folder of photos of many shapes would
# otherwise keep every shape's); the oldest finished ones go first.
MAX_PROGRAMS = 256


def enable_compile_cache(cache_dir=None):
  """Keeps compiled programs in ``<cdft cache>/xla-v2`` and ``<cdft cache>/programs``.

  Call before the first stylization of the process. ``CDFT_NO_COMPILE_CACHE=1``
  turns both off.

  Args:
    cache_dir: the cdft cache (default ``$CDFT_CACHE_DIR`` or ~/.cache/cdft).

  Returns:
    The cache folder, or None when turned off.
  """
  if os.environ.get("CDFT_NO_COMPILE_CACHE"):
    return None
  root = cachedir.resolve(cache_dir)
  # ("xla-v2": the caches of cdft before the executable store filled "xla",
  # whose hits could not be kept as executables; see _build.)
  jax.config.update("jax_compilation_cache_dir", str(root / "xla-v2"))
  # Every stylization program is worth keeping: the small shape-independent
  # ones (the WCT matrix) compile in well under JAX's default 1 s threshold.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  with _LOCK:
    _STATE["store"] = root / "programs"
  return root


def _listen():
  """Registers :func:`_note_persistent_hit` with JAX's monitoring, once per process."""
  with _LOCK:
    if not _STATE["listening"]:
      jax.monitoring.register_event_listener(_note_persistent_hit)
      _STATE["listening"] = True


def _note_persistent_hit(name, **_):
  # Called in the compiling thread, as JAX finds a program in its cache.
  if name == "/jax/compilation_cache/cache_hits":
    _THREAD.persistent_hit = True


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


def machine_fingerprint():
  """What compiled code depends on beyond the program: backend, versions, XLA flags, CPU features."""
  if _STATE["machine"] is None:
    import jaxlib  # pylint: disable=import-outside-toplevel
    device = jax.devices()[0]
    parts = [jax.default_backend(), device.device_kind, device.client.platform_version,
             jaxlib.__version__, os.environ.get("XLA_FLAGS", ""), _cpu_features()]
    _STATE["machine"] = hashlib.sha256(repr(parts).encode()).hexdigest()
  return _STATE["machine"]


def _cpu_features():
  """The host CPU's model and instruction-set flags (Linux), which XLA:CPU compiles for."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      lines = [l for l in f if l.startswith(("model name", "flags"))]
    return "".join(sorted(set(lines)))
  except OSError:
    import platform  # pylint: disable=import-outside-toplevel
    return platform.machine() + platform.processor()


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


def _executable_path(key):
  digest = hashlib.sha256((key + machine_fingerprint()).encode()).hexdigest()[:32]
  return _STATE["store"] / f"{digest}.jaxexec"


def _load_executable(path):
  """The compiled program kept at ``path``, or None (absent or damaged: it is removed)."""
  if not path.exists():
    return None
  try:
    payload, in_tree, out_tree = pickle.loads(path.read_bytes())
    # The programs run on one device (the default one), whatever the host has.
    return serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                     execution_devices=jax.devices()[:1])
  except Exception:  # pylint: disable=broad-except
    path.unlink(missing_ok=True)  # compiled again, never trusted
    return None


def _store_executable(path, compiled):
  try:
    blob = pickle.dumps(serialize_executable.serialize(compiled))
  except (ValueError, NotImplementedError, pickle.PicklingError):
    return  # not serializable on this backend: the persistent cache still keeps it
  try:
    with files.atomic_open(path) as f:
      f.write(blob)
  except OSError:
    pass  # a read-only cache


def _build(key, fn, specs, x64):
  with jax.enable_x64(x64):
    if _STATE["store"] is None:
      return jax.jit(fn).lower(*specs).compile()
    path = _executable_path(key)
    compiled = _load_executable(path)
    if compiled is None:
      _listen()  # before the compile whose cache hit it must see
      exported = _exported(key, fn, specs)
      _THREAD.persistent_hit = False
      compiled = jax.jit(exported.call).lower(*specs).compile()
      # An executable JAX read back from its persistent cache serializes
      # without its kernels (jaxlib 0.10: "Function ... not found" when the
      # copy runs): only a fresh compile is kept.
      if not _THREAD.persistent_hit:
        _store_executable(path, compiled)
    return compiled


def _pool():
  if _STATE["pool"] is None:
    _STATE["pool"] = concurrent.futures.ThreadPoolExecutor(
        max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="cdft-compile")
  return _STATE["pool"]


def wait_all():
  """Waits for every program this process started to build (and store)."""
  with _LOCK:
    futures = list(_PROGRAMS.values())
  concurrent.futures.wait(futures)


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

