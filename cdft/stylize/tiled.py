"""Exact WCT over tiles: any image size, in memory that does not grow with the image.

Per level k (with ``f = 2^(k-1)``, the level's pooling factor):

* pass 1 streams windows of the current image through encoder k and accumulates
  the content mean and covariance of the *whole* image exactly (float64 per
  tile, merged with Chan's update); each window is a tile's core plus a halo
  at least the encoder's receptive field, so the core's features equal the
  whole-image features;
* the style statistics come from the style image (tiled the same way when it is
  larger than a window), and give the level's C x C WCT matrix;
* pass 2 streams windows with a halo of the encoder's plus the decoder's
  receptive field, applies the matrix as a 1x1 map, decodes, and writes the
  window's core into the level's output, which feeds the next level.

All windows of a level have one shape (border windows are shifted inside the
image), so each level compiles once. Tiles, halos and the image are aligned to
``f``, so pooling grids match the whole-image computation. The image between
levels lives in a :class:`ImageStore`: in memory for small images, else in a
raw float32 file read and written in row bands.

``stats_mode='thumbnail'`` replaces pass 1 by the statistics of a downsampled
copy of the image (URST's approximation, Chen et al. AAAI 2022), for comparison.
"""
import dataclasses
import functools
import math
import os
import tempfile
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cdft.models import vgg
from cdft.stylize import wct
from cdft.stylize.cascade import DEFAULT_LEVELS, Stylizer

# Peak bytes of a level program per window pixel (float32 activations of the
# widest full-resolution layers, their reflection-pad strips and XLA buffers),
# measured with the 16x models on CPU; used to turn a memory budget into a tile.
BYTES_PER_WINDOW_PIXEL = 420
# Memory kept outside the windows: the interpreter, jax, weights and row bands.
BASE_BYTES = 700 << 20
MIN_TILE = 64


def _conv_extent(stage):
  """Pixels one side of a stage-k encoder's (or decoder's) output depends on."""
  ext = 0
  for block in range(1, stage + 1):
    depth = 1 if block == stage else vgg.BLOCK_DEPTHS[block - 1]
    ext += depth * 2 ** (block - 1)
  return ext


def _align_up(x, f):
  return -(-x // f) * f


def encoder_halo(stage):
  """Context (px per side) that makes a core's relu{k}_1 features exact."""
  f = 2 ** (stage - 1)
  return _align_up(_conv_extent(stage) + f, f)


def level_halo(stage):
  """Context (px per side) that makes a core's decoded pixels exact."""
  f = 2 ** (stage - 1)
  return _align_up(2 * _conv_extent(stage) + f, f)


def parse_bytes(text):
  """'4G', '512M', '1.5GiB', '2000000' -> bytes."""
  t = str(text).strip().upper().replace("IB", "").replace("B", "")
  units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
  try:
    if t and t[-1] in units:
      return int(float(t[:-1]) * units[t[-1]])
    return int(float(t))
  except ValueError:
    raise ValueError(f"not a memory size: {text!r} (use e.g. 4G or 512M)") from None


def tile_for_budget(budget_bytes, stage=5):
  """The largest tile core (px, a multiple of 16) whose window fits the budget."""
  free = max(budget_bytes - BASE_BYTES, 0)
  window = int(math.sqrt(free / BYTES_PER_WINDOW_PIXEL))
  core = (window - 2 * level_halo(stage)) // 16 * 16
  if core < MIN_TILE:
    raise ValueError(f"a memory budget of {budget_bytes / 2**30:.2f} GiB is too small for "
                     f"tiling (needs a {MIN_TILE}-px tile plus {level_halo(stage)}-px halos)")
  return core


def default_memory_budget():
  """Half of the machine's physical memory."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
  except (ValueError, OSError, AttributeError):
    return 4 << 30


def whole_image_bytes(height, width):
  """Rough peak memory of the untiled cascade on an image of this size."""
  return BASE_BYTES + BYTES_PER_WINDOW_PIXEL * height * width


class ImageStore:
  """A float32 (H, W, C) image or feature map, in memory or in a raw file read by row bands."""

  def __init__(self, height, width, on_disk=False, folder=None, channels=3):
    self.height, self.width, self.channels = height, width, channels
    self._array = None
    self._file = None
    if on_disk:
      fd, name = tempfile.mkstemp(prefix="cdft-level-", suffix=".f32", dir=folder)
      self._file = os.fdopen(fd, "w+b")
      os.unlink(name)  # removed by the OS when closed, even if the run is killed
      self._file.truncate(height * width * channels * 4)
    else:
      self._array = np.zeros((height, width, channels), np.float32)

  @classmethod
  def from_array(cls, image, on_disk=False, folder=None):
    """A store holding ``image`` (float in [0, 1], or uint8 converted band by band)."""
    store = cls(image.shape[0], image.shape[1], on_disk, folder)
    for r0, r1 in _bands(image.shape[0], 512):
      rows = image[r0:r1]
      if rows.dtype == np.uint8:
        rows = rows.astype(np.float32) / np.float32(255.0)
      store.write_rows(r0, np.asarray(rows, np.float32))
    return store

  def read_rows(self, r0, r1):
    """Rows [r0, r1) as a (r1 - r0, W, 3) array."""
    if self._array is not None:
      return self._array[r0:r1]
    self._file.seek(r0 * self.width * self.channels * 4)
    data = np.fromfile(self._file, np.float32, (r1 - r0) * self.width * self.channels)
    return data.reshape(r1 - r0, self.width, self.channels)

  def write_rows(self, r0, rows):
    if self._array is not None:
      self._array[r0:r0 + rows.shape[0], :rows.shape[1]] = rows
      return
    if rows.shape[1] != self.width:
      raise ValueError("on-disk stores are written in full rows")
    self._file.seek(r0 * self.width * self.channels * 4)
    np.ascontiguousarray(rows, np.float32).tofile(self._file)

  def _map(self):
    return np.memmap(self._file, np.float32, "r+", shape=(self.height, self.width, self.channels))

  def read_window(self, r0, r1, c0, c1):
    """The block [r0, r1) x [c0, c1); on disk only its pages are touched (flat memory)."""
    if self._array is not None:
      return self._array[r0:r1, c0:c1]
    mapped = self._map()
    block = np.array(mapped[r0:r1, c0:c1])
    del mapped  # unmapped: the pages leave this process's resident set
    return block

  def write_window(self, r0, c0, block):
    if self._array is not None:
      self._array[r0:r0 + block.shape[0], c0:c0 + block.shape[1]] = block
      return
    mapped = self._map()
    mapped[r0:r0 + block.shape[0], c0:c0 + block.shape[1]] = block
    mapped.flush()
    del mapped

  def to_array(self):
    return self.read_rows(0, self.height).copy()

  def to_uint8(self, band_rows=512):
    """The image clamped and rounded to uint8, converted band by band."""
    out = np.empty((self.height, self.width, 3), np.uint8)
    for r0, r1 in _bands(self.height, band_rows):
      rows = np.nan_to_num(self.read_rows(r0, r1), nan=0.0)
      out[r0:r1] = np.floor(np.clip(rows, 0.0, 1.0) * 255.0 + 0.5)
    return out

  def close(self):
    if self._file is not None:
      self._file.close()


def _bands(n, size):
  return [(a, min(a + size, n)) for a in range(0, n, size)]


@dataclasses.dataclass(frozen=True)
class Window:
  """One tile along one axis: its core [c0, c1) and the window [w0, w1) it is computed in."""
  c0: int
  c1: int
  w0: int
  w1: int


def windows_1d(n, core, halo, f=1):
  """Tiles of one axis of ``n`` px for a level with pooling factor ``f``.

  The level's output covers ``n_out = (n // f) * f`` px; the cores tile it.
  Windows are ``core + 2 halo`` px, shifted to stay inside the image, and a
  window that reaches ``n_out`` also takes the last ``n - n_out`` px, which the
  whole-image encoder sees too (floor pooling drops them only after the
  convolutions used them). So an axis has at most two window lengths.
  """
  n_out = (n // f) * f
  if n_out <= core + 2 * halo:
    return [Window(0, n_out, 0, n)]
  count = -(-n_out // core)  # balanced: equal cores, no nearly empty last tile
  core = _align_up(-(-n_out // count), f)
  size = core + 2 * halo
  out = []
  for c0 in range(0, n_out, core):
    c1 = min(c0 + core, n_out)
    w0 = min(max(c0 - halo, 0), n_out - size)
    w1 = n if w0 + size == n_out else w0 + size
    out.append(Window(c0, c1, w0, w1))
  return out


@functools.lru_cache(maxsize=None)
def _level_programs(encoder, decoder, stats_dtype):
  """(masked stats of the encoder output, enc -> matrix -> dec) for one level."""

  def stats(params, img, rows, cols):
    feat = encoder.apply(params, img)
    h, w = feat.shape[1:3]
    r = jnp.arange(h)
    c = jnp.arange(w)
    mask = ((r >= rows[0]) & (r < rows[1]))[:, None] & ((c >= cols[0]) & (c < cols[1]))[None]
    return wct.feature_stats(wct.flatten(feat), stats_dtype, mask=mask.reshape(-1)), feat

  def decode(dec_params, feat, m, b):
    return decoder.apply(dec_params, feat, input_affine=wct.as_affine(m, b, feat.dtype))

  def transform(enc_params, dec_params, img, m, b):
    return decode(dec_params, encoder.apply(enc_params, img), m, b)

  return jax.jit(stats), jax.jit(transform), jax.jit(decode)


class TiledStylizer:
  """The WCT cascade over tiles (exact, or with thumbnail statistics).

  Args:
    stylizer: a :class:`~cdft.stylize.cascade.Stylizer` (its models and dtype).
    tile: tile core size in px (a multiple of 16); default from ``max_memory``.
    max_memory: memory budget in bytes for choosing the tile.
    stats_mode: ``'exact'`` or ``'thumbnail'``.
    thumbnail_size: longer side of the thumbnail in thumbnail mode.
    on_disk: keep the image between levels in a temporary file (default: when
      it is larger than 64 MP-ish of the budget).
  """

  def __init__(self, stylizer: Stylizer, tile=None, max_memory=4 << 30, stats_mode="exact",
               thumbnail_size=1024, on_disk=None, temp_dir=None):
    if stats_mode not in ("exact", "thumbnail"):
      raise ValueError(f"stats_mode must be 'exact' or 'thumbnail', got {stats_mode!r}")
    self.stylizer = stylizer
    self.tile = tile or tile_for_budget(max_memory)
    if self.tile % 16 or self.tile < MIN_TILE:
      raise ValueError(f"tile must be a multiple of 16 and at least {MIN_TILE}, got {self.tile}")
    self.max_memory = max_memory
    self.stats_mode = stats_mode
    self.thumbnail_size = thumbnail_size
    self.on_disk = on_disk
    self.temp_dir = temp_dir
    self._programs = {
        k: _level_programs(m.encoder, m.decoder, stylizer.stats_dtype)
        for k, m in stylizer.levels.items()}

  # -- statistics ---------------------------------------------------------------------------

  def _tiled_stats(self, k, store, halo, keep_features=False):
    """Exact statistics of encoder k's features of a whole stored image.

    With ``keep_features`` also returns the features themselves (an
    :class:`ImageStore` of (H/f, W/f, C)), so pass 2 only has to decode.
    """
    f = 2 ** (k - 1)
    model = self.stylizer.levels[k]
    stats_fn = self._programs[k][0]
    rows = windows_1d(store.height, self.tile, halo, f)
    cols = windows_1d(store.width, self.tile, halo, f)
    feats = None
    parts = []
    with wct.x64_scope(self.stylizer.stats_dtype):
      for rw in rows:
        for cw in cols:
          window = jnp.asarray(store.read_window(rw.w0, rw.w1, cw.w0, cw.w1)[None])
          r = ((rw.c0 - rw.w0) // f, (rw.c1 - rw.w0) // f)
          c = ((cw.c0 - cw.w0) // f, (cw.c1 - cw.w0) // f)
          st, feat = stats_fn(model.encoder_params, window, jnp.asarray(r), jnp.asarray(c))
          parts.append(jax.device_get(st))
          if keep_features:
            core = np.asarray(feat[0, r[0]:r[1], c[0]:c[1]])
            if feats is None:
              feats = ImageStore(store.height // f, store.width // f,
                                 self.use_disk(store.height, store.width, core.shape[-1]),
                                 self.temp_dir, channels=core.shape[-1])
            feats.write_window(rw.c0 // f, cw.c0 // f, core)
    stats = wct.merge_stats(parts)
    return (stats, feats) if keep_features else stats

  def _thumbnail_stats(self, k, store):
    image = store.to_array() if store.height * store.width <= 16 << 20 else None
    if image is None:  # downsample band by band through PIL (keeps memory flat)
      image = _downsample_store(store, self.thumbnail_size)
    else:
      image = _resize_longer(image, self.thumbnail_size)
    return self._array_stats(k, image)

  def _array_stats(self, k, image):
    return self._tiled_stats(k, ImageStore.from_array(image), encoder_halo(k))

  # -- the cascade --------------------------------------------------------------------------

  def stylize(self, content, styles, alpha=1.0, levels=DEFAULT_LEVELS, style_weights=None,
              callback: Optional[Callable[[int, float], None]] = None, progress=None):
    """Stylizes ``content`` (an (H, W, 3) array or an :class:`ImageStore`).

    Args:
      content: the content image in [0, 1].
      styles: one (h, w, 3) style image or a list of them.
      alpha, levels, style_weights: as :meth:`Stylizer.stylize`.
      callback: ``callback(level, seconds)`` after each level.
      progress: ``progress(level, pass_name, done, total)`` per tile.

    Returns:
      An :class:`ImageStore` with the (H', W', 3) result (``.to_array()``).
    """
    if isinstance(styles, np.ndarray) and styles.ndim == 3:
      styles = [styles]
    styles = [np.asarray(s, np.float32) for s in styles]
    weights = style_weights or [1.0] * len(styles)
    store = content if isinstance(content, ImageStore) else None
    if store is None:
      content = np.asarray(content)
      store = ImageStore.from_array(content, self.use_disk(*content.shape[:2]), self.temp_dir)
    for k in levels:
      t0 = time.perf_counter()
      store = self.level(k, store, styles, alpha, weights, progress)
      if callback is not None:
        callback(k, time.perf_counter() - t0)
    return store

  def use_disk(self, height, width, channels=3):
    """Whether a level's image (or features of ``channels`` per pooled cell) go to a file."""
    if self.on_disk is not None:
      return self.on_disk
    return height * width * 4 * max(channels, 9) > self.max_memory // 4

  def level(self, k, store, styles, alpha, weights, progress=None):
    f = 2 ** (k - 1)
    # Pass 1. Level 1's encoder is a single conv: recomputing it in pass 2 is
    # cheaper than keeping its full-resolution 24-channel features.
    keep = self.stats_mode == "exact" and k >= 2
    feats = None
    if self.stats_mode == "exact":
      content_stats = self._tiled_stats(k, store, encoder_halo(k), keep_features=keep)
      if keep:
        content_stats, feats = content_stats
    else:
      content_stats = self._thumbnail_stats(k, store)
    targets = [(w, self._array_stats(k, s)) for w, s in zip(weights, styles)]
    with wct.x64_scope(self.stylizer.stats_dtype):
      m, b = jax.device_get(wct.wct_matrix(
          jax.tree.map(jnp.asarray, content_stats),
          [(w, jax.tree.map(jnp.asarray, s)) for w, s in targets], alpha))
    m = jnp.asarray(m, jnp.float32)
    b = jnp.asarray(b, jnp.float32)

    # Pass 2: decode (from the kept features, or re-encoding) tile by tile.
    height, width = (store.height // f) * f, (store.width // f) * f
    out = ImageStore(height, width, self.use_disk(height, width), self.temp_dir)
    model = self.stylizer.levels[k]
    _, transform, decode = self._programs[k]
    if feats is not None:
      source, scale, halo = feats, f, encoder_halo(k) // f  # the decoder mirrors the encoder
      run = lambda window: decode(model.decoder_params, window, m, b)
    else:
      source, scale, halo = store, 1, level_halo(k)
      run = lambda window: transform(model.encoder_params, model.decoder_params, window, m, b)
    rows = windows_1d(source.height, self.tile // scale, halo, f // scale)
    cols = windows_1d(source.width, self.tile // scale, halo, f // scale)
    done, total = 0, len(rows) * len(cols)
    for rw in rows:
      for cw in cols:
        window = source.read_window(rw.w0, rw.w1, cw.w0, cw.w1)
        result = np.asarray(run(jnp.asarray(window[None])))
        out.write_window(rw.c0 * scale, cw.c0 * scale, result[
            0, (rw.c0 - rw.w0) * scale:(rw.c1 - rw.w0) * scale,
            (cw.c0 - cw.w0) * scale:(cw.c1 - cw.w0) * scale])
        done += 1
        if progress is not None:
          progress(k, "decode", done, total)
    store.close()
    if feats is not None:
      feats.close()
    return out


def _resize_longer(image, size):
  h, w = image.shape[:2]
  scale = size / max(h, w)
  if scale >= 1:
    return image
  nh, nw = max(16, round(h * scale)), max(16, round(w * scale))
  chans = [np.asarray(Image.fromarray(image[..., c]).resize((nw, nh), Image.BILINEAR))
           for c in range(3)]
  return np.stack(chans, -1)


def _downsample_store(store, size):
  """A thumbnail of a stored image with longer side ``size``, read in row bands."""
  factor = max(1, math.ceil(max(store.height, store.width) / size))
  pieces = []
  for r0, r1 in _bands(store.height, factor * 64):
    band = store.read_rows(r0, r1)
    hh = (band.shape[0] // factor) * factor
    ww = (band.shape[1] // factor) * factor
    if hh == 0:
      continue
    pieces.append(band[:hh, :ww].reshape(hh // factor, factor, ww // factor, factor, 3)
                  .mean(axis=(1, 3)))
  return np.concatenate(pieces, 0).astype(np.float32)


def psnr(a, b):
  """PSNR (dB, peak 1) of two images after clamping to [0, 1]."""
  a = np.clip(np.asarray(a, np.float64), 0, 1)
  b = np.clip(np.asarray(b, np.float64), 0, 1)
  mse = np.mean((a - b) ** 2)
  return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def seam_ratio(image, boundaries_rows, boundaries_cols):
  """Mean |gradient| across tile boundaries over the mean |gradient| elsewhere."""
  img = np.asarray(image, np.float64)
  gy = np.abs(np.diff(img, axis=0)).mean(axis=(1, 2))  # gy[i]: between rows i and i+1
  gx = np.abs(np.diff(img, axis=1)).mean(axis=(0, 2))
  rows = [r - 1 for r in boundaries_rows if 0 < r < img.shape[0]]
  cols = [c - 1 for c in boundaries_cols if 0 < c < img.shape[1]]
  at = np.concatenate([gy[rows], gx[cols]])
  mask_y = np.ones_like(gy, bool)
  mask_y[rows] = False
  mask_x = np.ones_like(gx, bool)
  mask_x[cols] = False
  away = np.concatenate([gy[mask_y], gx[mask_x]])
  return float(at.mean() / away.mean())


def tile_boundaries(n, tile, halo, f=1):
  """Positions where one tile's core ends and the next begins along an axis of n px."""
  return [w.c0 for w in windows_1d(n, tile, halo, f)[1:]]


