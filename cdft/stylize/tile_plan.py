"""Planning exact tiles: halos, windows and the tile grid a memory budget allows.

The geometry of :mod:`cdft.stylize.tiled`: a level's windows (a tile's core
plus a halo of the receptive field, aligned to the level's pooling factor),
their fixed-shape loop plans, and how a memory budget becomes a window area and
a grid of balanced tiles.
"""
import dataclasses
import os

import numpy as np

from cdft.models import family


# Peak bytes of a level program per window pixel (float32 activations of the
# widest full-resolution layers, their reflection-pad strips and XLA buffers),
# measured with the 16x models on CPU, with margin; turns a memory budget into a window area.
BYTES_PER_WINDOW_PIXEL = 420
# The full-resolution width (conv1_x filters) of the networks it was measured with
# (the 16x students: 16, and 24 at stage 1). Wider networks (the VGG-19's 64) scale it
# (bytes_per_window_pixel): the VGG AdaIN pair peaked at ~3.2x the 16x pair's bytes per
# pixel (benchmarks/stylize_adain_cpu.json), under this 64/24 = 2.7x scaling of the margin.
CALIBRATION_WIDTH = 24
# Memory kept outside the windows: the interpreter, jax, weights and row bands.
BASE_BYTES = 700 << 20


MIN_TILE = 64


def _conv_extent(stage):
  """Pixels one side of a stage-k encoder's (or decoder's) output depends on."""
  ext = 0
  for block in range(1, stage + 1):
    depth = 1 if block == stage else family.BLOCK_DEPTHS[block - 1]
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


def bytes_per_window_pixel(width=CALIBRATION_WIDTH):
  """Peak bytes per window pixel of networks whose full-resolution layers have ``width``
  filters (:data:`BYTES_PER_WINDOW_PIXEL`, scaled up for wider networks)."""
  return int(BYTES_PER_WINDOW_PIXEL * max(1.0, width / CALIBRATION_WIDTH))


def window_area_for_budget(budget_bytes, width=CALIBRATION_WIDTH):
  """Window pixels (rows x columns, halos included) a memory budget allows (``width``: of
  the networks' full-resolution layers, :func:`bytes_per_window_pixel`)."""
  return max(budget_bytes - BASE_BYTES, 0) // bytes_per_window_pixel(width)


def _axis_split(n, count, halo, f):
  """(core, longest window) of ``count`` balanced tiles of an ``n``-px axis (:func:`windows_1d`)."""
  n_out = (n // f) * f
  core = _align_up(-(-n_out // count), f)
  if n_out <= core + 2 * halo:
    return core, n
  return core, core + 2 * halo + (n - n_out)


def cores_for_budget(budget_bytes, height, width, stage, net_width=CALIBRATION_WIDTH):
  """Tile cores (rows, columns) of level ``stage`` on a ``height`` x ``width`` image.

  A level's memory grows with the area of its window, not with its shape: the
  budget allows windows of :func:`window_area_for_budget` pixels. Of the grids
  of balanced tiles whose windows (with the level's widest halo) fit that
  area, this takes the one with the fewest tiles (then the least computed
  area): an image that fits one window is not split, and a wide image is cut
  into full-height strips rather than squares. ``net_width``: the networks'
  full-resolution width (:func:`bytes_per_window_pixel`).
  """
  area = window_area_for_budget(budget_bytes, net_width)
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


def whole_image_bytes(height, width, net_width=CALIBRATION_WIDTH):
  """Rough peak memory of the untiled cascade on an image of this size (``net_width``: the
  networks' full-resolution width, :func:`bytes_per_window_pixel`)."""
  return BASE_BYTES + bytes_per_window_pixel(net_width) * height * width


def full_resolution_width(levels):
  """The widest first-block convolution (conv11 / conv12) of ``{level: LevelModel}``'s encoders."""
  widths = [CALIBRATION_WIDTH]
  for model in levels.values():
    params = model.encoder_params["params"]
    widths += [params[name]["kernel"].shape[-1] for name in ("conv11", "conv12") if name in params]
  return max(widths)


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


def axis_plan(n, tile, halo, f, num=1, den=1):
  """One axis of a level pass as fixed-shape loop steps (for :func:`resident_program`).

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


def tile_steps(row_plan, col_plan):
  """The (tiles, 5, 2) int32 loop inputs of every (row, column) window pair."""
  return np.array([[r, c] for r in row_plan for c in col_plan], np.int32).transpose(0, 2, 1)


def tile_boundaries(n, tile, halo, f=1):
  """Positions where one tile's core ends and the next begins along an axis of n px."""
  return [w.c0 for w in windows_1d(n, tile, halo, f)[1:]]
