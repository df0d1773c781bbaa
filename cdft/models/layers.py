"""Building blocks shared by the VGG-style encoders and decoders.

Every 3x3 convolution of the Collaborative Distillation / WCT networks is
``ReflectionPad2d(1)`` followed by a VALID convolution. XLA on CPU runs a
reflect-pad + VALID convolution 2-4x slower than a zero-padded SAME one, so
:func:`reflect_conv3x3` computes the SAME convolution and then recomputes only
the one-pixel border from thin reflect-padded strips. The result is the same
function (tested against the naive form), at the speed of a SAME convolution.

The border fix is three convolutions where the naive form is one, and XLA's
compile time follows the number of operations: it triples the compile time of
a 16x level (encoder 5 at 512^2: 0.97 s vs 0.29 s), while it only pays at
large maps (measured with Eigen convolutions on 2 cores, naive / fixed time:
16->16 channels 0.77x at 256^2, 1.08x at 512^2, 1.51x at 2048^2; 64->64 0.94x at
256^2, 1.31x at 512^2). So maps under :data:`FIX_MIN_PIXELS` take the naive form.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cdft.kernels.conv import conv_general_dilated
from cdft.models.initializers import pytorch_bias_init, pytorch_kernel_init

_DN = ("NHWC", "HWIO", "NHWC")
# Input channels are zero-padded up to this many (see reflect_conv3x3).
_MIN_CIN = 8
# Maps of at least this many pixels get the border fix of reflect_conv3x3.
FIX_MIN_PIXELS = 1024 * 1024


def _conv_valid(x, kernel):
  return conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_DN)


def _reflect_indices(n):
  """Row/column indices of a reflection pad by 1; a 1-pixel axis repeats itself."""
  idx = np.concatenate([[1], np.arange(n), [n - 2]])
  return np.clip(idx, 0, n - 1)


def _pad_rows_grad(g, n):
  """Adjoint of the reflection pad by 1 of axis 1 (``n`` rows): each padded row's
  gradient added to the row it copies (rows 1 and n - 2; a 1-row axis, all three)."""
  dx = g[:, 1:n + 1]
  first, last = min(1, n - 1), max(n - 2, 0)
  dx = dx.at[:, first:first + 1].add(g[:, 0:1])
  return dx.at[:, last:last + 1].add(g[:, n + 1:n + 2])


@jax.custom_vjp
def reflect_pad1(x):
  """Reflection pad by 1 of the two spatial axes of NHWC ``x`` (rows/columns gathered).

  Its gradient adds the padded border back with slices: the gather's own
  transpose is a scatter-add over every element (with the index arrays built
  per element), which dominated a CD training step on CPU.
  """
  h, w = x.shape[1:3]
  return x[:, _reflect_indices(h)][:, :, _reflect_indices(w)]


def _reflect_pad1_fwd(x):
  return reflect_pad1(x), x.shape


def _reflect_pad1_bwd(shape, g):
  h, w = shape[1:3]
  g = jnp.swapaxes(_pad_rows_grad(jnp.swapaxes(g, 1, 2), w), 1, 2)
  return (_pad_rows_grad(g, h),)


reflect_pad1.defvjp(_reflect_pad1_fwd, _reflect_pad1_bwd)


def reflect_conv3x3_naive(x, kernel, bias):
  """Reference: reflection pad 1 (by gathering rows/columns) + VALID 3x3 conv."""
  return _conv_valid(reflect_pad1(x), kernel) + bias


def _take(x, idx, axis):
  """``x`` gathered at the in-bounds indices ``idx`` along ``axis`` (no bounds checks)."""
  offsets = tuple(d for d in range(x.ndim) if d != axis)
  dims = jax.lax.GatherDimensionNumbers(offset_dims=offsets, collapsed_slice_dims=(axis,),
                                        start_index_map=(axis,))
  sizes = tuple(1 if d == axis else n for d, n in enumerate(x.shape))
  return jax.lax.gather(x, idx[:, None], dims, sizes,
                        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _region_indices(n, extent):
  """Padded axis of a canvas side ``n`` whose region ends at ``extent``: the canvas's
  reflection indices, with position ``extent + 1`` reading row ``extent - 2``."""
  pos = jax.lax.iota(jnp.int32, n + 2)
  base = jnp.asarray(_reflect_indices(n), jnp.int32)
  return jax.lax.select(pos == extent + 1, jnp.broadcast_to(extent - 2, (n + 2,)), base)


def reflect_pad1_region(x, extent):
  """Reflection pad by 1 of the region ``x[:, :h, :w]`` of a canvas, ``(h, w) = extent``.

  ``extent`` is a traced (2,) int32, so one program serves every region of a
  canvas shape. The region sits at the canvas's top-left corner: its top and
  left pads are those of the canvas; the row below it (padded row h + 1) reads
  its row h - 2 and the column right of it its column w - 2, its reflections.
  Pixels beyond are whatever the canvas holds: the 3x3 VALID convolution that
  follows computes the region from the region alone. Two gathers, as the
  static pad (plain comparisons and bound-free gathers: selects and clamps
  would add to the compile time of every convolution). Needs h, w >= 2.
  """
  hc, wc = x.shape[1:3]
  x = _take(x, _region_indices(hc, extent[0]), 1)
  return _take(x, _region_indices(wc, extent[1]), 2)


def reflect_conv3x3(x, kernel, bias, extent=None):
  """3x3 convolution of ``x`` (NHWC) after a reflection pad of one pixel.

  Args:
    x: input, (N, H, W, Cin).
    kernel: (3, 3, Cin, Cout) HWIO.
    bias: (Cout,).
    extent: optional traced (2,) int32 ``(h, w)``: ``x`` is a canvas whose
      region ``[:h, :w]`` is the map, padded at the region's own edge
      (:func:`reflect_pad1_region`); outside the region the output is
      unspecified.

  Returns:
    (N, H, W, Cout), equal to ``conv_valid(reflect_pad(x, 1)) + bias`` (on the
    region, with ``extent``).
  """
  h, w, cin = x.shape[1:]
  if cin < _MIN_CIN:
    # XLA's CPU convolution is several times slower with 3 input channels than
    # with 8 (3->24 at 2048^2: 1.5 s vs 0.3 s): zero channels are cheaper.
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, _MIN_CIN - cin)))
    kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, _MIN_CIN - cin), (0, 0)))
  if extent is not None:
    return _conv_valid(reflect_pad1_region(x, extent), kernel) + bias
  if h < 3 or w < 3 or h * w < FIX_MIN_PIXELS:
    return reflect_conv3x3_naive(x, kernel, bias)
  y = conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DN)
  cols = _reflect_indices(w)
  rows = _reflect_indices(h)
  # Each strip holds the 3 padded rows (or columns) that feed one border line;
  # the two strips of an axis are one batched convolution (fewer ops to compile).
  n = x.shape[0]
  rows_tb = jnp.concatenate([x[:, [1, 0, 1]], x[:, [h - 2, h - 1, h - 2]]], axis=0)
  cols_lr = jnp.concatenate([x[:, :, [1, 0, 1]], x[:, :, [w - 2, w - 1, w - 2]]], axis=0)
  tb = _conv_valid(rows_tb[:, :, cols], kernel)
  lr = _conv_valid(cols_lr[:, rows], kernel)
  y = y.at[:, 0:1].set(tb[:n]).at[:, h - 1:h].set(tb[n:])
  y = y.at[:, :, 0:1].set(lr[:n]).at[:, :, w - 1:w].set(lr[n:])
  return y + bias


def upsample_nearest2x(x):
  """Nearest-neighbour x2 upsampling of an NHWC tensor."""
  n, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
  return x.reshape(n, 2 * h, 2 * w, c)


def zero_outside(x, extent):
  """``x`` (N, H, W, C) with zeros beyond the region ``[:extent[0], :extent[1]]``."""
  rows = jax.lax.iota(jnp.int32, x.shape[1]) < extent[0]
  cols = jax.lax.iota(jnp.int32, x.shape[2]) < extent[1]
  return jnp.where((rows[:, None] & cols[None, :])[None, :, :, None], x, 0)


def _max_pool(x, ceil):
  if not ceil:
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
  h, w = x.shape[1:3]
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding=((0, h % 2), (0, w % 2)))


def _interleave(a, b, axis):
  """``a`` and ``b`` (same shape) interleaved along ``axis``: a0 b0 a1 b1 ..."""
  shape = list(a.shape)
  shape[axis] *= 2
  return jnp.stack([a, b], axis=axis + 1).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool2x2(x, ceil=False):
  """2x2 max-pool, stride 2: floor mode drops an odd trailing row/column, ceil
  mode (PyTorch's ``ceil_mode=True``) pools it alone.

  Its gradient goes to the first maximum of each window in row-major order (as
  XLA's select-and-scatter and PyTorch do), computed with strided slices: XLA:CPU
  lowers select-and-scatter to a scatter with per-element index arrays, several
  times slower in a training step.
  """
  return _max_pool(x, ceil)


def _max_pool_fwd(x, ceil):
  y = _max_pool(x, ceil)
  return y, (x, y)


def _max_pool_bwd(ceil, res, g):
  x, y = res
  h, w = x.shape[1:3]
  hp, wp = 2 * y.shape[1], 2 * y.shape[2]  # the pooled part: cropped (floor) or padded (ceil)
  xe = x[:, :hp, :wp]
  if hp > h or wp > w:
    xe = jnp.pad(xe, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)), constant_values=-jnp.inf)
  corners = (xe[:, 0::2, 0::2], xe[:, 0::2, 1::2], xe[:, 1::2, 0::2], xe[:, 1::2, 1::2])
  taken = jnp.zeros(y.shape, bool)
  grads = []
  for i, corner in enumerate(corners):
    first = ~taken if i == 3 else (corner == y) & ~taken
    grads.append(jnp.where(first, g, jnp.zeros((), g.dtype)))
    taken = taken | first
  dx = _interleave(_interleave(grads[0], grads[1], 2), _interleave(grads[2], grads[3], 2), 1)
  dx = dx[:, :h, :w]
  return (jnp.pad(dx, ((0, 0), (0, h - dx.shape[1]), (0, w - dx.shape[2]), (0, 0))),)


max_pool2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


class ReflectConv3x3(nn.Module):
  """``ReflectionPad2d(1)`` + ``Conv2d(cin, features, 3)`` with bias, optionally ReLU.

  ``input_affine=(A, c)`` folds a preceding pointwise affine map ``x @ A + c``
  into the kernel (exact: the reflection pad only copies pixels), which is how
  the encoders absorb their 1x1 ``conv0`` pre-processing layer.
  """
  features: int
  relu: bool = True
  dtype: Any = None  # computation dtype (None: the input's; parameters stay float32)

  @nn.compact
  def __call__(self, x, input_affine=None, extent=None):
    cin = x.shape[-1] if input_affine is None else input_affine[0].shape[0]
    # PyTorch's default init, as the official models were trained from.
    kernel = self.param("kernel", pytorch_kernel_init, (3, 3, cin, self.features))
    bias = self.param("bias", pytorch_bias_init(9 * cin), (self.features,))
    if input_affine is not None:
      a, c = input_affine
      bias = bias + jnp.einsum("j,hwjo->o", c, kernel)
      kernel = jnp.einsum("ij,hwjo->hwio", a, kernel)
    if self.dtype is not None:
      x, kernel, bias = (v.astype(self.dtype) for v in (x, kernel, bias))
    y = reflect_conv3x3(x, kernel, bias, extent)
    return nn.relu(y) if self.relu else y


class Conv1x1(nn.Module):
  """A 1x1 convolution with bias (per-pixel affine map), NHWC."""
  features: int
  in_features: int
  dtype: Any = None  # computation dtype (None: the input's; parameters stay float32)

  def setup(self):
    self.kernel = self.param("kernel", pytorch_kernel_init,
                             (1, 1, self.in_features, self.features))
    self.bias = self.param("bias", pytorch_bias_init(self.in_features), (self.features,))

  def affine(self):
    """The map as ``(A, c)`` with ``y = x @ A + c``."""
    return self.kernel[0, 0], self.bias

  def __call__(self, x):
    kernel, bias = self.kernel[0, 0], self.bias
    if self.dtype is not None:
      x, kernel, bias = (v.astype(self.dtype) for v in (x, kernel, bias))
    return jnp.einsum("nhwi,io->nhwo", x, kernel) + bias
