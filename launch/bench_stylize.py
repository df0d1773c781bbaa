"""Benchmark of the full 5-level 16x WCT cascade (or of AdaIN) on CPU (or whatever jax runs on).

Each configuration runs in its own process (so its peak RSS is its own): one
warm-up run (compiles), then ``--repeats`` timed runs; the median is reported,
with the compile time (warm-up minus median) separately. Inputs are real images
from ../shared/images resized to the benchmark sizes, as the official baseline
(../shared/baselines/cd_official_cpu.json) which is printed beside.

  python launch/bench_stylize.py --weights-dir ../shared/weights --out benchmarks/stylize_cpu.json

``--models adain-16x,adain-vgg`` times AdaIN instead (see launch/bench_models.py:
the 16x student + small decoder against pytorch-AdaIN's VGG + decoder), with
MicroAST's figures (../shared/baselines/README.md §8, measured on the AVX-512
machine type) as the anchor:

  python launch/bench_stylize.py --models adain-16x,adain-vgg --configs 512,1024,2048,uhd \
      --out benchmarks/stylize_adain_cpu.json
"""
import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CONFIGS = {
    # name: (content file, content (W, H) or None = as is, style (W, H))
    "512": ("content/adain_golden_gate.jpg", (512, 512), (512, 512)),
    "1024": ("content/adain_golden_gate.jpg", (1024, 1024), (1024, 1024)),
    "2048": ("content/adain_golden_gate.jpg", (2048, 2048), (1024, 1024)),
    "uhd": ("uhd/cd_green_park_wallpaper_3840x2160.jpg", None, (1024, 1024)),
}
STYLE = "style/adain_la_muse.jpg"
# MicroAST (AAAI'23), its official network in-process on the AVX-512 machine type
# (../shared/baselines/README.md §8): the speed anchor of the AdaIN benchmark.
MICROAST_S = {"512": 0.25, "2048": 5.15, "uhd": 9.97}


def _load(path, size):
  from PIL import Image
  import numpy as np
  img = Image.open(path).convert("RGB")
  if size is not None and img.size != tuple(size):
    img = img.resize(size, Image.BICUBIC)
  return np.asarray(img, np.float32) / 255.0


def child(args):
  """Runs one configuration in this process and prints a JSON line."""
  from cdft.stylize import cpu_tuning
  cpu_tuning.tune_xla_cpu()  # as cdft-stylize
  import numpy as np
  import bench_models

  content_file, content_size, style_size = CONFIGS[args.config]
  content = _load(args.images / content_file, content_size)
  style = _load(args.images / STYLE, style_size)
  stylizer, order, what = bench_models.stylizer(args.model, args.weights_dir)
  runs, levels = [], []
  for i in range(args.repeats + 1):
    per_level = {}
    t0 = time.perf_counter()
    out = stylizer.stylize(content, style, levels=order,
                           callback=lambda k, s: per_level.__setitem__(k, s))
    _ = (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)  # what saving costs, as the baseline
    runs.append(time.perf_counter() - t0)
    levels.append(per_level)
  median = statistics.median(runs[1:])
  rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print(json.dumps({
      "config": args.config, "model": args.model, "weights": what,
      "content_hw": list(content.shape[:2]), "style_hw": list(style.shape[:2]),
      "output_hw": list(out.shape[:2]), "warmup_s": runs[0], "runs_s": runs[1:], "median_s": median,
      "compile_s": max(runs[0] - median, 0.0), "peak_rss_kb": rss_kb,
      "level_s": {k: statistics.median(l[k] for l in levels[1:]) for k in levels[0]},
  }))


def _run_child(args, config, model):
  cmd = [sys.executable, __file__, "--config", config, "--model", model, "--repeats",
         str(args.repeats), "--images", str(args.images)]
  if args.weights_dir:
    cmd += ["--weights-dir", str(args.weights_dir)]
  print(f"running {model} {config} ...", file=sys.stderr, flush=True)
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    sys.exit(f"{model} {config} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _write(args, system, results, **extra):
  """The JSON of a run: what, where, how, the results and ``extra``."""
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(dict({
      "system": system,
      "machine": f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}",
      "protocol": f"one warm-up then {args.repeats} timed runs per process, median; "
                  "peak RSS = ru_maxrss of that process",
      "results": results}, **extra), indent=1))
  print(f"wrote {args.out}", file=sys.stderr)


def _adain_main(args, models):
  """The AdaIN table: each model per config, the speed-up of the first over the others,
  and MicroAST's in-process time."""
  results = {m: {c: _run_child(args, c, m) for c in args.configs.split(",")} for m in models}
  first = models[0]
  head = " | ".join(f"{m} median (s) | {m} compile (s) | {m} peak RSS (GB)" for m in models)
  print(f"| config | content (H×W) | {head} | "
        + " | ".join(f"{m} / {first}" for m in models[1:])
        + f" | MicroAST (s, AVX-512) | {first} / MicroAST |")
  print("|" + "---|" * (4 + 3 * len(models) + len(models) - 1))
  for c in args.configs.split(","):
    rows = [results[m][c] for m in models]
    cells = " | ".join(f"{r['median_s']:.2f} | {r['compile_s']:.1f} | {r['peak_rss_kb'] / 1e6:.2f}"
                       for r in rows)
    ratios = " | ".join(f"{r['median_s'] / rows[0]['median_s']:.1f}x" for r in rows[1:])
    micro = MICROAST_S.get(c)
    print(f"| {c} | {rows[0]['content_hw'][0]}×{rows[0]['content_hw'][1]} | {cells} | "
          + (ratios + " | " if ratios else "")
          + (f"{micro} | {rows[0]['median_s'] / micro:.2f} |" if micro else "- | - |"))
  _write(args, "cdft AdaIN (relu4_1), alpha=1, batch 1, style statistics included", results,
         microast_in_process_s={"figures": MICROAST_S,
                                "source": "../shared/baselines/README.md §8 (AVX-512 machine)"})


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", default="512,1024,2048,uhd")
  p.add_argument("--models", default="cd16x",
                 help="comma-separated: cd16x (WCT), adain-16x, adain-vgg (launch/bench_models.py)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--weights-dir", default=os.environ.get("CDFT_WEIGHTS_DIR"))
  p.add_argument("--images", type=pathlib.Path, default=SHARED / "images")
  p.add_argument("--baseline", type=pathlib.Path, default=SHARED / "baselines/cd_official_cpu.json")
  p.add_argument("--out", type=pathlib.Path, default=REPO / "benchmarks/stylize_cpu.json")
  p.add_argument("--config", help=argparse.SUPPRESS)
  p.add_argument("--model", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.config:
    return child(args)
  models = args.models.split(",")
  if any(m != "cd16x" for m in models):
    return _adain_main(args, models)

  baseline = json.loads(args.baseline.read_text())["configs"] if args.baseline.exists() else {}
  results = {}
  for name in args.configs.split(","):
    results[name] = _run_child(args, name, "cd16x")

  header = ("| config | content (H×W) | cdft median (s) | compile (s) | cdft peak RSS (GB) "
            "| official median (s) | official peak RSS (GB) | time ratio | memory ratio |")
  print(header)
  print("|" + "---|" * 9)
  for name, r in results.items():
    b = baseline.get(name, {})
    bt, bm = b.get("median_s"), b.get("peak_rss_kb")
    rss = r["peak_rss_kb"] / 1e6
    print(f"| {name} | {r['content_hw'][0]}×{r['content_hw'][1]} | {r['median_s']:.2f} | "
          f"{r['compile_s']:.1f} | {rss:.2f} | {bt if bt else '-'} | "
          f"{bm / 1e6:.2f} | {r['median_s'] / bt:.2f} | {r['peak_rss_kb'] / bm:.2f} |"
          if bt and bm else f"| {name} | {r['content_hw']} | {r['median_s']:.2f} | "
          f"{r['compile_s']:.1f} | {rss:.2f} | - | - | - | - |")
  _write(args, "cdft 16x WCT cascade 5->1, alpha=1, batch 1", results,
         baseline={k: baseline.get(k) for k in results})


if __name__ == "__main__":
  main()
