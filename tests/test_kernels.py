"""cdft.kernels: oneDNN convolutions against XLA's, sharded and not, and their fallbacks."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import missing
from cdft.errors import CdftError
from cdft.kernels import build
from cdft.kernels import conv as kconv
from test_train_golden import _assert_rel

DN = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(scope="module")
def onednn():
  ok, why = kconv.onednn_available()
  if not ok:
    missing(f"oneDNN kernels unavailable: {why}")


def _lax(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN,
                                  precision=lax.Precision.HIGHEST)


def _ours(x, w, strides, padding):
  return kconv.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)


def _value_and_grads(conv, x, w, dy):
  """conv(x, w) and the gradients of <conv(x, w), dy>, traced afresh (the kernel policy
  applies to what is traced inside it)."""
  def f(x, w):
    y = conv(x, w)
    return jnp.vdot(y, dy), y
  (_, y), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, w)
  return y, grads


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((4, 9, 9, 5), (3, 3), (1, 1), "SAME"),
    ((4, 10, 10, 16), (3, 3), (2, 2), ((1, 1), (1, 1))),  # a ResNet downsampling conv
    ((2, 8, 8, 32), (1, 1), (2, 2), ((0, 0), (0, 0))),  # its 1x1 shortcut
    ((3, 7, 6, 3), (3, 3), (2, 1), ((1, 2), (0, 1))),  # asymmetric padding, 3 channels
    ((2, 6, 6, 8), (3, 3), (1, 1), "VALID"),
])
def test_onednn_convolution_and_its_gradients_equal_xla(onednn, shape, kernel, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(kernel + (shape[-1], 7)), jnp.float32)
  want_y = _lax(x, w, strides, padding)
  dy = jnp.asarray(rng.standard_normal(want_y.shape), jnp.float32)
  want_y, (want_dx, want_dw) = _value_and_grads(lambda x, w: _lax(x, w, strides, padding),
                                                x, w, dy)
  with kconv.cpu_convolutions("onednn") as on:
    assert on
    conv = lambda x, w: _ours(x, w, strides, padding)  # noqa: E731
    y, (dx, dw) = _value_and_grads(conv, x, w, dy)
    hlo = jax.jit(conv).lower(x, w).as_text()
  assert "CdftConvForward" in hlo
  assert y.shape == want_y.shape
  _assert_rel(y, want_y, 1e-6, "forward")
  _assert_rel(dx, want_dx, 1e-6, "input gradient")
  _assert_rel(dw, want_dw, 1e-6, "kernel gradient")


def test_sharded_onednn_convolution_runs_per_device_and_equals_xla(onednn):
  """With a mesh, each device convolves its part of the batch: no all-gather of the
  activations, the kernel gradient summed over the data axis."""
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((16, 8, 8, 16)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 16, 32)), jnp.float32)
  pads = ((1, 1), (1, 1))
  want_y = _lax(x, w, (1, 1), pads)
  dy = jnp.asarray(rng.standard_normal(want_y.shape), jnp.float32)
  _, (want_dx, want_dw) = _value_and_grads(lambda x, w: _lax(x, w, (1, 1), pads), x, w, dy)
  batch, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  xs, ws, dys = jax.device_put(x, batch), jax.device_put(w, repl), jax.device_put(dy, batch)
  with kconv.cpu_convolutions("onednn", mesh):
    def f(x, w, dy):
      y, vjp = jax.vjp(lambda x, w: _ours(x, w, (1, 1), pads), x, w)
      return (y,) + vjp(dy)
    step = jax.jit(f, in_shardings=(batch, repl, batch), out_shardings=(batch, batch, repl))
    hlo = step.lower(xs, ws, dys).compile().as_text()
    y, dx, dw = step(xs, ws, dys)
  assert hlo.count("CdftConv") >= 3 and "all-gather" not in hlo
  assert y.sharding.spec == P("data")
  _assert_rel(y, want_y, 1e-6, "forward")
  _assert_rel(dx, want_dx, 1e-6, "input gradient")
  _assert_rel(dw, want_dw, 1e-6, "kernel gradient")


def test_xla_convolutions_outside_the_policy_and_where_onednn_does_not_apply(onednn):
  rng = np.random.default_rng(2)
  x32 = jnp.asarray(rng.standard_normal((2, 6, 6, 4)), jnp.float32)
  w32 = jnp.asarray(rng.standard_normal((3, 3, 4, 4)), jnp.float32)
  same = lambda x, w, **kw: kconv.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), "SAME", dimension_numbers=DN, **kw)
  cases = {
      "bfloat16": lambda: same(x32.astype(jnp.bfloat16), w32.astype(jnp.bfloat16)),
      "dilated": lambda: same(x32, w32, rhs_dilation=(2, 2)),
      "grouped": lambda: same(x32, w32[:, :, :2], feature_group_count=2),
      "NCHW": lambda: kconv.conv_general_dilated(
          x32.transpose(0, 3, 1, 2), w32, (1, 1), "SAME", dimension_numbers=("NCHW", "HWIO",
                                                                             "NCHW")),
  }
  with kconv.cpu_convolutions("onednn"):
    for name, fn in cases.items():
      assert "CdftConv" not in jax.jit(fn).lower().as_text(), name
  with kconv.cpu_convolutions("xla") as on:
    assert not on
    assert "CdftConv" not in jax.jit(lambda: same(x32, w32)).lower().as_text()
  assert "CdftConv" not in jax.jit(lambda: same(x32, w32)).lower().as_text()  # no policy
  gpu = types.SimpleNamespace(platform="gpu")
  with kconv.cpu_convolutions("onednn", types.SimpleNamespace(devices=np.array([gpu]))) as on:
    assert not on  # a GPU (or TPU) mesh keeps XLA's convolutions, whatever the mode
    assert "CdftConv" not in jax.jit(lambda: same(x32, w32)).lower().as_text()


def test_a_resnet_train_step_on_onednn_equals_xla(onednn):
  """The FT teacher's network (narrow ResNet-8, train-mode BatchNorm): loss and
  gradients of the two kernels agree to float32 rounding."""
  from cdft.models.resnet import ResNet  # pylint: disable=import-outside-toplevel
  net = ResNet(num_blocks=(1, 1, 1), num_classes=10, widths=(4, 8, 8))
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((8, 16, 16, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 8))
  variables = net.init(jax.random.key(0), x)

  def grads():
    def loss(params):
      (logits, _), _ = net.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                 x, train=True, mutable=["batch_stats"])
      return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(8), labels])
    return jax.jit(jax.value_and_grad(loss))(variables["params"])

  want_loss, want = grads()
  with kconv.cpu_convolutions("onednn"):
    got_loss, got = grads()
  assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-5)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    _assert_rel(g, r, 1e-4, jax.tree_util.keystr(path))


def test_auto_falls_back_to_xla_with_one_warning_and_onednn_says_why(monkeypatch, capsys):
  monkeypatch.setattr(kconv, "_warned", set())

  def unavailable():
    raise build.KernelUnavailable("oneDNN's headers and library were not found (test)")
  monkeypatch.setattr(build, "load", unavailable)
  for _ in range(2):
    with kconv.cpu_convolutions("auto") as on:
      assert not on
  err = capsys.readouterr().err
  assert err.count("warning: XLA's CPU convolutions (slower) instead of oneDNN's: oneDNN's "
                   "headers and library were not found (test)") == 1
  with pytest.raises(build.KernelUnavailable, match="not found"):
    with kconv.cpu_convolutions("onednn"):
      pass
  with pytest.raises(CdftError, match=r"config.cpu_conv must be one of \('auto', 'xla', "
                                      r"'onednn'\), got 'mkl'"):
    with kconv.cpu_convolutions("mkl"):
      pass


def test_build_errors_name_what_is_missing(monkeypatch, tmp_path):
  monkeypatch.setattr(build, "_onednn_roots", lambda: [tmp_path / "nowhere"])
  with pytest.raises(build.KernelUnavailable, match=r"nowhere.*pip install 'cdft\[onednn\]'"):
    build.find_onednn()
  monkeypatch.undo()
  monkeypatch.setenv("CDFT_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setenv("CXX", "false")  # a compiler that fails
  try:
    build.find_onednn()
  except build.KernelUnavailable as e:
    missing(str(e))
  with pytest.raises(build.KernelUnavailable, match="building onednn_conv.cc failed"):
    build._library_path()  # pylint: disable=protected-access
  assert not [p for p in (tmp_path / "cache" / "kernels").iterdir()]  # no partial library left
  (tmp_path / "file").write_text("")
  monkeypatch.setenv("CDFT_CACHE_DIR", str(tmp_path / "file"))  # not a folder
  with pytest.raises(build.KernelUnavailable,
                     match="cannot write the kernel cache .*CDFT_CACHE_DIR"):
    build._library_path()  # pylint: disable=protected-access
