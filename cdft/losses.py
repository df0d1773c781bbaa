"""Every loss of cdft, as pure functions on NHWC arrays. Models hold models; tasks compose these.

* Collaborative Distillation (spec cd.md §3): :func:`reconstruction` (eq. 1),
  :func:`embedding` (eq. 5), :func:`perceptual`. Every term is a mean-reduced
  squared error (PyTorch ``nn.MSELoss()``), summed over layers without
  per-layer weights, as in the official code.
* Factor Transfer (spec ft.md): :func:`ft_loss` (mean |FT(s) - FT(t)|; the
  caller multiplies by beta, 500 in the official CIFAR-10 code) and the
  paraphraser's :func:`paraphraser_reconstruction`.
* AdaIN (spec adain.md §3): :func:`adain_style` (pytorch-AdaIN's mean/std
  style loss; its content loss is :func:`mse` of relu4_1) and :func:`cd_adain`
  (the three terms of CD's AdaIN student).
* The standard distillation baselines: :func:`kd_loss` (Hinton KD),
  :func:`hint_loss` (FitNets, with :class:`cdft.models.factor_transfer.HintRegressor`),
  :func:`attention_map` + :func:`attention_transfer_loss` (attention transfer).

The teacher side of a distillation loss is wrapped in ``stop_gradient``:
teachers, paraphrasers and their factors are constants.
"""
from typing import Sequence

import jax
import jax.numpy as jnp

from cdft.errors import CdftError
from cdft.models import adain

NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize
RECONSTRUCTION = ("l1", "mse")  # the paraphraser's reconstruction losses


def _wide(x):
  """``x`` in at least float32 (a bfloat16 network's output is reduced in float32)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def mse(a, b):
  """Mean squared error over all elements, in at least float32."""
  return jnp.mean(jnp.square(_wide(a) - _wide(b)))


def perceptual(feats_a, feats_b):
  """Σ_i MSE(F_i(a), F_i(b)) over matching feature tuples (relu1_1 .. relu{k}_1)."""
  if len(feats_a) != len(feats_b):
    raise ValueError(f"{len(feats_a)} vs {len(feats_b)} feature maps")
  return sum(mse(a, b) for a, b in zip(feats_a, feats_b))


def reconstruction(rec, image, feats_rec, feats_image, pixel_weight, perceptual_weight):
  """Paper eq. (1): ‖I_r − I_o‖² + λ_p Σ_i ‖F_i(I_r) − F_i(I_o)‖² (mean-reduced).

  Returns:
    ``(loss, {'pixel': ..., 'perceptual': ...})``.
  """
  pix = mse(rec, image)
  perc = perceptual(feats_rec, feats_image)
  return pixel_weight * pix + perceptual_weight * perc, {"pixel": pix, "perceptual": perc}


def embedding(embedded_student, teacher_feats):
  """Paper eq. (5) summed over layers: Σ_i ‖F_i − Q_i·F′_i‖² (mean-reduced)."""
  return perceptual(embedded_student, teacher_feats)


# Factor Transfer and the distillation baselines.

def adain_style(feats, style_feats):
  """pytorch-AdaIN's style loss over relu1_1 .. relu4_1.

  ``Σ_i MSE(μ_i(g), μ_i(s)) + MSE(σ_i(g), σ_i(s))`` with AdaIN's statistics
  (:func:`cdft.models.adain.mean_std`: unbiased, eps inside the root).

  Returns:
    ``(total, terms)``: the sum and the per-layer terms.
  """
  if len(feats) != len(style_feats):
    raise ValueError(f"{len(feats)} vs {len(style_feats)} feature maps")
  terms = []
  for f, s in zip(feats, style_feats):
    (f_mean, f_std), (s_mean, s_std) = adain.mean_std(f), adain.mean_std(s)
    terms.append(mse(f_mean, jax.lax.stop_gradient(s_mean)) +
                 mse(f_std, jax.lax.stop_gradient(s_std)))
  return sum(terms), terms


def cd_adain(emb_content, emb_style, teacher_content, teacher_style, out_feats):
  """The three terms of CD's AdaIN student (``TrainSE_With_AdaINDecoder2``).

  Args:
    emb_content, emb_style: the student's embedded relu1_1 .. relu4_1 (Q_i,
      teacher widths) of the content and the style.
    teacher_content, teacher_style: the teacher's relu1_1 .. relu4_1 of both.
    out_feats: the teacher's features of ``sd = D(AdaIN(Q_4 c, Q_4 s))``.

  Returns:
    ``{'feat', 'content', 'style'}``: the embedding term on both images, the
    content term against the *content image's* relu4_1 (not AdaIN's target t),
    and :func:`adain_style` against the style. The official weights are
    10 / 1 / 10.
  """
  teacher_content = jax.lax.stop_gradient(tuple(teacher_content))
  teacher_style = jax.lax.stop_gradient(tuple(teacher_style))
  return {"feat": perceptual(emb_content, teacher_content) + perceptual(emb_style, teacher_style),
          "content": mse(out_feats[-1], teacher_content[-1]),
          "style": adain_style(out_feats, teacher_style)[0]}


def _check_same_shape(a, b, what):
  if a.shape != b.shape:
    raise CdftError(f"{what}: student {tuple(a.shape)} and teacher {tuple(b.shape)} "
                    "shapes differ")


def normalize_flat(x):
  """Per-sample L2 normalisation over all non-batch axes: ``F.normalize(x.view(B, -1))``.

  Returns the (B, D) normalised rows, ``x / max(||x||_2, 1e-12)``, in float32.
  """
  flat = x.reshape(x.shape[0], -1).astype(jnp.promote_types(x.dtype, jnp.float32))
  norm = jnp.sqrt(jnp.sum(jnp.square(flat), axis=1, keepdims=True))
  return flat / jnp.maximum(norm, NORMALIZE_EPS)


def ft_loss(factor_s, factor_t):
  """Official Factor Transfer loss, without beta.

  ``mean_{b,i} |FT(factor_s)_{b,i} - FT(factor_t)_{b,i}|`` with FT the per-sample
  L2 normalisation of the flattened C*H*W factor (``nn.L1Loss()`` with its mean
  over all B*C*H*W elements). Both the norm and the mean are invariant to the
  flattening order, so NHWC gives PyTorch's NCHW value. The caller multiplies by
  beta (official CIFAR-10: 500). Not RepDistiller's spatial-attention variant.

  Args:
    factor_s: translator output, (B, H, W, f).
    factor_t: paraphraser factor, same shape (treated as a constant).

  Returns:
    Scalar float32.
  """
  _check_same_shape(factor_s, factor_t, "ft_loss")
  factor_t = jax.lax.stop_gradient(factor_t)
  return jnp.mean(jnp.abs(normalize_flat(factor_s) - normalize_flat(factor_t)))


def kd_loss(logits_s, logits_t, temperature=4.0):
  """Hinton knowledge distillation term.

  ``T^2 * mean_b sum_c p_t (log p_t - log p_s)`` with ``p = softmax(logits / T)``:
  the KL divergence summed over classes and averaged over the batch, scaled by
  T^2 so its gradient magnitude does not shrink with T. This is the common
  CIFAR code's ``F.kl_div(log_softmax(s/T), softmax(t/T), size_average=False)
  * T**2 / B`` (RepDistiller ``DistillKL``; T = 4 there). The caller weighs it
  against the cross-entropy.

  Args:
    logits_s: student logits (B, K).
    logits_t: teacher logits (B, K) (treated as a constant).
    temperature: T > 0.

  Returns:
    Scalar float32.
  """
  _check_same_shape(logits_s, logits_t, "kd_loss")
  if temperature <= 0:
    raise CdftError(f"kd_loss temperature must be > 0, got {temperature}")
  logits_t = jax.lax.stop_gradient(logits_t)
  log_p_s = jax.nn.log_softmax(logits_s.astype(jnp.float32) / temperature, axis=-1)
  log_p_t = jax.nn.log_softmax(logits_t.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return jnp.mean(kl) * temperature ** 2


def hint_loss(regressed_s, hint_t):
  """FitNets hint loss: mean squared error (``nn.MSELoss()``, mean over all elements).

  Args:
    regressed_s: :class:`HintRegressor` output on the student's guided layer.
    hint_t: the teacher's hint layer, same shape (treated as a constant).
  """
  _check_same_shape(regressed_s, hint_t, "hint_loss")
  hint_t = jax.lax.stop_gradient(hint_t)
  diff = regressed_s.astype(jnp.float32) - hint_t.astype(jnp.float32)
  return jnp.mean(jnp.square(diff))


def attention_map(feature, p=2):
  """Spatial attention of Zagoruyko & Komodakis: normalise(mean_c |f|^p), flattened.

  Args:
    feature: (B, H, W, C).
    p: exponent (2 in the paper's experiments).

  Returns:
    (B, H*W) rows of unit L2 norm (eps 1e-12 as ``F.normalize``).
  """
  if feature.ndim != 4:
    raise CdftError(f"attention_map expects NHWC (B, H, W, C), got {tuple(feature.shape)}")
  f = jnp.abs(feature.astype(jnp.promote_types(feature.dtype, jnp.float32)))
  return normalize_flat(jnp.mean(f ** p, axis=-1))


def attention_transfer_loss(feats_s: Sequence[jax.Array], feats_t: Sequence[jax.Array],
                            p=2, reduction="sum"):
  """Attention transfer: Σ_pairs mean_{b,i} (Q_s - Q_t)^2 with Q = :func:`attention_map`.

  Each pair's term is the mean squared difference of the attention rows over
  B*H*W (``(at(x) - at(y)).pow(2).mean()``). The pairs are summed, as in the
  authors' code (which multiplies by beta/2) and RepDistiller (beta = 1e3 on
  CIFAR, the usual choice). ``reduction='mean'`` averages over pairs instead
  (divides the sum by the number of pairs). Channel counts may differ within a
  pair; spatial sizes must match.

  Args:
    feats_s: student maps, e.g. ``(layer1, layer2, layer3)``.
    feats_t: teacher maps at the same positions (treated as constants).
    p: attention exponent.
    reduction: ``'sum'`` or ``'mean'`` over pairs.

  Returns:
    Scalar float32 (multiply by beta).
  """
  if len(feats_s) != len(feats_t) or not feats_s:
    raise CdftError(f"attention_transfer_loss needs matching non-empty feature lists, "
                    f"got {len(feats_s)} student and {len(feats_t)} teacher maps")
  if reduction not in ("sum", "mean"):
    raise CdftError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
  terms = []
  for i, (s, t) in enumerate(zip(feats_s, feats_t)):
    if s.shape[:3] != t.shape[:3]:
      raise CdftError(f"attention_transfer_loss pair {i}: student {tuple(s.shape)} and "
                      f"teacher {tuple(t.shape)} differ in batch or spatial size")
    a_t = jax.lax.stop_gradient(attention_map(t, p))
    terms.append(jnp.mean(jnp.square(attention_map(s, p) - a_t)))
  total = sum(terms)
  return total / len(terms) if reduction == "mean" else total


def paraphraser_reconstruction(rec, target, kind="l1"):
  """Paraphraser reconstruction loss, mean over all elements.

  Args:
    rec: the paraphraser's reconstruction.
    target: the teacher feature (treated as a constant).
    kind: 'l1' (official ``nn.L1Loss``) or 'mse' (RD, KDZ, TD).
  """
  if kind not in RECONSTRUCTION:
    raise CdftError(f"loss.reconstruction: unknown loss {kind!r}; choose from "
                    f"{', '.join(RECONSTRUCTION)}")
  if rec.shape != target.shape:
    raise CdftError(f"reconstruction {tuple(rec.shape)} and target {tuple(target.shape)} "
                    "shapes differ")
  diff = rec.astype(jnp.float32) - jax.lax.stop_gradient(target).astype(jnp.float32)
  return jnp.mean(jnp.abs(diff)) if kind == "l1" else jnp.mean(jnp.square(diff))
