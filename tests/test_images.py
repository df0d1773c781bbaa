"""Tests of cdft.io.images: loading, saving and listing images."""
import io
import os

import numpy as np
from PIL import Image
import pytest

from cdft.errors import ImageError
from cdft.io import images


def _check_error(excinfo, path, *phrases):
  """The message is one line, names the file and holds ``phrases``."""
  message = str(excinfo.value)
  assert "\n" not in message
  assert str(path) in message
  for phrase in phrases:
    assert phrase in message, message


def _gradient(height, width, seed=0):
  """A smooth, deterministic uint8 RGB test picture."""
  rng = np.random.default_rng(seed)
  y = np.linspace(0.0, 1.0, height)[:, None, None]
  x = np.linspace(0.0, 1.0, width)[None, :, None]
  base = rng.uniform(0.2, 0.8, size=(1, 1, 3))
  image = 0.5 * base + 0.3 * x + 0.2 * y * (1 - base)
  return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


# Real photographs.


def test_real_jpeg_matches_pil(images_dir):
  path = images_dir / "content" / "adain_avril.jpg"
  image = images.load_image(path)
  assert image.shape == (1050, 1680, 3)
  assert image.dtype == np.float32
  assert image.flags.c_contiguous
  with Image.open(path) as pil:
    expected = np.asarray(pil.convert("RGB"), dtype=np.float32) / 255
  np.testing.assert_array_equal(image, expected)
  assert 0.0 <= image.min() and image.max() <= 1.0


def test_real_png(images_dir):
  image = images.load_image(images_dir / "style" / "adain_sketch.png")
  assert image.ndim == 3 and image.shape[-1] == 3
  assert min(image.shape[:2]) >= 16


def test_uhd_photo(images_dir):
  image = images.load_image(images_dir / "uhd" /
                            "cd_green_park_wallpaper_3840x2160.jpg")
  assert image.shape == (2160, 3840, 3)


@pytest.mark.parametrize("name, shorter_side, shape", [
    ("adain_avril.jpg", 512, (512, 819, 3)),  # 1680x1050 landscape.
    ("adain_blonde_girl.jpg", 256, (341, 256, 3)),  # 600x800 portrait.
    ("adain_brad_pitt.jpg", 600, (600, 600, 3)),  # 512x512, upscaled.
    ("adain_brad_pitt.jpg", 512, (512, 512, 3)),  # Already that size.
])
def test_shorter_side(images_dir, name, shorter_side, shape):
  path = images_dir / "content" / name
  image = images.load_image(path, shorter_side=shorter_side)
  assert image.shape == shape
  # Same as torchvision's Resize(int) on the PIL image, then ToTensor.
  with Image.open(path) as pil:
    expected = pil.convert("RGB").resize(shape[1::-1], Image.BILINEAR)
  np.testing.assert_array_equal(
      image, np.asarray(expected, dtype=np.float32) / 255)


def test_bad_shorter_side(images_dir):
  with pytest.raises(ValueError):
    images.load_image(images_dir / "content" / "adain_avril.jpg",
                      shorter_side=0)


def test_list_real_images(images_dir):
  found = images.list_images(images_dir / "content")
  assert len(found) == 64
  assert found == sorted(found)
  assert all(p.suffix.lower() in (".jpg", ".png") for p in found)


# Synthesised images of every colour mode.


def test_grayscale(tmp_path):
  gray = _gradient(20, 30)[..., 0]
  path = tmp_path / "gray.png"
  Image.fromarray(gray, mode="L").save(path)
  image = images.load_image(path)
  assert image.shape == (20, 30, 3)
  for c in range(3):
    np.testing.assert_array_equal(image[..., c], gray / np.float32(255))


def test_bilevel(tmp_path):
  path = tmp_path / "bw.png"
  Image.new("1", (20, 20), 1).save(path)
  np.testing.assert_array_equal(images.load_image(path), 1.0)


def test_grayscale_alpha_over_white(tmp_path):
  data = np.zeros((16, 16, 2), np.uint8)
  data[..., 0] = 100
  data[:, :8, 1] = 0  # Transparent: white.
  data[:, 8:, 1] = 255  # Opaque: the grey value.
  path = tmp_path / "la.png"
  Image.fromarray(data, mode="LA").save(path)
  image = images.load_image(path)
  assert image.shape == (16, 16, 3)
  np.testing.assert_allclose(image[:, :8], 1.0, atol=1e-6)
  np.testing.assert_allclose(image[:, 8:], 100 / 255, atol=1e-6)


def test_rgba_over_white(tmp_path):
  data = np.zeros((16, 16, 4), np.uint8)
  data[..., :3] = (200, 40, 0)
  data[..., 3] = 51  # Alpha 0.2.
  path = tmp_path / "rgba.png"
  Image.fromarray(data, mode="RGBA").save(path)
  image = images.load_image(path)
  expected = np.array([200, 40, 0]) / 255 * 0.2 + 0.8
  np.testing.assert_allclose(image, np.broadcast_to(expected, image.shape),
                             atol=1e-6)


def test_palette(tmp_path):
  rgb = Image.fromarray(_gradient(24, 32))
  paletted = rgb.quantize(colors=16)
  assert paletted.mode == "P"
  path = tmp_path / "palette.png"
  paletted.save(path)
  image = images.load_image(path)
  expected = np.asarray(paletted.convert("RGB"), dtype=np.float32) / 255
  np.testing.assert_array_equal(image, expected)


def test_palette_with_transparency(tmp_path):
  paletted = Image.new("P", (16, 16), 0)
  paletted.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
  paletted.paste(1, (0, 0, 16, 8))
  path = tmp_path / "transparent.gif"
  paletted.save(path, transparency=0)
  image = images.load_image(path)
  np.testing.assert_allclose(image[:8], np.broadcast_to([0, 0, 1], (8, 16, 3)))
  np.testing.assert_allclose(image[8:], 1.0)  # Transparent red -> white.


def test_16bit_png_keeps_precision(tmp_path):
  data = np.full((20, 20), 40000, np.uint16)
  data[0, 0] = 65535
  data[0, 1] = 1  # Below 1/255: lost if truncated to 8 bits first.
  path = tmp_path / "deep.png"
  Image.fromarray(data).save(path)
  with Image.open(path) as pil:
    assert pil.mode in ("I;16", "I")
  image = images.load_image(path)
  assert image.shape == (20, 20, 3) and image.dtype == np.float32
  np.testing.assert_allclose(image[5, 5], 40000 / 65535, rtol=0, atol=1e-6)
  np.testing.assert_allclose(image[0, 0], 1.0, rtol=0, atol=1e-6)
  np.testing.assert_allclose(image[0, 1], 1 / 65535, rtol=0, atol=1e-9)


def test_16bit_big_endian_tiff(tmp_path):
  data = np.full((20, 20), 40000, dtype=">u2")
  path = tmp_path / "deep_be.tif"
  Image.fromarray(data).save(path)
  with Image.open(path) as pil:
    assert pil.mode == "I;16B"
  image = images.load_image(path)
  np.testing.assert_allclose(image, 40000 / 65535, rtol=0, atol=1e-6)


def test_32bit_integer_tiff(tmp_path):
  data = np.full((20, 20), 30000, dtype=np.int32)
  path = tmp_path / "int32.tif"
  Image.fromarray(data, mode="I").save(path)
  with Image.open(path) as pil:
    assert pil.mode == "I"
  np.testing.assert_allclose(images.load_image(path), 30000 / 65535,
                             rtol=0, atol=1e-6)


def test_16bit_resize_keeps_precision(tmp_path):
  data = np.full((40, 60), 40000, np.uint16)
  path = tmp_path / "deep.png"
  Image.fromarray(data).save(path)
  image = images.load_image(path, shorter_side=20)
  assert image.shape == (20, 30, 3)
  np.testing.assert_allclose(image, 40000 / 65535, rtol=0, atol=1e-6)


def test_float_tiff(tmp_path):
  data = np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20)
  path = tmp_path / "float.tif"
  Image.fromarray(data, mode="F").save(path)
  image = images.load_image(path)
  np.testing.assert_allclose(image[..., 1], data, atol=1e-7)


def test_cmyk_jpeg(tmp_path):
  path = tmp_path / "cmyk.jpg"
  Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(path, quality=95)
  image = images.load_image(path)
  assert image.shape == (32, 32, 3)
  np.testing.assert_allclose(image[16, 16], [1, 0, 0], atol=0.02)  # Red.


def test_exif_orientation(tmp_path):
  data = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high as stored.
  data[:, :20] = (255, 0, 0)  # Left half red.
  data[:, 20:] = (0, 0, 255)  # Right half blue.
  stored = Image.fromarray(data)
  exif = Image.Exif()
  exif[0x0112] = 6  # Display rotated 90 degrees clockwise.
  path = tmp_path / "rotated.jpg"
  stored.save(path, exif=exif, quality=95)
  with Image.open(path) as pil:
    assert pil.size == (40, 20) and pil.getexif()[0x0112] == 6
  image = images.load_image(path)
  assert image.shape == (40, 20, 3)  # Transposed: 20 wide, 40 high.
  # Clockwise rotation moves the left (red) half to the top.
  np.testing.assert_allclose(image[5, 10], [1, 0, 0], atol=0.05)
  np.testing.assert_allclose(image[35, 10], [0, 0, 1], atol=0.05)
  # The resize applies to the displayed orientation.
  assert images.load_image(path, shorter_side=16).shape == (32, 16, 3)
  # The header alone gives the same shapes (what the CLI compiles ahead for).
  assert images.probe_size(path) == (40, 20)
  assert images.probe_size(path, 16) == (32, 16)


def test_probe_size_matches_load_image(images_dir, tmp_path):
  for path in sorted((images_dir / "content").glob("*.jpg"))[:4]:
    for side in (None, 512):
      if side is None:  # decoding at full size is slow for big photos; the header is enough
        with Image.open(path) as pil:
          assert images.probe_size(path) == (pil.height, pil.width)
      else:
        assert images.probe_size(path, side) == images.load_image(path, side).shape[:2]
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"not an image")
  assert images.probe_size(bad) is None  # load_image says what is wrong
  assert images.probe_size(tmp_path / "missing.jpg") is None


# Errors.


def test_missing_file(tmp_path):
  path = tmp_path / "nope.jpg"
  with pytest.raises(ImageError) as excinfo:
    images.load_image(path)
  _check_error(excinfo, path, "no such file")


def test_directory(tmp_path):
  with pytest.raises(ImageError) as excinfo:
    images.load_image(tmp_path)
  _check_error(excinfo, tmp_path, "directory")


@pytest.mark.parametrize("name, content", [
    ("random.jpg", np.random.default_rng(0).bytes(5000)),
    ("text.png", b"this is not a picture\n" * 10),
    ("empty.jpg", b""),
])
def test_not_an_image(tmp_path, name, content):
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(ImageError) as excinfo:
    images.load_image(path)
  _check_error(excinfo, path, "not an image")


def test_truncated_jpeg(tmp_path, images_dir):
  data = (images_dir / "content" / "adain_avril.jpg").read_bytes()
  path = tmp_path / "truncated.jpg"
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ImageError) as excinfo:
    images.load_image(path)
  _check_error(excinfo, path, "corrupt or truncated")


def test_corrupt_png_data(tmp_path):
  buffer = io.BytesIO()
  Image.fromarray(_gradient(64, 64)).save(buffer, "PNG")
  data = bytearray(buffer.getvalue())
  start = data.index(b"IDAT") + 20
  data[start:start + 200] = np.random.default_rng(1).bytes(200)
  path = tmp_path / "corrupt.png"
  path.write_bytes(bytes(data))
  with pytest.raises(ImageError) as excinfo:
    images.load_image(path)
  _check_error(excinfo, path)


def test_too_small(tmp_path):
  path = tmp_path / "small.png"
  Image.new("RGB", (12, 40)).save(path)
  with pytest.raises(ImageError) as excinfo:
    images.load_image(path)
  _check_error(excinfo, path, "12x40 px is too small",
               "at least 16 px on the shorter side")
  assert images.load_image(path, min_side=12).shape == (40, 12, 3)


def test_too_small_after_resize(tmp_path):
  path = tmp_path / "ok.png"
  Image.new("RGB", (64, 32)).save(path)
  with pytest.raises(ImageError) as excinfo:
    images.load_image(path, shorter_side=8)
  _check_error(excinfo, path, "16x8 px after resizing is too small")


def test_pixel_limit_from_env(tmp_path, monkeypatch):
  path = tmp_path / "big.png"
  Image.new("RGB", (100, 100)).save(path)
  monkeypatch.setenv("CDFT_MAX_IMAGE_PIXELS", "5000")
  with pytest.raises(ImageError) as excinfo:
    images.load_image(path)
  _check_error(excinfo, path, "10000 pixels", "5000", "CDFT_MAX_IMAGE_PIXELS")
  monkeypatch.setenv("CDFT_MAX_IMAGE_PIXELS", "10000")
  assert images.load_image(path).shape == (100, 100, 3)
  monkeypatch.setenv("CDFT_MAX_IMAGE_PIXELS", "lots")
  with pytest.raises(ImageError, match="CDFT_MAX_IMAGE_PIXELS"):
    images.load_image(path)


def test_default_pixel_limit():
  assert images.MAX_PIXELS >= 1_000_000_000 or os.environ.get(
      "CDFT_MAX_IMAGE_PIXELS")
  assert Image.MAX_IMAGE_PIXELS is None or (
      Image.MAX_IMAGE_PIXELS >= images.MAX_PIXELS)


@pytest.mark.parametrize("side", [
    40,  # 1600 px: PIL's DecompressionBombWarning.
    100,  # 10000 px: PIL's DecompressionBombError.
])
def test_pil_decompression_bomb_guard(tmp_path, monkeypatch, side):
  path = tmp_path / "bomb.png"
  Image.new("RGB", (side, side)).save(path)
  monkeypatch.setenv("CDFT_MAX_IMAGE_PIXELS", "1000")
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  with pytest.raises(ImageError) as excinfo:
    images.load_image(path)
  _check_error(excinfo, path, "CDFT_MAX_IMAGE_PIXELS")


# Saving.


@pytest.mark.parametrize("suffix, atol", [
    (".png", 0), (".tif", 0), (".tiff", 0), (".bmp", 0), (".PNG", 0),
    (".jpg", 0.03), (".jpeg", 0.03), (".webp", 0.03),
])
def test_save_load_round_trip(tmp_path, suffix, atol):
  image = _gradient(32, 48).astype(np.float32) / 255
  path = tmp_path / f"out{suffix}"
  assert images.save_image(path, image) == path
  loaded = images.load_image(path)
  assert loaded.shape == image.shape
  if atol == 0:
    np.testing.assert_array_equal(loaded, image)
  else:
    assert np.abs(loaded - image).mean() < atol / 3
    np.testing.assert_allclose(loaded, image, atol=atol)
  assert sorted(os.listdir(tmp_path)) == [path.name]  # No temporary left.


def test_save_clamps_rounds_and_batches(tmp_path):
  image = np.array([[[-0.5, 0.5, 1.5], [np.nan, 0.2 / 255, 0.6 / 255]]],
                   np.float32)
  path = tmp_path / "deep" / "er" / "out.png"  # Folders get created.
  images.save_image(path, image[None])  # (1, H, W, 3).
  with Image.open(path) as pil:
    saved = np.asarray(pil)
  np.testing.assert_array_equal(saved, [[[0, 128, 255], [0, 0, 1]]])


def test_save_overwrites(tmp_path):
  path = tmp_path / "out.png"
  images.save_image(path, np.zeros((16, 16, 3)))
  images.save_image(path, np.ones((16, 16, 3)))
  np.testing.assert_array_equal(images.load_image(path), 1.0)


def test_save_unknown_extension(tmp_path):
  for name in ("out.xyz", "out"):
    path = tmp_path / name
    with pytest.raises(ImageError) as excinfo:
      images.save_image(path, np.zeros((16, 16, 3)))
    _check_error(excinfo, path, ".png")
  assert not os.listdir(tmp_path)


def test_save_bad_shape(tmp_path):
  with pytest.raises(ValueError):
    images.save_image(tmp_path / "out.png", np.zeros((2, 16, 16, 3)))
  with pytest.raises(ValueError):
    images.save_image(tmp_path / "out.png", np.zeros((16, 16)))


# Listing.


def test_list_images(tmp_path):
  for name in ("b.jpg", "a.PNG", "c.txt", ".hidden.jpg", "d.TIFF", "e.webp"):
    (tmp_path / name).write_bytes(b"x")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "f.png").write_bytes(b"x")
  (tmp_path / "folder.png").mkdir()  # A folder, not a file.
  found = images.list_images(tmp_path)
  assert [p.name for p in found] == ["a.PNG", "b.jpg", "d.TIFF", "e.webp"]
  assert all(p.parent == tmp_path for p in found)


def test_list_images_errors(tmp_path):
  (tmp_path / "notes.txt").write_text("no pictures here")
  with pytest.raises(ImageError) as excinfo:
    images.list_images(tmp_path)
  _check_error(excinfo, tmp_path, "no image files")
  missing = tmp_path / "missing"
  with pytest.raises(ImageError) as excinfo:
    images.list_images(missing)
  _check_error(excinfo, missing, "no such folder")
  with pytest.raises(ImageError) as excinfo:
    images.list_images(tmp_path / "notes.txt")
  _check_error(excinfo, tmp_path / "notes.txt", "not a folder")


def test_one_decode_path_for_files_and_the_data_pipeline(images_dir, tmp_path):
  """The CLI's load_image and the pipeline's decoding of a file's bytes give the same pixels."""
  from cdft.data import preprocess  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(3)
  rgb = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
  made = {"rgba.png": np.dstack([rgb, rgb[..., :1]]), "grey.png": rgb[..., 0],
          "wide.png": (rng.random((20, 24)) * 65535).astype(np.uint16)}
  paths = sorted((images_dir / "content").glob("*.jpg"))[:2]
  for name, data in made.items():
    Image.fromarray(data).save(tmp_path / name)
    paths.append(tmp_path / name)
  Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
  paths.append(tmp_path / "palette.png")
  for path in paths:
    from_file = images.load_image(path, min_side=1)
    from_bytes = images.as_float(preprocess.to_rgb(path.read_bytes()))
    np.testing.assert_array_equal(from_file, from_bytes, err_msg=str(path))
    assert from_file.dtype == np.float32 and from_file.shape[-1] == 3
