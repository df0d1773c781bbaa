"""XLA settings of the stylization entry points (``cdft-stylize``, ``launch/evaluate.py``).

Measured on a 2-core x86 VM (16x cascade, 2048^2 content, 1024^2 style): XLA's
YNNPACK convolution fusions are no faster here than its Eigen convolutions for
these thin layers, but they allocate scratch memory on every call, which the
kernel must page in afresh: with them a cascade takes ~2.7 M minor page faults
(~6 s of system CPU time) and 2.9 GB peak RSS; with Eigen convolutions and the
one-program cascade of :mod:`cdft.stylize.cascade`, ~0.44 M faults (~1 s) and
2.3 GB. So the stylization entry points (``cdft-stylize``, ``launch/evaluate.py``,
the benchmarks) turn the YNNPACK fusions off.

XLA reads ``XLA_FLAGS`` once, when its CPU backend starts: call
:func:`use_eigen_convolutions` before the first jax computation. It never
overrides a setting of the user's own (``XLA_FLAGS`` naming the option), and
``CDFT_KEEP_XLA_FLAGS=1`` turns it off.

:func:`enable_compile_cache` keeps compiled programs in the cdft cache: every
new image shape compiles the cascade again (~10 s on CPU), later runs reuse it.
"""
import os

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def use_eigen_convolutions():
  """Adds ``--xla_cpu_experimental_ynn_fusion_type=`` (no YNNPACK fusions) to XLA_FLAGS.

  Returns:
    Whether the flag was added: False when the user set it or
    ``CDFT_KEEP_XLA_FLAGS``, or when jax's backends already run (too late;
    nothing is changed then).
  """
  if os.environ.get("CDFT_KEEP_XLA_FLAGS"):
    return False
  flags = os.environ.get("XLA_FLAGS", "")
  if YNN_FLAG in flags:
    return False
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if xla_bridge.backends_are_initialized():
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}=".strip()
  return True


def enable_compile_cache(cache_dir=None):
  """Keeps compiled XLA programs in ``<cdft cache>/xla`` (off with CDFT_NO_COMPILE_CACHE=1).

  Args:
    cache_dir: the cdft cache (default ``$CDFT_CACHE_DIR`` or ~/.cache/cdft).
  """
  if os.environ.get("CDFT_NO_COMPILE_CACHE"):
    return
  import jax  # pylint: disable=import-outside-toplevel
  from cdft.weights import zoo  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_compilation_cache_dir", str(zoo.resolve_cache_dir(cache_dir) / "xla"))
