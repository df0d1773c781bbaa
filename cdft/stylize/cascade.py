"""Multi-level universal style transfer: WCT coarse to fine (levels 5 -> 1).

Each level k re-encodes the current image and the style image(s) with encoder k,
applies WCT to relu{k}_1, and decodes with decoder k; the decoded image feeds the
next level (as ``PytorchWCT/WCT.py`` of the official code). The style side
(each style's statistics per level) is computed once per style and reused for
every content (:meth:`Stylizer.style_stats`). The content side is n + 1
programs compiled per input shape (the first encoder, then per level its
decoder fused with the next level's encoder and content statistics), kept on
disk (:mod:`cdft.stylize.programs`); between them the host turns the float64
statistics into each level's WCT matrix (:func:`cdft.stylize.wct.host_matrix`:
a C x C eigenproblem, milliseconds in numpy, nothing to compile).

Images of up to :data:`BUCKET_MAX_PIXELS` run inside the canvas of a small
ladder of shapes (:func:`bucket_shape`), their region kept exact at every
layer, so a few compiled cascades serve every such size.

Size bookkeeping follows the official code: floor max-pooling and x2 upsampling
shrink a side that is not a multiple of 2^(k-1) at level k (3000 -> 2992 at
level 5); nothing is resized back.
"""
import dataclasses
import hashlib
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cdft.io import files
from cdft.models import family
from cdft.models.family import LevelModel  # noqa: F401  (re-exported as cascade.LevelModel)
from cdft.stylize import programs, transfer, wct

DEFAULT_LEVELS = (5, 4, 3, 2, 1)


# Images run inside a canvas from this ladder of sides (multiples of 16, steps
# of at most 1.5x) when the canvas has at most BUCKET_MAX_PIXELS: a handful of
# compiled cascades then serve every size, with the image's region kept exact
# (see bucket_shape). Larger images, where the compute dwarfs a compile, run
# at their own shape.
BUCKET_SIDES = (64, 96, 128, 192, 256, 320, 384, 512, 640, 768, 1024, 1280, 1536, 2048)
BUCKET_MAX_PIXELS = 1024 * 1024


def bucket_shape(shape, levels=DEFAULT_LEVELS):
  """The (1, H, W, 3) canvas an image of ``shape`` runs in, or None (its own shape).

  The image fills the canvas's top-left region; every layer keeps the region
  exact (the reflection border is taken at the region's edge, the WCT
  statistics count the region only, the pooled and upsampled extents are
  tracked), so the result equals the cascade at the image's own shape. A
  region needs at least 2 pixels per side at the deepest level.
  """
  n, h, w, c = shape
  if min(h, w) < 2 ** max(levels) or h > BUCKET_SIDES[-1] or w > BUCKET_SIDES[-1]:
    return None
  hc = next(s for s in BUCKET_SIDES if s >= h)
  wc = next(s for s in BUCKET_SIDES if s >= w)
  return (n, hc, wc, c) if hc * wc <= BUCKET_MAX_PIXELS else None


def _shift(extent, k, ceil=False):
  """``extent // 2^(k-1)`` (rounded up with ``ceil``: ceil-mode pooling) of a
  non-negative traced int32 (a shift: no division sign logic)."""
  if ceil:
    extent = extent + (2 ** (k - 1) - 1)
  return jnp.right_shift(extent, k - 1)


def _region_mask(shape, extent):
  """(H * W,) bool: the positions of an (N=1, H, W, C) canvas inside ``extent``.

  (:func:`cdft.models.layers.zero_outside` builds the same mask inside the
  encoder; this module does not import :mod:`~cdft.models.layers`, which
  imports Flax: a warm process runs without it.)
  """
  rows = jax.lax.iota(jnp.int32, shape[1]) < extent[0]
  cols = jax.lax.iota(jnp.int32, shape[2]) < extent[1]
  return (rows[:, None] & cols[None, :]).reshape(-1)


def _encode_fn(encoder, stats_dtype):
  """Encode + content statistics: image -> (features, (mean, cov, count)).

  With ``extent`` (the image's (h, w) in a canvas) the features and the
  statistics are those of the region.
  """

  def encode(enc_params, img, extent=None):
    cf = encoder.apply(enc_params, img, extent=extent)
    mask = None if extent is None else _region_mask(
        cf.shape, _shift(extent, encoder.stage, family.ceil_pool(encoder)))
    return cf, tuple(wct.feature_stats(wct.flatten(cf), stats_dtype, mask=mask))

  return encode


def _link_fn(decoder, encoder, stats_dtype, ceil=False):
  """Decode a level, then (unless ``encoder`` is None) encode its output for the next level.

  One program where the cascade goes from one level to the next, so a
  cascade of n levels is n + 1 programs per image shape (or bucket).
  ``ceil``: the level's encoder pools in ceil mode (its features' region
  rounds up).
  """
  encode = None if encoder is None else _encode_fn(encoder, stats_dtype)

  def link(dec_params, cf, m, b, enc_params, extent=None):
    # WCT is the affine map f @ M.T + b: folded into the decoder's first conv.
    # ``extent``: the region of the level's input image in a canvas (or None).
    k = decoder.stage
    feat = None if extent is None else _shift(extent, k, ceil)
    img = decoder.apply(dec_params, cf, input_affine=wct.as_affine(m, b, cf.dtype), extent=feat)
    if encode is None:
      return img
    out = None if extent is None else jnp.left_shift(feat, k - 1)
    return (img,) + encode(enc_params, img, out)

  return link


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

  A cascade of n levels runs as n + 1 programs compiled per image shape, or
  per bucket of shapes (:func:`bucket_shape`): the first encoder, then one
  program per level that decodes it and encodes the result for the next level
  (:func:`_link_fn`). Between two programs the host computes the level's WCT
  matrix from the content statistics (numpy) and reports each level as its
  output is ready; no program holds a host callback, so all of them are kept
  in the persistent compile cache (:mod:`cdft.stylize.programs`). The programs
  of a new shape compile concurrently on a thread pool, later levels while
  earlier ones run.

  The feature transform is WCT, or AdaIN (``method='adain'``, with the one
  level 4 of an AdaIN encoder/decoder pair): both are an affine map of the
  features computed on the host from the same statistics
  (:mod:`cdft.stylize.transfer`), so both run on the same programs.

  A level whose encoder pools in ceil mode (pytorch-AdaIN's VGG) decodes a
  side that is not a multiple of 2^(k-1) to the next multiple (100 -> 104 at
  relu4_1, as the official code); the output is that image's top-left crop at
  the input's size (only a last level may pool in ceil mode).

  Args:
    levels: level number -> :class:`LevelModel`.
    stats_dtype: dtype of the WCT statistics and eigendecomposition; default
      float64 on CPU/GPU, float32 on TPU.
    method: ``'wct'`` or ``'adain'``.
  """

  def __init__(self, levels, stats_dtype=None, method="wct"):
    self.levels = dict(levels)
    self.stats_dtype = np.dtype(stats_dtype or wct.stats_dtype_for_backend())
    transfer.matrix_fn(method)  # an unknown method fails here
    self.method = method
    self._param_digests = {}  # level -> hash of its encoder (the style cache's key)
    self._transposed = None  # the parameters for portrait images, made when first needed

  def _static(self, k):
    m = self.levels[k]
    return (repr(m.encoder), repr(m.decoder), str(self.stats_dtype))

  def _ceil(self, k):
    return family.ceil_pool(self.levels[k].encoder)

  def _region_after(self, k, shape):
    """The region level k returns for an input region ``shape`` (ceil: cropped to it)."""
    return tuple(shape) if self._ceil(k) else level_output_shape(k, shape)

  def _check(self, content, styles, style_weights, levels):
    """Validates a call; returns the style weights (default: equal)."""
    missing = [k for k in levels if k not in self.levels]
    if missing:
      raise ValueError(f"level {missing[0]} is not loaded (have {sorted(self.levels)})")
    if any(self._ceil(k) for k in levels[:-1]):
      raise ValueError("an encoder with ceil-mode pooling can only run as the last level")
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
        if stored is not None:
          for k in levels:
            stats[k][i] = tuple(stored[k])  # numpy: no eager device op to compile
          continue
        # The content's encoder programs, in the style's bucket: one compile
        # serves the styles of every shape of the bucket.
        img, params, canvas, region = self._placed(s, levels)
        for k in levels:
          futures[k, i] = (self._encode_program(k, img.shape, canvas is not None),
                           img, params[k][0], _extent(region, canvas))
      for (k, i), (future, img, params, extent) in futures.items():
        _, stats[k][i] = future.result()(params, img, extent)
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
    if self._ceil(k):
      h, w = -(-shape[1] // f), -(-shape[2] // f)
    else:
      h, w = shape[1] // f, shape[2] // f
    return jax.ShapeDtypeStruct((shape[0], h, w, feature_channels(self.levels[k], k)),
                                jnp.float32)

  def _stats_spec(self, k):
    """Level k's feature statistics ``(mean, cov, count)``."""
    c = feature_channels(self.levels[k], k)
    sdt = jnp.dtype(self.stats_dtype)
    return (jax.ShapeDtypeStruct((c,), sdt), jax.ShapeDtypeStruct((c, c), sdt),
            jax.ShapeDtypeStruct((), sdt))

  def _encode_program(self, k, shape, canvas):
    m = self.levels[k]
    return programs.compile_async(f"cascade.encode{k}", _encode_fn(m.encoder, self.stats_dtype),
                                  (m.encoder_params, jax.ShapeDtypeStruct(shape, jnp.float32),
                                   _EXTENT if canvas else None),
                                  self._static(k))

  def _link_program(self, k, nxt, shape, canvas):
    """Decode level k (input ``shape``), then encode for level ``nxt`` (None: the last)."""
    dec = self.levels[k]
    enc = None if nxt is None else self.levels[nxt]
    mean, cov, _ = self._stats_spec(k)  # the WCT map (M, b) has the shapes of (cov, mean)
    return programs.compile_async(
        f"cascade.link{k}to{nxt}",
        _link_fn(dec.decoder, None if enc is None else enc.encoder, self.stats_dtype,
                 self._ceil(k)),
        (dec.decoder_params, self._feature_spec(k, shape), cov, mean,
         None if enc is None else enc.encoder_params, _EXTENT if canvas else None),
        (self._static(k), None if nxt is None else self._static(nxt)))

  def _plan(self, shape, levels, canvas=False):
    """Futures of a cascade's programs: the first encode, then one link per level.

    With ``canvas``, ``shape`` is a canvas (:func:`bucket_shape`) and every
    program takes the region of its level's input as a last argument.
    """
    steps = []
    first = self._encode_program(levels[0], shape, canvas)
    for i, k in enumerate(levels):
      nxt = levels[i + 1] if i + 1 < len(levels) else None
      steps.append((k, self._link_program(k, nxt, shape, canvas)))
      shape = level_output_shape(k, shape)
    return first, steps

  def _matrix(self, k, content_stats, style, alpha):
    """Level k's WCT map (M, b), on the host: a C x C eigenproblem, nothing to compile."""
    targets = list(zip(style.weights, style.stats[k]))
    return transfer.host_matrix(self.method, content_stats, targets, alpha, self.stats_dtype)

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
      first, [(_, link)] = self._plan(content.shape, (k,))
      m = self.levels[k]
      cf, cstats = first.result()(m.encoder_params, content, None)
      mat, off = self._matrix(k, cstats, style, alpha)
      return link.result()(m.decoder_params, cf, mat, off, None, None)

  def warm_up(self, shape, levels=DEFAULT_LEVELS):
    """Starts compiling the cascade's programs for a (1, H, W, 3) content shape; returns futures."""
    levels = tuple(levels)
    region, canvas = _program_shape(shape, levels)
    with wct.x64_scope(self.stats_dtype):
      first, steps = self._plan(canvas or region, levels, canvas is not None)
    return [first] + [link for _, link in steps]

  def warm_up_style(self, shape, levels=DEFAULT_LEVELS):
    """Starts compiling the style-statistics programs for a (1, H, W, 3) style; returns futures."""
    region, canvas = _program_shape(shape, tuple(levels))
    with wct.x64_scope(self.stats_dtype):
      return [self._encode_program(k, canvas or region, canvas is not None)
              for k in dict.fromkeys(levels)]

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
    portrait = _landscape(img.shape) != tuple(img.shape)  # runs transposed (see _placed)
    img, params, canvas, region = self._placed(img, levels)
    with wct.x64_scope(self.stats_dtype):
      # Every program starts compiling now (those of a seen shape load from the cache).
      first, steps = self._plan(img.shape, levels, canvas is not None)
      reporter = _Reporter(callback, start)
      extent = _extent(region, canvas)
      cf, cstats = first.result()(params[levels[0]][0], img, extent)
      for i, (k, link) in enumerate(steps):
        mat, off = self._matrix(k, cstats, style, alpha)  # waits for the statistics
        nxt = steps[i + 1][0] if i + 1 < len(steps) else None
        out = link.result()(params[k][1], cf, mat, off, None if nxt is None else params[nxt][0],
                            extent)
        img, cf, cstats = (out, None, None) if nxt is None else out
        region = self._region_after(k, region)
        extent = _extent(region, canvas)
        # Level k's output exists once the program that also encodes it for
        # the next level is done: its line comes that much later.
        reporter.add(k, img)
      reporter.report(wait=True)
    # On the host: no eager device op (compile) per shape.
    out = np.asarray(img)[0, :region[1], :region[2]]
    return np.ascontiguousarray(np.swapaxes(out, 0, 1)) if portrait else out

  def _placed(self, img, levels):
    """How an image runs: ``(input, {level: (encoder, decoder) params}, canvas, region)``.

    A portrait runs through the programs of its landscape shape: the cascade
    of the transposed image with transposed kernels is the transposed cascade
    (reflection pads, 2x2 pools, upsampling and the statistics are symmetric
    in the two axes), so both orientations share one compile. An image of a
    bucket (:func:`bucket_shape`) is placed in its canvas's top-left region;
    ``canvas`` is None otherwise. ``region`` is the (landscape) image's shape.
    """
    region, canvas = _program_shape(img.shape, levels)
    portrait = region != tuple(img.shape)
    if portrait:
      img = np.ascontiguousarray(np.swapaxes(np.asarray(img), 1, 2))
    params = self._transposed_params() if portrait else {
        k: (m.encoder_params, m.decoder_params) for k, m in self.levels.items()}
    if canvas is not None:
      padded = np.zeros(canvas, np.float32)
      padded[:, :region[1], :region[2]] = np.asarray(img)
      img = padded
    return img, params, canvas, region

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


_EXTENT = jax.ShapeDtypeStruct((2,), jnp.int32)  # a region's (h, w) in a canvas


def _extent(shape, canvas):
  """The region (h, w) of an (N, h, w, C) image in a canvas, as the programs take it."""
  return None if canvas is None else np.array(shape[1:3], np.int32)


def common_buckets(shorter_side, levels=DEFAULT_LEVELS, max_aspect=2.5):
  """The landscape canvases of photos with this shorter side and aspect ratios 1..max_aspect.

  What ``cdft-stylize --warmup`` compiles ahead: every photo resized to
  ``shorter_side`` (portraits run transposed) falls into one of them.
  """
  shape = bucket_shape((1, shorter_side, shorter_side, 3), levels)
  if shape is None:
    return []
  height = shape[1]
  return [(1, height, w, 3) for w in BUCKET_SIDES
          if height <= w <= max(height, max_aspect * shorter_side)
          and bucket_shape((1, height, w, 3), levels) == (1, height, w, 3)]


def _program_shape(shape, levels):
  """``(region, canvas)`` of an image of ``shape``: its landscape shape, and the
  canvas of its bucket (None: it runs at that shape); see :meth:`Stylizer._placed`."""
  region = _landscape(tuple(shape))
  return region, bucket_shape(region, levels)


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
