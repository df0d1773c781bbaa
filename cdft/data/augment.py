"""Preprocessing inside the jitted step: the host ships uint8 pixels, the device augments.

``config.input.on_device = True`` (the default of every config) moves
``config.input.preprocess`` out of the host pipeline, or its last part: the
photo crops of Collaborative Distillation and AdaIN (``cd_train``, ``cd_eval``,
``adain_train``) keep decoding, resizing and cropping on the host and ship the
crop as uint8 (a quarter of the float32 bytes); the step scales it to [0, 1]
(:func:`to_unit`, the same float32 values). For CIFAR and the digits:

* the host returns each example as stored (:func:`host_op`: uint8 H x W x 3
  and its label; CIFAR and the digits are held in memory as one uint8 array,
  so a batch is one gather by index, no per-example Python);
* the task calls :func:`device_op`'s function on the batch inside the step,
  with a key derived from the step's ``fold_in(key, step)``: the random crop,
  the flip and the normalisation run on the accelerator, in the same program
  as the network.

The device ops are the host ops of :mod:`cdft.data.preprocess` on a batch:
``cifar_train`` (pad, random crop, random horizontal flip, ``(x - mean) /
std`` of x in [0, 1]) and ``cifar_eval`` (the normalisation). The random
numbers are drawn for the whole global batch with one key: the top offsets,
the left offsets, then the flips (``jax.random.split(key, 3)``), so a batch
does not depend on how it is sharded over devices or processes
(``jax_threefry_partitionable``, the default). They are not numpy's numbers:
a run with ``on_device`` sees other crops than one without.
"""

import jax
import jax.numpy as jnp
import numpy as np

from cdft.data import preprocess
from cdft.errors import CdftError
from cdft.errors import ImageError
from cdft.io.images import as_float, to_rgb

# ``fold_in`` of the step's rng whose key draws the augmentation.
KEY_STREAM = 0


def host_op(example, rng=None):
  """The host half of an on-device op: the example's pixels as uint8 RGB, and its label."""
  del rng
  image = np.asarray(example["image"])
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    image = to_rgb(image)
    if image.dtype != np.uint8:
      raise ImageError(f"on-device preprocessing needs 8-bit images, got {image.dtype}")
  out = {"image": np.ascontiguousarray(image)}
  if "label" in example:
    out["label"] = np.asarray(example["label"], dtype=np.int32)
  return out


def crop_offsets(key, batch_size, *, padded_height, padded_width, crop):
  """(tops, lefts, flips) of a batch: the random numbers of :func:`cifar_train`."""
  k_top, k_left, k_flip = jax.random.split(key, 3)
  tops = jax.random.randint(k_top, (batch_size,), 0, padded_height - crop + 1)
  lefts = jax.random.randint(k_left, (batch_size,), 0, padded_width - crop + 1)
  flips = jax.random.bernoulli(k_flip, 0.5, (batch_size,))
  return tops, lefts, flips


def _normalise(x, stats, mean, std):
  mean, std = preprocess.normalizer(stats, mean, std)
  return (x - jnp.asarray(mean)) / jnp.asarray(std)


def cifar_eval(images, key=None, *, stats="cifar10", mean=None, std=None, **unused):
  """``preprocess.cifar_eval`` on a uint8 batch (B, H, W, 3): float32 ``(x - mean) / std``."""
  del key, unused
  return _normalise(jnp.asarray(images).astype(jnp.float32) / 255.0, stats, mean, std)


def cifar_train(images, key, *, pad=4, crop=32, flip=True, stats="cifar10", mean=None,
                std=None, padding_mode="constant"):
  """``preprocess.cifar_train`` on a uint8 batch (B, H, W, 3), inside a jitted step.

  Returns:
    float32 (B, crop, crop, 3).
  """
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  if pad:
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=padding_mode)
  batch, height, width, channels = x.shape
  if min(height, width) < crop:
    raise ImageError(f"{width}x{height} px (padded) is smaller than the {crop} px crop")
  tops, lefts, flips = crop_offsets(key, batch, padded_height=height, padded_width=width,
                                    crop=crop)
  cut = jax.vmap(lambda img, t, l: jax.lax.dynamic_slice(img, (t, l, 0),
                                                         (crop, crop, channels)))
  x = cut(x, tops, lefts)
  if flip:
    x = jnp.where(flips[:, None, None, None], x[:, :, ::-1], x)
  return _normalise(x, stats, mean, std)


# float32 x / 255 of the 256 pixel values, as the host computes them (as_float).
_UNIT = as_float(np.arange(256, dtype=np.uint8))


def to_unit(images, key=None, **unused):
  """The device half of the photo crops (``cd_train``, ``cd_eval``, ``adain_train``):
  uint8 pixels as float32 in [0, 1], exactly :func:`cdft.io.images.as_float`'s values
  (looked up: XLA turns a division by 255 into a multiplication by its reciprocal,
  one unit in the last place off for some pixels); float images (already scaled)
  pass unchanged, as there."""
  del key, unused
  images = jnp.asarray(images)
  if images.dtype != jnp.uint8:
    return images
  return jnp.asarray(_UNIT)[images]


_OPS = {"cifar_train": cifar_train, "cifar_eval": cifar_eval,
        "cd_train": to_unit, "cd_eval": to_unit, "adain_train": to_unit}
# Host ops whose work ``device_op`` can do (or finish) in the step.
DEVICE_OPS = tuple(_OPS)
# Of those, the ops that keep their decoding, resizing and cropping on the host (whole
# images of any size in, fixed-size crops out) and ship the crop as uint8.
HOST_CROP_OPS = ("cd_train", "cd_eval", "adain_train")


def host_fn(input_cfg, in_memory=False):
  """The host pipeline's function for an ``on_device`` ``config.input``.

  CIFAR and the digits: the example as stored (:func:`host_op`), or None for an
  in-memory source, gathered a batch at a time. The photo crops: the op itself,
  returning uint8 crops (``uint8=True``).
  """
  name = input_cfg.preprocess
  if name in HOST_CROP_OPS:
    return preprocess.get_preprocess(name, **input_cfg.pp.to_dict(), uint8=True)
  return None if in_memory else host_op


def device_op(input_cfg):
  """``fn(images, rng) -> float32 images`` for ``config.input`` (identity without ``on_device``).

  ``rng`` is the train step's key (``fold_in(key, step)``); the op draws from
  ``fold_in(rng, KEY_STREAM)``. Evaluation ops take none.

  Raises:
    CdftError: ``on_device`` with a preprocessing that has no device version.
  """
  if input_cfg is None or not input_cfg.get("on_device", False):
    return lambda images, rng=None: images
  name = input_cfg.preprocess
  if name not in _OPS:
    raise CdftError(f"config.input.on_device: preprocessing {name!r} has no on-device "
                    f"version (those that have: {', '.join(DEVICE_OPS)}); set "
                    "config.input.on_device=False")
  kwargs = input_cfg.pp.to_dict()
  preprocess.get_preprocess(name, **kwargs)  # the host op's checks of the arguments
  op = _OPS[name]

  def fn(images, rng=None):
    key = None if rng is None else jax.random.fold_in(rng, KEY_STREAM)
    return op(images, key, **kwargs)
  return fn


def probe(op, images):
  """float32 zeros shaped as one example of ``images`` after ``op`` (a :func:`device_op`)."""
  images = np.asarray(images) if not hasattr(images, "dtype") else images
  one = jax.ShapeDtypeStruct((1,) + tuple(images.shape[1:]), images.dtype)
  return np.zeros(jax.eval_shape(lambda x: op(x, jax.random.key(0)), one).shape, np.float32)
