"""cdft.weights.resolve: one resolver for every way a network's weights are named."""
import jax
import numpy as np
import pytest

from cdft import models
from cdft import weights
from cdft.errors import CdftError
from cdft.weights import prune


def _shapes(tree):
  return jax.tree.map(np.shape, tree)


def test_random_networks_of_every_kind_fit_their_modules():
  enc = weights.resolve("random", "encoder", stage=2, preset="16x", seed=3)
  dec = weights.resolve("random", "decoder", stage=2, preset="16x", seed=3)
  x = np.zeros((1, 8, 8, 3), np.float32)
  feat = models.get_model("encoder", 2, "16x").apply({"params": enc}, x)
  out = models.get_model("decoder", 2, "16x").apply({"params": dec}, feat)
  assert out.shape == x.shape
  # Seeded: the same seed gives the same weights, another seed others.
  again = weights.resolve("random", "encoder", stage=2, preset="16x", seed=3)
  other = weights.resolve("random", "encoder", stage=2, preset="16x", seed=4)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(enc), jax.tree.leaves(again)))
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(enc), jax.tree.leaves(other)))
  module, variables = weights.resolve("random", "classifier", model="resnet20", num_classes=10,
                                      widths=(4, 8, 16))
  assert module.apply(variables, np.zeros((2, 32, 32, 3), np.float32), train=False)[0].shape == (2, 10)
  para, params = weights.resolve("random", "paraphraser", in_channels=8, rate=0.5)
  assert (para.in_channels, para.factor_channels) == (8, 4)


def test_pruned_is_the_pruning_tool_applied_to_the_teacher():
  teacher = weights.resolve("random", "encoder", stage=2, preset="vgg19", seed=1)
  got = weights.resolve("pruned", "encoder", stage=2, preset="16x", teacher=teacher)
  want = prune.prune_encoder(teacher, 2, models.vgg.stage_widths("16x", 2))
  assert _shapes(got) == _shapes(want) == _shapes(
      weights.resolve("random", "encoder", stage=2, preset="16x"))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


@pytest.mark.parametrize("call,message", [
    (lambda: weights.resolve("random", "vgg"), "unknown kind of network 'vgg'"),
    (lambda: weights.resolve("random", "encoder"),
     "encoder weights need the network's stage and preset"),
    (lambda: weights.resolve("pruned", "decoder", stage=1, preset="16x"),
     "'pruned' decoder weights need the teacher's decoder"),
    (lambda: weights.resolve("/no/such/file.msgpack", "encoder", stage=1, preset="vgg19"),
     "no such weights file or training workdir"),
    (lambda: weights.resolve("/no/such.pth", "paraphraser", in_channels=8),
     "no such paraphraser workdir or .pth file"),
    (lambda: weights.resolve("/no/such.pth", "classifier", model="resnet20", num_classes=10),
     "no such training workdir or .pth file"),
])
def test_names_that_do_not_resolve_are_one_line_errors(call, message):
  with pytest.raises(CdftError, match=message) as e:
    call()
  assert "\n" not in str(e.value)
