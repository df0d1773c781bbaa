"""Random-access data sources: ``len(src)``, ``src[i]`` -> dict of numpy.

Every source returns examples with 'image' (uint8, H x W x 3, decoded) and,
for labelled data, 'label' (int). Sources also have ``src.__getitems__(indices)``
(a list of examples) and a ``name`` for messages; the in-memory ones (CIFAR,
digits: ``ArraySource``) also ``src.get_batch(indices)`` (one stacked batch).

Datasets (``get_source(name, split, ...)``):
  image_folder: every image under ``manual_dir`` (recursive), built once into
    an array_record TFDS dataset in ``data_dir`` (see ``cdft.data.image_folder``);
    split 'train' (TFDS slicing such as 'train[:95%]' works). Extra key
    'filename' (bytes, relative path).
  coco: TFDS ``coco/2017`` already prepared in ``data_dir`` in the array_record
    format (building it needs TensorFlow). Image only, plus 'filename'.
  cifar10 / cifar100: TFDS, prepared (array_record) in ``data_dir``; 'train' /
    'test'; cifar100's 'label' is the fine (100-class) label. Read into memory
    once (uint8).
  digits: scikit-learn's ``load_digits`` (1,797 real 8 x 8 handwritten digits
    with 17 grey levels, shipped inside the scikit-learn wheel). Each image is
    scaled to uint8 (v * 255 / 16, rounded), upscaled to 32 x 32 with PIL
    bilinear and repeated to 3 channels. Fixed split: 'train' = the first 1,500
    images, 'test' = the remaining 297 (the file's order mixes the classes:
    every class has 142-163 training and 28-33 test images); 'all' = all.
"""

import os
import pathlib

import numpy as np
from PIL import Image

from cdft.errors import CdftError

DIGITS_TRAIN_SIZE = 1500  # First images of load_digits in 'train', rest 'test'.
DIGITS_SIZE = 32  # Side of the upscaled digit images.


class ArraySource:
  """A source over in-memory arrays (images and optional labels)."""

  def __init__(self, images, labels=None, name="arrays"):
    self.images = np.asarray(images)
    self.labels = None if labels is None else np.asarray(labels)
    if self.labels is not None and len(self.labels) != len(self.images):
      raise CdftError(f"{name}: {len(self.images)} images but {len(self.labels)} labels")
    self.name = name

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    example = {"image": self.images[index]}
    if self.labels is not None:
      example["label"] = self.labels[index]
    return example

  def __getitems__(self, indices):
    return [self[i] for i in indices]

  def get_batch(self, indices):
    """The examples ``indices`` as one batch (a gather per array, no per-example work)."""
    indices = np.asarray(indices, np.int64)
    batch = {"image": self.images[indices]}
    if self.labels is not None:
      batch["label"] = self.labels[indices].astype(np.int32)
    return batch

  def __repr__(self):
    return f"ArraySource({self.name}, {len(self)} examples)"


class FeatureSource:
  """Wraps a TFDS data source, keeping (and renaming) some features.

  Args:
    source: a TFDS random-access data source.
    keys: mapping from the names in ``source`` to the names returned.
    name: for messages.
  """

  def __init__(self, source, keys, name):
    self.source = source
    self.keys = dict(keys)
    self.name = name

  def __len__(self):
    return len(self.source)

  def _select(self, example):
    return {new: example[old] for old, new in self.keys.items() if old in example}

  def __getitem__(self, index):
    return self._select(self.source[int(index)])

  def __getitems__(self, indices):
    # One by one: TFDS's mock data sources fail on __getitems__.
    return [self[i] for i in indices]

  def __repr__(self):
    return f"FeatureSource({self.name}, {len(self)} examples)"


def _default_data_dir(data_dir):
  if data_dir:
    return os.fspath(data_dir)
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return os.fspath(tfds.core.constants.DATA_DIR)


def image_folder_source(split, data_dir=None, manual_dir=None):
  """The images of ``manual_dir``, prepared once in ``data_dir``."""
  from cdft.data import image_folder  # pylint: disable=import-outside-toplevel
  if not manual_dir:
    raise CdftError("dataset 'image_folder' needs manual_dir (the folder of images, "
                    "e.g. --config.input.manual_dir=data/COCO/train2014)")
  builder = image_folder.prepare_image_folder(manual_dir, data_dir)
  try:
    source = builder.as_data_source(split)
  except (KeyError, ValueError) as e:
    raise CdftError(f"image_folder {manual_dir}: bad split {split!r} (it has 'train'): "
                    f"{' '.join(str(e).split())}") from e
  return FeatureSource(source, {"image": "image", "filename": "filename"},
                       name=f"image_folder:{manual_dir}:{split}")


def _tfds_source(name, split, data_dir, download):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  kwargs = {"split": split, "data_dir": data_dir, "download": download}
  if download:
    kwargs["builder_kwargs"] = {"file_format": "array_record"}
  try:
    return tfds.data_source(name, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    where = _default_data_dir(data_dir)
    detail = " ".join(str(e).split())[:160]
    raise CdftError(
        f"TFDS dataset {name!r} (split {split!r}) is not available as an array_record "
        f"data source in data_dir {where}: prepare it there with "
        f"tfds.builder({name!r}, data_dir=..., file_format='array_record')"
        f".download_and_prepare() ({type(e).__name__}: {detail})") from e


def cifar_source(name, split, data_dir=None, download=False):
  """CIFAR-10 / CIFAR-100 from TFDS, read once into memory (image uint8 32 x 32 x 3, label).

  A split is at most 50,000 x 3,072 bytes (150 MB); held as one array, a batch is
  a gather (``ArraySource.get_batch``) instead of a record read per example.
  """
  source = FeatureSource(_tfds_source(name, split, data_dir, download),
                         {"image": "image", "label": "label"}, name=f"{name}:{split}")
  examples = [source[i] for i in range(len(source))]
  if not examples:
    raise CdftError(f"{source.name}: the split is empty")
  return ArraySource(np.stack([np.asarray(e["image"], np.uint8) for e in examples]),
                     np.array([e["label"] for e in examples], np.int32), name=source.name)


def coco_source(split, data_dir=None):
  """TFDS ``coco/2017`` from a prepared array_record copy (no TensorFlow needed).

  The COCO builder code imports TensorFlow, so the prepared files are opened
  with ``tfds.builder_from_directory`` (the newest version under
  ``<data_dir>/coco/2017``).
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  where = pathlib.Path(_default_data_dir(data_dir)) / "coco" / "2017"
  versions = sorted(
      (p for p in where.glob("*") if (p / "dataset_info.json").is_file()),
      key=lambda p: tuple(int(x) if x.isdigit() else 0 for x in p.name.split(".")))
  if not versions:
    raise CdftError(
        f"COCO 2017 is not prepared in data_dir {where.parent.parent} (no "
        f"{where}/<version>/dataset_info.json); prepare coco/2017 with TFDS "
        "(file_format='array_record'), or use dataset='image_folder' with "
        "manual_dir=<the unpacked train2014 or train2017 folder>")
  try:
    source = tfds.builder_from_directory(os.fspath(versions[-1])).as_data_source(split)
  except Exception as e:  # pylint: disable=broad-except
    detail = " ".join(str(e).split())[:300]
    raise CdftError(f"COCO 2017 in {versions[-1]} cannot be read as an array_record "
                    f"data source (split {split!r}): {type(e).__name__}: {detail}") from e
  return FeatureSource(source, {"image": "image", "image/filename": "filename"},
                       name=f"coco/2017:{split}")


def load_digits_images():
  """All of scikit-learn's digits as (uint8 (1797, 32, 32, 3), int32 labels)."""
  try:
    from sklearn import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CdftError("dataset 'digits' needs scikit-learn (pip install scikit-learn)") from e
  digits = datasets.load_digits()
  small = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
  big = np.stack([
      np.asarray(Image.fromarray(image, mode="L").resize(
          (DIGITS_SIZE, DIGITS_SIZE), Image.Resampling.BILINEAR)) for image in small
  ])
  return np.repeat(big[..., None], 3, axis=-1), digits.target.astype(np.int32)


def digits_source(split):
  """scikit-learn's digits as 32 x 32 RGB (see the module docstring)."""
  images, labels = load_digits_images()
  parts = {
      "train": slice(0, DIGITS_TRAIN_SIZE),
      "test": slice(DIGITS_TRAIN_SIZE, None),
      "all": slice(None),
  }
  if split not in parts:
    raise CdftError(f"dataset 'digits' has splits {', '.join(parts)}, not {split!r}")
  return ArraySource(images[parts[split]], labels[parts[split]], name=f"digits:{split}")


DATASETS = ("image_folder", "coco", "cifar10", "cifar100", "digits")


def get_source(name, split, *, data_dir=None, manual_dir=None, download=False):
  """A random-access source of dataset ``name`` (see the module docstring).

  Args:
    name: 'image_folder', 'coco', 'cifar10', 'cifar100' or 'digits'.
    split: split name; TFDS datasets accept TFDS slicing ('train[:10%]').
    data_dir: TFDS data_dir (None: TFDS default, ~/tensorflow_datasets).
    manual_dir: the folder of images ('image_folder' only).
    download: cifar10/cifar100 only: download and prepare (array_record) when
      not yet in ``data_dir`` (needs network access).

  Returns:
    A source: ``len()``, ``[i]`` and ``__getitems__`` giving dicts of numpy.

  Raises:
    CdftError: unknown dataset or split, or the data is not available.
  """
  if name == "image_folder":
    return image_folder_source(split, data_dir=data_dir, manual_dir=manual_dir)
  if name == "coco":
    return coco_source(split, data_dir=data_dir)
  if name in ("cifar10", "cifar100"):
    return cifar_source(name, split, data_dir=data_dir, download=download)
  if name == "digits":
    return digits_source(split)
  raise CdftError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
