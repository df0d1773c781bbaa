"""``conv_general_dilated`` for the models: oneDNN on CPU where asked, XLA elsewhere.

XLA:CPU's convolutions of the CIFAR ResNets' thin layers (16-64 channels) run at
55-100 GF/s on a 2-core AVX-512 VM; oneDNN's at 150-270 GF/s (forward, input and
kernel gradient alike). :func:`conv_general_dilated` has lax's signature (pass it
as ``nn.Conv(conv_general_dilated=...)``). While :func:`cpu_convolutions` is in
force with oneDNN on (the trainer enters it from ``config.cpu_conv``), a float32
NHWC/HWIO convolution without dilation or groups traced for a CPU backend is
:func:`conv2d`: three XLA FFI custom calls (forward, input gradient, kernel
gradient) of ``onednn_conv.cc``, with a ``jax.custom_vjp``. Anything else, every
GPU and TPU program and any code outside the context is ``lax``'s convolution,
unchanged.

With a mesh, the custom calls run per device on its part of the batch
(``shard_map`` over the mesh's ``'data'`` axis; the kernel gradient is summed
over it, as XLA's own data-parallel convolution's is); without one, XLA runs
them on whole arrays.
"""
import contextlib
import functools
import sys
import threading

import jax
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from cdft.errors import CdftError
from cdft.kernels import build

MODES = ("auto", "xla", "onednn")
DATA_AXIS = "data"

_policy = threading.local()  # .state = (oneDNN on, mesh) while cpu_convolutions is in force
_warned = set()


def onednn_available():
  """(True, '') if the oneDNN kernels load here, else (False, why)."""
  try:
    build.load()
  except build.KernelUnavailable as e:
    return False, str(e)
  return True, ""


@contextlib.contextmanager
def cpu_convolutions(mode, mesh=None, stream=None):
  """Within: which kernels CPU convolutions traced here use.

  Args:
    mode: 'xla' (XLA's own), 'onednn' (oneDNN; an error if it cannot be built
      here), 'auto' (oneDNN where it can be built, else XLA with one warning).
    mesh: the ``jax.sharding.Mesh`` the traced programs run on (its ``'data'``
      axis splits the batch), or None.
    stream: where the 'auto' fallback warning goes (default stderr).

  Yields:
    True if oneDNN convolutions are on: never for a mesh of another platform
    (or, without a mesh, another default backend), whose programs keep XLA's.

  Raises:
    CdftError: an unknown mode; build.KernelUnavailable: 'onednn' and no kernels.
  """
  if mode not in MODES:
    raise CdftError(f"config.cpu_conv must be one of {MODES}, got {mode!r}")
  platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  if platform != "cpu":
    mode = "xla"
  use = False
  if mode == "onednn":
    build.load()
    use = True
  elif mode == "auto":
    use, why = onednn_available()
    if not use and why not in _warned:
      _warned.add(why)
      print(f"warning: XLA's CPU convolutions (slower) instead of oneDNN's: {why}",
            file=stream or sys.stderr, flush=True)
  before = getattr(_policy, "state", None)
  _policy.state = (use, mesh)
  try:
    yield use
  finally:
    _policy.state = before


def _attrs(strides, pads):
  (pt, pb), (pl, pr) = pads
  return {k: np.int64(v) for k, v in
          dict(sh=strides[0], sw=strides[1], pt=pt, pb=pb, pl=pl, pr=pr).items()}


def _forward(x, w, strides, pads):
  n, h, wd, _ = x.shape
  kh, kw, _, o = w.shape
  (pt, pb), (pl, pr) = pads
  shape = (n, (h + pt + pb - kh) // strides[0] + 1, (wd + pl + pr - kw) // strides[1] + 1, o)
  return jax.ffi.ffi_call("CdftConvForward", jax.ShapeDtypeStruct(shape, x.dtype))(
      x, w, **_attrs(strides, pads))


def _input_grad(dy, w, x_shape, strides, pads):
  return jax.ffi.ffi_call("CdftConvBackwardData", jax.ShapeDtypeStruct(x_shape, dy.dtype))(
      dy, w, **_attrs(strides, pads))


def _kernel_grad(x, dy, w_shape, strides, pads):
  return jax.ffi.ffi_call("CdftConvBackwardWeights", jax.ShapeDtypeStruct(w_shape, x.dtype))(
      x, dy, **_attrs(strides, pads))


def _split(mesh, batch):
  """The mesh's data-axis size if the batch splits over it, else None (whole arrays)."""
  if mesh is None or DATA_AXIS not in mesh.axis_names:
    return None
  size = mesh.shape[DATA_AXIS]
  return size if size > 1 and batch % size == 0 else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x, w, strides, pads, mesh=None):
  """oneDNN convolution: x (N, H, W, C) float32, w (KH, KW, C, O) float32.

  Args:
    x, w: the input and the kernel.
    strides: (sh, sw).
    pads: ((top, bottom), (left, right)), explicit zero padding.
    mesh: a mesh whose 'data' axis splits the batch (see the module doc), or None.

  Returns:
    (N, H', W', O), as ``lax.conv_general_dilated`` with the same arguments.
  """
  if _split(mesh, x.shape[0]):
    return jax.shard_map(lambda x, w: _forward(x, w, strides, pads), mesh=mesh,
                         in_specs=(P(DATA_AXIS), P()), out_specs=P(DATA_AXIS),
                         check_vma=False)(x, w)
  return _forward(x, w, strides, pads)


def _conv2d_fwd(x, w, strides, pads, mesh):
  return conv2d(x, w, strides, pads, mesh), (x, w)


def _conv2d_bwd(strides, pads, mesh, residuals, dy):
  x, w = residuals
  if not _split(mesh, x.shape[0]):
    return (_input_grad(dy, w, x.shape, strides, pads),
            _kernel_grad(x, dy, w.shape, strides, pads))

  def local(x, w, dy):
    dx = _input_grad(dy, w, x.shape, strides, pads)
    return dx, lax.psum(_kernel_grad(x, dy, w.shape, strides, pads), DATA_AXIS)
  return jax.shard_map(local, mesh=mesh, in_specs=(P(DATA_AXIS), P(), P(DATA_AXIS)),
                       out_specs=(P(DATA_AXIS), P()), check_vma=False)(x, w, dy)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)

_NHWC = ("NHWC", "HWIO", "NHWC")


def _onednn_case(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                 batch_group_count, preferred_element_type):
  use, _ = getattr(_policy, "state", None) or (False, None)
  if not use:
    return False
  if lhs.ndim != 4 or lhs.dtype != np.float32 or rhs.dtype != np.float32:
    return False
  if feature_group_count != 1 or batch_group_count != 1 or preferred_element_type not in (
      None, np.float32):
    return False
  if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
    return False
  if dimension_numbers is None:
    return False
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """``jax.lax.conv_general_dilated``, on oneDNN where :func:`cpu_convolutions` says so."""
  if not _onednn_case(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers,
                      feature_group_count, batch_group_count, preferred_element_type):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return conv2d(lhs, rhs, tuple(int(s) for s in window_strides), pads,
                _policy.state[1])
