"""Architecture tests: parameter counts (spec tables), shapes, layer equivalences."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdft import models
from cdft.models import layers, norm, vgg


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def _abstract(module, x):
  return jax.eval_shape(module.init, jax.random.key(0), x)


# Spec cd.md 2.1 / 2.3 / 2.5: (encoder, decoder, embedding) per stage.
VGG19_COUNTS = [(1804, 1731), (112588, 112451), (555340, 555075), (3505740, 3505219),
                (12944972, 12944451)]
CD16X_COUNTS = [(684, 651, 1600), (7420, 7379, 5312), (35164, 35091, 21952),
                (219804, 219667, 88000), (810140, 810003, 154048)]


@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5])
def test_parameter_counts(stage):
  x = jnp.zeros((1, 32, 32, 3))
  enc = models.get_model("encoder", stage, "vgg19")
  pe = _abstract(enc, x)
  feat = jax.eval_shape(enc.apply, pe, x)
  pd = _abstract(models.get_model("decoder", stage, "vgg19"), feat)
  assert (_count(pe), _count(pd)) == VGG19_COUNTS[stage - 1]

  se = models.get_model("encoder", stage, "16x")
  ps = _abstract(se, x)
  feats = jax.eval_shape(lambda p, x: se.apply(p, x, return_all=True), ps, x)
  psd = _abstract(models.get_model("decoder", stage, "16x"), feats[-1])
  pq = _abstract(models.get_model("embedding", stage, "16x"), feats)
  assert (_count(ps), _count(psd), _count(pq)) == CD16X_COUNTS[stage - 1]
  assert feats[-1].shape[-1] == vgg.stage_widths("16x", stage)[stage - 1]


def test_totals_match_the_paper():
  x = jnp.zeros((1, 32, 32, 3))
  total_vgg = sum(_count(_abstract(models.get_model("encoder", k, "vgg19"), x)) for k in range(1, 6))
  total_16x = sum(_count(_abstract(models.get_model("encoder", k, "16x"), x)) for k in range(1, 6))
  assert total_vgg == 17_120_444
  assert total_16x == 1_073_212


def test_layer_names_mirror_official_order():
  assert vgg.encoder_layer_names(5) == [
      "conv11", "conv12", "conv21", "conv22", "conv31", "conv32", "conv33", "conv34",
      "conv41", "conv42", "conv43", "conv44", "conv51"]
  assert vgg.decoder_layer_names(3) == ["conv31", "conv22", "conv21", "conv12", "conv11"]


@pytest.mark.parametrize("fix_min_pixels", [0, 10 ** 9], ids=["border-fix", "naive"])
@pytest.mark.parametrize("shape", [(2, 9, 13, 5), (1, 2, 7, 4), (1, 1, 1, 3), (1, 3, 3, 2)])
def test_reflect_conv_matches_naive_reflection_pad(shape, fix_min_pixels, monkeypatch):
  # Both forms reflect_conv3x3 chooses between by map size: the SAME conv with
  # its border recomputed, and the gathered reflection pad.
  monkeypatch.setattr(layers, "FIX_MIN_PIXELS", fix_min_pixels)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, shape)
  w = jax.random.normal(k2, (3, 3, shape[-1], 6))
  b = jax.random.normal(k3, (6,))
  got = layers.reflect_conv3x3(x, w, b)
  if min(shape[1:3]) >= 2:  # where numpy's 'reflect' is defined, compare with it too
    xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    ref = jax.lax.conv_general_dilated(xp, w, (1, 1), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
  else:
    ref = layers.reflect_conv3x3_naive(x, w, b)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 9, 13, 3), (1, 2, 3, 2), (1, 1, 5, 2), (1, 1, 1, 1)])
def test_reflection_pad_gradient_is_the_gathers(shape):
  """reflect_pad1's own backward (slices) equals the transpose of its gather, in float64."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape)
  g = rng.standard_normal((shape[0], shape[1] + 2, shape[2] + 2, shape[3]))
  rows, cols = layers._reflect_indices(shape[1]), layers._reflect_indices(shape[2])
  with jax.enable_x64(True):
    gather = lambda x: x[:, rows][:, :, cols]  # noqa: E731
    np.testing.assert_array_equal(layers.reflect_pad1(x), gather(x))
    want = jax.vjp(gather, x)[1](g)[0]
    got = jax.vjp(layers.reflect_pad1, x)[1](g)[0]
    padded = layers.reflect_pad1(x)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  # Numpy's reflect pad where it is defined: the border rows fold back onto rows 1 and n - 2.
  if min(shape[1:3]) >= 2:
    np.testing.assert_array_equal(
        padded, np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect"))


@pytest.mark.parametrize("ceil", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (1, 7, 5, 2), (1, 3, 3, 1)])
def test_max_pool_gradient_is_select_and_scatters(shape, ceil):
  """max_pool2x2's own backward equals the gradient of XLA's reduce-window max-pool (its
  select-and-scatter: the first maximum of a window), ties of ReLU zeros included."""
  rng = np.random.default_rng(0)
  x = np.maximum(rng.standard_normal(shape), 0.0)  # many tied zeros
  x[0, 0, 0, 0] = x[0, 0, 1, 0] = 1.5  # a tied maximum
  with jax.enable_x64(True):
    y, want_vjp = jax.vjp(lambda x: layers._max_pool(x, ceil), x)
    got, got_vjp = jax.vjp(lambda x: layers.max_pool2x2(x, ceil=ceil), x)
    g = rng.standard_normal(y.shape)
    want, dx = want_vjp(g)[0], got_vjp(g)[0]
  assert y.shape[1:3] == tuple((n + 1) // 2 if ceil else n // 2 for n in shape[1:3])
  np.testing.assert_array_equal(got, y)
  np.testing.assert_array_equal(dx, want)


def test_reflect_conv_in_a_canvas_reflects_at_the_region_edge():
  # The canvas form: one program for every region of a 16x16 canvas, exact on
  # the region whatever the canvas holds beyond it (here: large values).
  # numpy inputs and a numpy reference: nothing compiles per region but the one program.
  rng = np.random.default_rng(3)
  kernel = rng.standard_normal((3, 3, 8, 6)).astype(np.float32)
  b = rng.standard_normal(6).astype(np.float32)
  conv = jax.jit(layers.reflect_conv3x3)
  for h, w in [(2, 2), (5, 9), (11, 16), (16, 16), (3, 15)]:
    x = rng.standard_normal((1, h, w, 8)).astype(np.float32)
    canvas = np.full((1, 16, 16, 8), 1e4, np.float32)
    canvas[:, :h, :w] = x
    got = np.asarray(conv(canvas, kernel, b, np.array([h, w], np.int32)))[:, :h, :w]
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect").astype(np.float64)
    ref = sum(np.einsum("nhwi,io->nhwo", xp[:, i:i + h, j:j + w], kernel[i, j])
              for i in range(3) for j in range(3)) + b
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
  assert conv._cache_size() == 1  # the region is data, not a shape: one compile


@pytest.mark.parametrize("stage", [1, 3])
def test_encoder_and_decoder_in_a_canvas_equal_their_own_shape(stage):
  # A canvas of multiples of 2^(k-1) holding a 45x37 image: every block's
  # region is the floor-pooled (then upsampled) extent, to float rounding.
  enc = models.get_model("encoder", stage, "16x")
  dec = models.get_model("decoder", stage, "16x")
  x = np.random.default_rng(4).random((1, 45, 37, 3), dtype=np.float32)
  # Everything jitted: eager Flax calls compile op by op.
  pe = jax.jit(enc.init)(jax.random.key(5), x)
  feats = jax.jit(lambda p, x: enc.apply(p, x, return_all=True))(pe, x)
  pd = jax.jit(dec.init)(jax.random.key(6), feats[-1])
  extent = np.array([45, 37], np.int32)
  canvas = np.zeros((1, 64, 48, 3), np.float32)
  canvas[:, :45, :37] = x
  got = jax.jit(lambda p, c, e: enc.apply(p, c, return_all=True, extent=e))(pe, canvas, extent)
  got, feats = jax.device_get((got, feats))
  for b, (g, f) in enumerate(zip(got, feats)):
    np.testing.assert_allclose(g[:, :45 >> b, :37 >> b], f, rtol=1e-6, atol=1e-6)
  f = 2 ** (stage - 1)
  fh, fw = 45 // f, 37 // f
  fcanvas = np.zeros(got[-1].shape, np.float32)
  fcanvas[:, :fh, :fw] = feats[-1]
  out = jax.jit(lambda p, c, e: dec.apply(p, c, extent=e))(pd, fcanvas, np.array([fh, fw], np.int32))
  np.testing.assert_allclose(np.asarray(out)[:, :fh * f, :fw * f],
                             jax.jit(dec.apply)(pd, feats[-1]), rtol=0, atol=1e-6)


def test_conv0_folding_is_exact():
  x = jax.random.uniform(jax.random.key(1), (1, 20, 18, 3))
  folded = models.get_model("encoder", 2, "16x")
  plain = models.get_model("encoder", 2, "16x", fold_conv0=False)
  params = folded.init(jax.random.key(2), x)
  # A conv0 like the real one: RGB -> BGR x 255 minus the Caffe mean.
  params["params"]["conv0"]["kernel"] = jnp.array(
      [[0, 0, 255], [0, 255, 0], [255, 0, 0]], jnp.float32).T[None, None]
  params["params"]["conv0"]["bias"] = jnp.array([-103.939, -116.779, -123.68])
  a = folded.apply(params, x, return_all=True)
  b = plain.apply(params, x, return_all=True)
  for fa, fb in zip(a, b):
    np.testing.assert_allclose(fa, fb, rtol=1e-4, atol=1e-3 * float(jnp.abs(fb).max()) + 1e-5)


def test_pool_floor_and_upsample():
  x = jnp.arange(1 * 5 * 7 * 1, dtype=jnp.float32).reshape(1, 5, 7, 1)
  p = layers.max_pool2x2(x)
  assert p.shape == (1, 2, 3, 1)
  assert float(p[0, 1, 2, 0]) == float(x[0, 3, 5, 0])
  u = layers.upsample_nearest2x(p)
  assert u.shape == (1, 4, 6, 1)
  np.testing.assert_array_equal(u[0, ::2, ::2], p[0])
  np.testing.assert_array_equal(u[0, 1::2, 1::2], p[0])


def test_decoder_ends_in_relu_and_restores_size():
  x = jnp.zeros((1, 48, 40, 3))
  enc = models.get_model("encoder", 4, "16x")
  f = jax.eval_shape(enc.apply, _abstract(enc, x), x)
  assert f.shape == (1, 6, 5, 128)
  dec = models.get_model("decoder", 4, "16x")
  feat = -jnp.ones(f.shape)
  y = dec.apply(dec.init(jax.random.key(0), feat), feat)
  assert y.shape == (1, 48, 40, 3)
  assert float(y.min()) >= 0.0


def test_unknown_names_are_rejected():
  with pytest.raises(ValueError, match="unknown model"):
    models.get_model("transformer", 1)
  with pytest.raises(ValueError, match="preset"):
    models.get_model("encoder", 1, "8x")


def test_init_is_the_eager_init_bit_for_bit():
  """``models.init`` (one program, optimisation level 2) gives Flax's eager values exactly."""
  from cdft.models import factor_transfer  # pylint: disable=import-outside-toplevel
  x = np.random.default_rng(0).random((1, 8, 8, 32), np.float32)
  for module in (models.get_model("decoder", 2, "16x"),
                 factor_transfer.Paraphraser(in_channels=32, rate=0.5)):
    want = jax.device_get(module.init(jax.random.key(3), x))
    got = jax.device_get(models.init(module, jax.random.key(3), x))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)


def _compiled(fn, *args, **options):
  return jax.device_get(jax.jit(fn, compiler_options=options)(*args))


# What the tests run (conftest.TEST_XLA_OPT), and what users run.
TEST_OPTIONS = {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False}
XLA_DEFAULTS = {"xla_backend_optimization_level": 3,  # launch/train.py: XLA's defaults
                "xla_cpu_use_fusion_emitters": True}
STYLIZE_OPTIONS = {"xla_backend_optimization_level": 3,  # cdft-stylize: cpu_tuning.FLAGS
                   "xla_cpu_use_fusion_emitters": False,
                   "xla_cpu_experimental_ynn_fusion_type": ""}


class _Block(nn.Module):
  """A residual block of the CIFAR ResNets' op kinds (conv, train-mode BatchNorm, ReLU)."""

  @nn.compact
  def __call__(self, x):
    # No bias before a train-mode BatchNorm (as in the ResNets): its gradient is
    # zero up to rounding noise, which no tolerance relative to itself can compare.
    conv = lambda: nn.Conv(8, (3, 3), use_bias=False)
    y = nn.relu(norm.BatchNorm(use_running_average=False)(conv()(x)))
    y = norm.BatchNorm(use_running_average=False)(conv()(y))
    y = nn.relu(y + nn.Conv(8, (1, 1))(x))
    return nn.Dense(10)(jnp.mean(nn.Conv(8, (3, 3), strides=2)(y), axis=(1, 2)))


def test_the_tests_xla_settings_give_the_users_numbers():
  """The tests run XLA:CPU at level 1 with the older loop emitters (conftest.py).

  Checked on the two kinds of program the golden tests pin down. A stylization
  level (16x encoder, the WCT-style affine map of its features, decoder) gives
  the bits of XLA's defaults exactly (and cdft-stylize's, which also turns
  YNNPACK fusions off, to float32 rounding). A training step's loss and
  gradients (a residual block in train mode, cross-entropy) agree with
  launch/train.py's XLA defaults to float32 rounding: orders of magnitude inside
  the float32 golden tests' tolerances (losses ~1e-6, gradients ~1e-5 to 1e-2).
  """
  import optax  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  net = _Block()
  image = rng.standard_normal((4, 16, 16, 3)).astype(np.float32)
  labels = np.array([0, 3, 5, 9])
  variables = models.init(net, jax.random.key(0), image)

  def train_loss(params):
    logits, _ = net.apply({"params": params, "batch_stats": variables["batch_stats"]}, image,
                          mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  step = jax.value_and_grad(train_loss)
  enc, dec = models.get_model("encoder", 3, "16x"), models.get_model("decoder", 3, "16x")
  content = rng.random((1, 40, 48, 3), np.float32)
  pe = models.init(enc, jax.random.key(1), content)
  feat = enc.apply(pe, content)
  pd = models.init(dec, jax.random.key(2), feat)
  width = feat.shape[-1]
  matrix = np.eye(width, dtype=np.float32) + 0.1 * rng.standard_normal((width, width), np.float32)
  bias = rng.standard_normal(width).astype(np.float32)

  def level(x):
    f = enc.apply(pe, x)
    return dec.apply(pd, f @ matrix.T + bias)

  tested = _compiled(level, content, **TEST_OPTIONS)
  np.testing.assert_array_equal(tested, _compiled(level, content, **XLA_DEFAULTS))
  cli = _compiled(level, content, **STYLIZE_OPTIONS)
  np.testing.assert_allclose(tested, cli, rtol=0, atol=2e-6 * np.abs(cli).max())

  tested = _compiled(step, variables["params"], **TEST_OPTIONS)
  users = _compiled(step, variables["params"], **XLA_DEFAULTS)
  assert float(tested[0]) == pytest.approx(float(users[0]), rel=1e-6)  # the loss
  for a, b in zip(jax.tree.leaves(tested[1]), jax.tree.leaves(users[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * np.abs(b).max())
