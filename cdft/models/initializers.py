"""PyTorch's default parameter initialisation, for models trained as the official code.

``Conv2d`` / ``Linear`` weights: kaiming_uniform(a=sqrt(5)) = U(±1/sqrt(fan_in)),
i.e. variance 1/(3 fan_in); biases U(±1/sqrt(fan_in)). Flax's defaults
(lecun_normal, zero bias) differ, and the difference matters for the WCT
decoders, which end in a ReLU: a zero-bias decoder trained with the large
perceptual term can push every output below zero in a few steps and die.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

pytorch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def pytorch_bias_init(fan_in):
  """PyTorch's default bias init U(±1/sqrt(fan_in)) (Conv2d, Linear)."""
  bound = 1.0 / (fan_in ** 0.5)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init
