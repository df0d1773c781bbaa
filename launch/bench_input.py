r"""Input-pipeline throughput alone: images/s of ``cdft.train.make_input`` per dataset.

Each workload builds the training input of a config exactly as ``launch/train.py`` does
(the same source, preprocessing, grain workers and prefetch), at the config's batch size,
and times ``--batches`` batches after ``--warmup`` (median of ``--repeats`` passes, each
from a fresh iterator at a later step). The file-backed workloads run once per
``--workers`` count (``config.input.num_workers``: -1 the default, one grain worker
process per two cores; 0 decoding threads in the process); ``first_batch_s`` is the
time from building the iterator to its first batch (worker start-up included). No train
step runs: this is what the input alone can deliver, to set beside the step it feeds
(``--steps-json``, a ``bench_train.py`` JSON: the ratio input / step should be >= 3 so
the step never waits).

  python launch/bench_input.py --out benchmarks/input_cpu.json --workers=-1,0,2 \
      --steps-json benchmarks/train_cpu_avx512_ft.json benchmarks/train_cpu_avx512_cd.json

Workloads:
  ft_digits        FT teacher input (digits, batch 128): uint8 gathered by index, the crop,
                   flip and normalisation happen in the step (``config.input.on_device``).
  ft_digits_host   the same with ``on_device=False``: the numpy op per example in threads.
  cd_images        CD step-2 input, ../shared/images/content as an image folder, batch 16,
                   shorter side 300, 256-px crops (the protocol of baselines §7).
  adain_images     AdaIN decoder input: content and style folders, batch 8, 512² resize,
                   256-px crops.
"""
import argparse
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# name: (config file, arg, overrides, step name in bench_train.py it feeds)
WORKLOADS = {
    "ft_digits": ("ft_teacher", "model=resnet56,dataset=digits", {"batch_size": 128},
                  "ft_train_teacher"),
    "ft_digits_host": ("ft_teacher", "model=resnet56,dataset=digits",
                       {"batch_size": 128, "input.on_device": False}, "ft_train_teacher"),
    "cd_images": ("cd_student", "stage=3,runlocal",
                  {"batch_size": 16, "input.pp.shorter_side": 300, "input.pp.crop": 256},
                  "cd_student_k3"),
    "adain_images": ("adain_decoder", "runlocal",
                     {"batch_size": 8, "input.pp.size": 512, "input.pp.crop": 256,
                      "style_input.pp.size": 512, "style_input.pp.crop": 256}, None),
}


def _config(name, arg, overrides, data_dir):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  for key, value in overrides.items():
    node = config
    *path, field = key.split(".")
    for part in path:
      node = node[part]
    node[field] = value
  for group in ("input", "style_input"):
    if group in config and config[group].dataset == "image_folder":
      config[group].data_dir = str(data_dir)
      config[group].manual_dir = str((REPO / config[group].manual_dir).resolve())
  return config


def _file_backed(config):
  return config.input.dataset in ("image_folder", "coco")


def _measure(config, batches, warmup, start_step):
  from cdft import train  # pylint: disable=import-outside-toplevel
  t = time.perf_counter()
  its = [train.make_input(config.input, global_batch_size=config.batch_size, seed=0,
                          start_step=start_step)]
  if "style_input" in config:
    its.append(train.make_input(config.style_input, global_batch_size=config.batch_size,
                                seed=1, start_step=start_step))
  for it in its:
    next(it)
  first = time.perf_counter() - t
  for _ in range(warmup):
    for it in its:
      next(it)
  t = time.perf_counter()
  for _ in range(batches):
    for it in its:
      batch = next(it)
  elapsed = time.perf_counter() - t
  for it in its:
    it.close()
  return {"seconds": elapsed, "images_per_s": batches * config.batch_size / elapsed,
          "first_batch_s": round(first, 2), "dtype": str(batch["image"].dtype),
          "shape": list(batch["image"].shape), "workers": its[0].num_workers}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workloads", default=",".join(WORKLOADS))
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--workers", default="-1",
                      help="comma-separated config.input.num_workers of the file-backed "
                           "workloads (-1: the default)")
  parser.add_argument("--steps-json", type=pathlib.Path, nargs="*", default=(),
                      help="bench_train.py JSONs: adds each step's images/s (its fastest device "
                           "count, as launch/train.py splits a CPU host) and the ratio")
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args()
  sys.path.insert(0, str(REPO))
  steps = {}
  for path in args.steps_json:
    for row in json.loads(path.read_text())["results"]:
      steps[row["step"]] = max(steps.get(row["step"], 0.0), row["images_per_s"])
  results = {}
  with tempfile.TemporaryDirectory(prefix="cdft_bench_input_") as tmp:
    for name in args.workloads.split(","):
      if name not in WORKLOADS:
        parser.error(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
      cfg_name, arg, overrides, step = WORKLOADS[name]
      config = _config(cfg_name, arg, overrides, pathlib.Path(tmp) / "tfds")
      for workers in ([int(w) for w in args.workers.split(",")] if _file_backed(config)
                      else [0]):
        for group in ("input", "style_input"):
          if group in config:
            config[group].num_workers = workers
        runs = [_measure(config, args.batches, args.warmup, start_step=1000 * r)
                for r in range(args.repeats)]
        rates = [r["images_per_s"] for r in runs]
        row = dict(runs[-1], runs_images_per_s=[round(x, 1) for x in rates],
                   images_per_s=round(statistics.median(rates), 1), feeds=step,
                   step_images_per_s=steps.get(step),
                   first_batch_s=statistics.median(r["first_batch_s"] for r in runs))
        if row["step_images_per_s"]:
          row["input_over_step"] = round(row["images_per_s"] / row["step_images_per_s"], 1)
        del row["seconds"]
        key = f"{name}@w{row['workers']}" if _file_backed(config) else name
        results[key] = row
        print(f"{key}: {row['images_per_s']} img/s {row['runs_images_per_s']} "
              f"({row['dtype']} {row['shape']}, {row['workers']} workers, first batch "
              f"{row['first_batch_s']} s)", flush=True)
  print("\n| input | batch | img/s (runs) | workers | first batch | feeds | step img/s | "
        "input / step |")
  print("|---|---|---|---|---|---|---|---|")
  for name, row in results.items():
    ratio = row.get("input_over_step")
    print(f"| {name} | {row['shape'][0]} ({row['dtype']}) | {row['images_per_s']} "
          f"({', '.join(map(str, row['runs_images_per_s']))}) | {row['workers']} | "
          f"{row['first_batch_s']} s | {row['feeds'] or '-'} | "
          f"{row['step_images_per_s'] or '-'} | {f'{ratio}x' if ratio else '-'} |")
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "what": "input pipeline alone (launch/bench_input.py)",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, avx512f="
                   f"{'avx512f' in pathlib.Path('/proc/cpuinfo').read_text()}",
        "protocol": f"{args.warmup} warm-up + {args.batches} timed batches, median of "
                    f"{args.repeats} iterators", "results": results,
        "measured": time.strftime("%Y-%m-%d %H:%M")}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
