"""Losses of Collaborative Distillation (spec cd.md §3), as pure functions.

Every term is a mean-reduced squared error (PyTorch ``nn.MSELoss()``), summed
over layers without per-layer weights, as in the official code.
"""
import jax.numpy as jnp


def mse(a, b):
  """Mean squared error over all elements."""
  return jnp.mean(jnp.square(a - b))


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
