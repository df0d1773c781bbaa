"""Multi-level universal style transfer: WCT coarse to fine (levels 5 -> 1).

Each level k re-encodes the current image and the style image(s) with encoder k,
applies WCT to relu{k}_1, and decodes with decoder k; the decoded image feeds the
next level (as ``PytorchWCT/WCT.py`` of the official code). The style side
(each style's statistics per level) is computed once per style and reused for
every content (:meth:`Stylizer.style_stats`). A level is three compiled
programs: encode + content statistics and decode, compiled per input shape,
and the WCT matrix from the float64 statistics (see :mod:`cdft.stylize.wct`),
compiled once per model; all of them are kept on disk
(:mod:`cdft.stylize.programs`).

Size bookkeeping follows the official code: floor max-pooling and x2 upsampling
shrink a side that is not a multiple of 2^(k-1) at level k (3000 -> 2992 at
level 5); nothing is resized back.
"""
import dataclasses
import time
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cdft.stylize import programs, wct

DEFAULT_LEVELS = (5, 4, 3, 2, 1)


@dataclasses.dataclass(frozen=True)
class LevelModel:
  """The encoder/decoder pair of one level and their parameters."""
  encoder: nn.Module
  decoder: nn.Module
  encoder_params: dict
  decoder_params: dict


def _content_fns(encoder, decoder, stats_dtype):
  """The three programs of one level: encode + content statistics, WCT matrix, decode.

  Split so that the small shape-independent part (the statistics' eigen-
  decompositions, which dominate the compile time of a small level) compiles
  once per model, not once per image shape.
  """

  def encode(enc_params, img):
    cf = encoder.apply(enc_params, img)
    return cf, tuple(wct.feature_stats(wct.flatten(cf), stats_dtype))

  def matrix(content_stats, style_stats, style_weights, alpha):
    targets = [(style_weights[i], wct.Stats(*s)) for i, s in enumerate(style_stats)]
    return wct.wct_matrix(wct.Stats(*content_stats), targets, alpha)

  def decode(dec_params, cf, m, b):
    # WCT is the affine map f @ M.T + b: folded into the decoder's first conv.
    return decoder.apply(dec_params, cf, input_affine=wct.as_affine(m, b, cf.dtype))

  return encode, matrix, decode


def _style_fn(encoder, stats_dtype):
  def style(enc_params, img):
    return tuple(wct.feature_stats(wct.flatten(encoder.apply(enc_params, img)), stats_dtype))
  return style


def feature_channels(model, k):
  """Channels of level k's features (relu{k}_1): the width of the encoder's last conv."""
  return model.encoder_params["params"][f"conv{k}1"]["kernel"].shape[-1]


def level_output_shape(k, shape):
  """(N, H', W', 3) that level k returns for an (N, H, W, 3) input (floor pooling)."""
  f = 2 ** (k - 1)
  return (shape[0], (shape[1] // f) * f, (shape[2] // f) * f, shape[3])


@dataclasses.dataclass(frozen=True)
class StyleStats:
  """The style side of a cascade, computed once and reused for every content.

  Attributes:
    stats: level -> one ``(mean, cov, count)`` per style (stats dtype).
    weights: (S,) float32 blend weights of the styles.
  """
  stats: dict
  weights: np.ndarray


class Stylizer:
  """Universal style transfer with a set of per-level encoder/decoder pairs.

  Each level runs as three compiled programs (:func:`_content_fns`), launched
  by the host one after the other without waiting: the host reports each
  level as its output is ready, and no program holds a host callback, so all
  of them are kept in the persistent compile cache
  (:mod:`cdft.stylize.programs`). The programs of a new image shape compile
  concurrently on a thread pool, later levels while earlier ones run.

  Args:
    levels: level number -> :class:`LevelModel`.
    stats_dtype: dtype of the WCT statistics and eigendecomposition; default
      float64 on CPU/GPU, float32 on TPU.
  """

  def __init__(self, levels, stats_dtype=None):
    self.levels = dict(levels)
    self.stats_dtype = np.dtype(stats_dtype or wct.stats_dtype_for_backend())

  def _static(self, k):
    m = self.levels[k]
    return (repr(m.encoder), repr(m.decoder), str(self.stats_dtype))

  def _check(self, content, styles, style_weights, levels):
    """Validates a call; returns the style weights (default: equal)."""
    missing = [k for k in levels if k not in self.levels]
    if missing:
      raise ValueError(f"level {missing[0]} is not loaded (have {sorted(self.levels)})")
    for x in (content,) + tuple(styles):
      if x.ndim != 4 or x.shape[0] != 1 or x.shape[-1] != 3:
        raise ValueError(f"images must be (1, H, W, 3), got {tuple(x.shape)}")
    if style_weights is None:
      return [1.0] * len(styles)
    if len(style_weights) != len(styles):
      raise ValueError(f"{len(style_weights)} style weights for {len(styles)} styles")
    return style_weights

  def style_stats(self, styles, levels=DEFAULT_LEVELS, style_weights=None):
    """The statistics of ``styles`` at ``levels``, for :meth:`stylize` (compute once, reuse).

    Args:
      styles: one (h, w, 3) / (1, h, w, 3) style image or a sequence of them.
      levels: the levels the cascade will run.
      style_weights: blend weights of several styles (default equal).
    """
    if isinstance(styles, (np.ndarray, jax.Array)):
      styles = [styles]
    styles = tuple(_batched(s) for s in styles)
    levels = tuple(levels)
    style_weights = self._check(styles[0], styles, style_weights, levels)
    with wct.x64_scope(self.stats_dtype):
      futures = {}
      for k in dict.fromkeys(levels):
        m = self.levels[k]
        for i, s in enumerate(styles):
          futures[k, i] = programs.compile_async(
              f"cascade.style{k}", _style_fn(m.encoder, self.stats_dtype),
              (m.encoder_params, s), self._static(k))
      stats = {k: tuple(futures[k, i].result()(self.levels[k].encoder_params, s)
                        for i, s in enumerate(styles))
               for k in dict.fromkeys(levels)}
    return StyleStats(stats, np.asarray(style_weights, np.float32))

  def _level_programs(self, k, shape, num_styles):
    """Futures of level k's (encode, matrix, decode) programs for an input ``shape``.

    The shapes between the programs are worked out here, not traced: a
    process whose programs are all stored traces nothing.
    """
    m = self.levels[k]
    encode, matrix, decode = _content_fns(m.encoder, m.decoder, self.stats_dtype)
    channels = feature_channels(m, k)
    f = 2 ** (k - 1)
    sdt = jnp.dtype(self.stats_dtype)
    cf = jax.ShapeDtypeStruct((shape[0], shape[1] // f, shape[2] // f, channels), jnp.float32)
    cstats = (jax.ShapeDtypeStruct((channels,), sdt), jax.ShapeDtypeStruct((channels, channels), sdt),
              jax.ShapeDtypeStruct((), sdt))
    weights = jax.ShapeDtypeStruct((num_styles,), jnp.float32)
    alpha = jax.ShapeDtypeStruct((), jnp.float32)
    static = self._static(k)
    image = jax.ShapeDtypeStruct(shape, jnp.float32)
    return (programs.compile_async(f"cascade.encode{k}", encode, (m.encoder_params, image),
                                   static),
            programs.compile_async(f"cascade.matrix{k}", matrix,
                                   (cstats, (cstats,) * num_styles, weights, alpha), static),
            programs.compile_async(f"cascade.decode{k}", decode,
                                   (m.decoder_params, cf, cstats[1], cstats[0]), static))

  def _run_level(self, k, img, style, alpha, futures):
    m = self.levels[k]
    encode, matrix, decode = (f.result() for f in futures)
    cf, cstats = encode(m.encoder_params, img)
    mat, off = matrix(cstats, style.stats[k], style.weights, alpha)
    return decode(m.decoder_params, cf, mat, off)

  def _style(self, styles, levels, style_weights):
    if isinstance(styles, StyleStats):
      missing = [k for k in levels if k not in styles.stats]
      if missing:
        raise ValueError(f"the style statistics lack level {missing[0]}")
      return styles
    return self.style_stats(styles, levels, style_weights)

  def level(self, k, content, styles, alpha=1.0, style_weights=None):
    """One level: encode, WCT, decode.

    Args:
      k: level (1..5); must be one of the loaded levels.
      content: (1, H, W, 3) float32 image (RGB, [0, 1] for the first level).
      styles: sequence of (1, h, w, 3) style images, or their :class:`StyleStats`.
      alpha: style strength in [0, 1].
      style_weights: blend weights of ``styles`` (default equal).

    Returns:
      The decoded (1, H', W', 3) float32 image (not clamped).
    """
    content = _batched(content)
    self._check(content, (), None, (k,))
    style = self._style(styles, (k,), style_weights)
    with wct.x64_scope(self.stats_dtype):
      futures = self._level_programs(k, content.shape, len(style.weights))
      return self._run_level(k, content, style, np.float32(alpha), futures)

  def warm_up(self, shape, levels=DEFAULT_LEVELS, num_styles=1):
    """Starts compiling the cascade's programs for a (1, H, W, 3) content shape; returns futures."""
    futures = []
    with wct.x64_scope(self.stats_dtype):
      for k in levels:
        futures += self._level_programs(k, shape, num_styles)
        shape = level_output_shape(k, shape)
    return futures

  def stylize(self, content, styles, alpha=1.0, levels=DEFAULT_LEVELS, style_weights=None,
              callback: Optional[Callable[[int, float], None]] = None):
    """The cascade over ``levels`` (default 5, 4, 3, 2, 1).

    Args:
      content: (H, W, 3) or (1, H, W, 3) float image in [0, 1].
      styles: one style image or a sequence of them (same layouts), or their
        :class:`StyleStats` (:meth:`style_stats`; reuse them across contents).
      alpha: style strength applied at every level (as the official code).
      levels: the order of levels to run.
      style_weights: blend weights of several styles (ignored with StyleStats).
      callback: called as ``callback(level, seconds)`` as each level finishes
        (seconds since the previous level finished, or since the start).

    Returns:
      (H', W', 3) float32 numpy image, not clamped.
    """
    img = _batched(content)
    levels = tuple(levels)
    self._check(img, (), None, levels)
    style = self._style(styles, levels, style_weights)
    start = time.perf_counter()
    with wct.x64_scope(self.stats_dtype):
      plan, shape = [], img.shape
      for k in levels:  # every level's programs start compiling now, in parallel
        plan.append((k, self._level_programs(k, shape, len(style.weights))))
        shape = level_output_shape(k, shape)
      alpha = np.float32(alpha)
      reporter = _Reporter(callback, start)
      for k, futures in plan:
        img = self._run_level(k, img, style, alpha, futures)  # launched, not waited for
        reporter.add(k, img)
      reporter.report(wait=True)
    return np.asarray(img)[0]  # on the host: no eager device op (compile) per shape


class _Reporter:
  """Reports finished levels in order: ``callback(level, seconds since the previous one)``."""

  def __init__(self, callback, start):
    self.callback = callback
    self.last = start
    self.pending = []  # (level, output) launched, not reported yet

  def add(self, k, out):
    self.pending.append((k, out))
    self.report()

  def report(self, wait=False):
    """Reports the pending levels that are done (all of them, in order, with ``wait``)."""
    while self.pending and (wait or self.pending[0][1].is_ready()):
      k, out = self.pending.pop(0)
      out.block_until_ready()
      now = time.perf_counter()
      if self.callback is not None:
        self.callback(k, now - self.last)
      self.last = now


def _batched(x):
  """(1, H, W, C) float32; numpy stays on the host (no eager device op to compile)."""
  if not isinstance(x, jax.Array):
    x = np.asarray(x, np.float32)
  elif x.dtype != jnp.float32:
    x = x.astype(jnp.float32)
  return x[None] if x.ndim == 3 else x


def preserve_color(content, stylized):
  """Keeps the content's colours: luminance of ``stylized``, chroma of ``content``.

  Both are (H, W, 3) RGB in [0, 1]; ``content`` is cropped to the stylized size
  (the cascade may drop trailing rows/columns). Uses BT.601 YCbCr.
  """
  h, w = stylized.shape[:2]
  content = np.asarray(content, np.float32)[:h, :w]
  stylized = np.clip(np.asarray(stylized, np.float32), 0.0, 1.0)
  to_ycc = np.array([[0.299, 0.587, 0.114],
                     [-0.168736, -0.331264, 0.5],
                     [0.5, -0.418688, -0.081312]], np.float32)
  y = stylized @ to_ycc[0]
  cbcr = content @ to_ycc[1:].T
  ycc = np.concatenate([y[..., None], cbcr], axis=-1)
  return np.clip(ycc @ np.linalg.inv(to_ycc).T, 0.0, 1.0)


def output_size(height, width, levels: Sequence[int] = DEFAULT_LEVELS):
  """The (H, W) the cascade returns for an input of (height, width)."""
  for k in levels:
    f = 2 ** (k - 1)
    height, width = (height // f) * f, (width // f) * f
  return height, width
