"""AdaIN's three training steps on the one trainer: train, resume, chain (one device)."""
import json

import jax
import numpy as np
import pytest

from cdft import tasks
from cdft import train
from cdft.data import preprocess
from cdft.errors import CdftError
from cdft.training import checkpointing
from cdft.training import optim
from conftest import ONE_DEVICE
from test_train import load_config, rows


@pytest.fixture(scope="module")
def folders(images_dir, write_small_photos, tmp_path_factory):
  """Eight content photos and the style artworks, shrunk to 48 px."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("adain_data")
  styles = root / "style"
  styles.mkdir()
  for path in sorted((images_dir / "style").glob("*.jpg"))[:8]:
    Image.open(path).convert("RGB").resize((56, 48)).save(styles / f"{path.stem}.png")
  return write_small_photos(root / "content", 48), styles


def tiny(config, folders, data_dir):
  for inp, folder in zip((config.input, config.style_input), folders):
    inp.num_workers = 0  # decoding threads (test_train's CLI tests spawn worker processes)
    inp.manual_dir = str(folder)
    inp.data_dir = str(data_dir)
    if inp.preprocess == "adain_train":
      inp.pp.size = 40
    else:
      inp.pp.shorter_side = 36
    inp.pp.crop = 32
  config.batch_size = 8
  config.total_steps = 2
  config.log_every = 1
  config.checkpoint_every = 2
  config.teacher.encoder = "random"
  config.teacher.preset = "16x"  # a narrow E: the test compiles 3 train steps, not the VGG's
  config.mesh = ONE_DEVICE
  return config


def _train_and_resume(config, workdir, terms, resume=True):
  out = train.run(config, workdir)
  assert out["step"] == 2 and not out["preempted"]
  lines = [r for r in rows(workdir) if "loss" in r]
  assert [r["step"] for r in lines] == [1, 2]
  for r in lines:
    assert all(np.isfinite(r[t]) and r[t] > 0 for t in terms)
    want = sum(config.loss[t] * r[t] for t in terms)
    assert r["loss"] == pytest.approx(want, rel=1e-5)
  if resume:  # the content and the style iterators restart at step 2
    config.total_steps = 3
    out = train.run(config, workdir)
    assert out["step"] == 3 and [r["step"] for r in rows(workdir) if "loss" in r] == [1, 2, 3]
  return out


def test_the_three_steps_train_resume_and_chain(folders, tmp_path, monkeypatch):
  data_dir = tmp_path / "tfds"
  dec = tiny(load_config("adain_decoder", "runlocal"), folders, data_dir)
  out = _train_and_resume(dec, tmp_path / "decoder", ("content", "style"))
  assert set(out["params"]) == {"decoder"}
  assert out["params"]["decoder"]["conv11"]["kernel"].shape == (3, 3, 16, 3)  # 16x preset

  student = tiny(load_config("adain_student", "runlocal"), folders, data_dir)
  student.teacher.decoder = str(tmp_path / "decoder")  # the step-1 run
  student.student.updim_relu = True
  # (The same resume as the decoder's: one is enough.)
  out = _train_and_resume(student, tmp_path / "student", ("feat", "content", "style"),
                          resume=False)
  assert set(out["params"]) == {"encoder", "embedding"}
  assert out["params"]["embedding"]["conv41_aux"]["kernel"].shape == (1, 1, 128, 128)
  task = tasks.get_task(student)
  trained_decoder, _ = checkpointing.restore_params(tmp_path / "decoder")
  for a, b in zip(jax.tree.leaves(task.frozen["decoder"]), jax.tree.leaves(trained_decoder)):
    np.testing.assert_array_equal(a, b)

  small = tiny(load_config("adain_small_decoder", "runlocal"), folders, data_dir)
  small.student.encoder = str(tmp_path / "student")  # the step-2 run
  out = _train_and_resume(small, tmp_path / "small", ("content", "style"), resume=False)
  assert out["params"]["decoder"]["conv41"]["kernel"].shape == (3, 3, 128, 64)
  task = tasks.get_task(small)
  trained_student, _ = checkpointing.restore_params(tmp_path / "student")
  for a, b in zip(jax.tree.leaves(task.frozen["student_encoder"]),
                  jax.tree.leaves(trained_student["encoder"])):
    np.testing.assert_array_equal(a, b)
  assert json.loads((tmp_path / "small" / "config.json").read_text())["task"] == \
      "adain_small_decoder"
  monkeypatch.setenv("CDFT_CACHE_DIR", str(tmp_path / "cache"))  # not the user's cache
  monkeypatch.setenv("CDFT_NO_COMPILE_CACHE", "1")
  _stylize_with_the_trained_pair(tmp_path, folders, trained_student["encoder"], out["params"])


def _stylize_with_the_trained_pair(tmp_path, folders, encoder, decoder):
  """``cdft-stylize --method adain --model <small-decoder workdir>``: the student it was
  trained for, AdaIN at its relu4_1, and the small decoder."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from cdft.io import images  # pylint: disable=import-outside-toplevel
  from cdft.models import adain, vgg  # pylint: disable=import-outside-toplevel
  from cdft.stylize import cli  # pylint: disable=import-outside-toplevel
  content = sorted(folders[0].iterdir())[0]
  style = sorted(folders[1].iterdir())[0]
  out_file = tmp_path / "stylized.png"
  assert cli.main(["--method", "adain", "--model", str(tmp_path / "small"), "--content",
                   str(content), "--style", str(style), "--output", str(out_file)]) == 0
  c = images.load_image(content)[None]
  s = images.load_image(style)[None]
  enc, dec = vgg.adain_encoder("16x"), vgg.adain_decoder("16x")

  @jax.jit  # one program, not hundreds of eager ops
  def reference(c, s):
    feat = adain.adain(enc.apply({"params": encoder}, c), enc.apply({"params": encoder}, s))
    return dec.apply({"params": decoder["decoder"]}, feat)

  want = np.asarray(reference(c, s))[0]
  want = np.floor(np.clip(want, 0, 1) * 255 + 0.5)
  got = np.asarray(Image.open(out_file), np.float64)
  assert got.shape == want.shape == (c.shape[1] // 8 * 8, c.shape[2] // 8 * 8, 3)
  assert np.abs(got - want).max() <= 1


def test_runlocal_configs_read_the_shared_contents_and_styles():
  for name in ("adain_decoder", "adain_student", "adain_small_decoder"):
    c = load_config(name, "runlocal")
    assert c.input.manual_dir == "../shared/images/content"
    assert c.style_input.manual_dir == "../shared/images/style"
    assert c.input.pp.crop % 8 == 0 and c.total_steps == 300
  full = load_config("adain_decoder", "")
  assert (full.batch_size, full.total_steps, full.loss.content, full.loss.style) == \
      (8, 160_000, 1.0, 10.0)
  full.compute_dtype = "bfloat16"
  with pytest.raises(CdftError, match="the AdaIN tasks train in float32 only"):
    tasks.get_task(full)
  assert (full.input.pp.size, full.input.pp.crop) == (512, 256)


def test_inverse_time_schedule_is_pytorch_adains():
  c = load_config("adain_decoder", "")
  schedule = optim.make_schedule(c.schedule, 1e-4, 100, 10)
  for step in (0, 1, 10_000, 160_000):
    assert float(schedule(step)) == pytest.approx(1e-4 / (1 + 5e-5 * step), rel=1e-6)


def test_adain_crop_resizes_to_a_square_without_keeping_the_aspect():
  fn = preprocess.get_preprocess("adain_train", size=64, crop=32)
  image = np.zeros((30, 90, 3), np.uint8)
  image[:, 45:] = 255  # right half white
  out = fn({"image": image}, np.random.default_rng(0))["image"]
  assert out.shape == (32, 32, 3) and out.dtype == np.float32
  with pytest.raises(CdftError, match="crop 64 is larger than the resized size 32"):
    preprocess.get_preprocess("adain_train", size=32, crop=64)


def test_bad_adain_configs_fail_in_one_line(folders, tmp_path):
  c = tiny(load_config("adain_decoder", "runlocal"), folders, tmp_path)
  c.input.pp.crop = 30
  with pytest.raises(CdftError, match="config.input.pp.crop must be a multiple of 8"):
    tasks.get_task(c)
  c = tiny(load_config("adain_student", "runlocal"), folders, tmp_path)
  c.teacher.encoder = c.teacher.decoder = "adain"
  with pytest.raises(CdftError, match="pytorch-AdaIN's files hold the VGG-19 relu4_1 encoder"):
    tasks.get_task(c)  # the test's narrow 16x teacher
  c.teacher.preset = "vgg19"
  c.weights_dir = str(tmp_path)
  with pytest.raises(CdftError, match="no adain/vgg_normalised.pth and adain/decoder.pth"):
    tasks.get_task(c)
