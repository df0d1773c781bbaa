"""Factor Transfer weights: the released paraphraser and PyTorch-layout classifier state dicts.

Flax module names mirror the PyTorch state-dict names, so each tensor maps by a
fixed rule (``layer2_0/shortcut_conv/kernel`` <-> ``layer2.0.shortcut.0.weight``,
``bn1/scale`` <-> ``bn1.weight``, ``batch_stats/bn1/var`` <-> ``bn1.running_var``)
plus a layout change:

* Conv2d weight (O, I, kH, kW) -> Flax HWIO: ``w.transpose(2, 3, 1, 0)``;
* ConvTranspose2d weight (I, O, kH, kW), stride 1, pad 1, 3x3 (the paraphraser's
  ``deconv*``) -> the kernel of the equivalent padded conv:
  ``np.flip(w, (2, 3)).transpose(2, 3, 0, 1)``;
* Linear weight (out, in) -> Dense kernel ``w.T``; BN vectors as they are.

The expected tensors come from ``jax.eval_shape`` of the module's init and every
tensor of the file is checked, in the file's order, against them: an unexpected,
misshapen or non-finite tensor, or a missing one, is a one-line
:class:`~cdft.errors.WeightError` naming the file and the first offending
tensor. ``num_batches_tracked`` counters are accepted and dropped.
"""
import functools
import os
import re

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from cdft.errors import WeightError
from cdft.models.factor_transfer import Paraphraser, Translator
from cdft.weights import torch_format, zoo

# The released Paraphraser.pth: ResNet-56 layer3 (64 channels), rate 0.5.
RELEASED_IN_CHANNELS = 64
RELEASED_RATE = 0.5

_IGNORED_SUFFIX = ".num_batches_tracked"
_MODULE_RULES = (
    (re.compile(r"^layer(\d+)_(\d+)$"), r"layer\1.\2"),
    (re.compile(r"^block(\d+)_(\d+)$"), r"block\1.layer.\2"),
    (re.compile(r"^shortcut_conv$"), "shortcut.0"),
    (re.compile(r"^shortcut_bn$"), "shortcut.1"),
    (re.compile(r"^conv_shortcut$"), "convShortcut"),
)
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _torch_module_name(name):
  for pattern, replacement in _MODULE_RULES:
    if pattern.match(name):
      return pattern.sub(replacement, name)
  return name


def torch_key(path):
  """PyTorch state-dict key of a Flax variable path ``(collection, *modules, leaf)``."""
  collection, *modules, leaf = path
  try:
    suffix = _LEAF_NAMES[(collection, leaf)]
  except KeyError:
    raise WeightError(f"no PyTorch name for Flax variable {'/'.join(path)}") from None
  return ".".join([_torch_module_name(m) for m in modules] + [suffix])


def _conv_layout(shape):
  """(torch shape, torch->flax, flax->torch) for a Flax leaf of ``shape``."""
  if len(shape) == 4:  # HWIO <-> OIHW
    return ((shape[3], shape[2], shape[0], shape[1]),
            lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))
  if len(shape) == 2:  # Dense (in, out) <-> Linear (out, in)
    return (shape[1], shape[0]), lambda w: w.T, lambda k: k.T
  return tuple(shape), lambda w: w, lambda k: k


def _deconv_layout(shape):
  """Layout of a stride-1 pad-1 ConvTranspose2d kept as a Flax conv kernel (HWIO)."""
  if len(shape) != 4:
    return _conv_layout(shape)
  return ((shape[2], shape[3], shape[0], shape[1]),
          lambda w: np.flip(w, (2, 3)).transpose(2, 3, 0, 1),
          lambda k: np.flip(k.transpose(2, 3, 0, 1), (2, 3)))


def _layout(path, shape):
  if path[1].startswith("deconv"):
    return _deconv_layout(shape)
  return _conv_layout(shape)


def _flat(tree):
  return flax.traverse_util.flatten_dict(dict(tree))


def _forward_order(flat, module_order):
  """Paths sorted by their module's first call (if known), params before batch_stats."""
  first = {}
  for path in module_order or ():
    first.setdefault(tuple(path), len(first))
  leaves = list(_LEAF_NAMES)
  return sorted(flat, key=lambda p: (first.get(tuple(p[1:-1]), len(first)),
                                     leaves.index((p[0], p[-1]))))


def variables_from_state(state, abstract, source="", module_order=None):
  """Converts a PyTorch-layout ``{name: array}`` dict into Flax variables.

  Args:
    state: the state dict (numpy arrays, e.g. from :func:`torch_format.state_dict`
      or an ``.npz`` file).
    abstract: the variables' shape tree (``{'params': ..., 'batch_stats': ...}``,
      e.g. from ``jax.eval_shape(module.init, ...)``).
    source: file name for error messages.
    module_order: module paths in call order (see :func:`abstract_variables`);
      a missing tensor is then reported in forward order.

  Returns:
    Variables of float32 numpy arrays, same structure as ``abstract``.

  Raises:
    WeightError: an unexpected, misshapen or non-finite tensor (the first in
      the file's order), or a missing one.
  """
  source = source or "state dict"
  expected = {}
  flat_abstract = _flat(abstract)
  for path in _forward_order(flat_abstract, module_order):
    shape, to_flax, _ = _layout(path, tuple(flat_abstract[path].shape))
    expected[torch_key(path)] = (path, shape, to_flax)
  flat = {}
  for key, value in state.items():
    if key.endswith(_IGNORED_SUFFIX):
      continue
    if key not in expected:
      raise WeightError(f"{source}: unexpected tensor {key!r}: wrong file for this model?")
    path, want, to_flax = expected[key]
    got = tuple(np.shape(value))
    if got != want:
      raise WeightError(f"{source}: tensor {key!r} has shape {got}, the model expects {want}")
    array = np.asarray(value, np.float32)
    if not np.all(np.isfinite(array)):
      raise WeightError(f"{source}: tensor {key!r} has non-finite values")
    flat[path] = np.ascontiguousarray(to_flax(array))
  missing = [k for k in expected if k not in state]
  if missing:
    raise WeightError(f"{source}: tensor {missing[0]!r} is missing ({len(missing)} of "
                      f"{len(expected)} expected tensors are missing): wrong file for this model?")
  return flax.traverse_util.unflatten_dict(flat)


def variables_to_state(variables, dtype=np.float32):
  """Flax variables -> PyTorch-layout ``{name: array of dtype}`` (inverse of the above)."""
  state = {}
  for path, leaf in _flat(variables).items():
    _, _, to_torch = _layout(path, np.shape(leaf))
    state[torch_key(path)] = np.ascontiguousarray(to_torch(np.asarray(leaf, dtype)))
  return state


def abstract_variables(module, example_input, with_order=False, **kwargs):
  """Shape tree of ``module.init(key, example_input, **kwargs)`` (nothing computed).

  With ``with_order=True`` returns ``(tree, module paths in call order)``.
  """
  order = []

  def record(next_fun, args, kw, context):
    order.append(context.module.path)
    return next_fun(*args, **kw)

  init = functools.partial(module.init, **kwargs)
  with nn.intercept_methods(record):
    tree = jax.eval_shape(init, jax.random.key(0), example_input)
  return (tree, order) if with_order else tree


def _convert(module, probe, state, source, **kwargs):
  abstract, order = abstract_variables(module, probe, with_order=True, **kwargs)
  return variables_from_state(state, abstract, source, order)


def _shape_of(state, key, source):
  source = source or "state dict"
  if key not in state:
    raise WeightError(f"{source}: tensor {key!r} is missing: not a Factor Transfer "
                      "paraphraser/translator file?")
  shape = tuple(np.shape(state[key]))
  if len(shape) != 4:
    raise WeightError(f"{source}: tensor {key!r} has shape {shape}, expected a 4-D conv weight")
  return shape


def paraphraser_from_state(state, in_channels=None, rate=RELEASED_RATE, source=""):
  """Paraphraser params from its PyTorch state dict (the official ``Paraphraser``).

  Args:
    state: ``conv0..2`` / ``deconv0..2`` weights and biases, PyTorch layouts.
    in_channels: feature channels m; default read from ``conv0.weight``.
    rate: paraphrase rate (factor channels ``round(m * rate)``).
    source: file name for error messages.

  Returns:
    ``(Paraphraser module, {'params': ...})``.
  """
  if in_channels is None:
    in_channels = _shape_of(state, "conv0.weight", source)[1]
  module = Paraphraser(in_channels, rate)
  probe = jnp.zeros((1, 4, 4, in_channels), jnp.float32)
  return module, _convert(module, probe, state, source)


def translator_from_state(state, in_channels=None, factor_channels=None, source=""):
  """Translator params from a PyTorch state dict; widths default to the file's.

  Returns:
    ``(Translator module, {'params': ...})``.
  """
  if in_channels is None:
    in_channels = _shape_of(state, "conv0.weight", source)[1]
  if factor_channels is None:
    factor_channels = _shape_of(state, "conv2.weight", source)[0]
  module = Translator(in_channels, factor_channels)
  probe = jnp.zeros((1, 4, 4, in_channels), jnp.float32)
  return module, _convert(module, probe, state, source)


def classifier_from_state(module, state, source="", image_size=32):
  """``{'params', 'batch_stats'}`` of a ResNet / WideResNet from its PyTorch state dict.

  Args:
    module: e.g. ``resnet.resnet20()``; its names follow the PyTorch ones.
    state: ``conv1.weight``, ``bn1.running_var``, ``layer1.0.conv1.weight`` ...
    source: file name for error messages.
    image_size: spatial size of the probe input used to derive the shapes.
  """
  probe = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return _convert(module, probe, state, source, train=False)


def load_paraphraser_file(path, rate=RELEASED_RATE):
  """Reads an official ``Paraphraser.pth`` (``{epoch, state_dict, optimizer}``).

  Returns:
    ``(Paraphraser module, {'params': ...})`` (numpy float32 leaves).
  """
  source = os.fspath(path)
  state = torch_format.state_dict(torch_format.load(path), source)
  return paraphraser_from_state(state, rate=rate, source=source)


def load_ft_paraphraser(weights_dir=None, cache_dir=None):
  """The released Factor Transfer paraphraser (ResNet-56 ``layer3``, 64 -> 32 channels).

  Fetched through the model zoo (``ft_paraphraser/Paraphraser.pth``): from
  ``weights_dir`` / $CDFT_WEIGHTS_DIR when set, else downloaded to the cache.

  Returns:
    ``(Paraphraser(64, 0.5), {'params': ...})``.
  """
  path = zoo.fetch("ft_paraphraser", "Paraphraser.pth", weights_dir=weights_dir,
                   cache_dir=cache_dir)
  module, variables = load_paraphraser_file(path)
  if module.in_channels != RELEASED_IN_CHANNELS:
    raise WeightError(f"{path}: paraphraser for {module.in_channels} channels, the released "
                      f"one has {RELEASED_IN_CHANNELS}")
  return module, variables
