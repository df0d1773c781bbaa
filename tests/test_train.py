"""The one trainer: every CD config end to end, resume, NaN guard, preemption, multi-process."""
import importlib.util
import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import psutil
import pytest

from cdft import train
from conftest import ONE_DEVICE, xla_flags
from cdft.training import checkpointing
from cdft.training import metrics as metrics_lib
from cdft.training import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def load_config(name, arg):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="module")
def image_folder(write_small_photos, tmp_path_factory):
  """Eight real photos, shrunk to 48 px on the shorter side (fast TFDS preparation)."""
  return write_small_photos(tmp_path_factory.mktemp("photos"), 48)


def tiny(config, folder, data_dir, steps=2):
  """Shrinks a runlocal config to a CI-sized run on ``folder``."""
  config.input.manual_dir = str(folder)
  config.input.data_dir = str(data_dir)
  config.input.pp.shorter_side = 36
  config.input.pp.crop = 32
  config.batch_size = 8
  config.total_steps = steps
  config.log_every = 1
  config.checkpoint_every = 2
  config.teacher.encoder = "random"
  config.mesh = ONE_DEVICE
  config.input.num_workers = 0  # decoding threads: the CLI tests below spawn the workers
  return config


def rows(workdir):
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]


def test_config_fields_are_commented():
  # Every `config.x = ...` line of every config carries a comment (ours or the block's).
  for path in sorted(CONFIGS.glob("*.py")):
    for n, line in enumerate(path.read_text().splitlines(), 1):
      s = line.strip()
      if s.startswith("config.") and "=" in s and not s.startswith("config.input = configlib"):
        assert "#" in s or path.read_text().splitlines()[n - 2].strip().startswith("#"), \
            f"{path.name}:{n} has no comment: {s}"


def test_config_args():
  c = load_config("cd_student", "stage=3,runlocal")
  assert (c.stage, c.batch_size, c.total_steps, c.distill.beta) == (3, 8, 300, 10.0)
  assert load_config("cd_student", "").optimizer.learning_rate == 1e-4
  with pytest.raises(ValueError, match="unknown config argument 'stag'"):
    load_config("cd_decoder", "stag=3")


@pytest.mark.parametrize("name,overrides", [
    ("cd_decoder", {}),
    ("cd_student", {"teacher.decoder": "random", "student.init": "pruned"}),
    ("cd_small_decoder", {"student.encoder": "cd16x", "student.init": "cd16x_base"}),
])
def test_every_config_trains_and_resumes(name, overrides, image_folder, tmp_path, request):
  config = tiny(load_config(name, "stage=2,runlocal"), image_folder, tmp_path / "tfds")
  for key, value in overrides.items():
    group, field = key.split(".")
    config[group][field] = value
  if "cd16x" in str(overrides):  # the released 16x student and its pruned init
    config.weights_dir = str(request.getfixturevalue("weights_dir"))
  workdir = tmp_path / "run"
  out = train.run(config, workdir)
  assert out["step"] == 2 and not out["preempted"]
  assert json.loads((workdir / "config.json").read_text())["task"] == name
  lines = rows(workdir)
  assert [r["step"] for r in lines] == [1, 2]
  assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in lines)
  params, saved_config = checkpointing.restore_params(workdir)
  assert saved_config["task"] == name
  np.testing.assert_array_equal(jax.tree.leaves(params)[0], jax.tree.leaves(out["params"])[0])
  # A rerun with more steps resumes at step 2 (no new step-1/2 lines).
  config.total_steps = 3
  out = train.run(config, workdir)
  assert out["step"] == 3
  assert [r["step"] for r in rows(workdir)] == [1, 2, 3]
  _check_export(name, workdir, out["params"], tmp_path / "export")


def _check_export(task, workdir, params, out_dir):
  """`cdft-weights export` writes the official layout, which cdft's readers load back."""
  from cdft.weights import cli as weights_cli  # pylint: disable=import-outside-toplevel
  from cdft.weights import convert, pretrained, torch_format  # pylint: disable=import-outside-toplevel
  assert weights_cli.main(["export", str(workdir), "--out", str(out_dir)]) == 0
  if task == "cd_student":  # the released kSE.pth layout: encoder + embedding heads
    back = pretrained.convert_student_files(2, str(out_dir / "2SE.pth"), None)
    want = {"encoder": params["encoder"], "embedding": params["embedding"]}
  elif task == "cd_small_decoder":
    back = pretrained.convert_student_files(2, None, str(out_dir / "2SD.pth"))
    want = {"decoder": params["decoder"]}
  else:  # cd_decoder: the teacher-width decoder
    path = out_dir / "2BD.pth"
    state = torch_format.state_dict(torch_format.load(path), str(path))
    back = {"decoder": convert.from_torch_state(state, params["decoder"], str(path))}
    want = {"decoder": params["decoder"]}
  for role, tree in want.items():
    got = back[role]["params"]
    assert jax.tree.structure(got) == jax.tree.structure(tree), role
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(tree)):
      np.testing.assert_array_equal(a, b)


def test_resume_equals_uninterrupted(image_folder, tmp_path):
  config = tiny(load_config("cd_student", "stage=1,runlocal"), image_folder, tmp_path / "tfds",
                steps=4)
  config.teacher.decoder = "random"
  config.student.init = "random"
  whole = train.run(config, tmp_path / "whole")
  config.total_steps = 2
  train.run(config, tmp_path / "split")
  config.total_steps = 4
  split = train.run(config, tmp_path / "split")
  for a, b in zip(jax.tree.leaves(whole["params"]), jax.tree.leaves(split["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert rows(tmp_path / "whole")[-1]["loss"] == pytest.approx(rows(tmp_path / "split")[-1]["loss"],
                                                             rel=1e-6)
  # Each checkpoint holds the input's state at its step (the next batch's step and what fixes
  # the order); a resume on other data says that it no longer follows the uninterrupted run.
  assert checkpointing.restore_data_state(tmp_path / "split", 2) == {
      "step": 2, "seed": config.seed, "global_batch_size": 8, "num_examples": 8}
  assert checkpointing.restore_data_state(tmp_path / "split", 4)["step"] == 4
  config.total_steps, config.seed = 5, config.seed + 1
  stream = io.StringIO()
  train.run(config, tmp_path / "split", stream=stream)
  assert "warning: the input differs from the one checkpoint 4 was saved with" in \
      stream.getvalue()


def test_nan_guard_keeps_last_good_checkpoint(image_folder, tmp_path):
  config = tiny(load_config("cd_decoder", "stage=1,runlocal"), image_folder, tmp_path / "tfds",
                steps=6)
  config.optimizer.learning_rate = 1e30  # the first update blows the decoder up
  config.checkpoint_every = 1
  with pytest.raises(metrics_lib.DivergenceError, match=r"is (nan|inf) at step \d.*last good "
                     r"checkpoint is step \d"):
    train.run(config, tmp_path / "run")
  manager = checkpointing.make_manager(tmp_path / "run", 1, 3, read_only=True)
  last = manager.latest_step()
  manager.close()
  params, _ = checkpointing.restore_params(tmp_path / "run")
  assert last is not None and last < 6
  # latest_step lists finalized steps without a manager (no collectives): an unfinished save is
  # not a step, and a run without checkpoints has none.
  (tmp_path / "run" / "checkpoints" / "9.orbax-checkpoint-tmp-123").mkdir()
  assert checkpointing.latest_step(tmp_path / "run") == last
  assert checkpointing.latest_step(tmp_path / "nothing") is None
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_intervals_in_epochs_follow_the_batch_size():
  config = load_config("ft_teacher", "model=resnet20")
  assert (config.eval_every_epochs, config.checkpoint_every_epochs) == (5.0, 10.0)
  # 50,000 CIFAR images: 391 steps an epoch at batch 128, 782 at batch 64.
  assert train.interval_steps(config, "eval_every", 391) == 1955
  assert train.interval_steps(config, "eval_every", 782) == 3910
  assert train.interval_steps(config, "checkpoint_every", 782) == 7820
  config.eval_every_epochs = 0.0  # steps again
  config.eval_every = 7
  assert train.interval_steps(config, "eval_every", 782) == 7
  config.eval_every_epochs = 0.001  # never below one step
  assert train.interval_steps(config, "eval_every", 10) == 1
  config.eval_every_epochs = -1.0
  with pytest.raises(train.CdftError, match="config.eval_every_epochs must be >= 0"):
    train.interval_steps(config, "eval_every", 10)


def test_student_conv0_is_frozen_on_request(image_folder, tmp_path):
  from cdft import tasks  # pylint: disable=import-outside-toplevel
  config = tiny(load_config("cd_student", "stage=1,runlocal"), image_folder, tmp_path / "tfds")
  config.teacher.decoder = "random"
  task = tasks.get_task(config)
  labels = task.trainable({"encoder": {"conv0": {"kernel": 0}, "conv11": {"kernel": 0}}})
  assert labels == {"encoder": {"conv0": {"kernel": "train"}, "conv11": {"kernel": "train"}}}
  config.student.train_conv0 = False
  task = tasks.get_task(config)
  init = task.init(jax.random.fold_in(jax.random.key(config.seed), 0), None)["params"]
  out = train.run(config, tmp_path / "run")["params"]
  for name in ("kernel", "bias"):  # conv0 kept its pruned (teacher) values; conv11 learnt
    np.testing.assert_array_equal(out["encoder"]["conv0"][name], init["encoder"]["conv0"][name])
  assert not np.array_equal(out["encoder"]["conv11"]["kernel"], init["encoder"]["conv11"]["kernel"])


def test_nan_guard_checks_the_parameters_too():
  good = {"w": np.ones((2, 2), np.float32), "step": np.int32(3)}
  assert bool(train._all_finite(good))
  assert not bool(train._all_finite({**good, "b": np.array([1.0, np.inf], np.float32)}))
  # The train step reports it: an SGD update that overflows a finite loss and gradient.
  class Square:
    def loss(self, params, model_state, frozen, batch, rng):
      del frozen, batch, rng
      return jnp.sum(params["w"] ** 2), ({}, model_state)
  for lr, finite in ((1.0, True), (1e30, False)):
    step = jax.jit(train.make_train_step(Square(), optax.sgd(lr), lambda s: lr, 0))
    state = {"step": 0, "params": {"w": np.full(3, 1e10, np.float32)}, "model_state": {}}
    state["opt_state"] = optax.sgd(lr).init(state["params"])
    state, metrics = step(state, {}, {})
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    assert bool(metrics["params_finite"]) == finite == np.isfinite(state["params"]["w"]).all()
  metrics_lib.check_finite({"loss": 1.0, "grad_norm": 2.0}, 5, 4)  # all finite: no error
  with pytest.raises(metrics_lib.DivergenceError,
                     match="the parameters hold nan or inf at step 5: .*last good checkpoint "
                     "is step 4"):
    metrics_lib.check_finite({"loss": 1.0, "grad_norm": 2.0}, 5, 4, params_finite=False)


def test_sigterm_saves_and_exits(image_folder, tmp_path):
  config = tiny(load_config("cd_decoder", "stage=1,runlocal"), image_folder, tmp_path / "tfds",
                steps=50)
  config.checkpoint_every = 100

  class KillAtFirstLine:
    sent = False

    def write(self, text):
      if text.startswith("step ") and not self.sent:
        self.sent = True
        os.kill(os.getpid(), signal.SIGTERM)

    def flush(self):
      pass

  out = train.run(config, tmp_path / "run", stream=KillAtFirstLine())
  assert out["preempted"] and out["step"] < 50
  params, _ = checkpointing.restore_params(tmp_path / "run")
  np.testing.assert_array_equal(jax.tree.leaves(params)[0], jax.tree.leaves(out["params"])[0])


def test_mesh_from_config():
  mesh = sharding.make_mesh((("data", -1),))
  assert mesh.shape["data"] == jax.device_count() == 8
  assert sharding.make_mesh((("data", 4), ("model", 2))).shape == {"data": 4, "model": 2}
  with pytest.raises(Exception, match="needs 16 devices"):
    sharding.make_mesh((("data", 16),))
  # One process may use fewer devices than it has: the first ones.
  assert sharding.make_mesh((("data", 6),)).devices.tolist() == jax.devices()[:6]
  assert sharding.make_mesh((("data", 1),)).devices.tolist() == jax.devices()[:1]
  with pytest.raises(Exception, match="not divisible by the 8 devices"):
    sharding.check_batch_size(12, mesh)


def test_prefetch_to_mesh_keeps_batches_placed_ahead_in_order():
  mesh = sharding.make_mesh((("data", -1),))
  pulled = []

  def batches(n):
    for i in range(n):
      pulled.append(i)
      yield {"x": np.full((8, 2), i, np.float32)}

  feed = sharding.prefetch_to_mesh(batches(5), mesh, size=2)
  first = next(feed)
  assert pulled == [0, 1, 2]  # the one returned and 2 more already sent to the devices
  assert first["x"].sharding == sharding.batch_sharding(mesh)
  rest = [int(b["x"][0, 0]) for b in feed]
  assert int(first["x"][0, 0]) == 0 and rest == [1, 2, 3, 4]
  assert [int(b["x"][0, 0]) for b in sharding.prefetch_to_mesh(batches(2), mesh, 0)] == [0, 1]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, folder, data_dir, process_id=None, num_processes=1, port=None, devices=8,
            extra=()):
  args = [sys.executable, str(REPO / "launch" / "train.py"),
          f"--config={CONFIGS / 'cd_student.py'}:stage=1,runlocal", f"--workdir={workdir}",
          f"--config.input.manual_dir={folder}", f"--config.input.data_dir={data_dir}",
          "--config.input.pp.shorter_side=36", "--config.input.pp.crop=32",
          "--config.batch_size=8", "--config.total_steps=3", "--config.log_every=1",
          "--config.teacher.encoder=random", "--config.teacher.decoder=random",
          "--config.student.init=random", *extra]
  if num_processes > 1:
    args += ["--distributed", f"--coordinator_address=127.0.0.1:{port}",
             f"--num_processes={num_processes}", f"--process_id={process_id}"]
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices),
             JAX_PLATFORMS="cpu")
  return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, cwd=REPO)


def test_two_processes_match_one(image_folder, tmp_path):
  data_dir = tmp_path / "tfds"
  threads = ("--config.input.num_workers=0",)  # the grain workers are the kill -9 test's
  single = _launch(tmp_path / "one", image_folder, data_dir, extra=threads)
  out, _ = single.communicate(timeout=600)
  assert single.returncode == 0, out[-3000:]
  port = _free_port()
  procs = [_launch(tmp_path / "two", image_folder, data_dir, i, 2, port, devices=4, extra=threads)
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-3000:]
  assert "over 8 devices / 2 processes" in outs[0]
  a, _ = checkpointing.restore_params(tmp_path / "one")
  b, _ = checkpointing.restore_params(tmp_path / "two")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_kill_9_mid_training_then_resume_ends_on_the_uninterrupted_loss(image_folder, tmp_path):
  """SIGKILL (no handler runs, nothing is flushed) once the step-2 checkpoint is on disk; the
  same command then resumes from it and ends exactly where an uninterrupted run ends."""
  import time  # pylint: disable=import-outside-toplevel
  data_dir = tmp_path / "tfds"
  extra = ("--config.total_steps=8", "--config.checkpoint_every=2")
  # The reference decodes in threads (the same batches: test_data.py), the victim in workers.
  whole = _launch(tmp_path / "whole", image_folder, data_dir,
                  extra=extra + ("--config.input.num_workers=0",))
  out, _ = whole.communicate(timeout=600)
  assert whole.returncode == 0, out[-3000:]
  victim = _launch(tmp_path / "victim", image_folder, data_dir, extra=extra)
  deadline = time.monotonic() + 300
  while checkpointing.latest_step(tmp_path / "victim") is None:
    assert victim.poll() is None and time.monotonic() < deadline, "no checkpoint before exit"
    time.sleep(0.02)
  workers = [c for c in psutil.Process(victim.pid).children(recursive=True)
             if "spawn_main" in " ".join(c.cmdline())]
  assert workers, "the run decodes in grain worker processes (config.input.num_workers=-1)"
  victim.kill()
  victim.communicate(timeout=60)  # returns once nothing holds its stdout: workers included
  assert victim.returncode == -signal.SIGKILL
  _, alive = psutil.wait_procs(workers, timeout=10)
  assert not alive, "grain workers outlived their killed trainer"
  killed_at = max(r["step"] for r in rows(tmp_path / "victim") if "loss" in r)
  assert 2 <= killed_at < 8  # killed mid-training
  resumed = _launch(tmp_path / "victim", image_folder, data_dir, extra=extra)
  out, _ = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, out[-3000:]
  final = {r["step"]: r["loss"] for r in rows(tmp_path / "victim") if "loss" in r}
  want = {r["step"]: r["loss"] for r in rows(tmp_path / "whole") if "loss" in r}
  assert final[8] == want[8] and final == want  # every step's loss, bit for bit
  a, _ = checkpointing.restore_params(tmp_path / "whole")
  b, _ = checkpointing.restore_params(tmp_path / "victim")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_typo_in_override_fails(tmp_path):
  proc = subprocess.run(
      [sys.executable, str(REPO / "launch" / "train.py"),
       f"--config={CONFIGS / 'cd_decoder.py'}:runlocal", f"--workdir={tmp_path}",
       "--config.batchsize=4"], capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode != 0 and "batchsize" in proc.stderr


def test_training_processes_keep_their_compiled_programs(tmp_path):
  """launch/train.py turns JAX's persistent cache on in <cdft cache>/xla-train, unless a cache
  is configured already or CDFT_NO_COMPILE_CACHE=1 (each case in a fresh process)."""
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = ("import jax; from cdft import train; "
          "print(train.enable_compile_cache(), jax.config.jax_compilation_cache_dir, "
          "jax.config.jax_persistent_cache_min_compile_time_secs)")
  base = {k: v for k, v in os.environ.items()
          if k not in ("JAX_COMPILATION_CACHE_DIR", "CDFT_NO_COMPILE_CACHE")}
  base["CDFT_CACHE_DIR"] = str(tmp_path / "cdft")

  def run(**env):
    out = subprocess.run([sys.executable, "-c", code], env=dict(base, **env), check=True,
                         capture_output=True, text=True).stdout.split()
    return out

  folder = str(tmp_path / "cdft" / "xla-train")
  assert run() == [folder, folder, "0.0"]
  mine = str(tmp_path / "mine")
  assert run(JAX_COMPILATION_CACHE_DIR=mine)[:2] == [mine, mine]
  assert run(CDFT_NO_COMPILE_CACHE="1")[:2] == ["None", "None"]


def test_a_cpu_host_runs_the_step_on_several_cpu_devices():
  """sharding.split_cpu_host (launch/train.py, before JAX starts): the largest device count up
  to 8 that divides the per-process batch and eval batch, or the config's own, unless the user
  set a device count. The cases run in one fresh process, JAX's device count reset between
  them (its backends never start); two more processes start the backends."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  from cdft.kernels import build  # pylint: disable=import-outside-toplevel
  try:
    build.find_onednn()
    build.find_compiler()
    onednn = True
  except build.KernelUnavailable:
    onednn = False
  cases = [(128, -1, 0, 1), (12, -1, 0, 1), (128, -1, 100, 1), (128, -1, 0, 32), (11, -1, 0, 1),
           (128, 1, 0, 1), (128, 2, 0, 1), (128, 5, 0, 1)]
  cases = [c + ("xla",) for c in cases] + [(128, -1, 0, 1, "auto"), (128, 4, 0, 1, "onednn")]
  code = f"""
import json, jax, ml_collections
from cdft.errors import CdftError
from cdft.training import sharding
out = []
for batch, cpu_devices, eval_batch, processes, cpu_conv in {cases!r}:
  jax.config.update("jax_num_cpu_devices", -1)
  c = ml_collections.ConfigDict(dict(batch_size=batch, cpu_devices=cpu_devices,
                                     eval_batch_size=eval_batch, cpu_conv=cpu_conv))
  try:
    out.append([sharding.split_cpu_host(c, processes), jax.config.jax_num_cpu_devices])
  except CdftError as e:
    out.append(str(e))
print(json.dumps(out))
"""
  out = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True,
                       check=True).stdout
  assert json.loads(out.splitlines()[-1]) == [
      [8, 8], [6, 6], [4, 4],
      [4, 4],  # 4 examples per process
      [None, -1],  # no divisor up to 8: one device
      [None, -1], [2, 2],
      "config.cpu_devices=5 does not divide the per-process batch 128 (and eval batch 128)",
      # oneDNN convolutions use every core from one device; an explicit count still holds
      [None, -1] if onednn else [8, 8], [4, 4]]

  def devices(**env):
    code = ("import jax, ml_collections; from cdft.training import sharding; "
            "c = ml_collections.ConfigDict(dict(batch_size=128, cpu_devices=-1, "
            "eval_batch_size=0)); n = sharding.split_cpu_host(c); print(n, jax.device_count())")
    return subprocess.run([sys.executable, "-c", code], env=dict(base, **env),
                          capture_output=True, text=True, check=True).stdout.split()

  assert devices() == ["8", "8"]  # the backends start with the devices set
  assert devices(XLA_FLAGS="--xla_force_host_platform_device_count=3") == ["None", "3"]


def test_the_trainer_process_starts_with_malloc_huge_pages(tmp_path):
  """cdft.training.cpu_memory: launch/train.py restarts its interpreter with glibc's
  malloc asking for transparent huge pages, unless it cannot help or the user decided."""
  import platform  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from cdft.training import cpu_memory  # pylint: disable=import-outside-toplevel
  name, version = platform.libc_ver()
  too_old = name != "glibc" or tuple(map(int, version.split(".")[:2])) < (2, 35)
  if sys.platform != "linux" or too_old:
    pytest.skip(f"needs glibc >= 2.35 on Linux, not {name} {version}")
  thp = tmp_path / "enabled"
  thp.write_text("always [madvise] never\n")
  env = cpu_memory.huge_pages_env({"A": "1"}, thp)
  assert env == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert cpu_memory.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, thp) == {
      "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
  assert cpu_memory.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, thp) is None
  assert cpu_memory.huge_pages_env({"CDFT_KEEP_MALLOC": "1"}, thp) is None
  thp.write_text("always madvise [never]\n")
  assert cpu_memory.huge_pages_env({}, thp) is None
  assert cpu_memory.huge_pages_env({}, tmp_path / "missing") is None

  code = ("import os; from cdft.training import cpu_memory; cpu_memory.reexec_with_huge_pages(); "
          "print(os.environ.get('GLIBC_TUNABLES'))")
  base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "CDFT_KEEP_MALLOC")}
  def run(**env):
    return subprocess.run([sys.executable, "-c", code], env=dict(base, **env),
                          capture_output=True, text=True, check=True).stdout.strip()
  want = "glibc.malloc.hugetlb=1" if cpu_memory.huge_pages_env({}) else "None"
  assert run() == want  # restarted once, with the tunable (where this kernel has THP)
  assert run(CDFT_KEEP_MALLOC="1") == "None"


def _losses(config, workdir):
  out = train.run(config, workdir)
  return out, np.array([r["loss"] for r in rows(workdir) if "loss" in r])


@pytest.mark.parametrize("name", ["ft_teacher", "cd_decoder"])
def test_bfloat16_trains_as_float32(name, image_folder, tmp_path):
  """config.compute_dtype='bfloat16': the same run's loss falls as in float32, while the
  parameters and the BatchNorm statistics stay float32."""
  if name == "ft_teacher":  # digits, the runlocal narrow ResNet-20, 40 steps of 16 images
    config = load_config(name, "model=resnet20,runlocal")
    config.total_steps, config.log_every, config.batch_size = 40, 1, 16
    config.eval_every_epochs = config.checkpoint_every_epochs = 0.0
    config.mesh = ONE_DEVICE
  else:  # the photos, a CD stage-1 decoder, 12 steps
    config = tiny(load_config(name, "stage=1,runlocal"), image_folder, tmp_path / "tfds", 12)
    config.optimizer.learning_rate = 1e-3
  curves = {}
  for dtype in ("float32", "bfloat16"):
    config.compute_dtype = dtype
    out, curves[dtype] = _losses(config, tmp_path / dtype)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(out["params"]))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(out["model_state"]))
  f32, bf16 = curves["float32"], curves["bfloat16"]
  k = len(f32) // 4
  assert f32[-k:].mean() < 0.85 * f32[:k].mean()  # it learns
  assert bf16[-k:].mean() < 0.85 * bf16[:k].mean()  # and so does bfloat16
  np.testing.assert_allclose(bf16[0], f32[0], rtol=2e-2)  # the same start, rounded
  np.testing.assert_allclose(bf16[-k:].mean(), f32[-k:].mean(), rtol=0.15)
  config.compute_dtype = "float16"
  with pytest.raises(train.CdftError, match="'float16' is not one of float32, bfloat16"):
    train.run(config, tmp_path / "f16")
