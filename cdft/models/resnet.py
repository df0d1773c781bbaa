"""CIFAR classifiers of the Factor Transfer experiments: ResNet-20/32/56/110 and WRNs.

``ResNet`` is the official Factor Transfer ``ResNet_simple`` (spec ft.md §1.3):
conv3x3(3->16) -> BN -> ReLU, three groups of post-activation ``BasicBlock``s
of widths 16/32/64 (the first block of groups 2 and 3 has stride 2), global
average pooling (``F.avg_pool2d(out, 8)`` on the 8x8 map of a 32x32 input) and
``Dense(num_classes)``. A block is ``relu(bn2(conv2(relu(bn1(conv1(x))))) +
shortcut(x))``; the shortcut is "option B" (1x1 conv + BN) only where the
stride or the width changes, identity elsewhere. Convolutions have no bias and
use PyTorch's default initialisation, as the official code does.

``WideResNet`` is the pre-activation WRN of the CRD/RepDistiller code
(``wrn_16_2``, ``wrn_40_2`` ...): conv3x3(3->16), three groups of blocks
``conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut``, where a block whose width
changes pre-activates its input once and feeds it to both branches (1x1 conv
shortcut), then a final BN -> ReLU -> pool -> Dense. Dropout 0 by default; conv
init normal(0, sqrt(2 / (9 * out_channels))) as in that code.

Both modules are NHWC and return ``(logits, feats)`` with ``feats`` a dict:

* ``stem``: output of the first convolution (ResNet: after its BN-ReLU);
* ``layer1``, ``layer2``, ``layer3``: outputs of the three groups, the maps
  that FitNets / attention transfer tap (WRN: before any BN-ReLU, RD's
  ``preact=False`` features);
* ``ft``: the Factor Transfer tap. ResNet: ``layer3`` (after the last block's
  ReLU, non-negative; the official code's ``outputs[2]``). WRN: also ``layer3``,
  i.e. block3's output *before* the final BN-ReLU, the ``feat[-2]`` that
  RepDistiller's FT taps (spec §1.3/§4.6); ``head`` holds the post BN-ReLU map;
* ``pooled``: the (B, C) vector fed to the classifier.

Module names follow the PyTorch state-dict names (``layer2_0/shortcut_conv`` <->
``layer2.0.shortcut.0``), see :mod:`cdft.weights.ft` for the converter. Per-
block outputs can be read with ``capture_intermediates`` (paths ``layer1_0``...).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cdft.errors import CdftError
from cdft.kernels.conv import conv_general_dilated
from cdft.models.initializers import pytorch_bias_init, pytorch_kernel_init
from cdft.models.norm import BatchNorm

# RepDistiller's WRN conv init: normal(0, sqrt(2 / (k*k*out_channels))).
_wrn_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _accumulation(dtype):
  """The dtype of the pooled features and logits: at least float32 (float64 stays float64)."""
  return jnp.promote_types(dtype, jnp.float32)


def _check_input(x, name):
  if x.ndim != 4 or x.shape[-1] != 3:
    raise CdftError(f"{name} expects NHWC images (B, H, W, 3), got shape {tuple(x.shape)}")


def _conv(features, kernel, stride, name, dtype, init=pytorch_kernel_init):
  pad = kernel // 2  # PyTorch's symmetric padding, not SAME (differs at stride 2)
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=init, dtype=dtype, name=name,
                 conv_general_dilated=conv_general_dilated)


def _dense(num_classes, in_features, dtype, name, zero_bias=False):
  bias_init = nn.initializers.zeros_init() if zero_bias else pytorch_bias_init(in_features)
  return nn.Dense(num_classes, kernel_init=pytorch_kernel_init, bias_init=bias_init,
                  dtype=dtype, name=name)


class BasicBlock(nn.Module):
  """Post-activation residual block of ``ResNet_simple`` with option-B shortcut."""
  features: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    bn = lambda name: BatchNorm(use_running_average=not train, name=name)
    out = _conv(self.features, 3, self.stride, "conv1", self.dtype)(x)
    out = nn.relu(bn("bn1")(out))
    out = bn("bn2")(_conv(self.features, 3, 1, "conv2", self.dtype)(out))
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = bn("shortcut_bn")(
          _conv(self.features, 1, self.stride, "shortcut_conv", self.dtype)(x))
    else:
      shortcut = x
    return nn.relu(out + shortcut)


class ResNet(nn.Module):
  """CIFAR ResNet (``ResNet_simple`` of the official FT code).

  Attributes:
    num_blocks: blocks per group, e.g. (3, 3, 3) for ResNet-20.
    num_classes: classifier outputs.
    widths: channels of the stem / groups.
    dtype: computation dtype of convs and the classifier (params stay float32).
  """
  num_blocks: Sequence[int] = (3, 3, 3)
  num_classes: int = 10
  widths: Sequence[int] = (16, 32, 64)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    """Logits and features of NHWC images ``x``.

    Args:
      x: (B, H, W, 3) normalised images (32x32 on CIFAR).
      train: batch statistics in BN (and update ``batch_stats``; apply with
        ``mutable=['batch_stats']``) instead of the running averages.

    Returns:
      ``(logits (B, num_classes), feats)``; see the module docstring.
    """
    _check_input(x, "ResNet")
    x = x.astype(self.dtype)
    out = _conv(self.widths[0], 3, 1, "conv1", self.dtype)(x)
    out = nn.relu(BatchNorm(use_running_average=not train, name="bn1")(out))
    feats = {"stem": out}
    for g, (n, width) in enumerate(zip(self.num_blocks, self.widths)):
      for i in range(n):
        stride = 2 if (g > 0 and i == 0) else 1
        out = BasicBlock(width, stride, self.dtype, name=f"layer{g + 1}_{i}")(out, train)
      feats[f"layer{g + 1}"] = out
    feats["ft"] = out
    pooled = jnp.mean(out.astype(_accumulation(self.dtype)), axis=(1, 2))
    feats["pooled"] = pooled
    logits = _dense(self.num_classes, out.shape[-1], self.dtype, "linear")(pooled)
    return logits.astype(_accumulation(self.dtype)), feats


class WideBasicBlock(nn.Module):
  """Pre-activation WRN block (RepDistiller ``wrn.BasicBlock``)."""
  features: int
  stride: int = 1
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    bn = lambda name: BatchNorm(use_running_average=not train, name=name)
    conv = lambda f, k, s, name: _conv(f, k, s, name, self.dtype, _wrn_kernel_init)
    equal = x.shape[-1] == self.features
    pre = nn.relu(bn("bn1")(x))
    out = nn.relu(bn("bn2")(conv(self.features, 3, self.stride, "conv1")(pre)))
    if self.dropout_rate > 0:
      out = nn.Dropout(self.dropout_rate, deterministic=not train)(out)
    out = conv(self.features, 3, 1, "conv2")(out)
    if equal:
      if self.stride != 1:
        raise CdftError("a WRN block with equal widths cannot have stride "
                        f"{self.stride} (identity shortcut)")
      return x + out
    return conv(self.features, 1, self.stride, "conv_shortcut")(pre) + out


class WideResNet(nn.Module):
  """Pre-activation Wide ResNet WRN-depth-k (as in the CRD/RepDistiller code).

  Attributes:
    depth: 6n + 4 (16, 22, 28, 40 ...).
    widen_factor: k; group widths 16k, 32k, 64k.
    num_classes: classifier outputs.
    dropout_rate: dropout between the two convs of a block (0 in CRD; needs a
      ``'dropout'`` rng in train mode when > 0).
    dtype: computation dtype.
  """
  depth: int = 16
  widen_factor: int = 2
  num_classes: int = 100
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    """Logits and features (see the module docstring); arguments as ``ResNet``."""
    if (self.depth - 4) % 6 or self.depth < 10:
      raise CdftError(f"WRN depth must be 6n+4 with n >= 1, got {self.depth}")
    _check_input(x, "WideResNet")
    n = (self.depth - 4) // 6
    widths = [16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor]
    x = x.astype(self.dtype)
    out = _conv(16, 3, 1, "conv1", self.dtype, _wrn_kernel_init)(x)
    feats = {"stem": out}
    for g, width in enumerate(widths):
      for i in range(n):
        stride = 2 if (g > 0 and i == 0) else 1
        out = WideBasicBlock(width, stride, self.dropout_rate, self.dtype,
                             name=f"block{g + 1}_{i}")(out, train)
      feats[f"layer{g + 1}"] = out
    feats["ft"] = out
    head = nn.relu(BatchNorm(use_running_average=not train, name="bn1")(out))
    feats["head"] = head
    pooled = jnp.mean(head.astype(_accumulation(self.dtype)), axis=(1, 2))
    feats["pooled"] = pooled
    logits = _dense(self.num_classes, widths[-1], self.dtype, "fc", zero_bias=True)(pooled)
    return logits.astype(_accumulation(self.dtype)), feats


RESNET_DEPTHS = {20: 3, 32: 5, 56: 9, 110: 18}


def resnet(depth, num_classes=10, **kwargs):
  """CIFAR ResNet-``depth`` (20, 32, 56 or 110: 6n+2 with n blocks per group)."""
  if depth not in RESNET_DEPTHS:
    raise CdftError(f"no CIFAR ResNet of depth {depth}; choose from {sorted(RESNET_DEPTHS)}")
  n = RESNET_DEPTHS[depth]
  return ResNet(num_blocks=(n, n, n), num_classes=num_classes, **kwargs)


def resnet20(num_classes=10, **kwargs):
  """ResNet-20 (the FT student)."""
  return resnet(20, num_classes, **kwargs)


def resnet32(num_classes=10, **kwargs):
  """ResNet-32."""
  return resnet(32, num_classes, **kwargs)


def resnet56(num_classes=10, **kwargs):
  """ResNet-56 (the FT teacher)."""
  return resnet(56, num_classes, **kwargs)


def resnet110(num_classes=10, **kwargs):
  """ResNet-110 (the official code's ``ResNet112``: 18 blocks per group)."""
  return resnet(110, num_classes, **kwargs)


def wrn_16_2(num_classes=100, **kwargs):
  """WRN-16-2 (CRD student)."""
  return WideResNet(depth=16, widen_factor=2, num_classes=num_classes, **kwargs)


def wrn_40_2(num_classes=100, **kwargs):
  """WRN-40-2 (CRD teacher)."""
  return WideResNet(depth=40, widen_factor=2, num_classes=num_classes, **kwargs)


def wrn_40_1(num_classes=100, **kwargs):
  """WRN-40-1 (CRD student)."""
  return WideResNet(depth=40, widen_factor=1, num_classes=num_classes, **kwargs)
