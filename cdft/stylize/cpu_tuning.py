"""XLA settings of the stylization entry points (``cdft-stylize``, ``launch/evaluate.py``).

Two XLA:CPU options, each measured on 2-core x86 VMs with the 16x cascade:

* ``--xla_cpu_experimental_ynn_fusion_type=`` (no YNNPACK fusions). They are no
  faster here than XLA's Eigen convolutions for these thin layers, but they
  allocate scratch memory on every call, which the kernel must page in afresh:
  at 2048^2 content with a 1024^2 style, ~2.7 M minor page faults (~6 s of
  system CPU time) and 2.9 GB peak RSS with them; ~0.44 M faults (~1 s) and
  2.3 GB without.
* ``--xla_cpu_use_fusion_emitters=false`` (XLA's older loop emitters for the
  elementwise fusions). A new image bucket's cascade compiles in 4.6-5.3 s
  instead of 7.3-8.1 s (512x768, AVX2 VM; 9.0 s instead of 11.1 s at 2048^2),
  its run time and its output unchanged (bit for bit, 16x cascade).

XLA reads ``XLA_FLAGS`` once, when its CPU backend starts: call
:func:`tune_xla_cpu` before the first jax computation. It never overrides a
setting of the user's own (``XLA_FLAGS`` naming the option), and
``CDFT_KEEP_XLA_FLAGS=1`` turns it off.

The compile caches are :func:`cdft.stylize.programs.enable_compile_cache`.
"""
import os

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
FUSION_EMITTERS_FLAG = "--xla_cpu_use_fusion_emitters"
# Option -> the value the stylization entry points give it.
FLAGS = {YNN_FLAG: "", FUSION_EMITTERS_FLAG: "false"}


def tune_xla_cpu():
  """Adds :data:`FLAGS` to ``XLA_FLAGS``, each unless the user names that option.

  Returns:
    Whether a flag was added: False when the user set them all or
    ``CDFT_KEEP_XLA_FLAGS``, or when jax's backends already run (too late;
    nothing is changed then).
  """
  if os.environ.get("CDFT_KEEP_XLA_FLAGS"):
    return False
  flags = os.environ.get("XLA_FLAGS", "")
  missing = [name for name in FLAGS if name not in flags]
  if not missing:
    return False
  # jax has no public "are the backends up?" (jax.extend.backend.backends()
  # would start them): the one private import of cdft, kept for that reason.
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if xla_bridge.backends_are_initialized():
    return False
  os.environ["XLA_FLAGS"] = " ".join([flags] + [f"{n}={FLAGS[n]}" for n in missing]).strip()
  return True
