"""Multi-level universal style transfer: WCT coarse to fine (levels 5 -> 1).

Each level k re-encodes the current image and the style image(s) with encoder k,
applies WCT to relu{k}_1, and decodes with decoder k; the decoded image feeds the
next level (as ``PytorchWCT/WCT.py`` of the official code). The style side
(each style's statistics per level) is computed once per style and reused for
every content (:meth:`Stylizer.style_stats`). The content side is n + 1
programs compiled per input shape (the first encoder, then per level its
decoder fused with the next level's encoder and content statistics) and one
WCT-matrix program per feature width from the float64 statistics (see
:mod:`cdft.stylize.wct`), shared by every shape; all of them are kept on disk
(:mod:`cdft.stylize.programs`).

Size bookkeeping follows the official code: floor max-pooling and x2 upsampling
shrink a side that is not a multiple of 2^(k-1) at level k (3000 -> 2992 at
level 5); nothing is resized back.
"""
import dataclasses
import hashlib
import time
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cdft.io import files
from cdft.stylize import programs, wct

DEFAULT_LEVELS = (5, 4, 3, 2, 1)


@dataclasses.dataclass(frozen=True)
class LevelModel:
  """The encoder/decoder pair of one level and their parameters."""
  encoder: nn.Module
  decoder: nn.Module
  encoder_params: dict
  decoder_params: dict


def _encode_fn(encoder, stats_dtype):
  """Encode + content statistics: image -> (features, (mean, cov, count))."""

  def encode(enc_params, img):
    cf = encoder.apply(enc_params, img)
    return cf, tuple(wct.feature_stats(wct.flatten(cf), stats_dtype))

  return encode


def _matrix(content_stats, style_stats, style_weights, alpha):
  """The WCT matrix of a level from content and style statistics (shape-independent)."""
  targets = [(style_weights[i], wct.Stats(*s)) for i, s in enumerate(style_stats)]
  return wct.wct_matrix(wct.Stats(*content_stats), targets, alpha)


def _link_fn(decoder, encoder, stats_dtype):
  """Decode a level, then (unless ``encoder`` is None) encode its output for the next level.

  One program where the cascade goes from one level to the next, so a
  cascade of n levels is n + 1 programs per image shape (and one WCT-matrix
  program per feature width, shared by every shape).
  """
  encode = None if encoder is None else _encode_fn(encoder, stats_dtype)

  def link(dec_params, cf, m, b, enc_params):
    # WCT is the affine map f @ M.T + b: folded into the decoder's first conv.
    img = decoder.apply(dec_params, cf, input_affine=wct.as_affine(m, b, cf.dtype))
    if encode is None:
      return img
    return (img,) + encode(enc_params, img)

  return link


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

  A cascade of n levels runs as n + 1 programs compiled per image shape (the
  first encoder, then one program per level that decodes it and encodes the
  result for the next level, :func:`_link_fn`) and one WCT-matrix program per
  feature width shared by every shape, launched by the host one after the
  other without waiting: the host reports each level as its output is ready,
  and no program holds a host callback, so all of them are kept in the
  persistent compile cache (:mod:`cdft.stylize.programs`). The programs of a new image shape compile
  concurrently on a thread pool, later levels while earlier ones run.

  Args:
    levels: level number -> :class:`LevelModel`.
    stats_dtype: dtype of the WCT statistics and eigendecomposition; default
      float64 on CPU/GPU, float32 on TPU.
  """

  def __init__(self, levels, stats_dtype=None):
    self.levels = dict(levels)
    self.stats_dtype = np.dtype(stats_dtype or wct.stats_dtype_for_backend())
    self._param_digests = {}  # level -> hash of its encoder (the style cache's key)
    self._transposed = None  # the parameters for portrait images, made when first needed

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

    With the compile cache on (:func:`cdft.stylize.programs.enable_compile_cache`)
    they are also kept in ``<cdft cache>/styles``, keyed by the style's pixels,
    the level's encoder (definition and weights) and the code, so the next
    process with the same style image reads them instead of encoding it again.

    Args:
      styles: one (h, w, 3) / (1, h, w, 3) style image or a sequence of them.
      levels: the levels the cascade will run.
      style_weights: blend weights of several styles (default equal).
    """
    if isinstance(styles, (np.ndarray, jax.Array)):
      styles = [styles]
    styles = tuple(_batched(s) for s in styles)
    levels = tuple(dict.fromkeys(levels))
    style_weights = self._check(styles[0], styles, style_weights, levels)
    stats = {k: [None] * len(styles) for k in levels}
    paths = [self._style_path(s, levels) for s in styles]
    with wct.x64_scope(self.stats_dtype):
      futures = {}
      for i, s in enumerate(styles):
        stored = self._stored_style(paths[i], levels)
        for k in levels:
          if stored is not None:
            stats[k][i] = tuple(stored[k])  # numpy: no eager device op to compile
          else:
            m = self.levels[k]
            futures[k, i] = programs.compile_async(
                f"cascade.style{k}", _style_fn(m.encoder, self.stats_dtype),
                (m.encoder_params, s), self._static(k))
      for (k, i), future in futures.items():
        stats[k][i] = future.result()(self.levels[k].encoder_params, styles[i])
      for i, path in enumerate(paths):
        if any((k, i) in futures for k in levels):
          self._store_style(path, {k: stats[k][i] for k in levels})
    return StyleStats({k: tuple(v) for k, v in stats.items()},
                      np.asarray(style_weights, np.float32))

  def _style_path(self, style, levels):
    """Where the statistics of ``style`` at ``levels`` are kept (None: no cache)."""
    root = programs.cache_root()
    if root is None:
      return None
    h = hashlib.sha256(programs.fingerprint().encode())
    h.update(repr((tuple(style.shape), str(self.stats_dtype), levels)).encode())
    h.update(np.ascontiguousarray(np.asarray(style, np.float32)).tobytes())
    for k in levels:
      if k not in self._param_digests:
        d = hashlib.sha256(repr(self._static(k)).encode())
        for leaf in jax.tree.leaves(jax.device_get(self.levels[k].encoder_params)):
          d.update(np.ascontiguousarray(leaf).tobytes())
        self._param_digests[k] = d.hexdigest()
      h.update(self._param_digests[k].encode())
    return root / "styles" / f"{h.hexdigest()[:32]}.npz"

  @staticmethod
  def _stored_style(path, levels):
    """``{level: (mean, cov, count)}`` kept at ``path`` for a style seen before, or None."""
    if path is None or not path.exists():
      return None
    try:
      with np.load(path) as z:
        return {k: (z[f"mean{k}"], z[f"cov{k}"], z[f"count{k}"]) for k in levels}
    except Exception:  # pylint: disable=broad-except
      path.unlink(missing_ok=True)  # a damaged entry is computed again, never trusted
      return None

  @staticmethod
  def _store_style(path, stats):
    if path is None:
      return
    arrays = {}
    for k, (mean, cov, count) in stats.items():
      arrays.update({f"mean{k}": np.asarray(mean), f"cov{k}": np.asarray(cov),
                     f"count{k}": np.asarray(count)})
    try:
      with files.atomic_open(path) as f:
        np.savez(f, **arrays)
    except OSError:
      pass  # a read-only cache: the statistics are just computed again next time

  # The shapes between the programs are worked out, not traced: a process
  # whose programs are all stored traces nothing.

  def _feature_spec(self, k, shape):
    """Level k's features (relu{k}_1) for an input ``shape``."""
    f = 2 ** (k - 1)
    return jax.ShapeDtypeStruct(
        (shape[0], shape[1] // f, shape[2] // f, feature_channels(self.levels[k], k)),
        jnp.float32)

  def _stats_spec(self, k):
    """Level k's feature statistics ``(mean, cov, count)``."""
    c = feature_channels(self.levels[k], k)
    sdt = jnp.dtype(self.stats_dtype)
    return (jax.ShapeDtypeStruct((c,), sdt), jax.ShapeDtypeStruct((c, c), sdt),
            jax.ShapeDtypeStruct((), sdt))

  def _encode_program(self, k, shape):
    m = self.levels[k]
    return programs.compile_async(f"cascade.encode{k}", _encode_fn(m.encoder, self.stats_dtype),
                                  (m.encoder_params, jax.ShapeDtypeStruct(shape, jnp.float32)),
                                  self._static(k))

  def _matrix_program(self, k, num_styles):
    stats = self._stats_spec(k)
    return programs.compile_async(
        "cascade.matrix", _matrix,  # one program for the levels of one width
        (stats, (stats,) * num_styles, jax.ShapeDtypeStruct((num_styles,), jnp.float32),
         jax.ShapeDtypeStruct((), jnp.float32)), (str(self.stats_dtype),))

  def _link_program(self, k, nxt, shape):
    """Decode level k (input ``shape``), then encode for level ``nxt`` (None: the last)."""
    dec = self.levels[k]
    enc = None if nxt is None else self.levels[nxt]
    mean, cov, _ = self._stats_spec(k)  # the WCT map (M, b) has the shapes of (cov, mean)
    return programs.compile_async(
        f"cascade.link{k}to{nxt}",
        _link_fn(dec.decoder, None if enc is None else enc.encoder, self.stats_dtype),
        (dec.decoder_params, self._feature_spec(k, shape), cov, mean,
         None if enc is None else enc.encoder_params),
        (self._static(k), None if nxt is None else self._static(nxt)))

  def _plan(self, shape, levels, num_styles):
    """Futures of a cascade's programs: the first encode, then (matrix, link) per level."""
    steps = []
    first = self._encode_program(levels[0], shape)
    for i, k in enumerate(levels):
      nxt = levels[i + 1] if i + 1 < len(levels) else None
      steps.append((k, self._matrix_program(k, num_styles), self._link_program(k, nxt, shape)))
      shape = level_output_shape(k, shape)
    return first, steps

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
      first, [(_, matrix, link)] = self._plan(content.shape, (k,), len(style.weights))
      m = self.levels[k]
      cf, cstats = first.result()(m.encoder_params, content)
      mat, off = matrix.result()(cstats, style.stats[k], style.weights, np.float32(alpha))
      return link.result()(m.decoder_params, cf, mat, off, None)

  def warm_up(self, shape, levels=DEFAULT_LEVELS, num_styles=1):
    """Starts compiling the cascade's programs for a (1, H, W, 3) content shape; returns futures."""
    with wct.x64_scope(self.stats_dtype):
      first, steps = self._plan(_landscape(tuple(shape)), tuple(levels), num_styles)
    return [first] + [f for _, matrix, link in steps for f in (matrix, link)]

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
    # A portrait image runs through the programs of its landscape shape: the
    # cascade of the transposed image with transposed kernels is the transposed
    # cascade (reflection pads, 2x2 pools, upsampling and the statistics are
    # symmetric in the two axes), so both orientations share one compile.
    portrait = _landscape(img.shape) != tuple(img.shape)
    if portrait:
      img = np.ascontiguousarray(np.swapaxes(np.asarray(img), 1, 2))
    params = self._transposed_params() if portrait else {
        k: (m.encoder_params, m.decoder_params) for k, m in self.levels.items()}
    with wct.x64_scope(self.stats_dtype):
      # Every program starts compiling now (those of a seen shape load from the cache).
      first, steps = self._plan(img.shape, levels, len(style.weights))
      alpha = np.float32(alpha)
      reporter = _Reporter(callback, start)
      cf, cstats = first.result()(params[levels[0]][0], img)
      for i, (k, matrix, link) in enumerate(steps):  # launched, not waited for
        mat, off = matrix.result()(cstats, style.stats[k], style.weights, alpha)
        nxt = steps[i + 1][0] if i + 1 < len(steps) else None
        out = link.result()(params[k][1], cf, mat, off, None if nxt is None else params[nxt][0])
        img, cf, cstats = (out, None, None) if nxt is None else out
        # Level k's output exists once the program that also encodes it for
        # the next level is done: its line comes that much later.
        reporter.add(k, img)
      reporter.report(wait=True)
    out = np.asarray(img)[0]  # on the host: no eager device op (compile) per shape
    return np.ascontiguousarray(np.swapaxes(out, 0, 1)) if portrait else out

  def _transposed_params(self):
    """Every level's (encoder, decoder) parameters with the kernels' two spatial axes swapped."""
    if self._transposed is None:
      def swap(x):
        x = np.asarray(x)
        return jax.device_put(np.ascontiguousarray(np.swapaxes(x, 0, 1)) if x.ndim == 4 else x)
      self._transposed = {
          k: jax.tree.map(swap, jax.device_get((m.encoder_params, m.decoder_params)))
          for k, m in self.levels.items()}
    return self._transposed


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


def _landscape(shape):
  """The (N, H, W, C) shape whose programs run an image of ``shape``: portraits transposed."""
  n, h, w, c = shape
  return (n, w, h, c) if h > w else (n, h, w, c)


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
