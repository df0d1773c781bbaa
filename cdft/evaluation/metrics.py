"""Style-transfer metrics as pure ``jnp`` functions (NHWC, batch first).

* :func:`gram`: per-image Gram matrix ``F Fᵀ / (C·H·W)`` of a feature map.
* :func:`style_distance` / :func:`style_distances`: the paper's Eq. 7,
  ``D_k = ‖G(F_k(stylized)) − G(F_k(style))‖_F`` at relu1_1 ... relu5_1 of a
  teacher VGG (Table 2 of CD).
* :func:`content_loss`: MSE between the teacher's relu4_1 (by default) of the
  stylized and the content image.
* :func:`ssim`: the structural similarity of Wang et al. (2004).

**Gram normalisation.** The official helper (``model_cd.py`` ``gram_matrix``)
divides the batched ``F Fᵀ`` by ``N·C·H·W``; for one image (N = 1, how the paper
measured Table 2) that is ``C·H·W``, which is what :func:`gram` divides by, per
image, so a batch gives each image's own Gram matrix. With features of mean
activation ~1 (a normalized VGG) the entries are O(1) whatever the image size,
and the distances of different layers stay on comparable scales. The script
behind Table 2 is not released, so its absolute numbers may use another
normalisation (the spec notes this); compare models under one teacher and one
normalisation only.

Everything is jit-friendly: shapes decide the code path, values never do.
"""
import functools

import math

import jax
import jax.numpy as jnp
import numpy as np

from cdft.errors import CdftError, ImageError

__all__ = ["LAYER_NAMES", "gram", "style_distance", "teacher_features", "style_distances",
           "content_loss", "gaussian_window", "ssim", "crop_to", "pair_metrics"]

# The teacher layers of the style distance (Table 2's Conv1..Conv5).
LAYER_NAMES = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")

_HIGHEST = jax.lax.Precision.HIGHEST


def _nhwc(x, what):
  x = jnp.asarray(x)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4:
    raise CdftError(f"{what}: expected (N, H, W, C) or (H, W, C), got shape {x.shape}")
  return x


def gram(features):
  """Per-image Gram matrices ``F Fᵀ / (C·H·W)``.

  Args:
    features: (N, H, W, C) or (H, W, C) feature maps.

  Returns:
    (N, C, C) float32.
  """
  f = _nhwc(features, "gram").astype(jnp.float32)
  _, h, w, c = f.shape
  g = jnp.einsum("nhwc,nhwd->ncd", f, f, precision=_HIGHEST)
  return g / (c * h * w)


def style_distance(features, style_features):
  """Eq. 7 at one layer: ``‖G(features) − G(style_features)‖_F`` per image.

  The two maps may differ in size (a Gram matrix is C x C); the batch sizes
  broadcast (e.g. N stylized images against one style).

  Returns:
    (N,) float32.
  """
  a, b = gram(features), gram(style_features)
  if a.shape[-1] != b.shape[-1]:
    raise CdftError(f"style_distance: {a.shape[-1]} vs {b.shape[-1]} channels")
  return jnp.sqrt(jnp.sum(jnp.square(a - b), axis=(-2, -1)))


def teacher_features(encoder, params, images):
  """relu1_1 ... relu{k}_1 of a teacher encoder (``vgg.Encoder``, stage k) for RGB [0, 1] images."""
  return encoder.apply(params, _nhwc(images, "images").astype(jnp.float32), return_all=True)


def style_distances(encoder, params, stylized, style):
  """D_1 ... D_k (relu1_1 ... relu{k}_1 of the teacher) of stylized images against a style.

  Args:
    encoder: the teacher, a ``vgg.Encoder`` of stage k (k = 5 for Table 2).
    params: its ``{'params': ...}``.
    stylized: (N, H, W, 3) RGB in [0, 1].
    style: (1 or N, h, w, 3) RGB in [0, 1].

  Returns:
    (N, k) float32.
  """
  fs = teacher_features(encoder, params, stylized)
  ft = teacher_features(encoder, params, style)
  return jnp.stack([style_distance(a, b) for a, b in zip(fs, ft)], axis=-1)


def _check_layer(encoder, layer):
  if not 1 <= layer <= encoder.stage:
    raise CdftError(f"content layer relu{layer}_1 is not in the stage-{encoder.stage} teacher")


def crop_to(image, height, width):
  """The top-left ``height`` x ``width`` of an NHWC image (the WCT cascade drops the
  trailing rows/columns a side loses to pooling, so this aligns a content image
  with its stylization)."""
  image = _nhwc(image, "image")
  if image.shape[1] < height or image.shape[2] < width:
    raise ImageError(f"image of {image.shape[2]}x{image.shape[1]} px cannot be cropped to "
                     f"{width}x{height} px")
  return image[:, :height, :width]


def content_loss(encoder, params, stylized, content, layer=4):
  """Mean squared difference of the teacher's relu{layer}_1 of stylized and content images.

  ``content`` is cropped (top-left) to the stylized size first.

  Returns:
    (N,) float32.
  """
  _check_layer(encoder, layer)
  stylized = _nhwc(stylized, "stylized")
  content = crop_to(content, stylized.shape[1], stylized.shape[2])
  a = teacher_features(encoder, params, stylized)[layer - 1]
  b = teacher_features(encoder, params, content)[layer - 1]
  return jnp.mean(jnp.square(a - b), axis=(1, 2, 3))


@functools.lru_cache(maxsize=None)
def gaussian_window(size=11, sigma=1.5):
  """The normalized 1-D Gaussian of :func:`ssim` (its 2-D window is the outer product)."""
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-x * x / (2.0 * sigma * sigma))
  return g / g.sum()


def _blur_valid(x, window):
  """Separable 'valid' Gaussian filter of every channel of an NHWC array."""
  n, h, w, c = x.shape
  planes = jnp.moveaxis(x, -1, 1).reshape(n * c, h, w, 1)
  k = jnp.asarray(window, jnp.float32)
  dn = ("NHWC", "HWIO", "NHWC")
  planes = jax.lax.conv_general_dilated(planes, k.reshape(-1, 1, 1, 1), (1, 1), "VALID",
                                        dimension_numbers=dn, precision=_HIGHEST)
  planes = jax.lax.conv_general_dilated(planes, k.reshape(1, -1, 1, 1), (1, 1), "VALID",
                                        dimension_numbers=dn, precision=_HIGHEST)
  return jnp.moveaxis(planes.reshape(n, c, *planes.shape[1:3]), 1, -1)


def ssim(a, b, data_range=1.0, window_size=11, sigma=1.5, k1=0.01, k2=0.03):
  """Structural similarity (Wang, Bovik, Sheikh & Simoncelli 2004), per image.

  The standard form: an 11x11 Gaussian window with sigma 1.5 (normalized),
  ``C1 = (k1 L)²``, ``C2 = (k2 L)²``, local statistics over the window with the
  population (biased) variance, the SSIM map over the 'valid' positions (no
  padding, as the authors' ``ssim_index.m``), averaged over positions and then
  over channels (RGB here, not luminance).

  Args:
    a, b: (N, H, W, C) or (H, W, C) images of the same shape, values in
      [0, ``data_range``] (RGB in [0, 1] by default).
    data_range: L, the dynamic range of the values.
    window_size, sigma, k1, k2: the window and constants.

  Returns:
    (N,) float32; 1 for identical images.

  Raises:
    CdftError: shapes differ; ImageError: images smaller than the window.
  """
  a = _nhwc(a, "ssim").astype(jnp.float32)
  b = _nhwc(b, "ssim").astype(jnp.float32)
  if a.shape != b.shape:
    raise CdftError(f"ssim: images of different shapes {a.shape} and {b.shape}")
  if min(a.shape[1:3]) < window_size:
    raise ImageError(f"ssim: {a.shape[2]}x{a.shape[1]} px is smaller than the "
                     f"{window_size}x{window_size} window")
  window = gaussian_window(window_size, sigma)
  blur = lambda x: _blur_valid(x, window)  # noqa: E731
  mu_a, mu_b = blur(a), blur(b)
  # The second moments are shift-invariant: taking them about each image's
  # channel means avoids most of float32's cancellation in E[x²] − μ² (flat
  # regions would otherwise carry ~1e-7 of noise against C2 = 9e-4).
  a0 = a - jnp.mean(a, axis=(1, 2), keepdims=True)
  b0 = b - jnp.mean(b, axis=(1, 2), keepdims=True)
  mu_a0, mu_b0 = blur(a0), blur(b0)
  var_a = blur(a0 * a0) - mu_a0 * mu_a0
  var_b = blur(b0 * b0) - mu_b0 * mu_b0
  cov = blur(a0 * b0) - mu_a0 * mu_b0
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  num = (2.0 * mu_a * mu_b + c1) * (2.0 * cov + c2)
  den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
  return jnp.mean(num / den, axis=(1, 2, 3))


def pair_metrics(encoder, params, stylized, content, style, content_layer=4):
  """Every metric of one stylization (the evaluator's per-pair row).

  Args:
    encoder, params: the teacher (``vgg.Encoder`` of stage k and its params).
    stylized: (N, H, W, 3) in [0, 1] (clamp a raw decoder output first).
    content: the content image(s) it was made from, at least H x W (cropped
      top-left to H x W).
    style: the style image(s), any size.
    content_layer: the relu{l}_1 of :func:`content_loss`.

  Returns:
    dict of ``style_distance`` (N, k), ``content_loss`` (N,) and ``ssim`` (N,)
    (SSIM of the stylized image against the content, per channel of RGB).
  """
  _check_layer(encoder, content_layer)
  stylized = _nhwc(stylized, "stylized").astype(jnp.float32)
  content = crop_to(content, stylized.shape[1], stylized.shape[2]).astype(jnp.float32)
  fs = teacher_features(encoder, params, stylized)
  ft = teacher_features(encoder, params, style)
  fc = teacher_features(encoder, params, content)[content_layer - 1]
  return {
      "style_distance": jnp.stack([style_distance(x, y) for x, y in zip(fs, ft)], axis=-1),
      "content_loss": jnp.mean(jnp.square(fs[content_layer - 1] - fc), axis=(1, 2, 3)),
      "ssim": ssim(stylized, content),
  }


def adain_pair_metrics(encoder, params, stylized, content, style, alpha=1.0):
  """AdaIN's metrics of one stylization, measured by the teacher (relu1_1 .. relu4_1).

  pytorch-AdaIN's two losses (:mod:`cdft.losses`): the style loss
  ``Σ_i MSE(μ_i(g), μ_i(s)) + MSE(σ_i(g), σ_i(s))`` per layer, and the content
  loss ``MSE(relu4_1(g), t)`` against AdaIN's target
  ``t = alpha·AdaIN(relu4_1(c), relu4_1(s)) + (1 - alpha)·relu4_1(c)``; and the
  SSIM of the stylized image against the content.

  Returns:
    dict of ``style_distance`` (N, 4): the per-layer style terms,
    ``content_loss`` (N,) and ``ssim`` (N,).
  """
  from cdft.models import adain  # pylint: disable=import-outside-toplevel
  _check_layer(encoder, 4)
  stylized = _nhwc(stylized, "stylized").astype(jnp.float32)
  content = crop_to(content, stylized.shape[1], stylized.shape[2]).astype(jnp.float32)
  fs = teacher_features(encoder, params, stylized)[:4]
  ft = teacher_features(encoder, params, style)[:4]
  fc = teacher_features(encoder, params, content)[3]
  target = alpha * adain.adain(fc, ft[3]) + (1 - alpha) * fc

  def sq(a, b):  # per image
    return jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim)))

  terms = []
  for f, s in zip(fs, ft):
    (f_mean, f_std), (s_mean, s_std) = adain.mean_std(f), adain.mean_std(s)
    terms.append(sq(f_mean, s_mean) + sq(f_std, s_std))
  return {"style_distance": jnp.stack(terms, axis=-1), "content_loss": sq(fs[3], target),
          "ssim": ssim(stylized, content)}


# Tiling checks (tests and launch/bench_ultra.py).


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
