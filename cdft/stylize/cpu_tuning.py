"""XLA settings of the stylization entry points (``cdft-stylize``, ``launch/evaluate.py``).

Measured on a 2-core x86 VM (16x cascade, 2048^2 content, 1024^2 style): XLA's
YNNPACK convolution fusions are no faster here than its Eigen convolutions for
these thin layers, but they allocate scratch memory on every call, which the
kernel must page in afresh: with them a cascade takes ~2.7 M minor page faults
(~6 s of system CPU time) and 2.9 GB peak RSS; with Eigen convolutions and the
cascade of :mod:`cdft.stylize.cascade` (then one program), ~0.44 M faults (~1 s) and
2.3 GB. So the stylization entry points (``cdft-stylize``, ``launch/evaluate.py``,
the benchmarks) turn the YNNPACK fusions off.

XLA reads ``XLA_FLAGS`` once, when its CPU backend starts: call
:func:`use_eigen_convolutions` before the first jax computation. It never
overrides a setting of the user's own (``XLA_FLAGS`` naming the option), and
``CDFT_KEEP_XLA_FLAGS=1`` turns it off.

The compile caches are :func:`cdft.stylize.programs.enable_compile_cache`.
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
