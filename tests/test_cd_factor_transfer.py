"""Factor Transfer for the CD student encoder: a CD paraphraser, then an FT student (2 steps each).

Its own file so that ``pytest -n 2 --dist loadfile`` can run it beside the FT chain of
``test_ft_train.py`` (the two longest training checks).
"""
import jax
import numpy as np
import pytest

from cdft import tasks
from cdft import train
from test_ft_train import assert_same_tree, load_config, rows, tiny  # tests/test_ft_train.py


# --- Factor Transfer for the CD student encoder --------------------------------------------------


@pytest.fixture(scope="module")
def photo_folder(write_small_photos, tmp_path_factory):
  return write_small_photos(tmp_path_factory.mktemp("photos"), 40)


def _cd_tiny(config, folder, data_dir):
  config.input.manual_dir = str(folder)
  config.input.data_dir = str(data_dir)
  config.input.pp.shorter_side = 34
  config.input.pp.crop = 32
  config.teacher.encoder = "random"
  config.input.num_workers = 0  # decoding threads (test_train's CLI tests spawn workers)
  return tiny(config, batch=8)


def test_cd_paraphraser_then_factor_transfer_student(photo_folder, tmp_path):
  para = _cd_tiny(load_config("cd_paraphraser", "stage=2,runlocal"), photo_folder,
                  tmp_path / "tfds")
  out_p = train.run(para, tmp_path / "para")
  assert out_p["step"] == 2 and set(out_p["params"]) == {"paraphraser"}
  assert out_p["params"]["paraphraser"]["conv1"]["kernel"].shape == (3, 3, 128, 64)  # relu2_1
  student = _cd_tiny(load_config("cd_student", "stage=2,runlocal"), photo_folder,
                     tmp_path / "tfds")
  student.distill.method = "factor_transfer"
  student.distill.paraphraser = str(tmp_path / "para")
  student.teacher.decoder = "random"
  student.student.init = "random"
  out = train.run(student, tmp_path / "student")
  assert out["step"] == 2 and set(out["params"]) == {"encoder", "embedding", "translator"}
  # 16x relu2_1 has 32 channels; the translator maps it to the 64 teacher factor channels.
  assert out["params"]["translator"]["conv2"]["kernel"].shape == (3, 3, 64, 64)
  lines = [r for r in rows(tmp_path / "student") if "loss" in r]
  assert all(np.isfinite(r["loss"]) and r["ft"] > 0 and r["pixel"] > 0 for r in lines)
  assert "embedding" not in lines[-1]
  task = tasks.get_task(student)
  assert_same_tree(task.frozen["paraphraser"], out_p["params"]["paraphraser"])
  # The FT loss replaces the embedding loss: Q_1 gets no gradient (Adam leaves it as it
  # started); Q_2 carries the reconstruction path and is trained.
  start = task.init(jax.random.fold_in(jax.random.key(student.seed), 0), None)["params"]
  assert_same_tree(out["params"]["embedding"]["conv11_aux"], start["embedding"]["conv11_aux"])
  assert not np.allclose(out["params"]["embedding"]["conv21_aux"]["kernel"],
                         start["embedding"]["conv21_aux"]["kernel"])
