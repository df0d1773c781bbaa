"""From PyTorch / Torch7 tensors to Flax parameter trees (checked tensor by tensor), and back.

Flax module names mirror the official state-dict names (``conv11`` <-> ``conv11.weight``
/ ``conv11.bias``), so the mapping is: the weight transposed OIHW -> HWIO, the
bias as is. The expected tree comes from ``jax.eval_shape`` of the module's init,
and every tensor is checked against it: a missing, extra or misshapen tensor is a
:class:`~cdft.errors.WeightError` naming the file and the first offending tensor,
never a silent partial load.
"""
import jax
import jax.numpy as jnp
import numpy as np

from cdft.errors import WeightError


def abstract_params(module, example_input):
  """The shape tree of ``module``'s parameters for inputs shaped like ``example_input``."""
  tree = jax.eval_shape(module.init, jax.random.key(0), example_input)
  return tree["params"]


def _to_flax(name, array):
  if name == "kernel":
    return np.ascontiguousarray(np.transpose(array, (2, 3, 1, 0)))  # OIHW -> HWIO
  return np.asarray(array)


def from_torch_state(state, abstract, source="", prefix=""):
  """Converts a flat ``{'conv11.weight': OIHW, ...}`` dict into a Flax param tree.

  Args:
    state: torch-named float arrays; only the keys the tree needs are consumed.
    abstract: ``{layer: {'kernel': ShapeDtypeStruct, 'bias': ...}}`` (see
      :func:`abstract_params`).
    source: file name for error messages.
    prefix: prefix of the torch keys (e.g. ``'model.'``).

  Returns:
    ``{'params': {layer: {'kernel': HWIO float32, 'bias': float32}}}`` of numpy arrays.

  Raises:
    WeightError: on the first missing, misshapen or non-finite tensor.
  """
  expected = {}
  for layer, leaves in abstract.items():
    for leaf in ("kernel", "bias"):
      if leaf in leaves:
        expected[f"{prefix}{layer}.{'weight' if leaf == 'kernel' else 'bias'}"] = (
            layer, leaf, tuple(leaves[leaf].shape))
  params = {layer: {} for layer in abstract}
  # Checked in the file's order, so the error names the first offending tensor.
  for key in [k for k in state if k in expected] + [k for k in expected if k not in state]:
    layer, leaf, want = expected[key]
    if key not in state:
      raise WeightError(f"{source}: tensor {key!r} is missing (found {len(state)} tensors: "
                        f"{', '.join(list(state)[:6])}{', ...' if len(state) > 6 else ''})")
    got = tuple(np.shape(state[key]))
    if leaf == "kernel":
      want = (want[3], want[2], want[0], want[1])  # report in the file's OIHW layout
    if got != want:
      raise WeightError(f"{source}: tensor {key!r} has shape {got}, the model expects {want}")
    value = _to_flax(leaf, np.asarray(state[key], np.float32))
    if not np.all(np.isfinite(value)):
      raise WeightError(f"{source}: tensor {key!r} has non-finite values")
    params[layer][leaf] = value
  return {"params": params}


def to_torch_state(params):
  """``{layer: {'kernel': HWIO, 'bias'}}`` -> ``{'layer.weight': OIHW, 'layer.bias'}``.

  The inverse of :func:`from_torch_state` for the CD VGG family (plain
  convolutions), for ``cdft-weights export``.
  """
  state = {}
  for layer, leaves in params.items():
    for leaf, value in leaves.items():
      value = np.asarray(value, np.float32)
      if leaf == "kernel":
        state[f"{layer}.weight"] = np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1)))
      elif leaf == "bias":
        state[f"{layer}.bias"] = np.ascontiguousarray(value)
      else:
        raise WeightError(f"no PyTorch name for the {layer}/{leaf} parameter")
  return state


def check_consumed(state, trees, source, prefix=""):
  """Raises WeightError if ``state`` has tensors that none of ``trees`` uses."""
  used = set()
  for tree in trees:
    for layer, leaves in tree["params"].items():
      for leaf in leaves:
        used.add(f"{prefix}{layer}.{'weight' if leaf == 'kernel' else 'bias'}")
  extra = [k for k in state if k not in used]
  if extra:
    raise WeightError(f"{source}: unexpected tensor {extra[0]!r} "
                      f"({len(extra)} not used by the model): wrong file for this model?")


def from_sequential_convs(convs, abstract, names, source=""):
  """Converts the convolutions of a Torch7 ``nn.Sequential`` (in order) into a param tree.

  Args:
    convs: ``[(index, weight OIHW, bias), ...]`` in forward order.
    abstract: the expected param shapes.
    names: layer names for the convolutions, in the same order.
    source: file name for error messages.
  """
  if len(convs) != len(names):
    raise WeightError(f"{source}: {len(convs)} convolutions, the model has {len(names)} "
                      f"({', '.join(names)}): wrong file for this model?")
  state = {}
  for (_, weight, bias), name in zip(convs, names):
    state[f"{name}.weight"] = weight
    state[f"{name}.bias"] = bias
  return from_torch_state(state, abstract, source)


def to_device(tree):
  """numpy tree -> float32 jax arrays."""
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
