"""Tests of cdft.weights.prune: L1 filter pruning of VGG-19 into the 16x students."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdft import models
from cdft.errors import WeightError
from cdft.models import vgg
from cdft.weights import convert, pretrained, prune


def _random_tree(module, probe, seed):
  """A numpy tree with ``module``'s parameter shapes, filled with N(0, 1)."""
  rng = np.random.default_rng(seed)
  abstract = convert.abstract_params(module, probe)
  return {"params": jax.tree.map(
      lambda s: rng.standard_normal(s.shape, dtype=np.float32), abstract)}


def _shapes(tree):
  return jax.tree.map(lambda x: tuple(x.shape), tree)


@pytest.fixture(scope="module")
def big_vgg():
  return _random_tree(models.get_model("encoder", 5, "vgg19"), jnp.zeros((1, 32, 32, 3)), 0)


@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5])
def test_pruned_trees_fit_the_16x_models(stage, big_vgg):
  image = jnp.zeros((1, 32, 32, 3), jnp.float32)
  enc = models.get_model("encoder", stage, "16x")
  small = prune.prune_encoder(big_vgg, stage)
  assert _shapes(small) == _shapes({"params": convert.abstract_params(enc, image)})
  feat = jax.eval_shape(enc.apply, small, image)  # loads into the model as is
  assert feat.shape[-1] == vgg.stage_widths("16x", stage)[stage - 1]
  np.testing.assert_array_equal(small["params"]["conv0"]["kernel"],
                                big_vgg["params"]["conv0"]["kernel"])

  big_dec = _random_tree(models.get_model("decoder", stage, "vgg19"),
                         jnp.zeros((1, 2, 2, vgg.VGG19_WIDTHS[stage - 1])), stage)
  dec = models.get_model("decoder", stage, "16x")
  small_dec = prune.prune_decoder(big_dec, stage)
  assert _shapes(small_dec) == _shapes({"params": convert.abstract_params(dec, feat)})
  assert jax.eval_shape(dec.apply, small_dec, feat).shape == (1, 32, 32, 3)
  # The RGB conv keeps its 3 outputs in order.
  np.testing.assert_array_equal(small_dec["params"]["conv11"]["bias"],
                                big_dec["params"]["conv11"]["bias"])

  emb = prune.init_embedding(jax.random.key(stage), stage)
  feats = tuple(jax.ShapeDtypeStruct((1, 4, 4, w), jnp.float32)
                for w in vgg.stage_widths("16x", stage)[:stage])
  want = convert.abstract_params(models.get_model("embedding", stage, "16x"), feats)
  assert _shapes(emb) == _shapes({"params": want})


def _kernel(rng, shape, out_norms=None, in_norms=None):
  """A random-sign kernel whose output filters / input channels have the given L1 norms.

  With both, ``|w| ~ a_in * b_out`` (rank one), so both rankings are known.
  """
  kh, kw, cin, cout = shape
  a = np.ones(cin) if in_norms is None else np.asarray(in_norms, np.float64)
  b = np.ones(cout) if out_norms is None else np.asarray(out_norms, np.float64)
  mag = a[:, None] * b[None, :] / (kh * kw)
  if in_norms is None:
    mag = mag / cin
  if out_norms is None:
    mag = mag / cout
  signs = rng.choice([-1.0, 1.0], size=shape)
  return (signs * mag[None, None]).astype(np.float32)


def test_hand_made_encoder_keeps_the_largest_filters():
  rng = np.random.default_rng(0)
  big = {
      "conv0": {"kernel": rng.normal(size=(1, 1, 3, 3)).astype(np.float32),
                "bias": rng.normal(size=3).astype(np.float32)},
      # L1 norms 4, 1, 3, 2: keep filters 0 and 2; ascending-L1 order [2, 0].
      "conv11": {"kernel": _kernel(rng, (3, 3, 3, 4), [4, 1, 3, 2]),
                 "bias": np.arange(4, dtype=np.float32)},
      # 1, 5, 2, 6: keep 1 and 3.
      "conv12": {"kernel": _kernel(rng, (3, 3, 4, 4), [1, 5, 2, 6]),
                 "bias": np.arange(4, dtype=np.float32) + 10},
      # 6, 5, 4, 3, 2, 1: keep 0, 1, 2; ascending-L1 order [2, 1, 0].
      "conv21": {"kernel": _kernel(rng, (3, 3, 4, 6), [6, 5, 4, 3, 2, 1]),
                 "bias": np.arange(6, dtype=np.float32) + 20},
  }
  for k in ("conv11", "conv12", "conv21"):
    assert big[k]["kernel"].shape[-1] == big[k]["bias"].shape[0]
  expected = {"l1": ([2, 0], [1, 3], [2, 1, 0]), "index": ([0, 2], [1, 3], [0, 1, 2])}
  for order, (k11, k12, k21) in expected.items():
    small = prune.prune_encoder(big, 2, widths=(2, 3), order=order)
    assert set(small) == {"conv0", "conv11", "conv12", "conv21"}  # no wrapper in, none out
    kept = prune.kept_filters(big, 2, widths=(2, 3), order=order)
    assert {k: v.tolist() for k, v in kept.items()} == {
        "conv0": [0, 1, 2], "conv11": k11, "conv12": k12, "conv21": k21}
    np.testing.assert_array_equal(small["conv0"]["kernel"], big["conv0"]["kernel"])
    np.testing.assert_array_equal(small["conv11"]["kernel"], big["conv11"]["kernel"][..., k11])
    np.testing.assert_array_equal(small["conv12"]["kernel"],
                                  big["conv12"]["kernel"][:, :, k11][..., k12])
    np.testing.assert_array_equal(small["conv21"]["kernel"],
                                  big["conv21"]["kernel"][:, :, k12][..., k21])
    np.testing.assert_array_equal(small["conv21"]["bias"], np.array(k21) + 20.0)

  # Function: the pruned stage-1 encoder computes the kept channels of the big one.
  x = jnp.asarray(rng.random((1, 8, 8, 3)), jnp.float32)
  big1 = {"params": {k: big[k] for k in ("conv0", "conv11")}}
  out_big = vgg.Encoder(stage=1, widths=(4,)).apply(big1, x)
  out_small = vgg.Encoder(stage=1, widths=(2,)).apply(prune.prune_encoder(big1, 1, (2,)), x)
  np.testing.assert_allclose(out_small, out_big[..., [2, 0]], rtol=1e-5, atol=1e-5)


def test_hand_made_decoder_first_conv_ranks_its_inputs():
  rng = np.random.default_rng(1)
  # Big stage-2 decoder with widths (4, 6): conv21 6->4, conv12 4->4, conv11 4->3.
  big = {"params": {
      # Rank one: input norms 1, 6, 2, 5, 3, 4 (keep 3 -> [5, 3, 1]); outputs 2, 4, 1, 3.
      "conv21": {"kernel": _kernel(rng, (3, 3, 6, 4), [2, 4, 1, 3], [1, 6, 2, 5, 3, 4]),
                 "bias": np.arange(4, dtype=np.float32)},
      "conv12": {"kernel": _kernel(rng, (3, 3, 4, 4), [3, 1, 4, 2]),
                 "bias": np.arange(4, dtype=np.float32)},
      "conv11": {"kernel": _kernel(rng, (3, 3, 4, 3), [1, 3, 2]),
                 "bias": np.array([7, 8, 9], np.float32)},
  }}
  p = big["params"]
  small = prune.prune_decoder(big, 2, widths=(2, 3))["params"]
  np.testing.assert_array_equal(small["conv21"]["kernel"],
                                p["conv21"]["kernel"][:, :, [5, 3, 1]][..., [3, 1]])
  np.testing.assert_array_equal(small["conv12"]["kernel"],
                                p["conv12"]["kernel"][:, :, [3, 1]][..., [0, 2]])
  # The RGB conv: all 3 outputs, in order; inputs follow conv12.
  np.testing.assert_array_equal(small["conv11"]["kernel"], p["conv11"]["kernel"][:, :, [0, 2]])
  np.testing.assert_array_equal(small["conv11"]["bias"], [7, 8, 9])
  # Following the encoder's kept relu2_1 filters instead.
  follow = prune.prune_decoder(big, 2, widths=(2, 3), input_keep=[4, 0, 2])["params"]
  np.testing.assert_array_equal(follow["conv21"]["kernel"],
                                p["conv21"]["kernel"][:, :, [4, 0, 2]][..., [3, 1]])
  with pytest.raises(WeightError, match="input_keep must be 3 distinct indices in 0..5"):
    prune.prune_decoder(big, 2, widths=(2, 3), input_keep=[0, 0, 1])


def test_bad_inputs_are_clear_errors(big_vgg):
  with pytest.raises(WeightError, match=r"encoder: layer 'conv11': cannot keep 80 of 64 filters"):
    prune.prune_encoder(big_vgg, 1, widths=(80,))
  partial = {"params": {k: v for k, v in big_vgg["params"].items() if k != "conv22"}}
  with pytest.raises(WeightError, match=r"encoder: layer 'conv22' is missing"):
    prune.prune_encoder(partial, 3)
  bad = {"params": dict(big_vgg["params"], conv12={
      "kernel": np.zeros((3, 3, 32, 64), np.float32), "bias": np.zeros(64, np.float32)})}
  with pytest.raises(WeightError, match=r"layer 'conv12': has 32 input channels, the previous "
                                        r"layer has 64 outputs"):
    prune.prune_encoder(bad, 2)
  with pytest.raises(ValueError, match="order must be one of"):
    prune.l1_keep(np.zeros((3, 3, 2, 2)), 1, order="random")


# --- The released pruned initialisations (small16x_ae_base) ----------------------------------


@pytest.fixture(scope="module")
def base(weights_dir):
  return {k: pretrained.load_cd16x_base(k, weights_dir) for k in (1, 4, 5)}


def _l1_out(kernel):
  return np.abs(kernel).sum(axis=(0, 1, 2))


def test_e1_base_pruned_to_16_filters_is_e5_base(base):
  e1 = base[1]["encoder"]
  e5 = base[5]["encoder"]["params"]
  small = prune.prune_encoder(e1, 1, widths=(16,))["params"]
  for name in ("conv0", "conv11"):
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(small[name][leaf], e5[name][leaf], err_msg=f"{name}.{leaf}")
  # The order is the official one: e1_base's 24 filters come sorted by L1 norm (the tail
  # of an ascending argsort over VGG's 64), and e5_base keeps the last 16 in that order.
  assert np.all(np.diff(_l1_out(e1["params"]["conv11"]["kernel"])) >= 0)
  np.testing.assert_array_equal(e5["conv11"]["kernel"], e1["params"]["conv11"]["kernel"][..., 8:])


def test_e4_and_e5_base_share_the_pruned_vgg_prefix(base):
  e4, e5 = base[4]["encoder"]["params"], base[5]["encoder"]["params"]
  assert set(e4) == {"conv0"} | set(vgg.encoder_layer_names(4))
  for name in e4:
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(e4[name][leaf], e5[name][leaf], err_msg=name)


def test_full_width_layers_are_copied_in_order(base):
  # Pruning e5_base to its own widths changes nothing, although e.g. its conv12
  # filters are not sorted by L1 norm: a layer that is not pruned is not reordered.
  e5 = base[5]["encoder"]
  assert not np.all(np.diff(_l1_out(e5["params"]["conv12"]["kernel"])) >= 0)
  same = prune.prune_encoder(e5, 5)
  jax.tree.map(np.testing.assert_array_equal, same, e5)


def test_d1_base_inputs_follow_the_column_rule(base):
  # The first decoder conv has no previous layer: its input channels are ranked by
  # their own L1 norm (ascending), which d1_base's 24 conv11 columns show.
  d1 = base[1]["decoder"]
  kernel = d1["params"]["conv11"]["kernel"]
  assert np.all(np.diff(np.abs(kernel).sum(axis=(0, 1, 3))) >= 0)
  small = prune.prune_decoder(d1, 1, widths=(16,))["params"]["conv11"]
  np.testing.assert_array_equal(small["kernel"], kernel[:, :, 8:])
  np.testing.assert_array_equal(small["bias"], d1["params"]["conv11"]["bias"])


def test_embedding_init_matches_the_released_aux_heads(base):
  # e*_base's aux heads are PyTorch's default Conv2d init: U(+-1/sqrt(cin)); so are ours.
  released = base[5]["embedding"]["params"]["conv41_aux"]
  ours = prune.init_embedding(jax.random.key(0), 5)["params"]["conv41_aux"]
  bound = 1.0 / np.sqrt(128)
  for leaf in ("kernel", "bias"):
    a, b = released[leaf], ours[leaf]
    assert a.shape == b.shape
    for x in (a, b):
      assert np.abs(x).max() <= bound and np.abs(x).max() > 0.97 * bound
  for x in (released["kernel"], ours["kernel"]):
    np.testing.assert_allclose(x.std(), bound / np.sqrt(3), rtol=0.02)
    assert abs(x.mean()) < 0.01 * bound
  other = prune.init_embedding(jax.random.key(1), 5)["params"]["conv41_aux"]["kernel"]
  assert not np.array_equal(other, ours["kernel"])  # the key matters


def test_prune_student_has_the_base_layout(base, big_vgg):
  student = prune.prune_student(jax.random.key(1), 5, big_vgg)
  assert set(student) == {"encoder", "embedding"}
  for part in ("encoder", "embedding"):
    assert _shapes(student[part]) == _shapes(base[5][part])
