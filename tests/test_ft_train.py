"""Factor Transfer with the one trainer: every stage end to end, loss composition, results table.

The real-data check runs the runlocal pipeline (teacher >= 95 % on the real
scikit-learn digits, paraphraser, FT student) with ``train.run`` in a child
process with one CPU device; the other stages run 2 steps in this process, on
one of its devices (digits, mock CIFAR-10 from ``tfds.testing.mock_data``).
Networks are narrow CIFAR ResNets (4/8/16, 8/16/32).
"""
import importlib.util
import io
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from cdft import losses
from cdft import tasks
from cdft import train
from cdft import weights
from cdft.errors import CdftError
from cdft.training import checkpointing
from conftest import ONE_DEVICE, xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = (4, 8, 16)
NARROW = (8, 16, 32)


def load_config(name, arg):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def rows(workdir):
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]


def evals(workdir):
  return [r for r in rows(workdir) if "eval/accuracy" in r]


def tiny(config, steps=2, batch=16):
  """A 2-step CI run: small batch, every step logged, no evaluation."""
  config.batch_size = batch
  config.total_steps = steps
  config.log_every = 1
  config.checkpoint_every = 1000
  config.checkpoint_every_epochs = 0.0
  config.eval_every = 0
  config.eval_every_epochs = 0.0
  config.mesh = ONE_DEVICE
  return config


def assert_same_tree(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and la
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- configs ---------------------------------------------------------------------------------


def test_ft_configs():
  t = load_config("ft_teacher", "model=resnet56,dataset=cifar10")
  assert (t.task, t.model.name, t.num_classes, t.batch_size, t.num_epochs) == (
      "classifier", "resnet56", 10, 128, 164.0)
  assert (t.optimizer.name, t.optimizer.learning_rate, t.optimizer.weight_decay) == (
      "sgd", 0.1, 5e-4)
  assert tuple(t.schedule.boundaries) == (82, 123) and t.input.pp.flip
  assert (t.input.split, t.eval_input.split, t.eval_input.preprocess) == (
      "train", "test", "cifar_eval")
  p = load_config("ft_paraphraser", "teacher=resnet56")
  assert (p.num_epochs, p.loss.reconstruction, p.schedule.name, p.paraphraser.rate) == (
      6.0, "l1", "constant", 0.5)
  assert p.teacher.workdir == "runs/ft_teacher_resnet56_cifar10"
  s = load_config("ft_student", "pair=resnet56_resnet20,method=ft,dataset=cifar10")
  assert (s.teacher.model, s.student.model, s.distill.method, s.distill.beta_ft) == (
      "resnet56", "resnet20", "ft", 500.0)
  assert s.distill.paraphraser == "runs/ft_paraphraser_resnet56_cifar10"
  c = load_config("ft_student", "pair=wrn_40_2_wrn_16_2,method=kd,dataset=cifar100,recipe=crd")
  assert (c.num_classes, c.input.pp.stats, c.batch_size, c.optimizer.learning_rate) == (
      100, "cifar100", 64, 0.05)
  assert tuple(c.schedule.boundaries) == (150, 180, 210) and c.num_epochs == 240.0
  local = load_config("ft_student", "method=kd,runlocal")
  assert local.input.dataset == local.eval_input.dataset == "digits"
  assert not local.input.pp.flip and tuple(local.student.widths) == NARROW
  assert local.teacher.workdir == "runs/ft_teacher_resnet56_digits"
  assert load_config("cd_student", "stage=3").distill.paraphraser == "runs/cd_paraphraser_stage3"
  with pytest.raises(ValueError, match="unknown pair 'resnet8x4'"):
    load_config("ft_student", "pair=resnet8x4")
  with pytest.raises(ValueError, match="unknown recipe"):
    load_config("ft_teacher", "recipe=rd")


def test_bad_configs_fail_with_one_line_errors(tmp_path):
  s = tiny(load_config("ft_student", "method=distil,runlocal"))
  with pytest.raises(CdftError, match="unknown method 'distil'"):
    tasks.get_task(s)
  s = load_config("ft_student", "pair=wrn_40_2_wrn_16_2,method=kd,runlocal")
  s.teacher.widths = NARROW
  with pytest.raises(CdftError, match="widths .* only apply to the CIFAR ResNets"):
    tasks.get_task(s)
  s = load_config("ft_student", "method=ft,runlocal")
  s.teacher.model, s.teacher.widths = "resnet20", TINY
  s.teacher.workdir = str(tmp_path / "nowhere")
  with pytest.raises(CdftError, match="no such training workdir"):
    tasks.get_task(s)
  s.teacher.workdir = "random"
  s.distill.paraphraser = "random"
  s.distill.rate = 0.001
  with pytest.raises(CdftError, match="gives 0 factor channels"):
    tasks.get_task(s)
  p = load_config("ft_paraphraser", "runlocal")
  p.teacher.workdir = "random"
  p.loss.reconstruction = "l2"
  with pytest.raises(CdftError, match="unknown loss 'l2'"):
    tasks.get_task(p)
  t = load_config("ft_teacher", "model=resnet20,runlocal")
  t.model.widths = TINY
  t = tasks.get_task(t)
  with pytest.raises(CdftError, match="do not fit num_classes=10"):
    t.init(jax.random.key(0), {"image": np.zeros((2, 32, 32, 3), np.float32),
                               "label": np.array([3, 10], np.int32)})
  with pytest.raises(CdftError, match="needs labelled data"):
    t.init(jax.random.key(0), {"image": np.zeros((2, 32, 32, 3), np.float32)})


# --- loss composition against numpy on tiny inputs --------------------------------------------


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_ce(logits, labels):
  return float(-np.mean(_np_log_softmax(logits)[np.arange(len(labels)), labels]))


def _np_normalize(x):
  flat = np.asarray(x, np.float64).reshape(len(x), -1)
  return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


@pytest.fixture(scope="module")
def tiny_batch():
  rng = np.random.default_rng(0)
  return {"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
          "label": np.array([0, 3, 7, 9], np.int32)}


def _host_prepared(config):
  """The tests below feed float batches, as the host preprocessing would give them."""
  config.input.on_device = config.eval_input.on_device = False
  return config


def _student_task(method):
  config = _host_prepared(load_config("ft_student", f"method={method},runlocal"))
  config.teacher.workdir = "random"
  config.distill.paraphraser = "random"
  config.teacher.model = "resnet20"
  config.teacher.widths = config.student.widths = TINY
  return tasks.get_task(config)


@pytest.mark.parametrize("method", ["kd", "fitnets", "at", "ft"])
def test_student_loss_composition_matches_numpy(method, tiny_batch):
  task = _student_task(method)
  state = task.init(jax.random.key(1), tiny_batch)
  params, model_state, frozen = state["params"], state["model_state"], task.frozen
  loss, (metrics, new_state) = task.loss(params, model_state, frozen, tiny_batch,
                                         jax.random.key(2))
  d = task.config.distill
  (logits, s_feats), _ = task.student.apply(
      {"params": params["student"], "batch_stats": model_state["student"]},
      tiny_batch["image"], train=True, mutable=["batch_stats"])
  t_logits, t_feats = task.teacher.apply(frozen["teacher"], tiny_batch["image"], train=False)
  ce = _np_ce(logits, tiny_batch["label"])
  assert float(metrics["ce"]) == pytest.approx(ce, rel=1e-5)
  if method == "kd":
    t = d.kd_temperature
    log_s, log_t = _np_log_softmax(np.asarray(logits) / t), _np_log_softmax(
        np.asarray(t_logits) / t)
    term = float(np.mean(np.sum(np.exp(log_t) * (log_t - log_s), -1)) * t * t)
    want = (1 - d.kd_alpha) * ce + d.kd_alpha * term
  elif method == "fitnets":
    regressed, _ = task.head.apply(
        {"params": params["regressor"], "batch_stats": model_state["regressor"]},
        s_feats["layer2"], train=True, mutable=["batch_stats"])
    term = float(np.mean((np.asarray(regressed, np.float64) - np.asarray(t_feats["layer2"])) ** 2))
    want = ce + d.beta_fitnets * term
    assert set(new_state) == {"student", "regressor"}
  elif method == "at":
    def att(f):
      return _np_normalize(np.mean(np.asarray(f, np.float64) ** 2, axis=-1))
    term = sum(float(np.mean((att(s_feats[k]) - att(t_feats[k])) ** 2))
               for k in ("layer1", "layer2", "layer3"))
    want = ce + d.beta_at * term
  else:
    factor_t = task.paraphraser.apply({"params": frozen["paraphraser"]}, t_feats["ft"],
                                      method=type(task.paraphraser).encode)
    factor_s = task.head.apply({"params": params["translator"]}, s_feats["ft"])
    assert factor_s.shape == factor_t.shape == (4, 4, 4, 8)  # round(16 * 0.5) teacher factors
    term = float(np.mean(np.abs(_np_normalize(factor_s) - _np_normalize(factor_t))))
    want = ce + d.beta_ft * term
  assert float(metrics[{"fitnets": "hint"}.get(method, method)]) == pytest.approx(term, rel=1e-4)
  assert float(loss) == pytest.approx(want, rel=1e-5)


def test_frozen_networks_get_no_gradient(tiny_batch):
  task = _student_task("ft")
  state = task.init(jax.random.key(1), tiny_batch)

  def loss_of(translator, frozen):
    params = dict(state["params"], translator=translator)
    return task.loss(params, state["model_state"], frozen, tiny_batch, jax.random.key(2))[0]

  grad = jax.jit(jax.grad(loss_of, argnums=(0, 1)))  # one program, not eager ops
  g_translator, g_frozen = grad(state["params"]["translator"], task.frozen)
  # The teacher and its paraphraser are constants; the translator learns.
  assert set(g_frozen) == {"teacher", "paraphraser"}
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(g_frozen))
  assert all(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(g_translator))


def test_reconstruction_loss_and_masked_evaluation_match_numpy():
  rng = np.random.default_rng(3)
  rec, target = rng.normal(size=(2, 3, 3, 4)), rng.normal(size=(2, 3, 3, 4))
  assert float(losses.paraphraser_reconstruction(rec, target, "l1")) == pytest.approx(
      np.mean(np.abs(rec - target)), rel=1e-6)
  assert float(losses.paraphraser_reconstruction(rec, target, "mse")) == pytest.approx(
      np.mean((rec - target) ** 2), rel=1e-6)
  config = _host_prepared(load_config("ft_teacher", "model=resnet20,runlocal"))
  config.model.widths = TINY
  task = tasks.get_task(config)
  batch = {"image": rng.normal(size=(4, 8, 8, 3)).astype(np.float32),
           "label": np.array([1, 2, 3, 4], np.int32), "mask": np.array([1, 1, 1, 0], np.float32)}
  state = task.init(jax.random.key(0), batch)
  sums = task.evaluate(state["params"], state["model_state"], {}, batch)
  logits, _ = task.model.apply({"params": state["params"]["classifier"],
                                "batch_stats": state["model_state"]["classifier"]}, batch["image"])
  logits = np.asarray(logits)[:3]
  assert float(sums["count"]) == 3.0
  assert float(sums["accuracy"]) == float(np.sum(logits.argmax(-1) == batch["label"][:3]))
  assert float(sums["ce"]) == pytest.approx(3 * _np_ce(logits, batch["label"][:3]), rel=1e-5)


def test_frozen_networks_from_pytorch_files(tmp_path):
  from cdft.weights import ft as ft_weights  # pylint: disable=import-outside-toplevel
  from cdft.weights import torch_format  # pylint: disable=import-outside-toplevel
  _, teacher = weights.resolve("random", "classifier", model="resnet20", num_classes=10,
                               widths=TINY, seed=5)
  torch_format.save(ft_weights.variables_to_state(teacher), tmp_path / "teacher.pth")
  _, loaded = weights.resolve(str(tmp_path / "teacher.pth"), "classifier", model="resnet20",
                              num_classes=10, widths=TINY)
  assert_same_tree(loaded, teacher)
  with pytest.raises(CdftError, match=r"'bn1.bias' has shape \(4,\), the model expects \(8,\)"):
    weights.resolve(str(tmp_path / "teacher.pth"), "classifier", model="resnet20",
                    num_classes=10, widths=NARROW)
  module, para = weights.resolve("random", "paraphraser", in_channels=16, rate=0.25, seed=1)
  torch_format.save({"epoch": 5, "state_dict": ft_weights.variables_to_state({"params": para})},
                    tmp_path / "Paraphraser.pth")
  loaded_module, loaded = weights.resolve(str(tmp_path / "Paraphraser.pth"), "paraphraser",
                                           in_channels=16)
  assert loaded_module.factor_channels == module.factor_channels == 4  # its own rate
  assert_same_tree(loaded, para)
  with pytest.raises(CdftError, match="reads 16-channel features, but the teacher feature "
                     "has 64 channels"):
    weights.resolve(str(tmp_path / "Paraphraser.pth"), "paraphraser", in_channels=64)


def test_released_paraphraser_as_the_frozen_one(weights_dir):
  module, params = weights.resolve("released", "paraphraser", in_channels=64,
                                   weights_dir=weights_dir)
  assert (module.in_channels, module.factor_channels) == (64, 32)
  assert params["conv1"]["kernel"].shape == (3, 3, 64, 32)


# --- the real-data check: the runlocal pipeline on the digits --------------------------------


def _run(config_arg, workdir, **overrides):
  """``configs/<config_arg>`` with dotted ``overrides``, trained with ``train.run``."""
  name, arg = config_arg.split(":")
  config = load_config(name, arg)
  for key, value in overrides.items():
    *groups, field = key.split(".")
    node = config
    for group in groups:
      node = node[group]
    node[field] = value
  out = train.run(config, workdir, stream=io.StringIO())
  assert out["step"] > 0 and not out["preempted"]


def train_digits_chain(root):
  """Teacher (runlocal: narrow ResNet-20, 6 epochs), its paraphraser (2 epochs) and an FT
  student (narrow ResNet-20, 2 epochs) on the real scikit-learn digits, in ``root``."""
  root = pathlib.Path(root)
  _run("ft_teacher:model=resnet20,runlocal", root / "teacher",
       eval_every_epochs=1000.0)  # evaluated at the end only
  _run("ft_paraphraser:teacher=resnet20,runlocal", root / "paraphraser",
       **{"teacher.workdir": str(root / "teacher"), "num_epochs": 2.0})
  _run("ft_student:pair=resnet56_resnet20,method=ft,runlocal", root / "student",
       **{"teacher.model": "resnet20", "teacher.workdir": str(root / "teacher"),
          "distill.paraphraser": str(root / "paraphraser"), "num_epochs": 2.0})


@pytest.fixture(scope="module")
def digits_chain(tmp_path_factory):
  """:func:`train_digits_chain` in a child process with one CPU device: a one-device program
  runs ~35% slower in a process that has 8 (fake) CPU devices, as this one has. The trainer's
  command line, flags and signals are checked in test_train.py."""
  root = tmp_path_factory.mktemp("digits")
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
  code = f"import test_ft_train; test_ft_train.train_digits_chain({str(root)!r})"
  proc = subprocess.run(
      [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=pathlib.Path(__file__).parent, timeout=600,
      check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return root


def test_teacher_reaches_95_percent_on_digits(digits_chain):
  final = evals(digits_chain / "teacher")[-1]
  assert final["step"] == 276 and final["eval/accuracy"] >= 0.95, final


def test_ft_student_trains_from_the_digits_teacher(digits_chain):
  p = [r for r in rows(digits_chain / "paraphraser") if "loss" in r]
  assert p[-1]["l1"] < 0.8 * p[0]["l1"]  # the paraphraser learns to reconstruct layer3
  s = [r for r in rows(digits_chain / "student") if "loss" in r]
  assert s[-1]["step"] == 92 and all(np.isfinite(r["loss"]) for r in s)
  assert s[-1]["ft"] < s[0]["ft"]  # the translator learns the teacher's factor
  final = evals(digits_chain / "student")[-1]
  assert final["step"] == 92 and final["eval/accuracy"] > 0.5, final  # chance: 0.1
  params, cfg = checkpointing.restore_params(digits_chain / "student")
  assert set(params) == {"student", "translator"} and cfg["distill"]["method"] == "ft"
  # The student read the trained teacher and paraphraser, not fresh ones.
  task = tasks.get_task(train.load_config_json(digits_chain / "student"))
  teacher, _ = checkpointing.restore_params(digits_chain / "teacher")
  para, _ = checkpointing.restore_params(digits_chain / "paraphraser")
  assert_same_tree(task.frozen["teacher"]["params"], teacher["classifier"])
  assert_same_tree(task.frozen["paraphraser"], para["paraphraser"])


def test_exported_ft_runs_load_as_official_files(digits_chain, tmp_path):
  """`cdft-weights export`: the teacher, paraphraser and FT student in the official .pth layout."""
  from cdft.weights import cli as weights_cli  # pylint: disable=import-outside-toplevel
  for run in ("teacher", "paraphraser", "student"):
    assert weights_cli.main(["export", str(digits_chain / run), "--out", str(tmp_path / run)]) == 0
  teacher, _ = checkpointing.restore_variables(digits_chain / "teacher")
  _, loaded = weights.resolve(str(tmp_path / "teacher" / "resnet20.pth"), "classifier",
                              model="resnet20", num_classes=10, widths=NARROW)
  assert_same_tree(loaded["params"], teacher["params"]["classifier"])
  assert_same_tree(loaded["batch_stats"], teacher["model_state"]["classifier"])
  para, _ = checkpointing.restore_params(digits_chain / "paraphraser")
  _, loaded = weights.resolve(str(tmp_path / "paraphraser" / "Paraphraser.pth"), "paraphraser",
                              in_channels=32)
  assert_same_tree(loaded, para["paraphraser"])
  assert sorted(p.name for p in (tmp_path / "student").iterdir()) == ["resnet20.pth",
                                                                      "translator.pth"]


# --- the other methods, 2 steps on 8 fake devices, from the digits teacher ----------------------


@pytest.mark.parametrize("method,heads", [
    ("kd", {"student"}), ("fitnets", {"student", "regressor"}), ("at", {"student"})])
def test_student_other_methods(method, heads, digits_chain, tmp_path):
  config = tiny(load_config("ft_student", f"method={method},runlocal"))
  config.teacher.model = "resnet20"
  config.teacher.workdir = str(digits_chain / "teacher")
  config.student.widths = TINY
  out = train.run(config, tmp_path / "run")
  assert out["step"] == 2 and set(out["params"]) == heads
  assert set(out["model_state"]) == heads  # BatchNorm statistics of every trained network
  lines = [r for r in rows(tmp_path / "run") if "loss" in r]
  assert [r["step"] for r in lines] == [1, 2]
  term = {"fitnets": "hint"}.get(method, method)
  assert all(np.isfinite(r["loss"]) and r[term] > 0 and r["ce"] > 0 for r in lines)


def test_student_refuses_a_teacher_of_another_architecture(digits_chain):
  config = load_config("ft_student", "pair=resnet56_resnet20,method=kd")
  config.teacher.workdir = str(digits_chain / "teacher")
  with pytest.raises(CdftError, match="the run trained a resnet20, but the config asks for a "
                     "resnet56"):
    tasks.get_task(config)
  config.teacher.model = "resnet20"  # the right name, the wrong widths
  with pytest.raises(CdftError, match="has shape .* expected"):
    tasks.get_task(config)
  config.teacher.widths = NARROW
  config.distill.method = "ft"
  config.distill.paraphraser = str(digits_chain / "teacher")
  with pytest.raises(CdftError, match="no 'paraphraser' parameters"):
    tasks.get_task(config)


def test_plain_student_on_mock_cifar10(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  config = tiny(load_config("ft_student", "pair=resnet56_resnet20,method=none,dataset=cifar10"))
  config.student.widths = TINY
  config.teacher.workdir = str(tmp_path / "missing")  # 'none' never reads the teacher
  config.eval_every = 2
  with tfds.testing.mock_data(num_examples=24):
    out = train.run(config, tmp_path / "run")
  assert out["step"] == 2 and set(out["params"]) == {"student"}
  lines = [r for r in rows(tmp_path / "run") if "loss" in r]
  assert [r["step"] for r in lines] == [1, 2]
  assert all(r["loss"] == pytest.approx(r["ce"]) for r in lines)  # CE only
  (ev,) = evals(tmp_path / "run")  # once, at the last step, on the 24 mock test images
  assert ev["step"] == 2 and 0.0 <= ev["eval/accuracy"] <= 1.0 and np.isfinite(ev["eval/ce"])
  stats = out["model_state"]["student"]["bn1"]  # train-mode BatchNorm moved the statistics
  assert np.any(stats["mean"] != 0) and np.any(stats["var"] != 1)


def test_aggregate_results_table(digits_chain, tmp_path):
  for seed, acc in enumerate((0.90, 0.92, 0.97)):  # three fake seeds of one KD student
    run = tmp_path / f"kd_seed{seed}"
    run.mkdir()
    cfg = json.loads((digits_chain / "student" / "config.json").read_text())
    cfg["seed"], cfg["distill"]["method"] = seed, "kd"
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 9, "eval/accuracy": 0.1}) + "\n" +
                                       json.dumps({"step": 10, "eval/accuracy": acc}) + "\n")
  out = tmp_path / "table.md"
  proc = subprocess.run(
      [sys.executable, str(REPO / "launch" / "aggregate_results.py"), str(tmp_path / "kd_seed*"),
       str(digits_chain / "*"), "--out", str(out)], capture_output=True, text=True, cwd=REPO,
      timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  table = out.read_text()
  assert table == proc.stdout
  lines = table.splitlines()
  teacher_acc = 100 * evals(digits_chain / "teacher")[-1]["eval/accuracy"]
  student_acc = 100 * evals(digits_chain / "student")[-1]["eval/accuracy"]
  assert lines[2] == f"| digits | resnet20(8/16/32) | teacher | 1 | 0 | {teacher_acc:.2f} ± 0.00 |"
  pair = "resnet20(8/16/32) → resnet20(8/16/32)"
  # The mean and sample standard deviation of 90, 92 and 97.
  assert lines[3] == f"| digits | {pair} | kd | 3 | 0,1,2 | 93.00 ± 3.61 |"
  assert lines[4] == f"| digits | {pair} | ft | 1 | 0 | {student_acc:.2f} ± 0.00 |"
  assert len(lines) == 5
  assert "skipped" in proc.stderr and "'ft_paraphraser' is not a classification run" in proc.stderr
