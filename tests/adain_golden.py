"""The random weights of ../shared/golden/adain, regenerated with numpy (its README, "Weights").

Not stored anywhere: each network has its own ``numpy.random.RandomState(seed)``
and draws its tensors in the manifest's order (PyTorch ``state_dict`` order):
a conv weight is ``f32(standard_normal(OIHW)) * f32(sqrt(2 / fan_in))``, a bias
``f32(uniform(-0.05, 0.05))``. :func:`check` compares every tensor with the
SHA-256 of ``weights_check.json`` before a test trusts them.
"""
import hashlib
import json

import numpy as np


def generate(golden):
  """``{'vgg' | 'decoder' | 'se': {torch key: float32 array}}`` of the golden set."""
  manifest = json.loads((golden / "manifest.json").read_text())
  nets = {}
  for net in manifest["weights"]:
    rs = np.random.RandomState(net["seed"])
    state = {}
    for key, shape in net["tensors_in_generation_order"]:
      if key.endswith(".weight"):
        fan_in = int(np.prod(shape[1:]))
        state[key] = (rs.standard_normal(shape).astype(np.float32) *
                      np.float32(np.sqrt(2.0 / fan_in)))
      else:
        state[key] = rs.uniform(-0.05, 0.05, size=shape).astype(np.float32)
    nets[net["network"]] = state
  return nets


def check(nets, golden):
  """Raises AssertionError unless every tensor is bit-identical to the generator's."""
  expected = json.loads((golden / "weights_check.json").read_text())
  for net in expected["networks"]:
    state = nets[net["network"]]
    assert list(state) == [t["key"] for t in net["tensors"]], net["network"]
    for t in net["tensors"]:
      value = np.ascontiguousarray(state[t["key"]], "<f4")
      digest = hashlib.sha256(value.tobytes()).hexdigest()
      assert digest == t["sha256_f32le"], (net["network"], t["key"])
