"""The Factor Transfer paraphraser, pretrained on a frozen network's feature tap (spec ft.md §2.1).

One task for every network a paraphraser can read: the tap says which frozen
weights it needs and how a batch's image becomes the feature map to
reconstruct. The two taps in use are the CIFAR teacher classifier's FT layer
(``ft_paraphraser``, :func:`cdft.tasks.classification.paraphraser_task`) and
the CD teacher encoder's relu{k}_1 (``cd_paraphraser``,
:func:`cdft.tasks.style.paraphraser_task`).
"""
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cdft import losses
from cdft import models
from cdft.data import augment
from cdft.errors import CdftError
from cdft.models import factor_transfer as ft_models


@dataclasses.dataclass(frozen=True)
class FeatureTap:
  """The feature map a paraphraser learns to reconstruct.

  Attributes:
    frozen: the fixed weights the tap reads (the task's ``frozen``).
    channels: the feature map's channels.
    features: ``features(frozen, image) -> (B, H, W, channels)``, jittable.
    probe_shape: ``probe_shape(batch) -> shape`` of one example's feature map
      (``batch`` a host batch; its shapes only matter).
  """
  frozen: dict
  channels: int
  features: Callable[[Any, Any], Any]
  probe_shape: Callable[[Any], tuple]


def check_config(config):
  """Raises CdftError for an unknown ``loss.reconstruction`` (before any network is loaded)."""
  kind = config.loss.reconstruction
  if kind not in losses.RECONSTRUCTION:
    raise CdftError(f"config.loss.reconstruction: unknown loss {kind!r}; "
                    f"choose from {', '.join(losses.RECONSTRUCTION)}")
  return kind


class ParaphraserTask:
  """Trains a :class:`~cdft.models.factor_transfer.Paraphraser` on ``tap``'s features.

  The loss is :func:`cdft.losses.paraphraser_reconstruction` (L1 as the
  official FT code, or MSE: ``config.loss.reconstruction``) of the constant
  feature map; both errors are logged.
  """

  def __init__(self, config, tap):
    self.config = config
    self.kind = check_config(config)
    self.tap = tap
    self.frozen = tap.frozen
    rate = float(config.paraphraser.rate)
    ft_models.factor_channels(tap.channels, rate)  # a usable rate, or a clear error
    self.paraphraser = ft_models.Paraphraser(int(tap.channels), rate)
    dtype = models.compute_dtype(config)
    if dtype is not None:
      self.paraphraser = self.paraphraser.clone(dtype=dtype)
    # config.input.on_device: the tap's images are prepared inside the step.
    self._images = augment.device_op(config.get("input"))

  def init(self, rng, batch):
    probe = np.zeros(self.tap.probe_shape({"image": augment.probe(self._images, batch["image"])}),
                     np.float32)
    return {"params": {"paraphraser": models.init(self.paraphraser, rng, probe)["params"]},
            "model_state": {}}

  def loss(self, params, model_state, frozen, batch, rng):
    image = self._images(batch["image"], rng)
    target = jax.lax.stop_gradient(self.tap.features(frozen, image))
    rec = self.paraphraser.apply({"params": params["paraphraser"]}, target)
    loss = losses.paraphraser_reconstruction(rec, target, self.kind)
    diff = rec - target
    metrics = {"l1": jnp.mean(jnp.abs(diff)), "mse": jnp.mean(jnp.square(diff))}
    return loss, (metrics, model_state)
