"""Factor Transfer models, losses and weights against the official code (golden/ft)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cdft import losses
from cdft import models
from cdft.errors import CdftError, WeightError
from cdft.models import factor_transfer as ftm
from cdft.models import resnet
from cdft.models.norm import BatchNorm
from cdft.weights import ft, torch_format

TOL = dict(rtol=1e-5, atol=1e-5)  # golden/ft/README.md


@pytest.fixture(scope="module")
def golden(golden_dir):
  root = golden_dir / "ft"

  def load(name):
    return np.load(root / name) if name.endswith(".npy") else dict(np.load(root / name))

  return load


def _random_variables(module, x, seed=0, **kwargs):
  """Variables shaped like ``module.init``'s, drawn with numpy (jax's RNG compiles slowly)."""
  rng = np.random.default_rng(seed)
  abstract = ft.abstract_variables(module, x, **kwargs)
  return jax.tree.map(lambda a: (rng.standard_normal(a.shape) * 0.1).astype(np.float32), abstract)


@pytest.fixture(scope="module")
def resnet20_vars(golden):
  net = resnet.resnet20()
  return net, ft.classifier_from_state(net, golden("resnet20_init.npz"), "resnet20_init.npz")


# ----------------------------------------------------------------------------
# Paraphraser / translator / FT loss.
# ----------------------------------------------------------------------------


def test_released_paraphraser_factor_and_reconstruction(weights_dir, golden):
  module, variables = ft.load_ft_paraphraser(weights_dir)
  assert (module.in_channels, module.factor_channels) == (64, 32)
  x = golden("feature_in.npy")
  factor = module.apply(variables, x, method=module.encode)
  np.testing.assert_allclose(factor, golden("paraphraser_factor.npy"), **TOL)
  recon = module.apply(variables, x)
  np.testing.assert_allclose(recon, golden("paraphraser_recon.npy"), **TOL)
  # Mode 0 is mode 2 of mode 1, exactly.
  np.testing.assert_array_equal(recon, module.apply(variables, factor, method=module.decode))
  # The .pth and its npz re-export convert to the same tree, bit for bit.
  _, from_npz = ft.paraphraser_from_state(golden("paraphraser_trained.npz"))
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(from_npz)):
    np.testing.assert_array_equal(a, b)


def test_translator_ft_loss_and_gradients(golden):
  module, variables = ft.translator_from_state(golden("translator_init.npz"))
  x = golden("translator_in.npy")
  np.testing.assert_allclose(module.apply(variables, x), golden("translator_factor.npy"), **TOL)
  factor_t = jnp.asarray(golden("paraphraser_factor.npy"))

  def loss(v, ft_):
    return 500 * losses.ft_loss(module.apply(v, x), ft_)

  value, (grads, grad_t) = jax.value_and_grad(loss, argnums=(0, 1))(variables, factor_t)
  np.testing.assert_allclose(float(value), 9.47387886, rtol=1e-5)
  np.testing.assert_array_equal(grad_t, 0)  # the teacher factor is a constant
  want = golden("translator_ft_grads.npz")
  got = ft.variables_to_state(grads)
  assert {f"grad.{k}" for k in got} == set(want)
  for key, g in got.items():
    np.testing.assert_allclose(g, want[f"grad.{key}"], **TOL, err_msg=key)


def test_ft_loss_matches_numpy_on_nchw():
  rng = np.random.default_rng(0)
  s, t = rng.standard_normal((2, 2, 3, 3, 5)).astype(np.float32)
  t[1] = 0  # an all-zero factor: the 1e-12 floor keeps it 0, not NaN

  def normalize(a):  # PyTorch order: NCHW flatten
    flat = a.transpose(0, 3, 1, 2).reshape(len(a), -1).astype(np.float64)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)

  want = np.mean(np.abs(normalize(s) - normalize(t)))
  np.testing.assert_allclose(losses.ft_loss(s, t), want, rtol=1e-6)
  with pytest.raises(CdftError, match=r"ft_loss: student \(2, 3, 3, 5\) and teacher"):
    losses.ft_loss(s, t[..., :4])


def test_paraphraser_translator_any_width():
  # A VGG relu2_1-like map of the 16x student (32 channels) and an odd rate.
  para = ftm.Paraphraser(32, rate=0.25)
  x = jnp.abs(jax.random.normal(jax.random.key(0), (1, 6, 5, 32)))
  v = para.init(jax.random.key(1), x)
  f = para.apply(v, x, method=para.encode)
  assert f.shape == (1, 6, 5, 8) and para.apply(v, x).shape == x.shape
  shapes = {k: p["kernel"].shape for k, p in v["params"].items()}
  assert shapes == {"conv0": (3, 3, 32, 32), "conv1": (3, 3, 32, 8), "conv2": (3, 3, 8, 8),
                    "deconv0": (3, 3, 8, 8), "deconv1": (3, 3, 8, 32), "deconv2": (3, 3, 32, 32)}
  # PyTorch default init: U(+-1/sqrt(fan_in)); a transposed conv's fan_in is out*9.
  for name, fan_in in (("conv0", 9 * 32), ("conv1", 9 * 32), ("deconv1", 9 * 32),
                       ("deconv0", 9 * 8)):
    for leaf in ("kernel", "bias"):
      a = np.abs(np.asarray(v["params"][name][leaf]))
      assert a.max() <= 1 / np.sqrt(fan_in) and a.max() > 0.7 / np.sqrt(fan_in), (name, leaf)
  trans = ftm.Translator(48, 8)
  y = jnp.ones((1, 6, 5, 48))
  assert jax.eval_shape(lambda: trans.init_with_output(jax.random.key(2), y)[0]).shape == (
      1, 6, 5, 8)
  with pytest.raises(CdftError, match=r"Translator expects NHWC input with 48 channels"):
    jax.eval_shape(trans.init, jax.random.key(2), x)
  with pytest.raises(CdftError, match=r"Paraphraser.encode expects NHWC input with 32"):
    para.apply(v, y, method=para.encode)
  assert ftm.factor_channels(64, 0.5) == 32 and ftm.factor_channels(3, 0.5) == 2


def test_leaky_slope_is_point_one():
  module = ftm.Translator(1, 1)
  w = {"kernel": np.zeros((3, 3, 1, 1), np.float32), "bias": np.array([-2.0], np.float32)}
  params = {"params": {"conv0": w, "conv1": w, "conv2": w}}
  # Three layers of bias -2: -2 -> -0.2 -> each later layer sees bias -2 only.
  out = module.apply(params, np.zeros((1, 3, 3, 1), np.float32))
  np.testing.assert_allclose(out, -0.2, rtol=1e-6)


# ----------------------------------------------------------------------------
# Classifiers.
# ----------------------------------------------------------------------------


def test_resnet20_eval_layer_by_layer(golden, resnet20_vars):
  net, variables = resnet20_vars
  x = golden("resnet_in.npy")
  (logits, feats), state = net.apply(variables, x, capture_intermediates=True)
  acts = golden("resnet20_acts_eval.npz")
  inter = state["intermediates"]
  np.testing.assert_allclose(feats["stem"], acts["stem"], **TOL)
  for name in [k for k in acts if k.startswith("layer")]:
    got = inter[name.replace(".", "_")]["__call__"][0]
    np.testing.assert_allclose(got, acts[name], **TOL, err_msg=name)
  np.testing.assert_allclose(feats["pooled"], acts["pooled"], **TOL)
  np.testing.assert_allclose(logits, golden("resnet20_logits.npy"), **TOL)
  np.testing.assert_allclose(feats["ft"], golden("resnet20_feature.npy"), **TOL)
  assert feats["ft"] is feats["layer3"] and float(feats["ft"].min()) >= 0
  assert feats["layer1"].shape == (2, 32, 32, 16) and feats["layer2"].shape == (2, 16, 16, 32)


def test_resnet20_train_forward_and_running_stats(golden, resnet20_vars):
  net, variables = resnet20_vars
  x = golden("resnet_in.npy")
  want = golden("resnet20_train_fwd.npz")
  (logits, feats), updated = net.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(logits, want["logits"], **TOL)
  # Batch-statistic BN over 2 images amplifies float32 rounding: the float64
  # forward of these modules is itself 1.6e-05 from the float32 one (measured).
  np.testing.assert_allclose(feats["ft"], want["feature"], rtol=1e-5, atol=5e-5)
  stats = ft.variables_to_state(updated)
  assert set(stats) == {k for k in want if k.startswith(("bn1.", "layer"))
                        and not k.endswith("num_batches_tracked")}
  for key, value in stats.items():  # running_var holds the unbiased variance
    np.testing.assert_allclose(value, want[key], rtol=1e-5, atol=1e-6, err_msg=key)
  after = {"params": variables["params"], "batch_stats": updated["batch_stats"]}
  logits, feats = net.apply(after, x)
  np.testing.assert_allclose(logits, want["eval_after_logits"], **TOL)
  np.testing.assert_allclose(feats["ft"], want["eval_after_feature"], **TOL)


def _param_count(variables):
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


def _resnet_formula(n, classes):
  total, cin = 9 * 3 * 16 + 2 * 16, 16
  for g, w in enumerate((16, 32, 64)):
    for i in range(n):
      total += 9 * cin * w + 9 * w * w + 4 * w
      total += cin * w + 2 * w if (cin != w or (g and not i)) else 0
      cin = w
  return total + 64 * classes + classes


def _wrn_formula(depth, k, classes):
  total, cin = 9 * 3 * 16, 16
  for w in (16 * k, 32 * k, 64 * k):
    for _ in range((depth - 4) // 6):
      total += 2 * cin + 9 * cin * w + 2 * w + 9 * w * w + (cin * w if cin != w else 0)
      cin = w
  return total + 2 * cin + cin * classes + classes


@pytest.mark.parametrize("name,classes,want", [
    ("resnet20", 10, 272_474), ("resnet56", 10, 855_770),
    ("resnet32", 100, _resnet_formula(5, 100)), ("resnet110", 10, _resnet_formula(18, 10)),
    ("wrn_16_2", 100, 703_284), ("wrn_40_2", 100, 2_255_156),
    ("wrn_40_1", 100, _wrn_formula(40, 1, 100)),
])
def test_parameter_counts(name, classes, want):
  net = models.get_classifier(name, classes)
  variables = ft.abstract_variables(net, jnp.zeros((1, 32, 32, 3)), train=False)
  assert _param_count(variables) == want
  if name.startswith("wrn"):
    assert want == _wrn_formula(int(name[4:6]), int(name[-1]), classes)
  else:
    assert want == _resnet_formula((int(name[6:]) - 2) // 6, classes)


def test_wrn_features_names_and_round_trip():
  net = models.get_classifier("wrn_16_2", 100)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  variables = _random_variables(net, x, train=False)
  (logits, feats), _ = net.apply(variables, x, train=True, mutable=["batch_stats"])
  assert logits.shape == (2, 100)
  assert [feats[k].shape[-1] for k in ("stem", "layer1", "layer2", "layer3")] == [16, 32, 64, 128]
  # FT tap = block3 output before the final BN-ReLU (RepDistiller feat[-2]).
  assert feats["ft"] is feats["layer3"] and float(feats["ft"].min()) < 0
  assert float(feats["head"].min()) >= 0 and feats["pooled"].shape == (2, 128)
  state = ft.variables_to_state(variables)
  for key in ("conv1.weight", "block1.layer.0.convShortcut.weight",
              "block3.layer.1.bn2.running_var",
              "bn1.weight", "fc.weight", "fc.bias"):
    assert key in state, key
  assert state["block1.layer.0.conv1.weight"].shape == (32, 16, 3, 3)
  assert state["fc.weight"].shape == (100, 128)
  back = ft.classifier_from_state(net, state)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------
# BatchNorm.
# ----------------------------------------------------------------------------


def test_batchnorm_is_pytorch_batchnorm2d():
  rng = np.random.default_rng(3)
  x = (rng.standard_normal((8, 3, 2, 4)) * 3 + 1).astype(np.float32)
  bn = BatchNorm()
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  # PyTorch's initial running stats; init does not update them.
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(4))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(4))
  params = {"scale": np.array([1, 2, 3, 4], np.float32),
            "bias": np.array([0, 1, 0, -1], np.float32)}
  y, new = bn.apply({**variables, "params": params}, x, use_running_average=False,
                    mutable=["batch_stats"])
  x64 = x.astype(np.float64).reshape(-1, 4)
  mean, biased, unbiased = x64.mean(0), x64.var(0), x64.var(0, ddof=1)
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(biased + 1e-5) * params["scale"]
                             + params["bias"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(new["batch_stats"]["var"], 0.9 + 0.1 * unbiased, rtol=1e-5)
  y_eval = bn.apply({**new, "params": params}, x, use_running_average=True)
  stats = new["batch_stats"]
  np.testing.assert_allclose(y_eval, (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5)
                             * params["scale"] + params["bias"], rtol=1e-5, atol=1e-5)
  with pytest.raises(CdftError, match=r"more than 1 value per channel, got input shape "
                     r"\(1, 1, 1, 4\)"):
    bn.apply({**variables, "params": params}, x[:1, :1, :1], use_running_average=False,
             mutable=["batch_stats"])


def test_batchnorm_statistics_are_global_under_sharded_jit():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x = np.random.default_rng(4).standard_normal((8, 2, 2, 3)).astype(np.float32)
  x[4:] += 5  # per-device statistics would differ from the global ones
  bn = BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), x)
  step = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))
  ref_y, ref_stats = step(variables, x)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    y, stats = step(variables, sharded)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["batch_stats"]["var"], ref_stats["batch_stats"]["var"],
                             rtol=1e-6)
  np.testing.assert_allclose(stats["batch_stats"]["mean"], 0.1 * x.mean((0, 1, 2)), rtol=1e-5)


# ----------------------------------------------------------------------------
# Weight files.
# ----------------------------------------------------------------------------


def test_wrong_weight_files_name_file_and_tensor(golden, tmp_path):
  state = golden("paraphraser_trained.npz")
  bad = dict(state, **{"conv1.weight": state["conv1.weight"][:16]})
  path = tmp_path / "Paraphraser.pth"
  torch_format.save({"epoch": 5, "state_dict": bad}, path)
  with pytest.raises(WeightError) as e:
    ft.load_paraphraser_file(path)
  assert str(e.value) == (f"{path}: tensor 'conv1.weight' has shape (16, 64, 3, 3), "
                 "the model expects (32, 64, 3, 3)")
  # The transposed-conv layout (in, out, kH, kW) is what is reported and checked.
  swapped = dict(state, **{"deconv1.weight": state["deconv1.weight"].transpose(1, 0, 2, 3)})
  with pytest.raises(WeightError, match=r"'deconv1.weight' has shape \(64, 32, 3, 3\), the "
                     r"model expects \(32, 64, 3, 3\)"):
    ft.paraphraser_from_state(swapped, source="x.pth")
  with pytest.raises(WeightError, match=r"^x.pth: tensor 'deconv2.bias' is missing"):
    ft.paraphraser_from_state({k: v for k, v in state.items() if k != "deconv2.bias"},
                              source="x.pth")
  with pytest.raises(WeightError, match=r"^r.npz: unexpected tensor 'conv0.weight'"):
    ft.classifier_from_state(resnet.resnet20(), state, "r.npz")
  nan = dict(state, **{"conv2.bias": np.full(32, np.nan, np.float32)})
  with pytest.raises(WeightError, match="'conv2.bias' has non-finite values"):
    ft.paraphraser_from_state(nan, source="x.pth")
  # A ResNet-20 state dict does not fit ResNet-56 (first missing block named).
  with pytest.raises(WeightError, match=r"tensor 'layer1.3.conv1.weight' is missing"):
    ft.classifier_from_state(resnet.resnet56(), golden("resnet20_init.npz"), "r20.npz")


# ----------------------------------------------------------------------------
# KD baselines against numpy.
# ----------------------------------------------------------------------------


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_kd_loss_matches_numpy():
  rng = np.random.default_rng(5)
  s, t = rng.standard_normal((2, 3, 7)).astype(np.float32) * 3
  for temp in (1.0, 4.0):
    ls, lt = _log_softmax(s.astype(np.float64) / temp), _log_softmax(t.astype(np.float64) / temp)
    want = np.sum(np.exp(lt) * (lt - ls)) / len(s) * temp ** 2
    np.testing.assert_allclose(losses.kd_loss(s, t, temp), want, rtol=1e-5)
  assert float(losses.kd_loss(t, t)) == pytest.approx(0, abs=1e-6)
  with pytest.raises(CdftError, match="temperature must be > 0"):
    losses.kd_loss(s, t, 0)


def test_fitnets_hint_matches_numpy():
  rng = np.random.default_rng(6)
  s = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
  t = rng.standard_normal((2, 4, 4, 5)).astype(np.float32)
  reg = ftm.HintRegressor(5, kernel_size=1, use_bn=False)
  v = _random_variables(reg, s)
  k, b = np.asarray(v["params"]["conv"]["kernel"]), np.asarray(v["params"]["conv"]["bias"])
  projected = np.maximum(np.einsum("nhwi,io->nhwo", s, k[0, 0]) + b, 0)
  np.testing.assert_allclose(losses.hint_loss(reg.apply(v, s), t), np.mean((projected - t) ** 2),
                             rtol=1e-5)
  with_bn = ftm.HintRegressor(5, kernel_size=3)
  vb = _random_variables(with_bn, s, train=False)
  out, _ = with_bn.apply(vb, s, train=True, mutable=["batch_stats"])
  assert out.shape == t.shape and float(out.min()) >= 0
  with pytest.raises(CdftError, match="hint_loss: student"):
    losses.hint_loss(s, t)


def test_attention_transfer_matches_numpy():
  rng = np.random.default_rng(7)
  pairs = [(rng.standard_normal((2, 4, 4, 3)), rng.standard_normal((2, 4, 4, 6))),
           (rng.standard_normal((2, 2, 2, 5)), rng.standard_normal((2, 2, 2, 5)))]
  pairs = [(s.astype(np.float32), t.astype(np.float32)) for s, t in pairs]

  def at(f):  # Zagoruyko & Komodakis on NCHW: F.normalize(f.pow(2).mean(1).view(B, -1))
    a = (f.transpose(0, 3, 1, 2).astype(np.float64) ** 2).mean(1).reshape(len(f), -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)

  terms = [np.mean((at(s) - at(t)) ** 2) for s, t in pairs]
  feats_s, feats_t = zip(*pairs)
  np.testing.assert_allclose(losses.attention_transfer_loss(feats_s, feats_t), sum(terms), rtol=1e-5)
  np.testing.assert_allclose(losses.attention_transfer_loss(feats_s, feats_t, reduction="mean"),
                             np.mean(terms), rtol=1e-5)
  np.testing.assert_allclose(losses.attention_map(pairs[0][0]), at(pairs[0][0]), rtol=1e-5)
  with pytest.raises(CdftError, match="pair 0: student"):
    losses.attention_transfer_loss(feats_s[:1], [feats_t[1]])
