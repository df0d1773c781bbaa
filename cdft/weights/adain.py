"""pytorch-AdaIN's released networks, read without PyTorch.

pytorch-AdaIN (naoto0804) publishes two files; cdft reads them under their own
names from ``<weights dir>/adain/`` (there is no zoo entry: their SHA-256 is not
known here, so the README says where to get them):

* ``vgg_normalised.pth``: the AdaIN authors' normalized VGG-19 as the full
  53-module ``nn.Sequential`` (legacy torch format). Keys are module indices:
  ``0.weight`` (the 1x1 RGB->BGR conv), ``2.weight`` (conv1_1), ``5.weight``, ...
  Only ``vgg[:31]`` (input -> relu4_1) is used; the later layers are ignored.
* ``decoder.pth``: the decoder ``nn.Sequential`` (either torch format), keys
  ``1.weight`` (512->256), ``5.weight``, ... ``28.weight`` (64->3).

Both become the parameter trees of the AdaIN members of the VGG family
(:func:`cdft.models.vgg.adain_encoder` / :func:`~cdft.models.vgg.adain_decoder`).
"""
import pathlib
import re

import jax
import jax.numpy as jnp

from cdft.errors import WeightError
from cdft.models import vgg
from cdft.weights import convert, torch_format

# vgg[:31] ends at relu4_1; its convolutions sit at these module indices.
VGG_MODULES = 31
VGG_CONVS = (0, 2, 5, 9, 12, 16, 19, 22, 25, 29)
DECODER_CONVS = (1, 5, 8, 11, 14, 18, 21, 25, 28)
FILES = ("vgg_normalised.pth", "decoder.pth")

_INDEX_KEY = re.compile(r"^(\d+)\.(weight|bias)$")
_PROBE = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)


def _convs(state, indices, limit, source):
  """``[(index, weight, bias)]`` of the Sequential's convolutions below module ``limit``."""
  found = {}
  for key in state:
    m = _INDEX_KEY.match(key)
    if m is None:
      raise WeightError(f"{source}: tensor {key!r} is not an nn.Sequential entry (keys like "
                        "'0.weight' expected): not a pytorch-AdaIN file?")
    if int(m.group(1)) < limit:
      found.setdefault(int(m.group(1)), set()).add(m.group(2))
  if tuple(sorted(found)) != indices or any(v != {"weight", "bias"} for v in found.values()):
    raise WeightError(f"{source}: convolutions at modules {sorted(found)}, pytorch-AdaIN's "
                      f"network has them at {list(indices)}: wrong file for this model?")
  return [(i, state[f"{i}.weight"], state[f"{i}.bias"]) for i in indices]


def encoder_from_state(state, source="vgg_normalised.pth"):
  """The AdaIN VGG encoder's ``{'params': ...}`` from a ``vgg_normalised.pth`` state dict."""
  abstract = convert.abstract_params(vgg.adain_encoder("vgg19"), _PROBE)
  return convert.from_sequential_convs(_convs(state, VGG_CONVS, VGG_MODULES, source), abstract,
                                       ["conv0"] + vgg.encoder_layer_names(4), source)


def decoder_from_state(state, source="decoder.pth"):
  """The AdaIN decoder's ``{'params': ...}`` from a ``decoder.pth`` state dict."""
  feat = jax.ShapeDtypeStruct((1, 2, 2, vgg.VGG19_WIDTHS[3]), jnp.float32)
  abstract = convert.abstract_params(vgg.adain_decoder("vgg19"), feat)
  return convert.from_sequential_convs(_convs(state, DECODER_CONVS, 10**9, source), abstract,
                                       vgg.decoder_layer_names(4), source)


def find_files(weights_dir):
  """``(vgg_normalised.pth, decoder.pth)`` under ``<weights_dir>/adain`` (or ``weights_dir``)."""
  root = pathlib.Path(weights_dir)
  for folder in (root / "adain", root):
    if all((folder / name).is_file() for name in FILES):
      return tuple(folder / name for name in FILES)
  raise WeightError(f"{root}: no adain/{FILES[0]} and adain/{FILES[1]}: the AdaIN teacher needs "
                    "pytorch-AdaIN's released files (see the README)")


def load_file(path, kind):
  """The ``{'params': ...}`` tree of one file: ``kind`` 'encoder' (vgg_normalised.pth
  layout) or 'decoder' (decoder.pth layout)."""
  state = torch_format.state_dict(torch_format.load(path), path)
  build = encoder_from_state if kind == "encoder" else decoder_from_state
  return build(state, str(path))


def load(weights_dir):
  """``(encoder, decoder)`` ``{'params': ...}`` trees of pytorch-AdaIN's released files."""
  vgg_file, decoder_file = find_files(weights_dir)
  return load_file(vgg_file, "encoder"), load_file(decoder_file, "decoder")
