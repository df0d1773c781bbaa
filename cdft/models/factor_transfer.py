"""Factor Transfer (Kim et al., NeurIPS 2018) and the standard KD baselines.

Modules (official code, spec ft.md §1.1-1.2; no BatchNorm, bias everywhere,
LeakyReLU with slope **0.1** after every layer, all convs 3x3 stride 1 pad 1 so
H x W never changes):

* :class:`Paraphraser`: encoder ``conv0`` (m->m), ``conv1`` (m->f), ``conv2``
  (f->f) gives the teacher factor, f = round(m * rate); decoder ``deconv0``
  (f->f), ``deconv1`` (f->m), ``deconv2`` (m->m) reconstructs the input. The
  decoder layers are PyTorch ``ConvTranspose2d(3, stride 1, pad 1)``, which is
  exactly a padded conv with the flipped, transposed kernel, so they are plain
  ``nn.Conv`` here (the weight converter does the flip).
* :class:`Translator`: the student-side encoder, m_s -> m_s -> f -> f.

Channel counts are arguments: the same modules work on any feature map (CIFAR
ResNet ``layer3``, a VGG ``relu{k}_1`` map ...). Initialisation is PyTorch's
default (the official code has no custom init).

* :class:`HintRegressor`: the FitNets regressor (its loss and every other
  distillation loss are in :mod:`cdft.losses`).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cdft.errors import CdftError
from cdft.kernels.conv import conv_general_dilated
from cdft.models.norm import BatchNorm
from cdft.models.initializers import pytorch_bias_init, pytorch_kernel_init

LEAKY_SLOPE = 0.1  # nn.LeakyReLU(0.1) in the official code (jax's default is 0.01)

# PyTorch's ConvTranspose2d init takes fan_in from weight.size(1) * k * k, the
# *output* channels: on the equivalent HWIO conv kernel that is fan_out.
_deconv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


def _leaky(x):
  return jax.nn.leaky_relu(x, LEAKY_SLOPE)


def _conv3x3(features, fan_in, name, dtype, kernel_init=pytorch_kernel_init):
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=True,
                 kernel_init=kernel_init, bias_init=pytorch_bias_init(fan_in),
                 dtype=dtype, name=name, conv_general_dilated=conv_general_dilated)


def _check_channels(x, channels, who):
  if x.ndim != 4 or x.shape[-1] != channels:
    raise CdftError(f"{who} expects NHWC input with {channels} channels, "
                    f"got shape {tuple(x.shape)}")


def factor_channels(in_channels, rate=0.5):
  """Factor width of the official code: ``int(round(in_channels * rate))``."""
  f = int(round(in_channels * rate))
  if in_channels < 1 or f < 1:
    raise CdftError(f"paraphrase rate {rate} on {in_channels} channels gives "
                    f"{f} factor channels; need at least 1")
  return f


class Paraphraser(nn.Module):
  """Convolutional autoencoder over a teacher feature map.

  ``apply(v, x)`` reconstructs ``x`` (official mode 0);
  ``apply(v, x, method=Paraphraser.encode)`` gives the factor (mode 1);
  ``apply(v, f, method=Paraphraser.decode)`` decodes a factor (mode 2).

  Attributes:
    in_channels: m, the channels of the feature map.
    rate: paraphrase rate k; the factor has ``round(m * k)`` channels.
    dtype: computation dtype (params stay float32).
  """
  in_channels: int
  rate: float = 0.5
  dtype: Any = jnp.float32

  @property
  def factor_channels(self):
    return factor_channels(self.in_channels, self.rate)

  def setup(self):
    m, f = self.in_channels, self.factor_channels
    self.conv0 = _conv3x3(m, 9 * m, "conv0", self.dtype)
    self.conv1 = _conv3x3(f, 9 * m, "conv1", self.dtype)
    self.conv2 = _conv3x3(f, 9 * f, "conv2", self.dtype)
    # Decoder bias fan_in is also the output width (see _deconv_kernel_init).
    self.deconv0 = _conv3x3(f, 9 * f, "deconv0", self.dtype, _deconv_kernel_init)
    self.deconv1 = _conv3x3(m, 9 * m, "deconv1", self.dtype, _deconv_kernel_init)
    self.deconv2 = _conv3x3(m, 9 * m, "deconv2", self.dtype, _deconv_kernel_init)

  def encode(self, x):
    """Teacher factor (B, H, W, f) of a feature map (B, H, W, m)."""
    _check_channels(x, self.in_channels, "Paraphraser.encode")
    x = x.astype(self.dtype)
    return _leaky(self.conv2(_leaky(self.conv1(_leaky(self.conv0(x))))))

  def decode(self, factor):
    """Reconstruction (B, H, W, m) of a factor (B, H, W, f)."""
    _check_channels(factor, self.factor_channels, "Paraphraser.decode")
    y = _leaky(self.deconv0(factor.astype(self.dtype)))
    return _leaky(self.deconv2(_leaky(self.deconv1(y))))

  def __call__(self, x):
    """Reconstruction ``decode(encode(x))`` (what the paraphraser is trained on)."""
    return self.decode(self.encode(x))


class Translator(nn.Module):
  """Student-side encoder: conv0 (m_s->m_s), conv1 (m_s->f), conv2 (f->f).

  Attributes:
    in_channels: m_s, the student feature map's channels.
    factor_channels: f, the *teacher* factor's channels (its output width).
    dtype: computation dtype.
  """
  in_channels: int
  factor_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """Student factor (B, H, W, f) of a student feature map (B, H, W, m_s)."""
    _check_channels(x, self.in_channels, "Translator")
    m, f = self.in_channels, self.factor_channels
    if f < 1:
      raise CdftError(f"Translator needs factor_channels >= 1, got {f}")
    x = _leaky(_conv3x3(m, 9 * m, "conv0", self.dtype)(x.astype(self.dtype)))
    x = _leaky(_conv3x3(f, 9 * m, "conv1", self.dtype)(x))
    return _leaky(_conv3x3(f, 9 * f, "conv2", self.dtype)(x))


class HintRegressor(nn.Module):
  """FitNets regressor: maps the student's guided layer to the teacher's hint width.

  A ``kernel_size`` conv (stride 1, same spatial size, with bias) followed by
  optional BN and ReLU (conv-BN-ReLU is what RepDistiller / KD-Zoo use; FitNets'
  regressor ends in the hint layer's nonlinearity, a ReLU for ResNets).

  Attributes:
    features: the teacher hint's channels.
    kernel_size: odd conv size (1 or 3).
    use_bn: insert :class:`~cdft.models.norm.BatchNorm` (then call with
      ``train`` and ``mutable=['batch_stats']`` in training).
    relu: end with a ReLU.
  """
  features: int
  kernel_size: int = 1
  use_bn: bool = True
  relu: bool = True

  @nn.compact
  def __call__(self, x, train=False):
    """Projects (B, H, W, C_s) to (B, H, W, features)."""
    k = self.kernel_size
    if k < 1 or k % 2 == 0:
      raise CdftError(f"HintRegressor kernel_size must be odd, got {k}")
    fan_in = k * k * x.shape[-1]
    y = nn.Conv(self.features, (k, k), padding=((k // 2, k // 2),) * 2,
                kernel_init=pytorch_kernel_init, bias_init=pytorch_bias_init(fan_in),
                name="conv", conv_general_dilated=conv_general_dilated)(x)
    if self.use_bn:
      y = BatchNorm(use_running_average=not train, name="bn")(y)
    return nn.relu(y) if self.relu else y
