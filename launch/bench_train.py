r"""Train-step throughput of every training step, beside the official PyTorch code.

Each (step, device count) runs in its own process so its peak RSS is its own.
As the baseline (../shared/baselines/train_official_cpu.json): random inputs
made before timing (no data loading), random frozen weights (cost does not
depend on them), ``--warmup`` steps then ``--repeats`` timed steps, median
step time, images/s = batch / median. Device counts > 1 are fake CPU devices
(``--xla_force_host_platform_device_count``): the same 2 cores, the batch split
over them. With XLA's convolutions each device's part of the batch stays in cache, so 8
devices are faster than 1 on a CPU host and ``launch/train.py`` splits a CPU host that way
(``config.cpu_devices``); with oneDNN's (``--cpu-conv``, ``config.cpu_conv``) one device is
faster, and ``launch/train.py`` keeps one. Each child starts as ``launch/train.py`` does, with
malloc's huge pages (cdft.training.cpu_memory).
The official figures are those of this CPU type: the AVX-512 row
of ../shared/baselines/README.md §7, or the AVX2 ``train_official_cpu.json``.

With ``--input pipeline`` each timed step also takes its batch from the real
input, as ``launch/train.py`` feeds it (``cdft.train.make_input`` with its grain
workers, then ``sharding.prefetch_to_mesh``): the FT steps read the digits (the
CIFAR configs' in-memory uint8 path, offline), the CD steps the photographs of
../shared/images/content as an image folder, shorter side 300 and 256-px crops
(the §7 protocol). A step time then includes any wait for data.

  python launch/bench_train.py --out benchmarks/train_cpu.json
  python launch/bench_train.py --input pipeline --devices 8 --out benchmarks/train_pipeline.json
  python launch/bench_train.py --steps cd_decoder_k3 --devices 1 --repeats 3
  python launch/bench_train.py --steps ft_train_student --devices 1 --repeats 10
  python launch/bench_train.py --steps ft_train_teacher --devices 1 --cpu-conv onednn,xla
  python launch/bench_train.py --steps ft_train_teacher --devices 1 --compare c07587c --rounds 3
  python launch/bench_train.py --steps ft_train_teacher,ft_train_student --devices 1 \
      --input pipeline --rounds 3 --reference /tmp/torch/bin/python

``--compare REV`` times REV's ``cdft`` (exported with ``git archive``, imported
through PYTHONPATH) with this script's protocol, alternating with the working tree
inside each configuration, ``--rounds`` times. This VM's speed drifts by up to 30%
between identical runs, and two programs compiled into one process time
differently from either alone, so separate processes close in time are the only
comparison that held up (issue 14, stop 30).

``--reference PYTHON`` runs ``launch/reference_torch.py`` under PYTHON (one with torch) after
cdft's children of each (round, step): the official training-loop body rebuilt in PyTorch on
these very cores, and prints cdft's median beside it. The official rows of
../shared/baselines come from one machine of each kind, and machines of a kind differ (a
Zen 4 "AVX-512" VM ran the rebuilt steps 1.6-1.9x slower than §7's AVX-512 row).
"""
import argparse
import itertools
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
BASELINE = REPO.parent / "shared" / "baselines" / "train_official_cpu.json"

# name: (config file, config arg, overrides, batch, input side, baseline step name)
STEPS = {
    "cd_decoder_k3": ("cd_decoder", "stage=3", {}, 16, 256, "cd_step1_bd_k3"),
    "cd_decoder_k5": ("cd_decoder", "stage=5", {}, 16, 256, "cd_step1_bd_k5"),
    "cd_student_k3": ("cd_student", "stage=3", {"teacher.decoder": "random"}, 16, 256,
                      "cd_step2_se_k3"),
    "cd_student_k5": ("cd_student", "stage=5", {"teacher.decoder": "random"}, 16, 256,
                      "cd_step2_se_k5"),
    "cd_small_decoder_k3": ("cd_small_decoder", "stage=3",
                            {"student.encoder": "random", "student.init": "random"}, 16, 256,
                            "cd_step3_sd_k3"),
    "cd_small_decoder_k5": ("cd_small_decoder", "stage=5",
                            {"student.encoder": "random", "student.init": "random"}, 16, 256,
                            "cd_step3_sd_k5"),
    "ft_train_teacher": ("ft_teacher", "model=resnet56,dataset=cifar10", {}, 128, 32,
                         "ft_train_teacher"),
    "ft_train_paraphraser": ("ft_paraphraser", "teacher=resnet56,dataset=cifar10",
                             {"teacher.workdir": "random"}, 128, 32, "ft_train_paraphraser"),
    "ft_train_student": ("ft_student", "pair=resnet56_resnet20,method=ft,dataset=cifar10",
                         {"teacher.workdir": "random", "distill.paraphraser": "random"}, 128, 32,
                         "ft_train_student"),
}


def _load_config(name, arg):
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def child(args):
  """Times one step configuration in this process; prints one JSON line."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from cdft import tasks, train  # pylint: disable=import-outside-toplevel
  from cdft.kernels import conv as kernel_conv  # pylint: disable=import-outside-toplevel
  from cdft.training import optim, sharding  # pylint: disable=import-outside-toplevel

  cfg_name, cfg_arg, overrides, batch, side, _ = STEPS[args.step]
  if args.input == "pipeline":
    cfg_arg = cfg_arg.replace("dataset=cifar10", "dataset=digits")
  config = _load_config(cfg_name, cfg_arg)
  if config.task.startswith("cd_"):
    config.teacher.encoder = "random"
  for key, value in overrides.items():
    group, field = key.split(".")
    config[group][field] = value
  t0 = time.perf_counter()
  mesh = sharding.make_mesh(config.mesh)
  repl = sharding.replicated(mesh)
  task = tasks.get_task(config)
  rng = np.random.default_rng(0)
  if config.input.get("on_device", False):  # uint8 pixels, prepared inside the step
    host_batch = {"image": rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8)}
  else:
    host_batch = {"image": rng.random((batch, side, side, 3), dtype=np.float32)}
  if "num_classes" in config:  # classification steps also take integer labels
    host_batch["label"] = rng.integers(0, config.num_classes, batch).astype(np.int32)
  schedule = optim.make_schedule(config.schedule, config.optimizer.learning_rate, 1000, 1000)
  tx = optim.make_optimizer(config.optimizer, schedule)
  host_state = jax.device_get(task.init(jax.random.key(0), host_batch))
  params = jax.device_put(host_state["params"], repl)
  state = {"step": jax.device_put(np.zeros((), np.int32), repl), "params": params,
           "opt_state": jax.jit(tx.init, out_shardings=repl)(params),
           "model_state": jax.device_put(host_state["model_state"], repl)}
  frozen = jax.device_put(jax.device_get(task.frozen), repl)
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  step = jax.jit(train.make_train_step(task, tx, schedule, 0),
                 in_shardings=(state_sh, repl, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sh, repl), donate_argnums=(0,),
                 compiler_options=train.step_compiler_options(task, mesh))
  if args.input == "pipeline":
    if config.input.dataset == "image_folder":
      config.input.manual_dir = str(REPO.parent / "shared" / "images" / "content")
      tmp = tempfile.TemporaryDirectory(prefix="cdft_bench_train_")  # pylint: disable=consider-using-with
      config.input.data_dir = tmp.name  # removed when this child exits
      config.input.pp.shorter_side, config.input.pp.crop = 300, side
    data = train.make_input(config.input, global_batch_size=batch, seed=0, start_step=0)
    feed = sharding.prefetch_to_mesh(data, mesh, config.device_prefetch)
  else:
    feed = itertools.repeat(sharding.global_batch(host_batch, mesh))
  setup = time.perf_counter() - t0
  times, losses, cpu = [], [], []
  with kernel_conv.cpu_convolutions(args.cpu_conv, mesh) as onednn:  # as launch/train.py
    for _ in range(args.warmup + args.repeats):
      t, c = time.perf_counter(), os.times()
      state, metrics = step(state, frozen, next(feed))
      losses.append(float(metrics["loss"]))  # syncs, as the baseline's .item()
      times.append(time.perf_counter() - t)
      cpu.append(sum(os.times()[:2]) - sum(c[:2]))  # this process's user + system seconds
  timed = times[args.warmup:]
  med = statistics.median(timed)
  print(json.dumps({
      "step": args.step, "input": args.input, "devices": jax.device_count(), "batch": batch,
      "convolutions": "onednn" if onednn else "xla",
      "input_hw": [side, side],
      "setup_s": round(setup, 3), "warmup_step_s": [round(x, 4) for x in times[:args.warmup]],
      "timed_step_s": [round(x, 4) for x in timed], "median_step_s": round(med, 4),
      "images_per_s": round(batch / med, 3),
      "cores_busy": round(sum(cpu[args.warmup:]) / sum(timed), 3),  # CPU seconds per second
      "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
      "loss_first_last": [losses[0], losses[-1]],
      "minor_page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
      "all_losses_finite": bool(all(np.isfinite(losses)))}))


# The official steps on an AVX-512 VM of this kind (../shared/baselines/README.md §7; the
# teacher and CD step 2 were measured twice there: the mean). train_official_cpu.json is AVX2.
OFFICIAL_AVX512 = {"ft_train_teacher": (312.5 + 259.9) / 2, "ft_train_student": 406.8,
                   "ft_train_paraphraser": 274.1, "cd_step1_bd_k3": 1.50,
                   "cd_step2_se_k3": (1.57 + 1.60) / 2, "cd_step3_sd_k3": 2.59}


def _avx512():
  try:
    return "avx512f" in pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return False


def _cpu_model():
  """Vendor name, family and model of the first CPU: machines of one "kind" differ (an AMD
  family 25 model 17 is Zen 4, whose AVX-512 has half the float32 FMA width of an Intel one)."""
  fields = {}
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines():
      key, _, value = line.partition(":")
      fields[key.strip()] = value.strip()
  except OSError:
    return None
  return {k: fields.get(k) for k in ("model name", "cpu family", "model")}


def _baseline():
  if _avx512():
    return {name: {"images_per_s": rate, "peak_rss_kb": None}
            for name, rate in OFFICIAL_AVX512.items()}
  if not BASELINE.is_file():
    return {}
  data = json.loads(BASELINE.read_text())
  out = {}
  for s in data.get("steps", []):
    rates = [s["median_images_per_s"]] + [
        r.get("median_images_per_s") for r in s.get("repeat_processes", [])
        if r.get("median_images_per_s")]
    out[s["step"]] = {"images_per_s": statistics.mean(rates), "peak_rss_kb": s["peak_rss_kb"]}
  return out


def _export(rev, tmp):
  """The tree of git revision ``rev`` of this repository, exported under ``tmp``."""
  out = tmp / "rev"
  out.mkdir()
  archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev],
                           capture_output=True, check=False)
  if archive.returncode:
    sys.exit(f"--compare {rev}: git archive failed: {archive.stderr.decode()[-500:]}")
  subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
  return out


def _json_child(cmd, failure, **kwargs):
  """Runs ``cmd`` and returns the JSON object of its last stdout line; exits with ``failure``
  and the end of its stderr if it fails."""
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
  if proc.returncode:
    print(proc.stderr[-3000:], file=sys.stderr)
    sys.exit(failure)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_all(args, parser, base, trees, cpu_memory):
  """Every (round, step, device count, kernels, tree) in its own child process; the trees
  alternate inside each configuration, so a drift of the machine's speed hits both. With
  ``--reference``, each (round, step) ends with the PyTorch reference of that step."""
  results, refs = [], []
  print(f"{'step':22} {'conv':>6} {'dev':>3} {'median s':>9} {'img/s':>7} {'RSS GB':>7} "
        f"{'official img/s':>14} {'ratio':>6}" + ("  tree" if len(trees) > 1 else ""))
  for name in args.steps.split(","):
    if name not in STEPS:
      parser.error(f"unknown step {name!r}; choose from {', '.join(STEPS)}")
  for rnd, name in itertools.product(range(args.rounds), args.steps.split(",")):
    for n, cpu_conv, (label, tree) in itertools.product(
        [int(d) for d in args.devices.split(",")], args.cpu_conv.split(","), trees):
      env = dict(os.environ,
                 XLA_FLAGS=f"--xla_force_host_platform_device_count={n} {args.xla_flags}".strip(),
                 JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
      if tree != REPO:  # this script's protocol, that revision's cdft
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
      env = cpu_memory.huge_pages_env(env) or env  # as launch/train.py starts
      row = _json_child(
          [sys.executable, __file__, "--child", "--step", name, "--warmup", str(args.warmup),
           "--repeats", str(args.repeats), "--input", args.input, "--cpu-conv", cpu_conv],
          f"{name} on {n} devices ({label}) failed", env=env, cwd=tree)
      ref = base.get(STEPS[name][5], {})
      row["official_images_per_s"] = ref.get("images_per_s")
      row["official_peak_rss_kb"] = ref.get("peak_rss_kb")
      row["tree"], row["round"] = label, rnd
      results.append(row)
      ratio = (f"{row['images_per_s'] / ref['images_per_s']:.2f}x" if ref else "-")
      print(f"{name:22} {row['convolutions']:>6} {n:>3} {row['median_step_s']:>9.3f} "
            f"{row['images_per_s']:>7.2f} "
            f"{row['peak_rss_kb'] / 1e6:>7.2f} {ref.get('images_per_s', float('nan')):>14.2f} "
            f"{ratio:>6}" + (f"  {label}" if len(trees) > 1 else ""), flush=True)
    if args.reference:  # the official step rebuilt in PyTorch, right after cdft's
      refs.append(_run_reference(args, name, rnd))
  return results, refs


def _run_reference(args, name, rnd):
  """One child of launch/reference_torch.py under ``args.reference`` (a Python with torch)."""
  row = _json_child(
      [args.reference, str(REPO / "launch" / "reference_torch.py"), "--step", name,
       "--warmup", str(args.warmup), "--repeats", str(args.repeats)],
      f"the PyTorch reference of {name} failed (--reference {args.reference})", cwd=REPO)
  row["round"] = rnd
  print(f"{name:22} {'torch':>6} {'-':>3} {row['median_step_s']:>9.3f} "
        f"{row['images_per_s']:>7.2f} {row['peak_rss_kb'] / 1e6:>7.2f}   "
        f"(reference, {row['reference']})", flush=True)
  return row


def _print_reference(results, refs):
  """Median images/s over the rounds, cdft beside the PyTorch reference of the same machine."""
  print("\nmedian over rounds: cdft vs the official step rebuilt in PyTorch, same machine")
  for key in dict.fromkeys((r["step"], r["devices"], r["convolutions"], r["tree"])
                           for r in results):
    mine = statistics.median(r["images_per_s"] for r in results
                             if (r["step"], r["devices"], r["convolutions"], r["tree"]) == key)
    theirs = [r["images_per_s"] for r in refs if r["step"] == key[0]]
    if theirs:
      print(f"{key[0]:22} {key[2]:>6} {key[1]:>3}  {mine:8.2f} vs {statistics.median(theirs):8.2f}"
            f" img/s ({mine / statistics.median(theirs):.2f}x)"
            + (f"  {key[3]}" if key[3] != "working" else ""))


def _print_comparison(results, rev):
  """Median images/s over the rounds of each configuration, the working tree beside rev."""
  print(f"\nmedian over rounds: working tree vs {rev}")
  keys = dict.fromkeys((r["step"], r["devices"], r["convolutions"]) for r in results)
  for key in keys:
    med = {}
    for label in ("working", rev):
      rows = [r["images_per_s"] for r in results
              if (r["step"], r["devices"], r["convolutions"]) == key and r["tree"] == label]
      med[label] = statistics.median(rows)
    print(f"{key[0]:22} {key[2]:>6} {key[1]:>3}  {med['working']:8.2f} vs {med[rev]:8.2f} img/s "
          f"({med['working'] / med[rev]:.2f}x)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated step names")
  parser.add_argument("--devices", default="1,8", help="comma-separated device counts")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON output file")
  parser.add_argument("--xla-flags", default="",
                      help="more XLA_FLAGS for every child (e.g. an XLA:CPU option to compare)")
  parser.add_argument("--input", choices=("synthetic", "pipeline"), default="synthetic",
                      help="one random batch made before timing, or each step's batch from "
                           "the real input pipeline (see the module doc)")
  parser.add_argument("--cpu-conv", default="auto",
                      help="comma-separated config.cpu_conv values to compare: auto (oneDNN "
                           "where cdft[onednn] builds, as launch/train.py), onednn, xla")
  parser.add_argument("--compare", default=None, metavar="REV",
                      help="also time git revision REV of this repository (its cdft, this "
                           "script's protocol), alternating with the working tree in each "
                           "configuration, and print both medians")
  parser.add_argument("--rounds", type=int, default=1,
                      help="times to run every configuration (with --compare: alternating)")
  parser.add_argument("--reference", default=None, metavar="PYTHON",
                      help="also time each step's official training-loop body rebuilt in "
                           "PyTorch (launch/reference_torch.py) with this interpreter, right "
                           "after cdft's in every round: a baseline of this very machine")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--step", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args)
    return
  from cdft.training import cpu_memory  # pylint: disable=import-outside-toplevel
  base = _baseline()
  trees = [("working", REPO)]
  with tempfile.TemporaryDirectory(prefix="cdft_bench_compare_") as tmp:
    if args.compare:
      trees.append((args.compare, _export(args.compare, pathlib.Path(tmp))))
    results, refs = _run_all(args, parser, base, trees, cpu_memory)
  if args.compare:
    _print_comparison(results, args.compare)
  if refs:
    _print_reference(results, refs)
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "description": "cdft train-step throughput (launch/bench_train.py)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "avx512f": _avx512(),
                    "cpu": _cpu_model()},
        "compare": args.compare, "rounds": args.rounds,
        "protocol": f"one process per (step, devices); {args.input} inputs and random "
                    f"frozen weights; {args.warmup} warm-up + {args.repeats} timed steps; "
                    "median",
        "xla_flags": args.xla_flags,
        "glibc_tunables": (cpu_memory.huge_pages_env(dict(os.environ)) or os.environ).get(
            "GLIBC_TUNABLES", ""),
        "results": results, "reference": refs}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
