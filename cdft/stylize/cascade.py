"""Multi-level universal style transfer: WCT coarse to fine (levels 5 -> 1).

Each level k re-encodes the current image and the style image(s) with encoder k,
applies WCT to relu{k}_1, and decodes with decoder k; the decoded image feeds the
next level (as ``PytorchWCT/WCT.py`` of the official code). One jit-compiled
program per level (and per input shape) does all of it; the float64 statistics
live inside that program (see :mod:`cdft.stylize.wct`).

Size bookkeeping follows the official code: floor max-pooling and x2 upsampling
shrink a side that is not a multiple of 2^(k-1) at level k (3000 -> 2992 at
level 5); nothing is resized back.
"""
import contextlib
import dataclasses
import functools
import threading
import time
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cdft.stylize import wct

DEFAULT_LEVELS = (5, 4, 3, 2, 1)


@dataclasses.dataclass(frozen=True)
class LevelModel:
  """The encoder/decoder pair of one level and their parameters."""
  encoder: nn.Module
  decoder: nn.Module
  encoder_params: dict
  decoder_params: dict


def _level_fn(encoder, decoder, stats_dtype):
  """One level as a traceable function: image, styles -> stylized image."""

  def stats(params, img):
    return wct.feature_stats(wct.flatten(encoder.apply(params, img)), stats_dtype)

  def run(enc_params, dec_params, content, styles, style_weights, alpha):
    cf = encoder.apply(enc_params, content)
    cs = wct.feature_stats(wct.flatten(cf), stats_dtype)
    targets = [(style_weights[i], stats(enc_params, s)) for i, s in enumerate(styles)]
    m, b = wct.wct_matrix(cs, targets, alpha)
    # WCT is the affine map f @ M.T + b: folded into the decoder's first conv.
    return decoder.apply(dec_params, cf, input_affine=wct.as_affine(m, b, cf.dtype))

  return run


@functools.lru_cache(maxsize=None)
def _level_program(encoder, decoder, stats_dtype):
  """The jitted function of one level: image, styles -> stylized image.

  Cached per (modules, dtype), so every Stylizer with the same architecture
  shares its compiled programs.
  """
  return jax.jit(_level_fn(encoder, decoder, stats_dtype))


# The progress sink of the program running now (the cascade here, a tiled
# level in cdft.stylize.tiled). Host callbacks run on XLA's threads, so this is
# process-wide: a lock lets one such program run at a time per process (they
# would share the CPU anyway).
_RUN_LOCK = threading.Lock()
_PROGRESS = {"sink": None}


def report_progress(after, *values):
  """Host side of a program's ordered progress callback: ``sink(*values)`` as ints.

  ``after`` is a value of the result being reported, so the callback runs once
  it exists; it is not passed on. Use as
  ``jax.debug.callback(report_progress, x, level, ..., ordered=True)``.
  """
  del after
  sink = _PROGRESS["sink"]
  if sink is not None:
    sink(*(int(v) for v in values))


@contextlib.contextmanager
def progress_to(sink):
  """Routes :func:`report_progress` calls to ``sink`` while a program runs.

  Holds the run lock; on leaving, waits until every callback has run.
  """
  with _RUN_LOCK:
    _PROGRESS["sink"] = sink
    try:
      yield
      jax.effects_barrier()
    finally:
      _PROGRESS["sink"] = None


@functools.lru_cache(maxsize=None)
def _cascade_program(modules, stats_dtype):
  """The whole cascade as one jitted program: image, styles -> stylized image.

  ``modules`` is a tuple of ``(level, encoder, decoder)`` in the order run.
  One program instead of one per level lets XLA place every level's
  temporaries in one buffer that is allocated (and page-faulted in) once per
  cascade rather than once per level: at 2048^2 that is ~1.6 GB of fresh
  memory instead of ~6 GB, a quarter less CPU time. After each level an
  ordered host callback reports it (progress), after that level's output
  exists.
  """
  levels = [(k, _level_fn(enc, dec, stats_dtype)) for k, enc, dec in modules]

  def run(params, content, styles, style_weights, alpha):
    img = content
    for (k, level), (enc_params, dec_params) in zip(levels, params):
      img = level(enc_params, dec_params, img, styles, style_weights, alpha)
      jax.debug.callback(report_progress, img[0, 0, 0, 0], k, ordered=True)
    return img

  return jax.jit(run)


class Stylizer:
  """Universal style transfer with a set of per-level encoder/decoder pairs.

  Args:
    levels: level number -> :class:`LevelModel`.
    stats_dtype: dtype of the WCT statistics and eigendecomposition; default
      float64 on CPU/GPU, float32 on TPU.
  """

  def __init__(self, levels, stats_dtype=None):
    self.levels = dict(levels)
    self.stats_dtype = np.dtype(stats_dtype or wct.stats_dtype_for_backend())
    self._programs = {
        k: _level_program(m.encoder, m.decoder, self.stats_dtype) for k, m in self.levels.items()
    }

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

  def level(self, k, content, styles, alpha=1.0, style_weights=None):
    """One level: encode, WCT, decode.

    Args:
      k: level (1..5); must be one of the loaded levels.
      content: (1, H, W, 3) float32 image (RGB, [0, 1] for the first level).
      styles: sequence of (1, h, w, 3) style images.
      alpha: style strength in [0, 1].
      style_weights: blend weights of ``styles`` (default equal).

    Returns:
      The decoded (1, H', W', 3) float32 image (not clamped).
    """
    styles = tuple(jnp.asarray(s, jnp.float32) for s in styles)
    style_weights = self._check(content, styles, style_weights, (k,))
    model = self.levels[k]
    with wct.x64_scope(self.stats_dtype):
      out = self._programs[k](model.encoder_params, model.decoder_params,
                              jnp.asarray(content, jnp.float32), styles,
                              jnp.asarray(style_weights, jnp.float32), jnp.float32(alpha))
    return out

  def stylize(self, content, styles, alpha=1.0, levels=DEFAULT_LEVELS, style_weights=None,
              callback: Optional[Callable[[int, float], None]] = None):
    """The cascade over ``levels`` (default 5, 4, 3, 2, 1), as one compiled program.

    Args:
      content: (H, W, 3) or (1, H, W, 3) float image in [0, 1].
      styles: one style image or a sequence of them (same layouts).
      alpha: style strength applied at every level (as the official code).
      levels: the order of levels to run.
      style_weights: blend weights of several styles.
      callback: called as ``callback(level, seconds)`` as each level finishes
        (seconds since the previous level finished, or since the start).

    Returns:
      (H', W', 3) float32 numpy image, not clamped.
    """
    if isinstance(styles, (np.ndarray, jax.Array)):
      styles = [styles]
    styles = tuple(_batched(s) for s in styles)
    img = _batched(content)
    levels = tuple(levels)
    style_weights = self._check(img, styles, style_weights, levels)
    program = _cascade_program(
        tuple((k, self.levels[k].encoder, self.levels[k].decoder) for k in levels),
        self.stats_dtype)
    params = tuple((self.levels[k].encoder_params, self.levels[k].decoder_params)
                   for k in levels)
    last = [time.perf_counter()]

    def sink(k):
      now = time.perf_counter()
      if callback is not None:
        callback(k, now - last[0])
      last[0] = now

    with progress_to(sink), wct.x64_scope(self.stats_dtype):
      out = program(params, img, styles, jnp.asarray(style_weights, jnp.float32),
                    jnp.float32(alpha))
      out.block_until_ready()
    return np.asarray(out[0])


def _batched(x):
  x = jnp.asarray(x, jnp.float32)
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
