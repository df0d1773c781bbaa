"""The VGG-19 style encoders and mirrored decoders of WCT / Collaborative Distillation.

One definition covers the normalized VGG-19 teacher (widths 64/128/256/512/512)
and the 16x small students (16/32/64/128/128, 24 at conv1_1 of stage 1): a stage-k
encoder is the VGG-19 prefix up to ``relu{k}_1``; its decoder mirrors it with
nearest x2 upsampling. AdaIN's networks are members of the same family
(:func:`adain_encoder`, :func:`adain_decoder`): stage 4, with pytorch-AdaIN's
ceil-mode pooling in its VGG and no ReLU after its decoder's last conv. Module and parameter names follow the official PyTorch
state dicts (``conv0``, ``conv11``, ..., ``conv11_aux``) so porting is a rename-free
transpose. Layout NHWC; inputs are RGB in [0, 1] (``conv0`` maps them to Caffe BGR).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cdft.models import layers

from cdft.models.family import (  # noqa: F401  (the family's data, re-exported)
    BLOCK_DEPTHS, CD16X_STAGE1_WIDTH, CD16X_WIDTHS, VGG19_WIDTHS, WIDTH_PRESETS, LevelModel,
    decoder_layer_names, encoder_layer_names, stage_widths)
from cdft.models.family import check_stage as _check_stage


class Encoder(nn.Module):
  """Stage-k encoder: ``conv0`` (1x1 RGB -> Caffe BGR) then VGG-19 up to relu{k}_1.

  Attributes:
    stage: 1..5, the last block (its relu{k}_1 is the output).
    widths: the five block widths (only the first ``stage`` are used).
    fold_conv0: fold the linear ``conv0`` into ``conv11`` (exact; faster).
    ceil_pool: ceil-mode max-pooling (an odd side keeps its last row/column:
      100 -> 50 -> 25 -> 13), as pytorch-AdaIN's VGG; default floor (-> 12),
      as the WCT and CD encoders.
  """
  stage: int
  widths: Sequence[int] = VGG19_WIDTHS
  fold_conv0: bool = True
  ceil_pool: bool = False
  dtype: Any = None  # computation dtype (None: the input's); parameters stay float32

  @nn.compact
  def __call__(self, x, return_all=False, extent=None):
    """Encodes RGB images in [0, 1].

    Args:
      x: (N, H, W, 3).
      return_all: also return relu1_1 .. relu{k-1}_1.
      extent: optional traced (2,) int32 ``(h, w)``: ``x`` is a canvas holding
        the image in ``[:h, :w]`` (sides multiples of 2^(k-1)); the features
        are then exact on the region ``[:h // 2^(b-1), :w // 2^(b-1)]`` of
        block b (floor pooling; ceil pooling: rounded up), and unspecified
        outside it.

    Returns:
      relu{k}_1, or the tuple (relu1_1, ..., relu{k}_1) if ``return_all``.
    """
    _check_stage(self.stage)
    conv0 = layers.Conv1x1(3, 3, dtype=self.dtype, name="conv0")
    affine = None
    if self.fold_conv0:
      affine = conv0.affine()
    else:
      x = conv0(x)
    feats = []
    for block in range(1, self.stage + 1):
      if block > 1:
        if extent is not None and self.ceil_pool:
          # Ceil mode pools a region's odd last row (column) alone. The
          # features are ReLU outputs (>= 0), so zeroing the canvas beyond the
          # region makes the canvas's 2x2 pool exactly that.
          x = layers.zero_outside(x, extent)
          extent = jnp.right_shift(extent + 1, 1)
        elif extent is not None:
          extent = jnp.right_shift(extent, 1)
        x = layers.max_pool2x2(x, ceil=self.ceil_pool)
      depth = 1 if block == self.stage else BLOCK_DEPTHS[block - 1]
      for i in range(1, depth + 1):
        x = layers.ReflectConv3x3(self.widths[block - 1], dtype=self.dtype,
                                  name=f"conv{block}{i}")(x, affine, extent)
        affine = None
        if i == 1:
          feats.append(x)
    return tuple(feats) if return_all else x


class Decoder(nn.Module):
  """Stage-k decoder mirroring :class:`Encoder`, ReLU after every conv.

  The final ReLU follows the official CD code (``final_relu=False``: none, as
  the AdaIN decoder); the output is not clamped.
  """
  stage: int
  widths: Sequence[int] = VGG19_WIDTHS
  final_relu: bool = True
  dtype: Any = None  # computation dtype (None: the input's); parameters stay float32

  @nn.compact
  def __call__(self, x, input_affine=None, extent=None):
    """Decodes relu{k}_1 features.

    Args:
      x: (N, h, w, C) features.
      input_affine: optional ``(A, c)``; decodes ``x @ A + c`` instead of ``x``,
        folded exactly into the first convolution (how WCT's C x C transform is
        applied without materialising the transformed features).
      extent: optional traced (2,) int32: ``x`` is a canvas whose region
        ``[:extent[0], :extent[1]]`` holds the features; the output is exact on
        the region scaled by 2^(k-1) and unspecified outside it.
    """
    _check_stage(self.stage)
    out_widths = (3,) + tuple(self.widths[:4])  # conv{b}1 maps block b to block b-1
    for block in range(self.stage, 0, -1):
      if block < self.stage:
        x = layers.upsample_nearest2x(x)
        extent = None if extent is None else jnp.left_shift(extent, 1)
      depth = 1 if block == self.stage else BLOCK_DEPTHS[block - 1]
      for i in range(depth, 0, -1):
        features = out_widths[block - 1] if i == 1 else self.widths[block - 1]
        last = block == 1 and i == 1
        x = layers.ReflectConv3x3(features, relu=self.final_relu or not last, dtype=self.dtype,
                                  name=f"conv{block}{i}")(x, input_affine, extent)
        input_affine = None
    return x


class Embedding(nn.Module):
  """The linear embedding heads Q_i (1x1 conv, bias, no activation) of a stage-k student.

  Maps the student's relu{i}_1 (width ``widths[i]``) to the teacher's width, for
  i = 1..k. Names follow the released files: ``conv11_aux``, ``conv21_aux``, ...
  ``relu=True`` adds a ReLU after each head (CD-AdaIN's ``updim_relu``).
  """
  stage: int
  widths: Sequence[int] = CD16X_WIDTHS
  teacher_widths: Sequence[int] = VGG19_WIDTHS
  relu: bool = False
  dtype: Any = None  # computation dtype (None: the input's); parameters stay float32

  @nn.compact
  def __call__(self, feats):
    """Embeds the tuple (relu1_1, ..., relu{k}_1) of the student; returns a tuple."""
    _check_stage(self.stage)
    if len(feats) != self.stage:
      raise ValueError(f"expected {self.stage} features, got {len(feats)}")
    out = tuple(
        layers.Conv1x1(self.teacher_widths[i], self.widths[i], dtype=self.dtype,
                       name=f"conv{i + 1}1_aux")(f)
        for i, f in enumerate(feats))
    return tuple(nn.relu(f) for f in out) if self.relu else out


def adain_encoder(preset="vgg19"):
  """AdaIN's encoder, input -> relu4_1.

  ``'vgg19'``: pytorch-AdaIN's ``vgg[:31]`` (ceil-mode pooling); ``'16x'``: CD's
  ``SmallEncoder4_16x_aux`` without its heads (widths 16/32/64/128, floor
  pooling; the heads are ``Embedding(stage=4)``).
  """
  return Encoder(stage=4, widths=stage_widths(preset, 4), ceil_pool=preset == "vgg19")


def adain_decoder(preset="vgg19"):
  """AdaIN's decoder, relu4_1 -> RGB (no final ReLU): pytorch-AdaIN's (``'vgg19'``,
  512 -> 3) or the 16x small decoder mirroring the student (``'16x'``, 128 -> 3)."""
  return Decoder(stage=4, widths=stage_widths(preset, 4), final_relu=False)
