"""A TFDS dataset over a folder of images (e.g. COCO train2014 unpacked).

The builder reads every file under a folder (recursively, hidden files left
out), keeps those that decode as images, whatever their extension, and writes
an array_record dataset with one split, ``train``, holding all readable images.
It needs no TensorFlow. Read it back with
``builder.as_data_source('train')`` (random access, numpy dicts).

Features:
  image: ``tfds.features.Image`` (uint8 RGB, H x W x 3 when read back).
  filename: the file's path relative to the folder (``tfds.features.Text``).

What is stored: JPEG and PNG files that are already 8-bit RGB without an EXIF
rotation keep their original bytes; every other readable image (greyscale,
paletted, CMYK, with alpha, 16-bit, float, other formats, EXIF-rotated) is
converted as ``cdft.io.images.load_image`` does (EXIF orientation applied, alpha
composited over white, 16-bit scaled) and re-encoded as 8-bit RGB PNG, so every
stored image reads back as 3 uint8 channels. Files that cannot be read (not an
image, e.g. a README, corrupt, truncated, over the pixel limit) are skipped,
logged, and counted in ``builder.info.metadata['skipped']`` (their names, up to
``MAX_LISTED_SKIPS``, in ``metadata['skipped_files']``).

Naming: each folder gets its own builder config, named
``<folder name>-<first 12 hex digits of sha1(absolute folder path)>``, so two
folders never collide in one ``data_dir``
(``<data_dir>/cdft_image_folder/<config>/<version>/``). The copy is keyed by the
path only: files added to or removed from the folder later are not seen until
the copy is rebuilt (``prepare_image_folder(..., overwrite=True)``).

Several hosts sharing one ``data_dir`` should not build the same copy at the
same time: prepare it once beforehand (one process, or the same call on a
single machine), then every host reuses it.
"""

import dataclasses
import hashlib
import io
import logging
import os
import pathlib
import re

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from cdft.errors import CdftError
from cdft.errors import ImageError
from cdft.io import images

# At most this many skipped file names are kept in the metadata.
MAX_LISTED_SKIPS = 1000
# Formats whose original bytes are stored as they are (for 8-bit RGB data).
_PASS_THROUGH_FORMATS = frozenset(("JPEG", "PNG"))
_EXIF_ORIENTATION = 0x0112

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
  """Builder config of one folder.

  Attributes:
    folder: the absolute folder path this config was made for (informative;
      the images are read from ``download_config.manual_dir``).
  """
  folder: str = ""


def config_name(folder):
  """The builder-config name of ``folder`` (see the module docstring)."""
  path = os.path.abspath(os.fspath(folder))
  slug = re.sub(r"[^a-z0-9_]+", "_", os.path.basename(path.rstrip(os.sep)).lower())
  slug = slug.strip("_")[:40] or "root"
  digest = hashlib.sha1(path.encode("utf-8")).hexdigest()[:12]
  return f"{slug}-{digest}"


def list_files(folder):
  """The files under ``folder``, recursively, hidden ones ('.*') left out.

  Args:
    folder: the folder.

  Returns:
    Sorted list of ``pathlib.Path``.

  Raises:
    CdftError: ``folder`` does not exist or is not a folder.
  """
  root = pathlib.Path(folder)
  if not root.is_dir():
    raise CdftError(f"{root}: no such folder of images")
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    found.extend(pathlib.Path(dirpath) / name for name in filenames
                 if not name.startswith("."))
  return sorted(found)


def _rgb_png_bytes(path):
  """Decodes ``path`` like ``load_image`` and re-encodes it as 8-bit RGB PNG."""
  data = images.load_image(path, min_side=1, keep_uint8=True)
  if data.dtype != np.uint8:
    data = np.floor(np.clip(data, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(data, mode="RGB").save(buffer, format="PNG")
  return buffer.getvalue()


def encoded_rgb_image(path):
  """The bytes to store for the image file ``path``.

  Args:
    path: an image file.

  Returns:
    The file's own bytes for 8-bit RGB JPEG/PNG files without an EXIF rotation,
    else a PNG of the converted 8-bit RGB image.

  Raises:
    ImageError: the file is not an image PIL can read, or cannot be decoded.
  """
  path = pathlib.Path(path)
  try:
    # Only the header is read here: a big non-image file is never loaded whole.
    with Image.open(path) as image:
      fmt, mode = image.format, image.mode
      width, height = image.size
      rotated = image.getexif().get(_EXIF_ORIENTATION, 1) in range(2, 9)
  except Image.UnidentifiedImageError as e:
    raise ImageError(f"{path}: not an image, or a format PIL cannot read") from e
  except Exception:  # pylint: disable=broad-except
    fmt = None  # load_image below gives the one-line reason.
  if (fmt in _PASS_THROUGH_FORMATS and mode == "RGB" and not rotated
      and width * height <= images.MAX_PIXELS):
    try:
      raw = path.read_bytes()
      with Image.open(io.BytesIO(raw)) as image:
        image.load()  # Full decode: catches truncated and corrupt data.
      return raw
    except Exception:  # pylint: disable=broad-except
      pass  # load_image below gives the one-line reason.
  return _rgb_png_bytes(path)


class ImageFolder(tfds.core.GeneratorBasedBuilder):
  """All readable images of a folder (``manual_dir``), as one ``train`` split."""

  name = "cdft_image_folder"  # Not TFDS's own 'image_folder' (a different builder).
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Images as 8-bit RGB, unreadable files skipped."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the folder of images as manual_dir."
  # Set explicitly: TFDS's own lookup of a builder's source file needs the
  # ``importlib_resources`` backport, which Python 3.9+ installs do not have.
  code_path = pathlib.Path(__file__)

  def _info(self):
    return self.dataset_info_from_configs(
        description="Images of a folder, recursively, as 8-bit RGB.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "filename": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(pathlib.Path(dl_manager.manual_dir))}

  def _generate_examples(self, folder):
    files = list_files(folder)
    skipped = []
    for path in files:
      relative = path.relative_to(folder).as_posix()
      try:
        encoded = encoded_rgb_image(path)
      except ImageError as e:
        logger.warning("image_folder: skipping %s", e)
        skipped.append(relative)
        continue
      yield relative, {"image": encoded, "filename": relative}
    self.info.metadata["skipped"] = len(skipped)
    self.info.metadata["skipped_files"] = skipped[:MAX_LISTED_SKIPS]
    self.info.metadata["folder"] = os.fspath(folder)
    logger.info("image_folder: %d images from %s, %d files skipped",
                len(files) - len(skipped), folder, len(skipped))


def image_folder_builder(folder, data_dir=None):
  """The (possibly not yet prepared) builder for ``folder``."""
  folder = os.path.abspath(os.fspath(folder))
  config = ImageFolderConfig(name=config_name(folder), folder=folder,
                             description=f"Images under {folder}")
  return ImageFolder(config=config, data_dir=data_dir, file_format="array_record")


def prepare_image_folder(folder, data_dir=None, *, overwrite=False):
  """Builds the dataset of ``folder`` once and returns its builder.

  An existing prepared copy in ``data_dir`` is reused (nothing is read from the
  folder then, so it may even be gone).

  Args:
    folder: the folder of images (searched recursively).
    data_dir: TFDS data_dir (None: TFDS default, ~/tensorflow_datasets).
    overwrite: rebuild even if a prepared copy exists (after the folder changed).

  Returns:
    The prepared ``ImageFolder`` builder; read it with
    ``builder.as_data_source('train')``.

  Raises:
    CdftError: the folder does not exist (and there is no prepared copy), or it
      holds no readable image.
  """
  folder = pathlib.Path(folder)
  builder = image_folder_builder(folder, data_dir)
  if overwrite or not builder.is_prepared():
    if not list_files(folder):  # Raises for a missing folder.
      raise CdftError(f"{folder}: no files in this folder or below")
    mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.fspath(folder.absolute()), download_mode=mode))
  if builder.info.splits["train"].num_examples == 0:
    raise CdftError(f"{folder}: none of its image files could be read (prepared copy "
                    f"in {builder.data_dir}; rebuild with overwrite=True once fixed)")
  return builder
