"""The XLA programs of a tiled level.

Per tile: the masked statistics and the decode; for an image held in memory,
the whole level as one scan over its windows (:func:`resident_program`).
"""
import functools

import jax
import jax.numpy as jnp

from cdft.stylize import transfer, wct


@functools.lru_cache(maxsize=None)
def level_programs(encoder, decoder, stats_dtype):
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


@functools.lru_cache(maxsize=None)
def resident_program(level, encoder, decoder, stats_dtype, pass1, pass2, method="wct"):
  """A whole level over the tiles of an image held in memory, as one XLA program.

  Pass 1 (``pass1`` = (window rows, window cols, core rows, core cols, keep),
  or None when the content statistics are given) scans the windows through
  the encoder, returns each core's statistics and, with ``keep``, writes the
  cores' features into one feature map; the statistics are merged, turned with
  the style's into the level's map (WCT or AdaIN: ``method``, see
  :mod:`cdft.stylize.transfer`), and pass 2 (``pass2`` = (window rows,
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
    m, b = transfer.matrix_fn(method)(content_stats, targets, alpha)
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
