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

A level's memory grows with the area of its windows, so the budget sets an
area (:func:`window_area_for_budget`), and each level takes the grid with the
fewest balanced tiles whose windows fit it (:func:`cores_for_budget`): an
image that fits one window is not split, a wide one is cut into full-height
strips, and a large one into windows of about the budget's area. The peak
memory is set by the budget, not by the image's size (``tile=`` forces
square tiles instead).

Two ways to run a level, with the same windows and arithmetic:

* an image held in memory, whose copies and kept features take at most a
  quarter of the budget (:meth:`TiledStylizer.resident_bytes`), runs the
  whole level (both passes over every tile, the statistics merge and the
  matrix) as one XLA program that scans the windows
  (:func:`_resident_program`): the tiles reuse one set of buffers and the
  features stay inside the program. On CPU this matters: every program
  execution pages in its temporaries afresh, and at 3840x2160 running the
  ~25 tile programs one by one took 1.5x the time of this path;
* a larger image runs tile by tile, reading and writing windows of its
  stores (files when the image is too large for the budget), so memory stays
  flat however large the image.

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
# measured with the 16x models on CPU, with margin; turns a memory budget into a window area.
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


def window_area_for_budget(budget_bytes):
  """Window pixels (rows x columns, halos included) a memory budget allows."""
  return max(budget_bytes - BASE_BYTES, 0) // BYTES_PER_WINDOW_PIXEL


def _axis_split(n, count, halo, f):
  """(core, longest window) of ``count`` balanced tiles of an ``n``-px axis (:func:`windows_1d`)."""
  n_out = (n // f) * f
  core = _align_up(-(-n_out // count), f)
  if n_out <= core + 2 * halo:
    return core, n
  return core, core + 2 * halo + (n - n_out)


def cores_for_budget(budget_bytes, height, width, stage):
  """Tile cores (rows, columns) of level ``stage`` on a ``height`` x ``width`` image.

  A level's memory grows with the area of its window, not with its shape: the
  budget allows windows of :func:`window_area_for_budget` pixels. Of the grids
  of balanced tiles whose windows (with the level's widest halo) fit that
  area, this takes the one with the fewest tiles (then the least computed
  area): an image that fits one window is not split, and a wide image is cut
  into full-height strips rather than squares.
  """
  area = window_area_for_budget(budget_bytes)
  halo, f = level_halo(stage), 2 ** (stage - 1)
  if (MIN_TILE + 2 * halo) ** 2 > area:
    raise ValueError(f"a memory budget of {budget_bytes / 2**30:.2f} GiB is too small for "
                     f"tiling (needs a {MIN_TILE}-px tile plus {halo}-px halos)")
  best = None
  for rows in range(1, max(height // MIN_TILE, 1) + 1):
    core_r, win_r = _axis_split(height, rows, halo, f)
    if best is not None and rows > best[0]:
      break
    if core_r < MIN_TILE and rows > 1:
      break
    if win_r * min(width, MIN_TILE + 2 * halo) > area:
      continue  # too tall for even the narrowest window
    for cols in range(1, max(width // MIN_TILE, 1) + 1):
      core_c, win_c = _axis_split(width, cols, halo, f)
      if core_c < MIN_TILE and cols > 1:
        break
      if win_r * win_c <= area:
        key = (rows * cols, rows * cols * win_r * win_c, (core_r, core_c))
        best = min(best, key) if best else key
        break
  if best is None:  # (not reached: MIN_TILE windows fit the area)
    raise ValueError(f"no tiling of {width}x{height} fits {budget_bytes} bytes")
  return best[2]


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
  def holding(cls, array):
    """An in-memory store around an (H, W, C) float32 array (not copied)."""
    store = cls.__new__(cls)
    store.height, store.width, store.channels = array.shape
    store._array, store._file = array, None
    return store

  @property
  def in_memory(self):
    return self._array is not None

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
    block = _aligned_empty((r1 - r0, c1 - c0, self.channels))
    np.copyto(block, mapped[r0:r1, c0:c1])
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


def _aligned_empty(shape, dtype=np.float32, alignment=64):
  """An uninitialised array whose data starts on an ``alignment``-byte boundary."""
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  raw = np.empty(nbytes + alignment, np.uint8)
  offset = -raw.ctypes.data % alignment
  return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def _to_device(window):
  """A (1, h, w, C) device array of a window; an aligned contiguous one is not copied on CPU."""
  return jax.device_put(window[None])


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

  def stats(params, img, rows, cols, keep):
    feat = encoder.apply(params, img)
    h, w = feat.shape[1:3]
    r = jnp.arange(h)
    c = jnp.arange(w)
    mask = ((r >= rows[0]) & (r < rows[1]))[:, None] & ((c >= cols[0]) & (c < cols[1]))[None]
    st = wct.feature_stats(wct.flatten(feat), stats_dtype, mask=mask.reshape(-1))
    return (st, feat) if keep else (st, None)  # unkept features are never materialised

  def decode(dec_params, feat, m, b):
    return decoder.apply(dec_params, feat, input_affine=wct.as_affine(m, b, feat.dtype))

  def transform(enc_params, dec_params, img, m, b):
    return decode(dec_params, encoder.apply(enc_params, img), m, b)

  return jax.jit(stats, static_argnums=4), jax.jit(transform), jax.jit(decode)


def _axis_plan(n, tile, halo, f, num=1, den=1):
  """One axis of a level pass as fixed-shape loop steps (for :func:`_resident_program`).

  The windows of :func:`windows_1d` in a source of ``n`` px, all given one
  length ``size`` (the longest; every window still fits: only windows ending
  at the output's end are longer, by the trailing remainder, and the others
  end at least that far before ``n``). The program maps a window to ``num/den``
  output px per source px (decoded pixels per feature cell, features per
  pixel, ...). Each window writes ``length`` output px from ``src`` (in its
  own output) to ``dst``: its core, except that the last, possibly shorter,
  core is widened backwards over pixels its window also computes exactly.

  Returns:
    (size, length, rows) with rows of (start, mask_lo, mask_hi, src, dst):
    ``[mask_lo, mask_hi)`` is the core in window output px (the statistics
    count it once).
  """
  wins = windows_1d(n, tile, halo, f)
  n_out = (n // f) * f
  size = max(w.w1 - w.w0 for w in wins)
  core = max(w.c1 - w.c0 for w in wins)
  rows = []
  for w in wins:
    if w.w0 + size > n:
      raise AssertionError(f"window {w} cannot take {size} px of {n}")
    dst = min(w.c0, n_out - core)
    rows.append((w.w0, (w.c0 - w.w0) * num // den, (w.c1 - w.w0) * num // den,
                 (dst - w.w0) * num // den, dst * num // den))
  return size, core * num // den, rows


def _tile_steps(row_plan, col_plan):
  """The (tiles, 5, 2) int32 loop inputs of every (row, column) window pair."""
  return np.array([[r, c] for r in row_plan for c in col_plan], np.int32).transpose(0, 2, 1)


@functools.lru_cache(maxsize=None)
def _resident_program(level, encoder, decoder, stats_dtype, pass1, pass2):
  """A whole level over the tiles of an image held in memory, as one XLA program.

  Pass 1 (``pass1`` = (window rows, window cols, core rows, core cols, keep),
  or None when the content statistics are given) scans the windows through
  the encoder, returns each core's statistics and, with ``keep``, writes the
  cores' features into one feature map; the statistics are merged, turned with
  the style's into the WCT matrix, and pass 2 (``pass2`` = (window rows,
  window cols, write rows, write cols, output h, output w, from features))
  scans the windows of the features (or re-encodes the image), decodes them
  and writes their cores into the level's output.

  The same windows and arithmetic as the tile-by-tile path, but one program
  execution per level instead of one per tile and pass: XLA reuses one
  window's buffers for the next (no fresh memory per tile), and the features
  never leave the program.
  """

  def encode(params, window):
    return encoder.apply(params, window[None])[0]

  def run(enc_params, dec_params, img, steps1, steps2, content_stats, style_stats,
          style_weights, alpha):
    zero = jnp.int32(0)  # index operands of one type (int64 literals under x64)
    feats = img
    if pass1 is not None:
      size_r, size_c, core_r, core_c, keep = pass1
      feat_shape = jax.eval_shape(encode, enc_params,
                                  jax.ShapeDtypeStruct((size_r, size_c, 3), img.dtype)).shape
      channels = feat_shape[-1]
      f = 2 ** (level - 1)
      init = (jnp.zeros((img.shape[0] // f, img.shape[1] // f, channels), img.dtype)
              if keep else jnp.zeros((), img.dtype))

      def stats_step(acc, step):
        start, lo, hi, src, dst = step[0], step[1], step[2], step[3], step[4]
        feat = encode(enc_params, jax.lax.dynamic_slice(
            img, (start[0], start[1], zero), (size_r, size_c, 3)))
        r = jnp.arange(feat.shape[0])
        c = jnp.arange(feat.shape[1])
        mask = (((r >= lo[0]) & (r < hi[0]))[:, None] & ((c >= lo[1]) & (c < hi[1]))[None])
        st = wct.feature_stats(wct.flatten(feat), stats_dtype, mask=mask.reshape(-1))
        if keep:
          core = jax.lax.dynamic_slice(feat, (src[0], src[1], zero), (core_r, core_c, channels))
          acc = jax.lax.dynamic_update_slice(acc, core, (dst[0], dst[1], zero))
        return acc, st

      feats, parts = jax.lax.scan(stats_step, init, steps1)
      content_stats = wct.merge_stacked_stats(parts)
      if not keep:
        feats = img
    targets = [(style_weights[i], s) for i, s in enumerate(style_stats)]
    m, b = wct.wct_matrix(content_stats, targets, alpha)
    size_r, size_c, len_r, len_c, out_h, out_w, from_feats = pass2

    def decode_step(out, step):
      start, src, dst = step[0], step[3], step[4]
      window = jax.lax.dynamic_slice(feats, (start[0], start[1], zero),
                                     (size_r, size_c, feats.shape[-1]))
      feat = window if from_feats else encode(enc_params, window)
      y = decoder.apply(dec_params, feat[None],
                        input_affine=wct.as_affine(m, b, feat.dtype))[0]
      piece = jax.lax.dynamic_slice(y, (src[0], src[1], zero), (len_r, len_c, 3))
      return jax.lax.dynamic_update_slice(out, piece, (dst[0], dst[1], zero)), None

    out = jnp.zeros((out_h, out_w, 3), img.dtype)
    out, _ = jax.lax.scan(decode_step, out, steps2)
    return out

  return jax.jit(run)


class TiledStylizer:
  """The WCT cascade over tiles (exact, or with thumbnail statistics).

  Args:
    stylizer: a :class:`~cdft.stylize.cascade.Stylizer` (its models and dtype).
    tile: square tile cores of this size in px (a multiple of 16); by default
      each level's tiles come from ``max_memory`` (:func:`cores_for_budget`).
    max_memory: memory budget in bytes for choosing the tiles.
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
    if tile is not None and (tile % 16 or tile < MIN_TILE):
      raise ValueError(f"tile must be a multiple of 16 and at least {MIN_TILE}, got {tile}")
    if tile is None:
      cores_for_budget(max_memory, 1, 1, max(stylizer.levels))  # a budget too small fails here
    self.tile = tile
    self.max_memory = max_memory
    self.stats_mode = stats_mode
    self.thumbnail_size = thumbnail_size
    self.on_disk = on_disk
    self.temp_dir = temp_dir
    self._channels = {}  # level -> feature channels, for resident_bytes
    self._programs = {
        k: _level_programs(m.encoder, m.decoder, stylizer.stats_dtype)
        for k, m in stylizer.levels.items()}

  def cores(self, k, height, width):
    """(row, column) tile cores of level k on a ``height`` x ``width`` image."""
    if self.tile is not None:
      return self.tile, self.tile
    return cores_for_budget(self.max_memory, height, width, k)

  def plan(self, height, width, levels=DEFAULT_LEVELS):
    """Per level: (k, input height, input width, row core, column core, tile rows, tile columns).

    A level's input is the previous level's output (cropped to its pooling grid).
    """
    out = []
    for k in levels:
      f = 2 ** (k - 1)
      core_r, core_c = self.cores(k, height, width)
      out.append((k, height, width, core_r, core_c,
                  len(windows_1d(height, core_r, level_halo(k), f)),
                  len(windows_1d(width, core_c, level_halo(k), f))))
      height, width = (height // f) * f, (width // f) * f
    return out

  def describe(self, height, width, levels=DEFAULT_LEVELS):
    """One line on the tiles of each level, for logs."""
    source = f"tile {self.tile} px" if self.tile else (
        f"tiles for a {self.max_memory / 2**30:.1f} GiB budget")
    grids = ", ".join(f"level {k}: {r}x{c}" for k, _, _, _, _, r, c in self.plan(height, width, levels))
    return f"{source} ({grids} tiles)"

  # -- statistics ---------------------------------------------------------------------------

  def _tiled_stats(self, k, store, halo, keep_features=False):
    """Exact statistics of encoder k's features of a whole stored image.

    With ``keep_features`` also returns the features themselves (an
    :class:`ImageStore` of (H/f, W/f, C)), so pass 2 only has to decode.
    """
    f = 2 ** (k - 1)
    model = self.stylizer.levels[k]
    stats_fn = self._programs[k][0]
    core_r, core_c = self.cores(k, store.height, store.width)
    rows = windows_1d(store.height, core_r, halo, f)
    cols = windows_1d(store.width, core_c, halo, f)
    feats = None
    parts = []
    with wct.x64_scope(self.stylizer.stats_dtype):
      for rw in rows:
        for cw in cols:
          window = _to_device(store.read_window(rw.w0, rw.w1, cw.w0, cw.w1))
          r = ((rw.c0 - rw.w0) // f, (rw.c1 - rw.w0) // f)
          c = ((cw.c0 - cw.w0) // f, (cw.c1 - cw.w0) // f)
          st, feat = stats_fn(model.encoder_params, window, jnp.asarray(r), jnp.asarray(c),
                              keep_features)
          del window
          parts.append(jax.device_get(st))
          if keep_features:
            core = np.asarray(feat)[0, r[0]:r[1], c[0]:c[1]]  # a view: no copy of the features
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
    """One level of the cascade on a stored image; returns the level's output store."""
    if store.in_memory and self.resident_bytes(k, store.height, store.width) <= self.max_memory // 4:
      return self._resident_level(k, store, styles, alpha, weights, progress)
    return self._streamed_level(k, store, styles, alpha, weights, progress)

  def _keeps_features(self, k):
    """Whether pass 1 keeps level k's features for pass 2 to decode.

    Level 1's encoder is a single conv: recomputing it in pass 2 is cheaper
    than keeping its full-resolution 24-channel features.
    """
    return self.stats_mode == "exact" and k >= 2

  def _decode_geometry(self, k, keep):
    """(output px per source px, halo in source px) of pass 2's windows.

    From kept features the decoder alone runs, and it mirrors the encoder;
    from the image, the encoder runs again first.
    """
    f = 2 ** (k - 1)
    return (f, encoder_halo(k) // f) if keep else (1, level_halo(k))

  def resident_bytes(self, k, height, width):
    """What running level k in one program adds to the windows' memory.

    The image in and the level's output (in the program, and on the host),
    float32 RGB, plus the features pass 1 keeps (levels >= 2, exact mode).
    """
    f = 2 ** (k - 1)
    total = 3 * height * width * 3 * 4
    if self._keeps_features(k):
      if k not in self._channels:
        model = self.stylizer.levels[k]
        probe = jax.ShapeDtypeStruct((1, 2 * f, 2 * f, 3), jnp.float32)
        self._channels[k] = jax.eval_shape(model.encoder.apply, model.encoder_params,
                                           probe).shape[-1]
      total += (height // f) * (width // f) * self._channels[k] * 4
    return total

  def _resident_level(self, k, store, styles, alpha, weights, progress):
    """A level of an image held in memory: one program over all its tiles."""
    f = 2 ** (k - 1)
    model = self.stylizer.levels[k]
    keep = self._keeps_features(k)
    height, width = store.height, store.width
    pass1, steps1, content_stats = None, np.zeros((0, 5, 2), np.int32), None
    tile_r, tile_c = self.cores(k, height, width)
    if self.stats_mode == "exact":
      size_r, core_r, rows = _axis_plan(height, tile_r, encoder_halo(k), f, 1, f)
      size_c, core_c, cols = _axis_plan(width, tile_c, encoder_halo(k), f, 1, f)
      pass1, steps1 = (size_r, size_c, core_r, core_c, keep), _tile_steps(rows, cols)
    else:
      content_stats = self._thumbnail_stats(k, store)  # numpy float64, passed as is
    scale, halo = self._decode_geometry(k, keep)
    (size_r, len_r, rows), (size_c, len_c, cols) = [
        _axis_plan(n // scale, tile // scale, halo, f // scale, scale)
        for n, tile in ((height, tile_r), (width, tile_c))]
    pass2 = (size_r, size_c, len_r, len_c, (height // f) * f, (width // f) * f, keep)
    steps2 = _tile_steps(rows, cols)
    targets = tuple(self._array_stats(k, s) for s in styles)
    program = _resident_program(k, model.encoder, model.decoder, self.stylizer.stats_dtype,
                                pass1, pass2)
    total = len(steps2)
    with wct.x64_scope(self.stylizer.stats_dtype):
      out = program(model.encoder_params, model.decoder_params,
                    jnp.asarray(store.read_rows(0, height)), steps1, steps2, content_stats,
                    targets, jnp.asarray(weights, jnp.float32), jnp.float32(alpha))
      out = np.asarray(out)  # a (read-only) view of the program's output, not a copy
    # One program scans every tile: its tiles are reported when it is done (a
    # program that reports from inside holds a host callback, and JAX keeps
    # no such program in its persistent cache).
    if progress is not None:
      progress(k, "decode", total, total)
    return ImageStore.holding(out)

  def _streamed_level(self, k, store, styles, alpha, weights, progress):
    """A level tile by tile, reading and writing windows of its stores."""
    f = 2 ** (k - 1)
    keep = self._keeps_features(k)
    feats = None
    if self.stats_mode == "exact":
      content_stats = self._tiled_stats(k, store, encoder_halo(k), keep_features=keep)
      if keep:
        content_stats, feats = content_stats
    else:
      content_stats = self._thumbnail_stats(k, store)
    targets = [(w, self._array_stats(k, s)) for w, s in zip(weights, styles)]
    m, b = wct.host_matrix(content_stats, targets, alpha, self.stylizer.stats_dtype)
    m = jnp.asarray(m, jnp.float32)
    b = jnp.asarray(b, jnp.float32)

    # Pass 2: decode (from the kept features, or re-encoding) tile by tile.
    height, width = (store.height // f) * f, (store.width // f) * f
    out = ImageStore(height, width, self.use_disk(height, width), self.temp_dir)
    model = self.stylizer.levels[k]
    _, transform, decode = self._programs[k]
    scale, halo = self._decode_geometry(k, keep)
    if keep:
      source = feats
      run = lambda window: decode(model.decoder_params, window, m, b)
    else:
      source = store
      run = lambda window: transform(model.encoder_params, model.decoder_params, window, m, b)
    tile_r, tile_c = self.cores(k, store.height, store.width)
    rows = windows_1d(source.height, tile_r // scale, halo, f // scale)
    cols = windows_1d(source.width, tile_c // scale, halo, f // scale)
    done, total = 0, len(rows) * len(cols)
    for rw in rows:
      for cw in cols:
        result = np.asarray(run(_to_device(source.read_window(rw.w0, rw.w1, cw.w0, cw.w1))))
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


