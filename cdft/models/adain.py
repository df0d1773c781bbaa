"""Adaptive instance normalization (Huang & Belongie, ICCV 2017), as pytorch-AdaIN computes it.

The functional piece between an encoder's relu4_1 and a decoder, used by the
AdaIN losses, the AdaIN training tasks and the stylizer. Features are NHWC.

* :func:`mean_std`: per sample and channel over H*W, the mean and
  ``sqrt(unbiased variance + eps)`` (divisor HW - 1, eps inside the root:
  pytorch-AdaIN's ``calc_mean_std``); a dead channel's std is sqrt(1e-5).
* :func:`transform`: ``(c - mean_c) / std_c * std_s + mean_s`` from given
  statistics (how exact tiling applies statistics accumulated over tiles).
* :func:`adain`: both at once.
* :func:`mix`: ``test.py``'s feature mix: AdaIN of one content with k styles,
  their weighted sum, then ``alpha * feat + (1 - alpha) * content``.
"""
import jax.numpy as jnp

EPS = 1e-5


def mean_std(feat, eps=EPS):
  """Per (sample, channel) mean and std over H*W of an (N, H, W, C) map; each (N, 1, 1, C)."""
  h, w = feat.shape[1:3]
  if h * w < 2:
    raise ValueError(f"AdaIN statistics need at least 2 positions, got a {h}x{w} map")
  mean = jnp.mean(feat, axis=(1, 2), keepdims=True)
  var = jnp.sum(jnp.square(feat - mean), axis=(1, 2), keepdims=True) / (h * w - 1)
  return mean, jnp.sqrt(var + eps)


def transform(content, content_stats, style_stats):
  """``content`` renormalized from its ``(mean, std)`` to the style's ``(mean, std)``."""
  (c_mean, c_std), (s_mean, s_std) = content_stats, style_stats
  return (content - c_mean) / c_std * s_std + s_mean


def adain(content, style, eps=EPS):
  """AdaIN(content, style) of two feature maps (pairwise over the batch, or broadcast)."""
  return transform(content, mean_std(content, eps), mean_std(style, eps))


def mix(content, style_stats, alpha=1.0, weights=None):
  """The features pytorch-AdaIN's ``style_transfer`` decodes.

  Args:
    content: (1, H, W, C) relu4_1 of the content.
    style_stats: ``(mean, std)`` of k styles, each (k, 1, 1, C).
    alpha: content-style trade-off: ``alpha * AdaIN + (1 - alpha) * content``.
    weights: k interpolation weights (required when k > 1), summed as given
      (pytorch-AdaIN does not normalize them).

  Returns:
    (1, H, W, C).
  """
  k = style_stats[0].shape[0]
  if weights is None:
    if k != 1:
      raise ValueError(f"{k} styles need {k} interpolation weights")
    weights = (1.0,)
  if len(weights) != k:
    raise ValueError(f"{len(weights)} interpolation weights for {k} styles")
  stylized = transform(content, mean_std(content), style_stats)  # (k, H, W, C)
  feat = jnp.zeros_like(content)
  for i, w in enumerate(weights):
    feat = feat + w * stylized[i:i + 1]
  return feat * alpha + content * (1 - alpha)
