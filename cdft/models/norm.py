"""Batch normalisation with PyTorch ``BatchNorm2d`` semantics.

``flax.linen.BatchNorm`` differs from ``torch.nn.BatchNorm2d`` in two ways
that matter when porting a PyTorch training recipe or checkpoint:

* momentum convention: PyTorch's ``momentum=0.1`` means
  ``new = 0.9 * old + 0.1 * batch`` (Flax would call that momentum 0.9);
* the running variance: PyTorch normalises with the biased batch variance but
  stores the **unbiased** one (``* n / (n - 1)``, n = elements per channel) in
  ``running_var``; Flax stores the biased one.

:class:`BatchNorm` follows PyTorch exactly (eps 1e-5, momentum 0.1 in the
PyTorch convention). Variables: params ``scale`` (torch ``weight``) and
``bias``; collection ``batch_stats`` with ``mean`` (``running_mean``) and
``var`` (``running_var``), initialised to 0 and 1 as in PyTorch.

Data parallelism: under ``jax.jit`` with the global batch sharded over a mesh
(``NamedSharding(mesh, P('data'))``) the module sees the *global* array, so
``jnp.mean`` over the batch axis already is the mean over all devices' examples
(XLA inserts the cross-device reduction). No ``axis_name`` is needed and the
statistics equal those of one device holding the whole batch (PyTorch's
``SyncBatchNorm``). Inside ``shard_map`` (per-device code) the statistics would
be per device; this module is not meant for that.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from cdft.errors import CdftError


class BatchNorm(nn.Module):
  """``torch.nn.BatchNorm2d`` over the last (channel) axis of an NHWC tensor.

  Attributes:
    use_running_average: if True normalise with ``batch_stats`` (eval mode);
      if False with the statistics of the batch, and update ``batch_stats``
      (train mode; apply with ``mutable=['batch_stats']``). May instead be
      passed to ``__call__``.
    momentum: PyTorch convention: weight of the *batch* statistic in the
      running average.
    epsilon: added to the variance.
  """
  use_running_average: bool | None = None
  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, use_running_average=None):
    """Normalises ``x`` (..., C) per channel.

    Args:
      x: input; every axis but the last is reduced over.
      use_running_average: overrides the attribute of the same name.

    Returns:
      Normalised ``x``, same shape and dtype. Statistics and the affine map are
      computed in at least float32.
    """
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones_init(), (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (channels,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)

    compute = jnp.promote_types(x.dtype, jnp.float32)
    xc = x.astype(compute)
    if use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      n = math.prod(x.shape[:-1])
      if n < 2:
        raise CdftError(f"BatchNorm in train mode needs more than 1 value per channel, "
                        f"got input shape {tuple(x.shape)}")
      mean = jnp.mean(xc, axes)
      # Two-pass variance: as accurate as PyTorch's for non-centred inputs.
      var = jnp.mean(jnp.square(xc - mean), axes)
      if not self.is_initializing():
        m = self.momentum
        batch_mean = jax.lax.stop_gradient(mean)
        unbiased = jax.lax.stop_gradient(var) * (n / (n - 1))
        running_mean.value = (1.0 - m) * running_mean.value + m * batch_mean
        running_var.value = (1.0 - m) * running_var.value + m * unbiased
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    y = (xc - mean) * mul + bias
    return y.astype(x.dtype)
