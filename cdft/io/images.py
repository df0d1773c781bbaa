"""Reading, writing and listing images for style transfer.

Images are float32 arrays of shape (H, W, 3): RGB in [0, 1], the convention of
``torchvision.transforms.ToTensor`` (channels last here).

``load_image`` accepts what people actually feed a style-transfer tool: phone
photos with an EXIF orientation tag, greyscale and paletted images, images with
an alpha channel (composited over white), 16-bit and float scans, CMYK print
files. Every problem a user can cause (missing file, not an image, corrupt or
truncated data, an image too small for the 5-level WCT cascade, a suspiciously
huge image) raises ``cdft.errors.ImageError`` with a one-line message naming the
file.

Decompression-bomb guard: PIL refuses images above ``Image.MAX_IMAGE_PIXELS``
(about 179 megapixels by default), which is too low for ultra-resolution style
transfer. This module deliberately raises PIL's limit to ``MAX_PIXELS`` (one
gigapixel unless the environment variable ``CDFT_MAX_IMAGE_PIXELS`` says
otherwise) and checks the limit itself, from the image header, before decoding.

``save_image`` writes atomically (a temporary file in the same folder, then
``os.replace``), so an interrupted run never leaves a half-written output.
"""

import io
import os
import pathlib
import warnings

import numpy as np
from PIL import Image
from PIL import ImageOps

from cdft import errors
from cdft.errors import CdftError, ImageError
from cdft.io import files

# Pixel limit (width * height) of the decompression-bomb guard when the
# environment variable CDFT_MAX_IMAGE_PIXELS is not set. One gigapixel is a
# 31623 x 31623 image, about 12 GB as float32 RGB.
DEFAULT_MAX_PIXELS = 1_000_000_000
MAX_PIXELS_ENV = "CDFT_MAX_IMAGE_PIXELS"


def _max_pixels_from_env(default=DEFAULT_MAX_PIXELS):
  """Returns the pixel limit from $CDFT_MAX_IMAGE_PIXELS, else ``default``."""
  value = os.environ.get(MAX_PIXELS_ENV, "").strip()
  if not value:
    return default
  try:
    limit = int(value.replace("_", ""))
  except ValueError:
    limit = 0
  if limit <= 0:
    raise ImageError(f"{MAX_PIXELS_ENV}={value!r} is not a positive integer "
                     "(the largest number of pixels, width * height, of an "
                     "image to load)")
  return limit


def _initial_max_pixels():
  try:
    return _max_pixels_from_env()
  except ImageError:
    # Reported by load_image, where it can be caught; never fail an import.
    return DEFAULT_MAX_PIXELS


# The largest image (width * height pixels) that load_image decodes; larger
# ones raise ImageError. Read from $CDFT_MAX_IMAGE_PIXELS at import (default
# DEFAULT_MAX_PIXELS); load_image also honours later changes of that variable.
MAX_PIXELS = _initial_max_pixels()

# Deliberately raised from PIL's default (~179 Mpx, meant for web servers) so
# that PIL's own guard never trips below ours.
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_PIXELS:
  Image.MAX_IMAGE_PIXELS = MAX_PIXELS

# Output formats by file extension (lower case), with the options PIL gets.
_SAVE_FORMATS = {
    # zlib level 1: a stylized 800x512 PNG encodes in 0.06 s instead of 0.18 s
    # (PIL's default 6), for files ~8% larger; still lossless.
    ".png": ("PNG", {"compress_level": 1}),
    ".jpg": ("JPEG", {"quality": 95}),
    ".jpeg": ("JPEG", {"quality": 95}),
    ".tif": ("TIFF", {}),
    ".tiff": ("TIFF", {}),
    ".bmp": ("BMP", {}),
    ".webp": ("WEBP", {"quality": 95}),
}

# Extensions that list_images picks up (lower case).
IMAGE_EXTENSIONS = frozenset(
    (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp"))

# EXIF tag number of the orientation (1 = as stored, 2..8 = flip / rotate).
_EXIF_ORIENTATION = 0x0112
# PIL resampling filters by name. PIL's default for Image.resize is BICUBIC
# since Pillow 7.0; the 2019 CD training most likely ran with NEAREST, the
# default before (cd.md section 3.3).
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# PIL modes converted by PIL itself to RGB, and modes with alpha to RGBA / LA.
_PIL_TO_RGB = frozenset(("1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"))
_PIL_ALPHA = {"La": "LA", "PA": "RGBA", "RGBa": "RGBA"}


def _pil_to_array(image):
  """A loaded PIL image as a numpy array, converted only where numpy cannot hold the mode.

  Palette images become RGB (RGBA with transparency), CMYK/YCbCr/LAB/HSV/1-bit
  RGB, premultiplied alpha straight alpha; greyscale, alpha, 16-bit and float
  data stay as stored for :func:`to_rgb`.
  """
  if image.mode == "P":
    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
  elif image.mode in _PIL_TO_RGB:
    image = image.convert("RGB")
  elif image.mode in _PIL_ALPHA:
    image = image.convert(_PIL_ALPHA[image.mode])
  return np.asarray(image)


def decode_image(data):
  """Decodes encoded image bytes with PIL (EXIF orientation applied).

  Args:
    data: the bytes of an image file.

  Returns:
    numpy array: uint8 (H, W[, C]) for 8-bit images, uint16/int32/float32 for
    wider ones; channels as stored (greyscale, RGB, alpha).

  Raises:
    ImageError: not an image, or corrupt / truncated data.
  """
  try:
    with Image.open(io.BytesIO(bytes(data))) as image:
      image.load()
      return _pil_to_array(_apply_exif_orientation(image))
  except Image.UnidentifiedImageError as e:
    raise ImageError("not an image, or a format PIL cannot read") from e
  except Exception as e:  # pylint: disable=broad-except
    # PIL's plugins raise many types on malformed data.
    raise ImageError(f"corrupt or truncated image ({errors.one_line(e)})") from e


def to_rgb(image):
  """Any image (array or encoded bytes) as 3-channel RGB.

  Args:
    image: encoded bytes, or an array (H, W), (H, W, 1) greyscale, (H, W, 2)
      greyscale + alpha, (H, W, 3) RGB, (H, W, 4) RGBA; uint8, uint16, other
      integers (16-bit data if the maximum exceeds 255), bool or float
      (values in [0, 1], or [0, 255] / [0, 65535] if the maximum says so).

  Returns:
    uint8 (H, W, 3) for 8-bit input without alpha (so that resizing happens on
    8-bit data, as torchvision does), else float32 (H, W, 3) in [0, 1]. Alpha is
    composited over white.

  Raises:
    ImageError: undecodable bytes, an unusable shape, an empty image, or
      NaN / infinite values.
  """
  if isinstance(image, (bytes, bytearray, np.bytes_)):
    image = decode_image(image)
  data = np.asarray(image)
  if data.dtype == object and data.ndim == 0:
    return to_rgb(data.item())
  if data.ndim == 2:
    data = data[..., None]
  if data.ndim != 3 or data.shape[-1] not in (1, 2, 3, 4):
    raise ImageError(f"expected an (H, W), (H, W, 1|2|3|4) image, got shape {data.shape}")
  if data.shape[0] == 0 or data.shape[1] == 0:
    raise ImageError(f"empty image of shape {data.shape}")
  if data.dtype == np.uint8 and data.shape[-1] in (1, 3):
    return np.ascontiguousarray(np.broadcast_to(data, data.shape[:2] + (3,)))

  if data.dtype == np.uint8:
    data = data.astype(np.float32) / np.float32(255)
  elif data.dtype == np.bool_:
    data = data.astype(np.float32)
  elif np.issubdtype(data.dtype, np.integer):
    peak = int(data.max())
    scale = 65535.0 if peak > 255 or data.dtype == np.uint16 else 255.0
    data = np.clip(data.astype(np.float32) / np.float32(scale), 0.0, 1.0)
  elif np.issubdtype(data.dtype, np.floating):
    data = data.astype(np.float32)
    if not np.all(np.isfinite(data)):
      raise ImageError("image holds NaN or infinite values")
    peak = float(data.max())
    scale = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0
    data = np.clip(data / np.float32(scale), 0.0, 1.0)
  else:
    raise ImageError(f"unsupported image dtype {data.dtype}")

  if data.shape[-1] in (2, 4):
    color, alpha = data[..., :-1], data[..., -1:]
    data = color * alpha + (1.0 - alpha)  # Over a white background.
  if data.shape[-1] == 1:
    data = np.repeat(data, 3, axis=-1)
  return np.ascontiguousarray(data, dtype=np.float32)


def as_float(rgb):
  """uint8 RGB as float32 in [0, 1]; float images unchanged."""
  if rgb.dtype == np.uint8:
    return rgb.astype(np.float32) / np.float32(255)
  return rgb


def resized_size(width, height, shorter_side):
  """(width, height) with the shorter side ``shorter_side``, as torchvision's
  ``Resize(int)``: the longer side scales by the same factor, truncated."""
  if width <= height:
    return shorter_side, max(1, int(shorter_side * height / width))
  return max(1, int(shorter_side * width / height)), shorter_side


def resize(rgb, size, resample="bicubic"):
  """Resizes an RGB image from :func:`to_rgb` to ``size`` = (width, height).

  uint8 images are resized by PIL on 8-bit data, float images channel by
  channel in PIL's 32-bit float mode (then clipped to [0, 1]); the dtype is
  kept. ``resample``: a name of :data:`RESAMPLE`.
  """
  if (rgb.shape[1], rgb.shape[0]) == tuple(size):
    return rgb
  method = resample_filter(resample)
  if rgb.dtype == np.uint8:
    return np.asarray(Image.fromarray(rgb, mode="RGB").resize(size, method))
  channels = [
      np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., c]), mode="F")
                 .resize(size, method)) for c in range(3)
  ]
  return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


def resample_filter(name):
  """The PIL filter of a :data:`RESAMPLE` name; CdftError for another name."""
  if isinstance(name, str) and name.lower() in RESAMPLE:
    return RESAMPLE[name.lower()]
  raise CdftError(f"unknown resize filter {name!r}; use one of {', '.join(RESAMPLE)}")


def _pixel_limit():
  """The current decompression-bomb limit (env var wins over MAX_PIXELS)."""
  return _max_pixels_from_env(default=MAX_PIXELS)


def _bomb_error(path, detail, limit, pixels=None):
  suggested = pixels if pixels is not None else 4 * limit
  return ImageError(
      f"{path}: {detail}, more than the limit of {limit} pixels that guards "
      "against decompression bombs; if the image is genuine, raise the limit "
      f"with the environment variable {MAX_PIXELS_ENV} (e.g. "
      f"{MAX_PIXELS_ENV}={suggested})")


def _exif_orientation(image):
  """The EXIF orientation tag of ``image`` (1, as stored, when absent or malformed).

  A malformed EXIF block keeps the stored orientation rather than refusing an
  otherwise good photo.
  """
  try:
    return image.getexif().get(_EXIF_ORIENTATION, 1)
  except Exception:  # pylint: disable=broad-except
    return 1


def _apply_exif_orientation(image):
  """Returns ``image`` turned as its EXIF orientation tag (if any) says."""
  if _exif_orientation(image) in (2, 3, 4, 5, 6, 7, 8):
    try:
      return ImageOps.exif_transpose(image)
    except Exception:  # pylint: disable=broad-except
      pass  # as a malformed EXIF block: keep the stored orientation
  return image


def probe_size(path, shorter_side=None):
  """(height, width) that :func:`load_image` will return, from the file's header alone.

  Reads no pixels (for planning ahead, e.g. compiling for the next image while
  this one is stylized). Returns None for a file whose header cannot be read:
  :func:`load_image` reports what is wrong with it.
  """
  try:
    with Image.open(path) as image:
      width, height = image.size
      if _exif_orientation(image) in (5, 6, 7, 8):  # turned by 90 degrees
        width, height = height, width
  except Exception:  # pylint: disable=broad-except
    return None
  if shorter_side is not None:
    width, height = resized_size(width, height, int(shorter_side))
  return height, width


def load_image(path, shorter_side=None, min_side=16, keep_uint8=False):
  """Reads an image file as float32 RGB in [0, 1].

  Applies the EXIF orientation, converts greyscale / paletted / CMYK images to
  RGB, composites images with alpha over white, and keeps the full precision of
  16-bit and float images (16-bit values v become v / 65535).

  Args:
    path: the image file (str or path-like).
    shorter_side: if given, resize (PIL bilinear, keeping the aspect ratio, as
      ``torchvision.transforms.Resize(shorter_side)``) so that the shorter side
      has this many pixels; upscaling is allowed.
    min_side: the smallest acceptable shorter side, in pixels, after resizing;
      the default 16 is what the 5-level WCT cascade (four 2x poolings) needs.
    keep_uint8: return 8-bit images as uint8 (0..255) instead of float32, for
      huge images that are converted band by band later.

  Returns:
    float32 array of shape (H, W, 3), values in [0, 1] (uint8 with ``keep_uint8``
    for 8-bit sources).

  Raises:
    ImageError: the file is missing, a directory, unreadable, not an image,
      corrupt or truncated, larger than the pixel limit (``MAX_PIXELS``,
      env ``CDFT_MAX_IMAGE_PIXELS``), or smaller than ``min_side``.
    ValueError: ``shorter_side`` is not a positive integer.
  """
  if shorter_side is not None and (int(shorter_side) != shorter_side
                                   or shorter_side <= 0):
    raise ValueError(f"shorter_side must be a positive integer, got "
                     f"{shorter_side!r}")
  path = pathlib.Path(path)
  limit = _pixel_limit()
  if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
    Image.MAX_IMAGE_PIXELS = limit  # Keep PIL's own guard above ours.

  if path.is_dir():
    raise ImageError(f"{path}: is a directory, not an image file")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      handle = Image.open(path)
  except FileNotFoundError as e:
    raise ImageError(f"{path}: no such file") from e
  except PermissionError as e:
    raise ImageError(f"{path}: permission denied") from e
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise _bomb_error(path, errors.one_line(e).rstrip("."), limit) from e
  except Image.UnidentifiedImageError as e:
    raise ImageError(
        f"{path}: not an image, or a format PIL cannot read") from e
  except Exception as e:  # pylint: disable=broad-except
    # PIL's format plugins raise many types on malformed headers.
    raise ImageError(f"{path}: cannot read image header "
                     f"({errors.one_line(e)})") from e

  with handle as image:
    width, height = image.size
    if width * height > limit:
      raise _bomb_error(path, f"{width}x{height} = {width * height} pixels",
                        limit, pixels=width * height)
    try:
      # Force the full decode now: PIL decodes lazily, and truncated or
      # corrupt data only shows up here.
      image.load()
    except Exception as e:  # pylint: disable=broad-except
      raise ImageError(f"{path}: corrupt or truncated image "
                       f"({errors.one_line(e)})") from e
    oriented = _apply_exif_orientation(image)
    try:
      rgb = to_rgb(_pil_to_array(oriented))
    except ImageError as e:
      raise ImageError(f"{path}: {e}") from e

  if shorter_side is not None:
    size = resized_size(rgb.shape[1], rgb.shape[0], int(shorter_side))
    rgb = resize(rgb, size, "bilinear")  # torchvision's Resize on a PIL image
  data = rgb if keep_uint8 else as_float(rgb)  # uint8 only for 8-bit sources
  height, width = data.shape[:2]
  if min(height, width) < min_side:
    resized = "" if shorter_side is None else " after resizing"
    raise ImageError(
        f"{path}: {width}x{height} px{resized} is too small: the 5-level "
        f"cascade needs at least {min_side} px on the shorter side")
  return data


def _output_format(path):
  suffix = path.suffix.lower()
  if suffix not in _SAVE_FORMATS:
    known = ", ".join(sorted(_SAVE_FORMATS))
    what = f"extension {suffix!r}" if suffix else "no file extension"
    raise ImageError(f"{path}: unknown image format ({what}); use one of "
                     f"{known}")
  return _SAVE_FORMATS[suffix]


def save_image(path, image):
  """Writes a float RGB image, atomically.

  Values are clamped to [0, 1] and rounded to 8 bits (``floor(255 x + 0.5)``,
  as ``torchvision.utils.save_image``); NaNs become 0. The format follows the
  extension: .png (fast zlib level 1), .jpg/.jpeg (quality 95), .tif/.tiff, .bmp, .webp (quality
  95). Missing parent folders are created. The data go to a temporary file in
  the same folder that then replaces ``path``, so a killed run never leaves a
  half-written image behind.

  Args:
    path: the output file (str or path-like).
    image: array-like (numpy or jax) of shape (H, W, 3) or (1, H, W, 3); uint8
      arrays are written as they are.

  Returns:
    The written path as a ``pathlib.Path``.

  Raises:
    ImageError: unknown extension, or the file or its folder cannot be written.
    ValueError: ``image`` does not have one of the shapes above.
  """
  path = pathlib.Path(path)
  pil_format, options = _output_format(path)
  data = np.asarray(image)
  if data.ndim == 4 and data.shape[0] == 1:
    data = data[0]
  if data.ndim != 3 or data.shape[-1] != 3:
    raise ValueError(f"save_image wants an (H, W, 3) or (1, H, W, 3) image, "
                     f"got shape {np.shape(image)}")
  if data.dtype != np.uint8:
    data = np.nan_to_num(data.astype(np.float32), nan=0.0)
    data = np.floor(np.clip(data, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
  pil_image = Image.fromarray(data, mode="RGB")

  try:
    with files.atomic_open(path) as f:
      pil_image.save(f, format=pil_format, **options)
  except OSError as e:
    raise ImageError(f"{path}: cannot write image ({errors.one_line(e)})") from e
  return path


def list_images(directory):
  """The image files of a folder, sorted by name (not recursive).

  Files count as images by extension (case-insensitive, see
  ``IMAGE_EXTENSIONS``); hidden files (names starting with '.') are skipped.

  Args:
    directory: the folder (str or path-like).

  Returns:
    A sorted list of ``pathlib.Path``.

  Raises:
    ImageError: the folder does not exist, is not a folder, cannot be read, or
      holds no image files.
  """
  directory = pathlib.Path(directory)
  if not directory.exists():
    raise ImageError(f"{directory}: no such folder")
  if not directory.is_dir():
    raise ImageError(f"{directory}: not a folder")
  try:
    found = sorted(
        p for p in directory.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        and p.is_file())
  except OSError as e:
    raise ImageError(f"{directory}: cannot list folder ({errors.one_line(e)})") from e
  if not found:
    known = ", ".join(sorted(IMAGE_EXTENSIONS))
    raise ImageError(f"{directory}: no image files ({known}) in this folder")
  return found
