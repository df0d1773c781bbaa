"""Tests of the input pipeline: preprocessing, sources, image_folder, iterators."""
import io
import logging
import os
import signal
import sys

import numpy as np
import psutil
from PIL import Image
import pytest

from cdft.data import image_folder
from cdft.data import pipeline
from cdft.data import preprocess
from cdft.data import sources
from cdft.errors import CdftError
from cdft.errors import ImageError


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def _random_image(seed, height, width):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _windows(image, crop):
  """All crop x crop windows of image, as float [0, 1], keyed by (top, left)."""
  data = image.astype(np.float32) / 255
  return {(t, l): data[t:t + crop, l:l + crop]
          for t in range(image.shape[0] - crop + 1)
          for l in range(image.shape[1] - crop + 1)}


# ----------------------------------------------------------------- preprocess


def test_cd_train_crop_inside_image_and_flip_really_flips():
  image = _random_image(0, 20, 26)
  windows = _windows(image, 16)
  flipped_seen = plain_seen = 0
  for seed in range(24):
    out = preprocess.cd_train(image, np.random.default_rng(seed), shorter_side=None, crop=16)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    plain = [k for k, w in windows.items() if np.array_equal(w, out)]
    flipped = [k for k, w in windows.items() if np.array_equal(w[:, ::-1], out)]
    assert len(plain) + len(flipped) == 1, "output is not a (flipped) window of the input"
    # The documented draw order: crop top, crop left, then the flip.
    rng = np.random.default_rng(seed)
    top, left, flip = rng.integers(0, 5), rng.integers(0, 11), rng.random() < 0.5
    assert (flipped if flip else plain) == [(top, left)]
    flipped_seen += bool(flipped)
    plain_seen += bool(plain)
  assert flipped_seen and plain_seen
  again = preprocess.cd_train(image, np.random.default_rng(3), shorter_side=None, crop=16)
  assert np.array_equal(again, preprocess.cd_train(image, np.random.default_rng(3),
                                                   shorter_side=None, crop=16))


def test_cd_resize_shorter_side_and_centre_crop_match_pil():
  image = _random_image(1, 90, 60)  # 60 wide, 90 high
  out = preprocess.cd_eval(image, shorter_side=30, crop=30)
  expected = np.asarray(Image.fromarray(image).resize((30, 45), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(out, expected[8:38].astype(np.float32) / 255)  # round(7.5)=8
  near = preprocess.cd_eval(image, shorter_side=30, crop=30, resample="nearest")
  expected = np.asarray(Image.fromarray(image).resize((30, 45), Image.Resampling.NEAREST))
  np.testing.assert_array_equal(near, expected[8:38].astype(np.float32) / 255)
  train = preprocess.cd_train(image, np.random.default_rng(0), shorter_side=30, crop=24)
  assert train.shape == (24, 24, 3) and 0.0 <= train.min() and train.max() <= 1.0


def test_cd_small_image_is_upscaled_to_fit_the_crop_and_min_side_refuses():
  small = _random_image(2, 10, 12)
  out = preprocess.cd_train(small, np.random.default_rng(0), shorter_side=20, crop=32)
  assert out.shape == (32, 32, 3)
  with pytest.raises(ImageError, match="smaller than min_side=16"):
    preprocess.cd_train(small, np.random.default_rng(0), shorter_side=20, crop=32, min_side=16)


def test_to_rgb_handles_grey_alpha_16bit_bytes_and_corrupt_data():
  grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
  rgb = preprocess.to_rgb(grey)
  assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
  assert np.array_equal(rgb[..., 0], grey) and np.array_equal(rgb[..., 2], grey)
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[0, 0] = (255, 0, 0, 255)  # opaque red; the rest transparent black -> white
  np.testing.assert_allclose(preprocess.to_rgb(rgba)[0, 0], [1, 0, 0])
  np.testing.assert_allclose(preprocess.to_rgb(rgba)[1, 1], [1, 1, 1])
  wide = np.array([[0, 65535]], np.uint16)
  np.testing.assert_allclose(preprocess.to_rgb(wide)[0], [[0, 0, 0], [1, 1, 1]])
  decoded = preprocess.to_rgb(_png(grey))
  assert np.array_equal(decoded, rgb)
  with pytest.raises(ImageError, match="corrupt or truncated|not an image"):
    preprocess.to_rgb(_png(grey)[:40])
  with pytest.raises(ImageError, match="shape"):
    preprocess.to_rgb(np.zeros((4, 4, 5), np.uint8))


def test_cifar_normalisation_values_and_padding():
  white = np.full((32, 32, 3), 255, np.uint8)
  mean = np.array([0.4914, 0.4822, 0.4465], np.float32)
  std = np.array([0.2023, 0.1994, 0.2010], np.float32)
  out = preprocess.cifar_eval(white)
  assert out.shape == (32, 32, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out[5, 7], (1 - mean) / std, rtol=1e-6)
  np.testing.assert_allclose(out[0, 0], [2.5140880, 2.5967904, 2.7537313], rtol=1e-6)
  c100 = preprocess.cifar_eval(white, stats="cifar100")
  np.testing.assert_allclose(c100[0, 0], (1 - np.array([129.3, 124.1, 112.4]) / 255)
                             / (np.array([68.2, 65.4, 70.4]) / 255), rtol=1e-5)
  # Train: zero padding (black before normalising), crop position from the rng.
  for seed in range(6):
    got = preprocess.cifar_train(white, np.random.default_rng(seed), flip=False)
    rng = np.random.default_rng(seed)
    top, left = rng.integers(0, 9), rng.integers(0, 9)
    padded = np.pad(np.ones((32, 32, 3), np.float32), ((4, 4), (4, 4), (0, 0)))
    np.testing.assert_allclose(got, (padded[top:top + 32, left:left + 32] - mean) / std,
                               rtol=1e-6)


def test_get_preprocess_registry_labels_and_errors():
  fn = preprocess.get_preprocess("cifar_train")
  out = fn({"image": _random_image(3, 32, 32), "label": 7, "id": 1}, np.random.default_rng(0))
  assert set(out) == {"image", "label"}
  assert out["label"].dtype == np.int32 and out["label"] == 7
  fn = preprocess.get_preprocess("cd_train", shorter_side=20, crop=16, flip=True)
  assert set(fn({"image": _random_image(4, 20, 30)}, np.random.default_rng(0))) == {"image"}
  with pytest.raises(CdftError, match="unknown preprocessing 'nope'"):
    preprocess.get_preprocess("nope")
  with pytest.raises(CdftError, match="unknown arguments cropp"):
    preprocess.get_preprocess("cd_train", cropp=3)
  with pytest.raises(CdftError, match="crop must be an integer >= 1"):
    preprocess.get_preprocess("cd_eval", crop=0)
  with pytest.raises(CdftError, match="unknown resize filter"):
    preprocess.get_preprocess("cd_train", resample="sharp")
  with pytest.raises(CdftError, match="unknown CIFAR statistics"):
    preprocess.get_preprocess("cifar_eval", stats="imagenet")


# -------------------------------------------------------------------- sources


def test_digits_source_shapes_labels_and_split():
  train, test = sources.get_source("digits", "train"), sources.get_source("digits", "test")
  assert (len(train), len(test)) == (1500, 297)
  example = train[0]
  assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
  assert example["label"] == 0  # sklearn's first digit is a 0
  assert np.array_equal(example["image"][..., 0], example["image"][..., 2])
  assert example["image"].max() > 200 and example["image"][0, 0, 0] == 0
  assert set(np.bincount(train.labels)) and len(np.unique(train.labels)) == 10
  assert len(np.unique(test.labels)) == 10
  assert not np.array_equal(train[0]["image"], test[0]["image"])
  with pytest.raises(CdftError, match="splits train, test, all"):
    sources.get_source("digits", "validation")


def test_mock_cifar10_through_the_pipeline():
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  with tfds.testing.mock_data(num_examples=12):
    source = sources.get_source("cifar10", "train")
    assert len(source) == 12
    example = source[3]
    assert set(example) == {"image", "label"}
    assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
    assert 0 <= int(example["label"]) < 10
    it = pipeline.make_train_iterator(source, preprocess.get_preprocess("cifar_train"),
                                      global_batch_size=4, seed=0, num_threads=0)
    batch = next(it)
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32


def test_source_errors_are_clear(tmp_path):
  with pytest.raises(CdftError, match="unknown dataset 'imagenet'"):
    sources.get_source("imagenet", "train")
  with pytest.raises(CdftError, match="needs manual_dir"):
    sources.get_source("image_folder", "train", data_dir=tmp_path)
  with pytest.raises(CdftError, match=f"COCO 2017 is not prepared in data_dir {tmp_path}"):
    sources.get_source("coco", "train", data_dir=tmp_path)


# --------------------------------------------------------------- image_folder


@pytest.fixture(scope="module")
def photo_folder(images_dir, tmp_path_factory):
  """4 real photos shrunk to <= 64 px (one grey, one in a subfolder), a corrupt
  JPEG and a text file."""
  folder = tmp_path_factory.mktemp("photos")
  (folder / "sub").mkdir()
  paths = sorted((images_dir / "content").glob("*.jpg"))[:4]
  names = ["a.jpg", "b.jpg", "sub/c.jpg", "grey.png"]
  for path, name in zip(paths, names):
    image = Image.open(path).convert("RGB")
    image.thumbnail((64, 64))
    if name == "grey.png":
      image = image.convert("L")
    image.save(folder / name)
  (folder / "broken.jpg").write_bytes((folder / "a.jpg").read_bytes()[:200])
  (folder / "notes.txt").write_text("not an image")
  return folder


def test_image_folder_builder_skips_and_counts_bad_files(photo_folder, tmp_path):
  builder = image_folder.prepare_image_folder(photo_folder, tmp_path)
  assert builder.info.metadata["skipped"] == 2
  assert sorted(builder.info.metadata["skipped_files"]) == ["broken.jpg", "notes.txt"]
  source = sources.get_source("image_folder", "train", data_dir=tmp_path,
                              manual_dir=photo_folder)
  assert len(source) == 4
  examples = {source[i]["filename"].decode(): source[i]["image"] for i in range(4)}
  assert sorted(examples) == ["a.jpg", "b.jpg", "grey.png", "sub/c.jpg"]
  for image in examples.values():
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert max(image.shape[:2]) <= 64
  # RGB JPEGs are stored as they are: same pixels as PIL decoding the file.
  np.testing.assert_array_equal(examples["a.jpg"], np.asarray(Image.open(photo_folder / "a.jpg")))
  grey = np.asarray(Image.open(photo_folder / "grey.png"))
  for channel in range(3):
    np.testing.assert_array_equal(examples["grey.png"][..., channel], grey)
  # A prepared copy is reused (the folder is not read again) ...
  again = image_folder.prepare_image_folder(photo_folder / ".." / photo_folder.name, tmp_path)
  assert again.data_dir == builder.data_dir
  # ... and another folder gets its own copy.
  assert image_folder.config_name(photo_folder / "sub") != image_folder.config_name(photo_folder)
  with pytest.raises(CdftError, match="no such folder"):
    image_folder.prepare_image_folder(tmp_path / "missing", tmp_path)


# ------------------------------------------------------------------- pipeline


class _Recorder:
  """An in-memory source whose examples carry their index; records reads."""

  def __init__(self, n, bad=()):
    self.n, self.bad, self.read = n, set(bad), []
    self.name = "recorder"

  def __len__(self):
    return self.n

  def __getitem__(self, index):
    self.read.append(int(index))
    if index in self.bad:
      raise ImageError(f"example {index} is corrupt")
    return {"id": index}


def _tag(example, rng):
  return {"id": np.int64(example["id"]), "r": np.float64(rng.random())}


def _take(it, steps):
  return [next(it) for _ in range(steps)]


def _train(source, **kwargs):
  kwargs.setdefault("global_batch_size", 8)
  kwargs.setdefault("seed", 5)
  kwargs.setdefault("num_threads", 2)
  return pipeline.make_train_iterator(source, _tag, **kwargs)


def test_train_order_follows_the_documented_contract():
  n, g, seed = 20, 8, 5
  batches = _take(_train(_Recorder(n), process_index=0, process_count=1), 6)
  ids = np.concatenate([b["id"] for b in batches])
  rs = np.concatenate([b["r"] for b in batches])
  for q in range(6 * g):
    epoch, i = divmod(q, n)
    assert ids[q] == np.random.default_rng([seed, epoch]).permutation(n)[i]
    assert rs[q] == np.random.default_rng([seed, epoch, i, 0, 1]).random()
  assert sorted(ids[:n]) == list(range(n))  # an epoch is a permutation
  assert sorted(ids[n:2 * n]) == list(range(n))
  assert not np.array_equal(ids[:n], ids[n:2 * n])


def test_union_over_processes_does_not_depend_on_process_count():
  single = _take(_train(_Recorder(20), process_index=0, process_count=1), 5)
  parts = [_take(_train(_Recorder(20), process_index=p, process_count=2, num_threads=0), 5)
           for p in range(2)]
  for step in range(5):
    for key in ("id", "r"):
      joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
      np.testing.assert_array_equal(joined, single[step][key])
    assert parts[0][step]["id"].shape == (4,)
  with pytest.raises(CdftError, match="not divisible by the number of processes 3"):
    _train(_Recorder(20), process_index=0, process_count=3)
  with pytest.raises(CdftError, match="process_index 2 is not in"):
    _train(_Recorder(20), process_index=2, process_count=2)


def test_start_step_resumes_exactly_without_reading_earlier_batches():
  fresh = _take(_train(_Recorder(20), process_index=1, process_count=2), 7)
  source = _Recorder(20)
  it = _train(source, process_index=1, process_count=2, start_step=4, prefetch=1)
  resumed = _take(it, 3)
  for a, b in zip(fresh[4:], resumed):
    np.testing.assert_array_equal(a["id"], b["id"])
    np.testing.assert_array_equal(a["r"], b["r"])
  wanted = set().union(*(it.source_indices(s) for s in range(4, 8)))  # 3 + prefetch
  assert set(source.read) <= wanted
  assert it.step == 7 and it.num_examples == 20 and it.steps_per_epoch == 2


def test_worker_processes_give_the_same_batches_and_report_failures(caplog):
  """grain worker processes (spawned: the source and op travel pickled) decode whole batches
  round robin; the batches, replacements and warnings are those of the in-process iterator."""
  bad = {3, 11}
  caplog.set_level(logging.WARNING, logger="cdft.data.pipeline")
  here = _train(_Recorder(16, bad), process_index=1, process_count=2, start_step=3)
  want = _take(here, 5)
  warned_here = [r.getMessage() for r in caplog.records]
  caplog.clear()
  with _train(_Recorder(16, bad), process_index=1, process_count=2, start_step=3,
              num_workers=2) as there:
    got = _take(there, 2)
    # Ctrl-C and a scheduler's SIGTERM reach the workers too: they leave them to the trainer.
    workers = [c for c in psutil.Process().children(recursive=True)
               if "spawn_main" in " ".join(c.cmdline())]
    assert len(workers) == 2
    for worker in workers:
      worker.send_signal(signal.SIGINT)
      worker.send_signal(signal.SIGTERM)
    got += _take(there, 3)
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert there.skipped == here.skipped > 0
    assert there.state() == {"step": 8, "seed": 5, "global_batch_size": 8, "num_examples": 16}
  for a, b in zip(want, got, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  warned = [r.getMessage() for r in caplog.records]
  assert warned == warned_here and "skipping unreadable example 3 of recorder" in warned[0]
  with pytest.raises(CdftError, match="num_workers must be an integer >= 0"):
    _train(_Recorder(16), process_index=0, process_count=1, num_workers=-1)


def _die(example, rng):
  del example, rng
  os._exit(3)  # pylint: disable=protected-access


def test_a_dead_worker_is_explained():
  it = pipeline.make_train_iterator(_Recorder(8), _die, global_batch_size=4, seed=0,
                                    process_index=0, process_count=1, num_workers=1)
  with pytest.raises(CdftError, match=r"a data worker process died .*"
                     r"if __name__ == '__main__'.*num_workers=0"):
    next(it)
  it.close()


def test_without_grain_the_error_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "grain", None)  # `import grain` raises ImportError
  with pytest.raises(CdftError, match=r"needs grain: pip install 'cdft\[data\]'"):
    _train(_Recorder(8), process_index=0, process_count=1)


def test_same_seed_same_data_other_seed_other_data():
  a = _take(_train(_Recorder(30), process_index=0, process_count=1), 3)
  b = _take(_train(_Recorder(30), process_index=0, process_count=1, num_threads=0), 3)
  c = _take(_train(_Recorder(30), process_index=0, process_count=1, seed=6), 3)
  assert all(np.array_equal(x["id"], y["id"]) and np.array_equal(x["r"], y["r"])
             for x, y in zip(a, b))
  assert not all(np.array_equal(x["id"], y["id"]) for x, y in zip(a, c))


def test_unreadable_examples_are_replaced_deterministically(caplog):
  bad = {3, 11}
  caplog.set_level(logging.WARNING, logger="cdft.data.pipeline")
  it = _train(_Recorder(16, bad), process_index=0, process_count=1)
  batches = _take(it, 6)  # 3 epochs: every bad example comes up 3 times
  ids = np.concatenate([b["id"] for b in batches])
  assert not set(ids.tolist()) & bad and len(ids) == 48
  assert it.skipped >= 6
  warned = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
  assert len(warned) == 2 and any("example 3 of recorder" in w for w in warned)
  # Replacement depends on the position only: 2 processes see the same union.
  parts = [_take(_train(_Recorder(16, bad), process_index=p, process_count=2), 6)
           for p in range(2)]
  joined = np.concatenate([np.concatenate([parts[0][s]["id"], parts[1][s]["id"]])
                           for s in range(6)])
  np.testing.assert_array_equal(joined, ids)
  with pytest.raises(CdftError, match="none of the 100 examples tried"):
    next(_train(_Recorder(4, bad=range(4)), process_index=0, process_count=1))


def test_corrupt_image_bytes_are_replaced_in_real_preprocessing():
  images = [_png(_random_image(i, 24, 30)) for i in range(6)]
  images[2] = images[2][:50]  # truncated PNG
  source = sources.ArraySource(np.array(images, dtype=object), np.arange(6), name="pngs")
  fn = preprocess.get_preprocess("cd_train", shorter_side=20, crop=16)
  it = pipeline.make_train_iterator(source, fn, global_batch_size=6, seed=0,
                                    process_index=0, process_count=1)
  batch = next(it)
  assert batch["image"].shape == (6, 16, 16, 3) and 2 not in batch["label"]
  assert it.skipped == 1


def test_eval_iterator_pads_masks_and_shards():
  source = _Recorder(10, bad={7})
  it = pipeline.make_eval_iterator(source, _tag, batch_size=4, process_index=0,
                                   process_count=1)
  assert len(it) == 3
  batches = list(it)
  ids = np.concatenate([b["id"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, [1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(ids[mask == 1], [0, 1, 2, 3, 4, 5, 6, 8, 9])
  assert it.skipped == 1 and mask.dtype == np.float32
  halves = [list(pipeline.make_eval_iterator(_Recorder(10, bad={7}), _tag, batch_size=4,
                                             process_index=p, process_count=2))
            for p in range(2)]
  joined = np.concatenate([np.concatenate([halves[0][b]["mask"], halves[1][b]["mask"]])
                           for b in range(3)])
  np.testing.assert_array_equal(joined, mask)
  with pytest.raises(CdftError, match="empty"):
    pipeline.make_eval_iterator(_Recorder(0), _tag, batch_size=4, process_index=0,
                                process_count=1)
  inline = list(pipeline.make_eval_iterator(_Recorder(10, bad={7}), _tag, batch_size=4,
                                            process_index=0, process_count=1, num_threads=0))
  for a, b in zip(inline, batches, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
