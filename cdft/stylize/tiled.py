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
  (:func:`resident_program`): the tiles reuse one set of buffers and the
  features stay inside the program. On CPU this matters: every program
  execution pages in its temporaries afresh, and at 3840x2160 running the
  ~25 tile programs one by one took 1.5x the time of this path;
* a larger image runs tile by tile, reading and writing windows of its
  stores (files when the image is too large for the budget), so memory stays
  flat however large the image.

``stats_mode='thumbnail'`` replaces pass 1 by the statistics of a downsampled
copy of the image (URST's approximation, Chen et al. AAAI 2022), for comparison.
"""
import math
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cdft.models import family
from cdft.stylize import transfer, wct
from cdft.stylize.cascade import DEFAULT_LEVELS, Stylizer
from cdft.stylize.tile_plan import (MIN_TILE, axis_plan, cores_for_budget, encoder_halo,
                                    full_resolution_width, level_halo, tile_steps, windows_1d)
from cdft.stylize.tile_programs import level_programs, resident_program
from cdft.stylize.tile_store import ImageStore, bands, to_device


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
    self.net_width = full_resolution_width(stylizer.levels)  # wider networks: smaller tiles
    if tile is None:  # a budget too small fails here
      cores_for_budget(max_memory, 1, 1, max(stylizer.levels), self.net_width)
    self.tile = tile
    self.max_memory = max_memory
    self.stats_mode = stats_mode
    self.thumbnail_size = thumbnail_size
    self.on_disk = on_disk
    self.temp_dir = temp_dir
    self._channels = {}  # level -> feature channels, for resident_bytes
    self._programs = {
        k: level_programs(m.encoder, m.decoder, stylizer.stats_dtype)
        for k, m in stylizer.levels.items()}

  def cores(self, k, height, width):
    """(row, column) tile cores of level k on a ``height`` x ``width`` image."""
    if self.tile is not None:
      return self.tile, self.tile
    return cores_for_budget(self.max_memory, height, width, k, self.net_width)

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
    ceil = family.ceil_pool(model.encoder)

    def cells(win, n):
      # The core's feature cells; with ceil pooling the last core (its window
      # ends the image) also has the image's last, partial cell, as the whole
      # image has.
      hi = win.w1 - win.w0 if ceil and win.c1 == (n // f) * f else win.c1 - win.w0
      return ((win.c0 - win.w0) // f, -(-hi // f))

    feats = None
    parts = []
    with wct.x64_scope(self.stylizer.stats_dtype):
      for rw in rows:
        for cw in cols:
          window = to_device(store.read_window(rw.w0, rw.w1, cw.w0, cw.w1))
          r, c = cells(rw, store.height), cells(cw, store.width)
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
      f = 2 ** (k - 1)
      if family.ceil_pool(self.stylizer.levels[k].encoder) and (store.height % f or
                                                                store.width % f):
        raise ValueError(
            f"tiling a {store.width}x{store.height} image through an encoder with ceil-mode "
            f"pooling (the AdaIN VGG) needs sides that are multiples of {f}: resize it "
            "(e.g. --content-size a multiple of 8), or stylize it whole")
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
      size_r, core_r, rows = axis_plan(height, tile_r, encoder_halo(k), f, 1, f)
      size_c, core_c, cols = axis_plan(width, tile_c, encoder_halo(k), f, 1, f)
      pass1, steps1 = (size_r, size_c, core_r, core_c, keep), tile_steps(rows, cols)
    else:
      content_stats = self._thumbnail_stats(k, store)  # numpy float64, passed as is
    scale, halo = self._decode_geometry(k, keep)
    (size_r, len_r, rows), (size_c, len_c, cols) = [
        axis_plan(n // scale, tile // scale, halo, f // scale, scale)
        for n, tile in ((height, tile_r), (width, tile_c))]
    pass2 = (size_r, size_c, len_r, len_c, (height // f) * f, (width // f) * f, keep)
    steps2 = tile_steps(rows, cols)
    targets = tuple(self._array_stats(k, s) for s in styles)
    program = resident_program(k, model.encoder, model.decoder, self.stylizer.stats_dtype,
                                pass1, pass2, self.stylizer.method)
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
    m, b = transfer.host_matrix(self.stylizer.method, content_stats, targets, alpha,
                                self.stylizer.stats_dtype)
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
        result = np.asarray(run(to_device(source.read_window(rw.w0, rw.w1, cw.w0, cw.w1))))
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
  for r0, r1 in bands(store.height, factor * 64):
    band = store.read_rows(r0, r1)
    hh = (band.shape[0] // factor) * factor
    ww = (band.shape[1] // factor) * factor
    if hh == 0:
      continue
    pieces.append(band[:hh, :ww].reshape(hh // factor, factor, ww // factor, factor, 3)
                  .mean(axis=(1, 3)))
  return np.concatenate(pieces, 0).astype(np.float32)
