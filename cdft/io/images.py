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

import os
import pathlib
import warnings

import numpy as np
from PIL import Image
from PIL import ImageOps

from cdft import errors
from cdft.errors import ImageError
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
    ".png": ("PNG", {}),
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

# Modes holding 8 bits per channel without alpha that PIL converts to RGB.
_MODES_TO_RGB = frozenset(("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr",
                           "HSV", "LAB"))
# Modes with an alpha channel, and the mode PIL should convert them to.
_ALPHA_MODES = {"LA": "LA", "La": "LA", "PA": "RGBA", "RGBA": "RGBA",
                "RGBa": "RGBA"}
# EXIF tag number of the orientation (1 = as stored, 2..8 = flip / rotate).
_EXIF_ORIENTATION = 0x0112
# Integer modes wider than 8 bits (one channel).
_WIDE_INT_MODES = frozenset(("I", "I;16", "I;16B", "I;16L", "I;16N"))


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


def _to_float_rgb(image, path):
  """Converts a decoded PIL image of any mode to float32 (H, W, 3) in [0, 1].

  Args:
    image: a loaded PIL image, already in display orientation.
    path: the file, for error messages.

  Returns:
    ``(pil_rgb, None)`` for 8-bit images without alpha (an RGB PIL image, so
    that resizing happens on uint8 data exactly as in torchvision), or
    ``(None, array)`` with the float32 (H, W, 3) array for everything else.
  """
  mode = image.mode
  if mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")
    mode = "RGBA"
  if mode in _MODES_TO_RGB:
    try:
      return image.convert("RGB"), None
    except (ValueError, OSError) as e:
      raise ImageError(f"{path}: cannot convert PIL mode {mode} to RGB "
                       f"({errors.one_line(e)})") from e

  if mode in _ALPHA_MODES:
    image = image.convert(_ALPHA_MODES[mode])
    data = np.asarray(image, dtype=np.float32) / 255.0
    color, alpha = data[..., :-1], data[..., -1:]
    if color.shape[-1] == 1:
      color = np.repeat(color, 3, axis=-1)
    # Composite over a white background: c * a + 1 * (1 - a).
    return None, color * alpha + (1.0 - alpha)

  if mode in _WIDE_INT_MODES or mode == "F":
    data = np.asarray(image)
    if mode == "F":
      data = data.astype(np.float32)
      if not np.all(np.isfinite(data)):
        raise ImageError(f"{path}: float image holds NaN or infinite values")
      peak = float(data.max()) if data.size else 0.0
      # Float images are usually in [0, 1]; some tools write [0, 255] or
      # [0, 65535] instead.
      scale = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0
    elif mode == "I":
      # 32-bit integers, in practice 16-bit data (PNG/TIFF readers) or, rarely,
      # 8-bit data stored wide.
      peak = int(data.max()) if data.size else 0
      scale = 65535.0 if peak > 255 else 255.0
    else:
      scale = 65535.0
    # float32 holds integers up to 2**24 exactly; one rounding in the divide.
    data = np.clip(data.astype(np.float32) / np.float32(scale), 0.0, 1.0)
    return None, np.repeat(data[..., None], 3, axis=-1)

  # Anything else PIL can decode (e.g. "I;16S" or unusual raw modes).
  try:
    return image.convert("RGB"), None
  except (ValueError, OSError) as e:
    raise ImageError(f"{path}: unsupported PIL image mode {mode} "
                     f"({errors.one_line(e)})") from e


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


def _resized_size(width, height, shorter_side):
  """(width, height) with the shorter side set to ``shorter_side``.

  Matches ``torchvision.transforms.Resize(int)``: the longer side is scaled by
  the same factor and truncated to an integer.
  """
  if width <= height:
    return shorter_side, max(1, int(shorter_side * height / width))
  return max(1, int(shorter_side * width / height)), shorter_side


def _resize_float(data, size):
  """Bilinear resize of a float32 (H, W, 3) array to ``size`` = (W, H)."""
  channels = [
      np.asarray(Image.fromarray(np.ascontiguousarray(data[..., c]), mode="F")
                 .resize(size, Image.BILINEAR))
      for c in range(data.shape[-1])
  ]
  return np.stack(channels, axis=-1)


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
    width, height = _resized_size(width, height, int(shorter_side))
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
    pil_rgb, data = _to_float_rgb(oriented, path)

  if shorter_side is not None:
    width, height = pil_rgb.size if pil_rgb is not None else (data.shape[1],
                                                             data.shape[0])
    size = _resized_size(width, height, int(shorter_side))
    if size != (width, height):
      if pil_rgb is not None:
        pil_rgb = pil_rgb.resize(size, Image.BILINEAR)
      else:
        data = _resize_float(data, size)
  if pil_rgb is not None and keep_uint8:
    data = np.asarray(pil_rgb, dtype=np.uint8)  # 4x less memory for huge images
  elif pil_rgb is not None:
    data = np.asarray(pil_rgb, dtype=np.float32) / np.float32(255.0)
  if data.dtype != np.uint8:
    data = np.ascontiguousarray(data, dtype=np.float32)

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
  extension: .png, .jpg/.jpeg (quality 95), .tif/.tiff, .bmp, .webp (quality
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
