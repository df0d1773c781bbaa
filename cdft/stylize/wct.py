"""Whitening and colouring transform (WCT) on feature maps, with float64-accurate statistics.

The official code casts whole C x HW feature maps to float64 and runs ``torch.svd``
on CPU. Here the maps stay float32; only the statistics are float64:

* :func:`feature_stats` streams row blocks of the (N, C) features, casting each
  block to float64, and accumulates the mean and the *centred* second moment
  (two passes), so the covariance is accurate to float64 level without a float64
  copy of the map.
* :func:`wct_matrix` turns content and style statistics into one C x C matrix M
  and offset b with ``wct(f) = f @ M.T + b`` -- the whitening, the colouring, the
  style mean and the alpha blend folded together, so applying WCT is a single
  1x1 convolution in float32 (and the same matrix serves every tile of a large
  image).

Rank deficiency: many encoder channels are always zero (dead ReLUs: 77 of 128 at
relu4_1 of the released 16x SE4), and a map with fewer positions than channels
(small style images) has a rank-deficient covariance. Channels of zero variance
are removed exactly (masked), and eigenvalues at or below
``rtol * max eigenvalue`` (``rtol = C * eps`` of the statistics dtype by default)
are treated as null directions: neither whitened nor coloured. The official code
keeps every eigenvalue above 1e-100, which equals this on full-rank live channels.

Everything here is jit-able; float64 needs ``jax.enable_x64`` around the call
(see :func:`x64_scope`).
"""
import contextlib
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Rows of the (N, C) feature matrix per float64 block in feature_stats.
STATS_BLOCK_ROWS = 1 << 15


class Stats(NamedTuple):
  """First and second moments of a (N, C) feature matrix (dtype of the statistics)."""
  mean: jax.Array  # (C,)
  cov: jax.Array  # (C, C), centred, divided by N - 1
  count: jax.Array  # () number of positions N


def stats_dtype_for_backend(backend=None):
  """float64 where the backend has it natively (CPU, GPU); float32 on TPU."""
  backend = backend or jax.default_backend()
  return jnp.float32 if backend == "tpu" else jnp.float64


@contextlib.contextmanager
def x64_scope(dtype):
  """Enables 64-bit types for the enclosed jax calls when ``dtype`` is float64."""
  if np.dtype(dtype) == np.float64:
    with jax.enable_x64(True):
      yield
  else:
    yield


def moment_sums(f, mean=None, dtype=jnp.float64, block_rows=STATS_BLOCK_ROWS, mask=None):
  """Sums of ``f - mean`` and of its outer products over rows, accumulated in ``dtype``.

  Row blocks are sliced from ``f`` in place (no padded or float64 copy of the
  whole map); the last block is shifted back to end at row N and its rows that
  an earlier block already counted are masked out.

  Args:
    f: (N, C) features (any float dtype).
    mean: (C,) centre, in ``dtype``; zero if None.
    dtype: accumulation dtype.
    block_rows: rows cast to ``dtype`` at a time (bounds the extra memory).
    mask: optional (N,) bool, the rows to count.

  Returns:
    (s1 (C,), s2 (C, C)) in ``dtype``.
  """
  n, c = f.shape
  rows = min(block_rows, n)
  num_blocks = -(-n // rows)
  centre = jnp.zeros((c,), dtype) if mean is None else mean.astype(dtype)

  def body(i, carry):
    s1, s2 = carry
    start = jnp.minimum(i * rows, n - rows)
    block = jax.lax.dynamic_slice_in_dim(f, start, rows, axis=0)
    fresh = (start + jnp.arange(rows)) >= i * rows
    if mask is not None:
      fresh = fresh & jax.lax.dynamic_slice_in_dim(mask, start, rows, axis=0)
    g = jnp.where(fresh[:, None], block.astype(dtype) - centre, 0)
    s1 = s1 + g.sum(axis=0)
    s2 = s2 + jnp.einsum("ni,nj->ij", g, g, precision=jax.lax.Precision.HIGHEST)
    return s1, s2

  init = (jnp.zeros((c,), dtype), jnp.zeros((c, c), dtype))
  if num_blocks == 1:  # the same sums without a loop (a smaller program to compile)
    return body(0, init)
  return jax.lax.fori_loop(0, num_blocks, body, init)


def feature_stats(f, dtype=jnp.float64, block_rows=STATS_BLOCK_ROWS, mask=None):
  """Mean and covariance (divided by N - 1, as the official code) of (N, C) features.

  One pass over the map, accumulating in ``dtype`` the sums of ``f - K`` and
  of its outer products, with the shift ``K`` = the first row (any data point
  near the mean keeps the ``S2 - S1 S1^T / N`` cancellation harmless; in
  float64 it is exact to ~1e-16 relative). ``mask`` (N,) bool restricts the
  statistics to some rows (a tile's core); N is then the number counted.
  """
  if mask is None:
    n = f.shape[0]
    if n < 2:
      raise ValueError(f"WCT needs at least 2 feature positions, got {n}")
  else:
    n = jnp.sum(mask).astype(dtype)
  shift = f[0].astype(dtype)
  s1, s2 = moment_sums(f, shift, dtype, block_rows, mask)
  cov = (s2 - jnp.outer(s1, s1) / n) / (n - 1)
  return Stats(shift + s1 / n, cov, jnp.asarray(n, dtype))


def merge_stats(parts):
  """Exact statistics of a union from those of its disjoint parts (numpy, float64).

  Chan et al.'s pairwise update of (count, mean, centred sum of outer products);
  used to accumulate whole-image statistics over tiles.
  """
  n, mean, m2 = 0.0, None, None
  for st in parts:
    nb = float(st.count)
    mb = np.asarray(st.mean, np.float64)
    m2b = np.asarray(st.cov, np.float64) * (nb - 1)
    if mean is None:
      n, mean, m2 = nb, mb, m2b
      continue
    delta = mb - mean
    total = n + nb
    mean = mean + delta * (nb / total)
    m2 = m2 + m2b + np.outer(delta, delta) * (n * nb / total)
    n = total
  if mean is None or n < 2:
    raise ValueError("WCT needs at least 2 feature positions")
  return Stats(mean, m2 / (n - 1), np.float64(n))


def merge_stacked_stats(parts):
  """:func:`merge_stats` inside a jitted program: ``parts`` is a Stats of stacked arrays.

  The union's mean is the count-weighted mean of the parts, and its centred
  second moment the sum of the parts' plus the spread of their means
  (``sum n_i (mu_i - mu)(mu_i - mu)^T``): exact, in the parts' dtype.
  """
  counts = parts.count
  n = jnp.sum(counts)
  mean = jnp.sum(counts[:, None] * parts.mean, axis=0) / n
  delta = parts.mean - mean
  own = jnp.where((counts > 1)[:, None, None], parts.cov, 0) * (counts - 1)[:, None, None]
  m2 = jnp.sum(own + counts[:, None, None] * delta[:, :, None] * delta[:, None, :], axis=0)
  return Stats(mean, m2 / (n - 1), n)


def _masked_power(cov, power, rtol, xp=jnp):
  """``cov ** power`` on the live subspace; zero on dead channels and null directions."""
  c = cov.shape[0]
  live = xp.diagonal(cov) > 0
  mask2 = live[:, None] & live[None, :]
  cov = xp.where(mask2, cov, 0)
  cov = 0.5 * (cov + cov.T)
  evals, evecs = xp.linalg.eigh(cov)
  top = xp.max(evals)
  if rtol is None:
    rtol = c * xp.finfo(cov.dtype).eps
  keep = evals > rtol * top
  scale = xp.where(keep, xp.where(keep, evals, 1) ** power, 0)
  out = (evecs * scale[None, :]) @ evecs.T
  return xp.where(mask2, out, 0), xp.sum(keep)


def wct_matrix(content, style, alpha=1.0, rtol=None, xp=jnp):
  """The affine map of WCT with alpha blending: ``out = f @ M.T + b``.

  ``M = alpha * C_s^{1/2} C_c^{-1/2} + (1 - alpha) I`` and
  ``b = alpha * (mu_s - C_s^{1/2} C_c^{-1/2} mu_c)``, the powers taken on the
  live, non-null eigen-subspaces (see module docstring).

  Args:
    content: :class:`Stats` of the content features.
    style: :class:`Stats` of the style features, or a sequence of
      ``(weight, Stats)`` pairs to blend several styles (the targets are mixed
      linearly with weights summing to 1).
    alpha: content/style blend, 1 = full style (as the official ``--alpha``).
    rtol: relative eigenvalue cut-off; default ``C * eps`` of the stats dtype.
    xp: ``jax.numpy`` (jit-able; the default) or ``numpy``: the host computes
      the C x C eigendecompositions in a few milliseconds with nothing to
      compile, which is how the stylizers call it (:func:`host_matrix`).

  Returns:
    (M (C, C), b (C,)) in the statistics dtype.
  """
  dtype = content.cov.dtype
  whiten, _ = _masked_power(content.cov, -0.5, rtol, xp)
  styles = [(1.0, style)] if isinstance(style, Stats) else list(style)
  total = sum(w for w, _ in styles)
  target = xp.zeros_like(whiten)
  offset = xp.zeros_like(content.mean)
  for weight, s in styles:
    colour, _ = _masked_power(s.cov, 0.5, rtol, xp)
    t = colour @ whiten
    target = target + (weight / total) * t
    offset = offset + (weight / total) * (s.mean - t @ content.mean)
  c = whiten.shape[0]
  m = alpha * target + (1.0 - alpha) * xp.eye(c, dtype=dtype)
  return m, alpha * offset


def host_matrix(content, style, alpha=1.0, dtype=None, matrix=None):
  """:func:`wct_matrix` in numpy from statistics anywhere (device or host), in ``dtype``.

  Args:
    content: ``(mean, cov, count)`` of the content.
    style: a sequence of ``(weight, (mean, cov, count))``.
    alpha: content/style blend.
    dtype: of the computation (default: each statistic's own dtype).
    matrix: the map (default :func:`wct_matrix`; see :mod:`cdft.stylize.transfer`).

  Returns:
    (M, b) numpy arrays in ``dtype``.
  """
  def stats(x):
    return Stats(*(np.asarray(v, dtype or np.asarray(x[1]).dtype) for v in x))

  content = stats(content)
  targets = [(float(w), stats(s)) for w, s in style]
  return (matrix or wct_matrix)(content, targets, float(alpha), xp=np)


def apply_matrix(f, m, b):
  """Applies ``f @ M.T + b`` to NHWC features in their own dtype."""
  m = m.astype(f.dtype)
  b = b.astype(f.dtype)
  return jnp.einsum("...i,oi->...o", f, m, precision=jax.lax.Precision.HIGHEST) + b


def as_affine(m, b, dtype=jnp.float32):
  """``(A, c)`` with ``f @ A + c == f @ M.T + b``, for folding into a following conv."""
  return m.T.astype(dtype), b.astype(dtype)


def flatten(f):
  """(N, H, W, C) or (H, W, C) features -> (positions, C)."""
  return f.reshape(-1, f.shape[-1])


@functools.partial(jax.jit, static_argnames=("dtype",))
def wct(content_feat, style_feat, alpha=1.0, dtype=jnp.float64):
  """One-shot WCT of NHWC content features with NHWC style features (a convenience)."""
  cs = feature_stats(flatten(content_feat), dtype)
  ss = feature_stats(flatten(style_feat), dtype)
  m, b = wct_matrix(cs, ss, alpha)
  return apply_matrix(content_feat, m, b)
