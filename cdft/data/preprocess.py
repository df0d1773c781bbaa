"""Per-example preprocessing: pure numpy/PIL, deterministic given an rng.

Every op maps an image to a float32 (H, W, 3) array. Inputs may be what the
data sources return (uint8 RGB H x W x 3) or anything a user's data holds
(decoded and converted by :mod:`cdft.io.images`, the one decode path of cdft):
greyscale (H x W or H x W x 1), greyscale + alpha, RGBA (composited over white),
16-bit or float images (scaled to [0, 1]), or encoded bytes (JPEG, PNG, ...,
decoded with PIL, EXIF orientation applied). Problems with an image raise
``cdft.errors.ImageError`` (one line), which the pipeline counts and replaces.

Ops (registry names for ``get_preprocess``):
  cd_train / cd_eval: Collaborative Distillation (cd.md section 3.3). Resize so
    the shorter side is ``shorter_side`` (300), then a random (train) or centre
    (eval) ``crop`` x ``crop`` (256) square, random horizontal flip (train), RGB
    in [0, 1]. Random numbers are drawn in this order: crop top, crop left,
    flip.
  adain_train: pytorch-AdaIN (adain.md section 3): resize to ``size`` x
    ``size`` (512, the aspect ratio not kept; torchvision's default bilinear),
    then a random ``crop`` (256) square, no flip. Draws crop top, crop left.
  cifar_train / cifar_eval: the official Factor Transfer CIFAR pipeline
    (ft.md section 2.2): zero-pad 4, random 32 x 32 crop, random horizontal
    flip (train), then ``(x - mean) / std`` per channel of x in [0, 1].

Each registry function is ``fn(example: dict, rng: numpy.random.Generator) ->
dict`` with key 'image' and, when the example has one, 'label' (int32).
"""

import functools
import inspect

import numpy as np

from cdft.errors import CdftError
from cdft.errors import ImageError
# The one decode path (cdft.io.images); RESAMPLE and to_rgb are named here too.
from cdft.io.images import RESAMPLE  # noqa: F401
from cdft.io.images import as_float, resample_filter, resize, resized_size, to_rgb

# Official FT code, CIFAR-10 (transforms.Normalize in train_student.py).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
# Official FT code's CIFAR-100 loader (utils.py), the same values RepDistiller uses.
CIFAR100_MEAN = (129.3 / 255, 124.1 / 255, 112.4 / 255)
CIFAR100_STD = (68.2 / 255, 65.4 / 255, 70.4 / 255)
CIFAR_STATS = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # Plain [0, 1] values.
}

def _checked_rgb(image, min_side):
  rgb = to_rgb(image)
  height, width = rgb.shape[:2]
  if min(height, width) < min_side:
    raise ImageError(f"{width}x{height} px is smaller than min_side={min_side}")
  return rgb


def _random_crop(rgb, crop, rng):
  """A random ``crop`` x ``crop`` square; draws its top, then its left."""
  height, width = rgb.shape[:2]
  top = int(rng.integers(0, height - crop + 1))
  left = int(rng.integers(0, width - crop + 1))
  return rgb[top:top + crop, left:left + crop]


def _resize_for_crop(image, shorter_side, crop, resample, min_side):
  rgb = _checked_rgb(image, min_side)
  height, width = rgb.shape[:2]
  target = max(shorter_side or 0, crop)  # Upscale (more) if the crop would not fit.
  if shorter_side or min(height, width) < crop:
    rgb = resize(rgb, resized_size(width, height, target), resample)
  return rgb


def _pixels(rgb, uint8):
  """The crop as the op returns it: float32 in [0, 1], or (``uint8``) the 8-bit pixels of an
  8-bit image, which :mod:`cdft.data.augment` scales to the same float32 inside the step."""
  rgb = np.ascontiguousarray(rgb)
  return rgb if uint8 and rgb.dtype == np.uint8 else np.ascontiguousarray(as_float(rgb))


def cd_train(image, rng, *, shorter_side=300, crop=256, flip=True, resample="bicubic",
             min_side=1, uint8=False):
  """CD training crop: resize, random square crop, random horizontal flip.

  Args:
    image: an image (see :func:`cdft.io.images.to_rgb`).
    rng: ``numpy.random.Generator``; draws crop top, crop left, then the flip.
    shorter_side: resize so the shorter side is this (paper 300); None or 0:
      keep the size (images smaller than ``crop`` are still upscaled to fit).
    crop: side of the square crop (paper 256). If ``shorter_side < crop`` the
      image is resized so its shorter side is ``crop`` instead.
    flip: random horizontal flip with probability 1/2.
    resample: PIL resize filter name (see ``RESAMPLE``; default bicubic).
    min_side: images whose original shorter side is below this are refused
      (ImageError), e.g. to drop thumbnails; the default 1 takes all.
    uint8: return an 8-bit image's crop as uint8 (``config.input.on_device``).

  Returns:
    float32 (crop, crop, 3), RGB in [0, 1] (uint8 with ``uint8``).
  """
  out = _random_crop(_resize_for_crop(image, shorter_side, crop, resample, min_side), crop, rng)
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  return _pixels(out, uint8)


def cd_eval(image, rng=None, *, shorter_side=300, crop=256, resample="bicubic",
            min_side=1, flip=False, uint8=False):
  """CD evaluation crop: resize as ``cd_train``, then the centre crop.

  ``rng`` and ``flip`` are accepted (and ignored) so that the training
  arguments can be reused; the rounding of the offsets is torchvision's
  ``CenterCrop``.
  """
  del rng, flip
  rgb = _resize_for_crop(image, shorter_side, crop, resample, min_side)
  height, width = rgb.shape[:2]
  top = int(round((height - crop) / 2.0))
  left = int(round((width - crop) / 2.0))
  return _pixels(rgb[top:top + crop, left:left + crop], uint8)


def adain_train(image, rng, *, size=512, crop=256, resample="bilinear", min_side=1,
                uint8=False):
  """pytorch-AdaIN's training crop: a ``size`` x ``size`` resize, then a random square crop.

  Returns:
    float32 (crop, crop, 3), RGB in [0, 1] (uint8 with ``uint8``, as ``cd_train``).
  """
  rgb = resize(_checked_rgb(image, min_side), (size, size), resample)
  return _pixels(_random_crop(rgb, crop, rng), uint8)


def normalizer(stats, mean, std):
  """float32 (mean, std) of ``stats`` ('cifar10', 'cifar100', 'none'), or the given ones."""
  if stats not in CIFAR_STATS:
    raise CdftError(f"unknown CIFAR statistics {stats!r}; use one of {', '.join(CIFAR_STATS)}")
  mean = np.asarray(CIFAR_STATS[stats][0] if mean is None else mean, np.float32)
  std = np.asarray(CIFAR_STATS[stats][1] if std is None else std, np.float32)
  if mean.shape != (3,) or std.shape != (3,) or np.any(std <= 0):
    raise CdftError(f"mean and std must be 3 numbers (std > 0), got {mean} and {std}")
  return mean, std


def cifar_train(image, rng, *, pad=4, crop=32, flip=True, stats="cifar10", mean=None,
                std=None, padding_mode="constant"):
  """CIFAR training augmentation of the official FT code, then normalisation.

  Args:
    image: an image (see :func:`cdft.io.images.to_rgb`), normally uint8 32 x 32 x 3.
    rng: ``numpy.random.Generator``; draws crop top, crop left, then the flip.
    pad: pixels of padding on every side (zeros, i.e. black, before the
      normalisation, as torchvision's ``RandomCrop(32, padding=4)``).
    crop: side of the random square crop.
    flip: random horizontal flip with probability 1/2.
    stats: 'cifar10' (official FT numbers), 'cifar100' (FT's CIFAR-100 loader,
      = RepDistiller's) or 'none' (no normalisation).
    mean: per-channel means (overrides ``stats``).
    std: per-channel standard deviations (overrides ``stats``).
    padding_mode: 'constant' (zeros) or 'reflect'.

  Returns:
    float32 (crop, crop, 3), ``(x - mean) / std`` of x in [0, 1].
  """
  mean, std = normalizer(stats, mean, std)
  rgb = as_float(to_rgb(image))
  if pad:
    if padding_mode not in ("constant", "reflect"):
      raise CdftError(f"padding_mode must be 'constant' or 'reflect', got {padding_mode!r}")
    rgb = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), mode=padding_mode)
  height, width = rgb.shape[:2]
  if min(height, width) < crop:
    raise ImageError(f"{width}x{height} px (padded) is smaller than the {crop} px crop")
  top = int(rng.integers(0, height - crop + 1))
  left = int(rng.integers(0, width - crop + 1))
  out = rgb[top:top + crop, left:left + crop]
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray((out - mean) / std, dtype=np.float32)


def cifar_eval(image, rng=None, *, stats="cifar10", mean=None, std=None, **unused):
  """CIFAR evaluation: normalisation only (training-only arguments ignored)."""
  del rng
  bad = set(unused) - {"pad", "crop", "flip", "padding_mode"}
  if bad:
    raise CdftError(f"cifar_eval got unexpected arguments: {', '.join(sorted(bad))}")
  mean, std = normalizer(stats, mean, std)
  rgb = as_float(to_rgb(image))
  return np.ascontiguousarray((rgb - mean) / std, dtype=np.float32)


_OPS = {
    "cd_train": cd_train,
    "cd_eval": cd_eval,
    "adain_train": adain_train,
    "cifar_train": cifar_train,
    "cifar_eval": cifar_eval,
}


def _apply(op, kwargs, example, rng):
  out = {"image": op(example["image"], rng, **kwargs)}
  if "label" in example:
    out["label"] = np.asarray(example["label"], dtype=np.int32)
  return out


def get_preprocess(name, **kwargs):
  """The preprocessing function registered as ``name``, bound to ``kwargs``.

  Args:
    name: one of 'cd_train', 'cd_eval', 'adain_train', 'cifar_train', 'cifar_eval'.
    **kwargs: keyword arguments of that op (e.g. ``shorter_side``, ``crop``).

  Returns:
    ``fn(example: dict, rng: numpy.random.Generator) -> dict`` with 'image'
    (float32 H x W x 3) and, when the example has one, 'label' (int32 scalar).

  Raises:
    CdftError: unknown name, unknown arguments or bad argument values.
  """
  if name not in _OPS:
    raise CdftError(f"unknown preprocessing {name!r}; known: {', '.join(sorted(_OPS))}")
  op = _OPS[name]
  signature = inspect.signature(op)
  has_var_kw = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
  allowed = [p.name for p in signature.parameters.values()
             if p.kind is p.KEYWORD_ONLY]
  unknown = sorted(set(kwargs) - set(allowed)) if not has_var_kw else []
  if unknown:
    raise CdftError(f"preprocessing {name!r} got unknown arguments {', '.join(unknown)}; "
                    f"it takes {', '.join(allowed)}")
  _validate(name, kwargs)
  return functools.partial(_apply, op, dict(kwargs))


def _validate(name, kwargs):
  """Checks argument values once, so a bad config fails before training."""
  for key in ("crop", "size", "shorter_side", "pad", "min_side"):
    if key in kwargs and kwargs[key] is not None:
      value = kwargs[key]
      low = 1 if key == "crop" else 0
      if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
          or value < low):
        raise CdftError(f"{name}: {key} must be an integer >= {low}, got {value!r}")
  if name == "adain_train":
    crop, size = kwargs.get("crop", 256), kwargs.get("size", 512)  # adain_train's defaults
    if crop > size:
      raise CdftError(f"{name}: crop {crop} is larger than the resized size {size}")
  if "resample" in kwargs:
    resample_filter(kwargs["resample"])
  if name.startswith("cifar"):
    normalizer(kwargs.get("stats", "cifar10"), kwargs.get("mean"), kwargs.get("std"))
  if kwargs.get("padding_mode", "constant") not in ("constant", "reflect"):
    raise CdftError(f"{name}: padding_mode must be 'constant' or 'reflect', got "
                    f"{kwargs['padding_mode']!r}")
