"""Where a tiled level's image lives: in memory, or in a raw float32 file.

A file is read and written by windows and row bands, so memory stays flat.
"""
import os
import tempfile

import jax
import numpy as np


class ImageStore:
  """A float32 (H, W, C) image or feature map, in memory or in a raw file read by row bands."""

  def __init__(self, height, width, on_disk=False, folder=None, channels=3):
    self.height, self.width, self.channels = height, width, channels
    self._array = None
    self._file = None
    if on_disk:
      fd, name = tempfile.mkstemp(prefix="cdft-level-", suffix=".f32", dir=folder)
      self._file = os.fdopen(fd, "w+b")
      os.unlink(name)  # removed by the OS when closed, even if the run is killed
      self._file.truncate(height * width * channels * 4)
    else:
      self._array = np.zeros((height, width, channels), np.float32)

  @classmethod
  def holding(cls, array):
    """An in-memory store around an (H, W, C) float32 array (not copied)."""
    store = cls.__new__(cls)
    store.height, store.width, store.channels = array.shape
    store._array, store._file = array, None
    return store

  @property
  def in_memory(self):
    return self._array is not None

  @classmethod
  def from_array(cls, image, on_disk=False, folder=None):
    """A store holding ``image`` (float in [0, 1], or uint8 converted band by band)."""
    store = cls(image.shape[0], image.shape[1], on_disk, folder)
    for r0, r1 in bands(image.shape[0], 512):
      rows = image[r0:r1]
      if rows.dtype == np.uint8:
        rows = rows.astype(np.float32) / np.float32(255.0)
      store.write_rows(r0, np.asarray(rows, np.float32))
    return store

  def read_rows(self, r0, r1):
    """Rows [r0, r1) as a (r1 - r0, W, 3) array."""
    if self._array is not None:
      return self._array[r0:r1]
    self._file.seek(r0 * self.width * self.channels * 4)
    data = np.fromfile(self._file, np.float32, (r1 - r0) * self.width * self.channels)
    return data.reshape(r1 - r0, self.width, self.channels)

  def write_rows(self, r0, rows):
    if self._array is not None:
      self._array[r0:r0 + rows.shape[0], :rows.shape[1]] = rows
      return
    if rows.shape[1] != self.width:
      raise ValueError("on-disk stores are written in full rows")
    self._file.seek(r0 * self.width * self.channels * 4)
    np.ascontiguousarray(rows, np.float32).tofile(self._file)

  def _map(self):
    return np.memmap(self._file, np.float32, "r+", shape=(self.height, self.width, self.channels))

  def read_window(self, r0, r1, c0, c1):
    """The block [r0, r1) x [c0, c1); on disk only its pages are touched (flat memory)."""
    if self._array is not None:
      return self._array[r0:r1, c0:c1]
    mapped = self._map()
    block = _aligned_empty((r1 - r0, c1 - c0, self.channels))
    np.copyto(block, mapped[r0:r1, c0:c1])
    del mapped  # unmapped: the pages leave this process's resident set
    return block

  def write_window(self, r0, c0, block):
    if self._array is not None:
      self._array[r0:r0 + block.shape[0], c0:c0 + block.shape[1]] = block
      return
    mapped = self._map()
    mapped[r0:r0 + block.shape[0], c0:c0 + block.shape[1]] = block
    mapped.flush()
    del mapped

  def to_array(self):
    return self.read_rows(0, self.height).copy()

  def to_uint8(self, band_rows=512):
    """The image clamped and rounded to uint8, converted band by band."""
    out = np.empty((self.height, self.width, 3), np.uint8)
    for r0, r1 in bands(self.height, band_rows):
      rows = np.nan_to_num(self.read_rows(r0, r1), nan=0.0)
      out[r0:r1] = np.floor(np.clip(rows, 0.0, 1.0) * 255.0 + 0.5)
    return out

  def close(self):
    if self._file is not None:
      self._file.close()


def _aligned_empty(shape, dtype=np.float32, alignment=64):
  """An uninitialised array whose data starts on an ``alignment``-byte boundary."""
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  raw = np.empty(nbytes + alignment, np.uint8)
  offset = -raw.ctypes.data % alignment
  return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def to_device(window):
  """A (1, h, w, C) device array of a window; an aligned contiguous one is not copied on CPU."""
  return jax.device_put(window[None])


def bands(n, size):
  return [(a, min(a + size, n)) for a in range(0, n, size)]
