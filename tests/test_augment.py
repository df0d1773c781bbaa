"""On-device preprocessing (cdft.data.augment) against the host ops, and the uint8 input path."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cdft import train
from cdft.data import augment
from cdft.data import pipeline
from cdft.data import preprocess
from cdft.data import sources
from cdft.errors import CdftError
from cdft.tasks import classification
from cdft.training import sharding
from test_train import load_config


def _images(n, seed=0, side=32):
  return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _input(**pp):
  cfg = classification.input_config("cifar10", "train")
  cfg.pp.update(pp)
  return cfg


class _Fixed:
  """A numpy Generator stand-in that returns the given crop offsets and flip."""

  def __init__(self, top, left, flip):
    self._ints, self._flip = [top, left], flip

  def integers(self, low, high):
    value = self._ints.pop(0)
    assert low <= value < high
    return value

  def random(self):
    return 0.0 if self._flip else 1.0


@pytest.mark.parametrize("pp", [{}, {"padding_mode": "reflect"}, {"stats": "cifar100"},
                                {"pad": 2, "crop": 28, "flip": False}])
def test_device_op_is_the_host_op_at_its_offsets(pp):
  """Each example of the jitted batch op equals preprocess.cifar_train with the same crop
  offsets and flip, drawn from the step's key (and the eval op equals cifar_eval)."""
  images = _images(16)
  cfg = _input(**pp)
  rng = jax.random.fold_in(jax.random.key(7), 3)
  got = np.asarray(jax.jit(augment.device_op(cfg))(images, rng))
  kwargs = cfg.pp.to_dict()
  pad, crop = kwargs["pad"], kwargs["crop"]
  side = 32 + 2 * pad
  tops, lefts, flips = augment.crop_offsets(jax.random.fold_in(rng, augment.KEY_STREAM), 16,
                                            padded_height=side, padded_width=side, crop=crop)
  flips = np.asarray(flips) & kwargs["flip"]
  assert got.shape == (16, crop, crop, 3) and got.dtype == np.float32
  for i in range(16):
    want = preprocess.cifar_train(images[i], _Fixed(int(tops[i]), int(lefts[i]), flips[i]),
                                  **kwargs)
    np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-6)
  if kwargs["flip"]:
    assert 0 < flips.sum() < 16  # both branches ran
  assert len({(int(t), int(l)) for t, l in zip(tops, lefts)}) > 8  # offsets vary per example
  eval_cfg = classification.input_config("cifar10", "test", train=False)
  eval_cfg.pp.update({k: v for k, v in pp.items() if k == "stats"})
  got = np.asarray(augment.device_op(eval_cfg)(images))
  want = np.stack([preprocess.cifar_eval(x, **eval_cfg.pp.to_dict()) for x in images])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_device_op_does_not_depend_on_the_sharding():
  """The global batch split over the trainer's mesh of 8 devices is augmented exactly as
  on one device."""
  images = _images(16, seed=1)
  fn = jax.jit(augment.device_op(_input()))
  rng = jax.random.key(3)
  whole = np.asarray(fn(images, rng))
  mesh = sharding.make_mesh((("data", -1),))
  sharded = jax.device_put(images, sharding.batch_sharding(mesh))
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(fn(sharded, rng)), whole)
  other = np.asarray(fn(images, jax.random.key(4)))
  assert not np.array_equal(other, whole)  # the step's key matters


def test_device_op_switch_and_errors():
  images = _images(2)
  off = _input()
  off.on_device = False
  assert augment.device_op(off)(images) is images  # the host already preprocessed
  assert augment.device_op(None)(images) is images
  bad = ml_collections.ConfigDict({"on_device": True, "preprocess": "cifar_flip",
                                   "pp": {"crop": 16}})
  with pytest.raises(CdftError, match="'cifar_flip' has no on-device version"):
    augment.device_op(bad)
  with pytest.raises(CdftError, match="unknown arguments cropp"):
    augment.device_op(_input(cropp=3))
  with pytest.raises(CdftError, match="padding_mode must be 'constant' or 'reflect'"):
    augment.device_op(_input(padding_mode="edge"))


@pytest.mark.parametrize("name,pp", [
    ("cd_train", {"shorter_side": 40, "crop": 32, "flip": True}),
    ("cd_eval", {"shorter_side": 40, "crop": 32}),
    ("adain_train", {"size": 48, "crop": 32})])
def test_photo_crops_ship_uint8_and_the_step_scales_them_exactly(name, pp, tmp_path):
  """on_device photo crops: the host's crop as uint8 (a quarter of the bytes), scaled in the
  step to the float32 values of the host op, bit for bit (every pixel value 0..255)."""
  from cdft import train  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  for i in range(4):
    pixels = rng.integers(0, 256, (44 + 3 * i, 52, 3), dtype=np.uint8)
    pixels[0, :16] = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)[0]  # every value
    Image.fromarray(pixels).save(tmp_path / f"{i}.png")
  cfg = ml_collections.ConfigDict({
      "dataset": "image_folder", "manual_dir": str(tmp_path), "data_dir": str(tmp_path / "tfds"),
      "split": "train", "preprocess": name, "pp": pp, "on_device": True,
      "num_workers": 0})  # decoding threads: the workers are test_data's and test_train's
  shipped = next(train.make_input(cfg, global_batch_size=4, seed=3, start_step=0))["image"]
  cfg.on_device = False
  host = next(train.make_input(cfg, global_batch_size=4, seed=3, start_step=0))["image"]
  assert shipped.dtype == np.uint8 and host.dtype == np.float32
  assert shipped.nbytes * 4 == host.nbytes
  cfg.on_device = True
  scaled = jax.jit(augment.device_op(cfg))(shipped, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(scaled), host)
  table = np.asarray(augment.to_unit(np.arange(256, dtype=np.uint8)))
  np.testing.assert_array_equal(table, np.arange(256, dtype=np.float32) / np.float32(255))
  floats = np.full((1, 2, 2, 3), 0.5, np.float32)  # already scaled: passed through
  assert augment.to_unit(floats) is not None and np.array_equal(augment.to_unit(floats), floats)


def test_uint8_batches_are_gathered_by_index():
  """Without a host op an in-memory source gives each batch as one gather: the examples
  (uint8) and order of the per-example pipeline."""
  images, labels = _images(20, seed=2), np.arange(20) % 10
  source = sources.ArraySource(images, labels)
  fast = pipeline.make_train_iterator(source, None, global_batch_size=6, seed=5, start_step=4,
                                      process_index=1, process_count=2)
  slow = pipeline.make_train_iterator(source, augment.host_op, global_batch_size=6, seed=5,
                                      start_step=4, process_index=1, process_count=2,
                                      num_threads=0)
  for _ in range(5):  # across epoch boundaries (20 examples, 6 a step)
    a, b = next(fast), next(slow)
    assert a["image"].dtype == np.uint8 and a["image"].shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert a["label"].dtype == np.int32
  with pytest.raises(CdftError, match="needs a source with get_batch"):
    pipeline.make_train_iterator(sources.FeatureSource(source, {"image": "image"}, "f"), None,
                                 global_batch_size=2, seed=0, process_index=0, process_count=1)


def test_train_input_ships_uint8_and_the_task_prepares_it():
  """The digits config: make_input gives uint8 batches; the task's loss sees the crops."""
  cfg = classification.input_config("digits", "train")
  it = train.make_input(cfg, global_batch_size=8, seed=0, start_step=0)
  batch = next(it)
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (8, 32, 32, 3)
  eval_it = train.make_input(classification.input_config("digits", "test", train=False),
                             global_batch_size=8, seed=0, start_step=0, train=False)
  assert next(eval_it)["image"].dtype == np.uint8
  prepared = augment.device_op(cfg)(jnp.asarray(batch["image"]), jax.random.key(0))
  assert prepared.dtype == jnp.float32 and prepared.shape == (8, 32, 32, 3)
  # The digits' own statistics, and no flip (a mirrored digit is another shape).
  assert cfg.pp.flip is False and cfg.pp.mean == classification.DIGITS_MEAN


def _teacher_task(on_device):
  from cdft import tasks  # pylint: disable=import-outside-toplevel
  config = load_config("ft_teacher", "model=resnet20,runlocal")
  config.model.widths = (4, 8, 16)
  config.input.on_device = config.eval_input.on_device = on_device
  return tasks.get_task(config)


def test_the_tasks_prepare_uint8_batches_in_the_step():
  """A classifier's loss on a uint8 batch is its loss on that batch prepared by the device op
  from the step's rng; its evaluation normalises."""
  on, off = _teacher_task(True), _teacher_task(False)
  images = _images(8, seed=4)
  batch = {"image": images, "label": np.arange(8, dtype=np.int32)}
  state = on.init(jax.random.key(0), batch)
  rng = jax.random.fold_in(jax.random.key(5), 11)
  prepared = dict(batch, image=augment.device_op(on.config.input)(images, rng))
  assert state["params"]["classifier"]["conv1"]["kernel"].dtype == jnp.float32
  got = jax.jit(on.loss)(state["params"], state["model_state"], {}, batch, rng)
  want = jax.jit(off.loss)(state["params"], state["model_state"], {}, prepared, rng)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # one program or two: fusion rounding
  other = jax.jit(on.loss)(state["params"], state["model_state"], {}, batch, jax.random.key(6))
  assert float(other[0]) != float(got[0])  # another step, other crops
  masked = dict(batch, mask=np.ones(8, np.float32))
  evaluated = on.evaluate(state["params"], state["model_state"], {}, masked)
  normalised = dict(masked, image=augment.device_op(on.eval_input)(images))
  assert float(evaluated["ce"]) == pytest.approx(
      float(off.evaluate(state["params"], state["model_state"], {}, normalised)["ce"]), rel=1e-6)
