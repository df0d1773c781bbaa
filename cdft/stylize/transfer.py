"""The feature transforms of the stylizers, as one affine map ``f @ M.T + b``.

Both methods turn content statistics and style statistics (``(mean, cov,
count)``, float64, whole-image: exact over tiles) into a C x C matrix ``M``
and an offset ``b``, which the decoder's first convolution absorbs:

* ``'wct'``: whitening and colouring (:func:`cdft.stylize.wct.wct_matrix`);
* ``'adain'``: adaptive instance normalization, as pytorch-AdaIN's
  ``test.py`` (:func:`adain_matrix`): a diagonal ``M``.

So one cascade (:mod:`cdft.stylize.cascade`: buckets, the compile cache, the
style cache) and one tiler (:mod:`cdft.stylize.tiled`) serve both.
"""
import jax.numpy as jnp

from cdft.models import adain
from cdft.stylize import wct

METHODS = ("wct", "adain")


def adain_matrix(content, style, alpha=1.0, rtol=None, xp=jnp):
  """pytorch-AdaIN's feature mix as an affine map: ``out = f @ M.T + b``.

  With ``sigma = sqrt(var + 1e-5)`` (:func:`cdft.models.adain.mean_std`'s;
  the unbiased variance is the diagonal of the covariance), each style gives ``(f - mu_c) / sigma_c * sigma_s + mu_s``;
  several styles are summed with weights normalized to 1 (as ``test.py``
  normalizes ``--style_interpolation_weights``), then blended with the
  content features: ``alpha * mix + (1 - alpha) * f``.

  Args:
    content: :class:`~cdft.stylize.wct.Stats` of the content features.
    style: Stats of one style, or a sequence of ``(weight, Stats)``.
    alpha: content/style trade-off, 1 = full style.
    rtol: unused (the signature of :func:`cdft.stylize.wct.wct_matrix`).
    xp: ``jax.numpy`` (default) or ``numpy``.

  Returns:
    (M (C, C) diagonal, b (C,)) in the statistics dtype.
  """
  del rtol
  c_std = xp.sqrt(xp.diagonal(content.cov) + adain.EPS)
  styles = [(1.0, style)] if isinstance(style, wct.Stats) else list(style)
  total = sum(w for w, _ in styles)
  scale = xp.zeros_like(content.mean)
  offset = xp.zeros_like(content.mean)
  for weight, s in styles:
    gain = xp.sqrt(xp.diagonal(s.cov) + adain.EPS) / c_std
    scale = scale + (weight / total) * gain
    offset = offset + (weight / total) * (s.mean - gain * content.mean)
  return xp.diag(alpha * scale + (1.0 - alpha)), alpha * offset


def matrix_fn(method):
  """The jit-able map of ``method`` ('wct' or 'adain'): ``fn(content, style, alpha, xp=...)``."""
  if method == "wct":
    return wct.wct_matrix
  if method == "adain":
    return adain_matrix
  raise ValueError(f"unknown stylization method {method!r}; choose from {', '.join(METHODS)}")


def host_matrix(method, content, style, alpha=1.0, dtype=None):
  """:func:`matrix_fn` in numpy from statistics anywhere, as :func:`cdft.stylize.wct.host_matrix`."""
  return wct.host_matrix(content, style, alpha, dtype, matrix=matrix_fn(method))
