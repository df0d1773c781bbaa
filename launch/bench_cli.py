"""Whole-process benchmark of ``cdft-stylize`` as a user runs it, beside the official code.

The workloads of ``../shared/baselines/cli_official_cpu.json`` (the official
cascade run once per photo, import and model loading included):

* ``eight_cold``: one ``cdft-stylize`` over a folder of 8 photos of 8 shapes
  (``--content-size 512 --style-size 512``, style ``adain_la_muse.jpg``) with
  an empty cdft cache (a fresh ``CDFT_CACHE_DIR``: weights converted, every
  program compiled);
* ``eight_warm``: the same command again, on the cache the cold run left;
* ``warmup`` / ``eight_after_warmup`` (``--workloads warmup``): ``cdft-stylize
  --warmup`` on an empty cache, then the 8-photo folder for the first time;
* ``one_512_second``: one 512x512 photo, the second process on a warm cache;
* ``one_2048`` / ``one_uhd``: a 2048x2048 crop of the UHD photo, and the UHD
  photo itself, with a 1024x1024 style (the style resized first, as the
  baseline), whole processes on a warm cache (the first, cold, run is
  reported too).

Each workload runs ``--repeats`` times (a fresh cache for every cold run); the
median wall time and peak RSS (``/usr/bin/time``-style, of the child) are
reported. The cache-less start-up is calibrated too: ``python -c 'import jax,
flax.linen, cdft.stylize.cli; jax.devices()'``, which the baseline timed at
1.04-1.19 s on its machine.

The official figures were measured on one VM of this kind, and these VMs
differ (AVX2 or AVX-512, and speed). ``--reference CMD`` times a reference
implementation on this machine, in the same run, one process per photo as the
baseline did: ``CMD`` is a command template with the fields ``{weights}``
(the ``cd_wct16x`` folder), ``{content}``, ``{style}``, ``{content_size}``,
``{style_size}`` (0: no resize) and ``{output}``. Each reference run
alternates with a cdft run of the same workload, and the table gains the
ratio against it. For example, with a checkout of the official code and a
driver of your own beside it (not part of cdft):

  python launch/bench_cli.py --reference \
    "/path/to/torch-venv/bin/python /path/to/driver.py {weights} {content} {style} {content_size} {style_size} {output}"

  python launch/bench_cli.py --weights-dir ../shared/weights --out benchmarks/cli_cpu.json
"""
import argparse
import json
import os
import pathlib
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
EIGHT = ("adain_avril.jpg", "adain_blonde_girl.jpg", "adain_brad_pitt.jpg", "adain_flowers.jpg",
         "adain_newyork.jpg", "artflow_atlanta.jpg", "artflow_kitten_440379.jpg",
         "ust_tubingen.jpg")
STYLE = "style/adain_la_muse.jpg"
UHD = "uhd/cd_green_park_wallpaper_3840x2160.jpg"
IMPORT_CMD = "import jax, flax.linen, cdft.stylize.cli; jax.devices()"


def _measure(cmd, env, cwd=None):
  """Runs ``cmd`` in a helper process so that the peak RSS is that command's alone."""
  helper = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "w = time.perf_counter() - t; "
            "print(json.dumps({'rc': p.returncode, 'wall': w, 'out': p.stdout, 'err': p.stderr, "
            "'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
  proc = subprocess.run([sys.executable, "-c", helper] + cmd, env=env, capture_output=True,
                        text=True, check=True, cwd=cwd)
  res = json.loads(proc.stdout)
  if res["rc"]:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{res['out']}\n{res['err']}")
  return res["wall"], res["rss"], res["out"]


def _stylize_cmd(content, style, output, args, content_size=None, style_size=None):
  if args.tree is not None:  # another checkout of cdft (--calibrate)
    cli = [sys.executable, "-m", "cdft.stylize.cli"]
  else:
    cli = [shutil.which("cdft-stylize") or "cdft-stylize"]
  cmd = cli + ["--content", str(content),
         "--style", str(style), "--output", str(output), "--weights-dir", str(args.weights_dir)]
  if content_size:
    cmd += ["--content-size", str(content_size)]
  if style_size:
    cmd += ["--style-size", str(style_size)]
  if os.path.isdir(content):
    cmd += ["--format", "png"]
  return cmd


def _inputs(work, images):
  """The 8-photo folder, the 2048^2 crop and the 1024^2 style, written into ``work``."""
  from PIL import Image
  eight = work / "eight"
  eight.mkdir()
  for name in EIGHT:
    (eight / name).symlink_to(images / "content" / name)
  uhd = Image.open(images / UHD).convert("RGB")
  crop = uhd.crop((840, 56, 3000, 2216)).resize((2048, 2048), Image.BICUBIC)
  crop.save(work / "content_2048.png")
  Image.open(images / STYLE).convert("RGB").resize((1024, 1024), Image.BICUBIC).save(
      work / "style_1024.png")
  return eight, work / "content_2048.png", work / "style_1024.png"


def _median_row(runs):
  walls = [r[0] for r in runs]
  return {"runs_s": [round(w, 2) for w in walls], "median_s": round(statistics.median(walls), 2),
          "peak_rss_mib": round(max(r[1] for r in runs))}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--weights-dir", type=pathlib.Path, default=SHARED / "weights")
  p.add_argument("--images", type=pathlib.Path, default=SHARED / "images")
  p.add_argument("--baseline", type=pathlib.Path,
                 default=SHARED / "baselines" / "cli_official_cpu.json")
  p.add_argument("--official", type=pathlib.Path,
                 default=SHARED / "baselines" / "cd_official_cpu.json",
                 help="the in-process official figures (UHD: no whole-process figure exists)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--workloads", default="import,eight,one_512,one_2048,one_uhd")
  p.add_argument("--out", type=pathlib.Path, default=None)
  p.add_argument("--calibrate", type=pathlib.Path, default=None, metavar="TREE",
                 help="run the workloads with the cdft of another checkout TREE (e.g. 5250f36, "
                      "which the baseline measured on its machine): this machine's speed "
                      "against the baseline's")
  p.add_argument("--calibration", type=pathlib.Path, default=None,
                 help="JSON of a --calibrate run on this machine: adds the ratio transferred to "
                      "the baseline's machine (this run / 5250f36 here x 5250f36 there / official)")
  p.add_argument("--reference", default=None, metavar="CMD",
                 help="command template of a reference implementation, timed on this machine "
                      "one process per photo beside each cdft run (see the module docstring)")
  args = p.parse_args()
  args.tree = None if args.calibrate is None else args.calibrate.resolve()
  args.weights_dir, args.images = args.weights_dir.resolve(), args.images.resolve()
  chosen = args.workloads.split(",")
  base = json.loads(args.baseline.read_text()) if args.baseline.exists() else {}
  work = pathlib.Path(tempfile.mkdtemp(prefix="cdft_bench_cli_"))
  env = dict(os.environ)
  env.pop("CDFT_NO_COMPILE_CACHE", None)
  if args.tree is not None:
    env["PYTHONPATH"] = str(args.tree)
  results = {}
  try:
    eight, content_2048, style_1024 = _inputs(work, args.images)
    style = args.images / STYLE

    def run(cmd, cache):
      # From the other checkout's folder, so that its cdft is the one imported.
      return _measure(cmd, dict(env, CDFT_CACHE_DIR=str(cache)), cwd=args.tree)

    reference = {}

    def run_reference(name, photos, style_path, content_size, style_size):
      """One reference process per photo, as the baseline; returns (total wall, max RSS)."""
      if args.reference is None:
        return
      total, rss = 0.0, 0.0
      out = work / "ref_out"
      out.mkdir(exist_ok=True)
      for photo in photos:
        cmd = shlex.split(args.reference.format(
            weights=args.weights_dir / "cd_wct16x", content=photo, style=style_path,
            content_size=content_size or 0, style_size=style_size or 0,
            output=out / (pathlib.Path(photo).stem + ".png")))
        wall, peak, _ = _measure(cmd, dict(os.environ))
        total, rss = total + wall, max(rss, peak)
      reference.setdefault(name, []).append((total, rss))
      print(f"  reference {name}: {total:.2f}s", flush=True)

    if "import" in chosen:
      results["import"] = _median_row([run([sys.executable, "-c", IMPORT_CMD], work / "c0")
                                       for _ in range(args.repeats)])
      print(f"import jax+flax+cli: {results['import']}", flush=True)
    if "eight" in chosen:
      cold, warm = [], []
      for i in range(args.repeats):
        cache = work / f"cache_eight{i}"  # empty: weights converted, everything compiled
        cmd = _stylize_cmd(eight, style, work / f"out_eight{i}", args, 512, 512)
        cold.append(run(cmd, cache))
        warm.append(run(cmd, cache))
        run_reference("eight", sorted(eight.iterdir()), style, 512, 512)
        print(f"8 photos, run {i}: cold {cold[-1][0]:.2f}s, warm {warm[-1][0]:.2f}s", flush=True)
      results["eight_cold"], results["eight_warm"] = _median_row(cold), _median_row(warm)
    if "one_512" in chosen:
      cache = work / "cache_512"
      photo = args.images / "content" / "adain_brad_pitt.jpg"
      cmd = _stylize_cmd(photo, style, work / "out_512.png", args, 512, 512)
      first = run(cmd, cache)
      second = []
      for _ in range(args.repeats):
        second.append(run(cmd, cache))
        run_reference("one_512", [photo], style, 512, 512)
      results["one_512_first"] = _median_row([first])
      results["one_512_second"] = _median_row(second)
      print(f"one 512x512: first {first[0]:.2f}s, second {results['one_512_second']}", flush=True)
    if "warmup" in chosen:  # `cdft-stylize --warmup` once, then the 8-photo folder (first run)
      warmup_s, after = [], []
      for i in range(args.repeats):
        cache = work / f"cache_warmup{i}"
        folder_cmd = _stylize_cmd(eight, style, work / f"out_warm{i}", args, 512, 512)
        program = folder_cmd[:folder_cmd.index("--content")]
        warmup_s.append(run(program + ["--warmup", "--weights-dir", str(args.weights_dir),
                                       "--content-size", "512", "--style-size", "512"], cache))
        after.append(run(folder_cmd, cache))
        print(f"--warmup {warmup_s[-1][0]:.2f}s, then 8 photos {after[-1][0]:.2f}s", flush=True)
      results["warmup"], results["eight_after_warmup"] = _median_row(warmup_s), _median_row(after)
    for name, content in (("one_2048", content_2048), ("one_uhd", args.images / UHD)):
      if name not in chosen:
        continue
      cache = work / f"cache_{name}"
      cmd = _stylize_cmd(content, style_1024, work / f"out_{name}.png", args)
      first = run(cmd, cache)
      warm = []
      for _ in range(args.repeats):
        warm.append(run(cmd, cache))
        run_reference(name, [content], style_1024, None, None)
      results[name + "_first"] = _median_row([first])
      results[name] = _median_row(warm)
      print(f"{name}: first {first[0]:.2f}s, then {results[name]}", flush=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)

  official = base.get("workloads", {})
  in_process = json.loads(args.official.read_text()) if args.official.exists() else {}
  uhd = in_process.get("configs", {}).get("uhd", {})
  ref = {
      "eight_cold": official.get("eight_photos_eight_shapes", {}).get("official_total_s"),
      "eight_warm": official.get("eight_photos_eight_shapes", {}).get("official_total_s"),
      "eight_after_warmup": official.get("eight_photos_eight_shapes", {}).get("official_total_s"),
      "one_512_second": official.get("one_photo_512", {}).get("official_second_process_s"),
      "one_2048": official.get("one_photo_2048", {}).get("official_process_median_s"),
      "import": 1.115,  # the middle of the baseline's 1.04-1.19 s
      # In-process cascade of the official code (AVX2 machine), the only UHD figure:
      # a whole process would take longer (import, loading).
      "one_uhd": uhd.get("median_s"),
  }
  ref_rss = {
      "one_2048": official.get("one_photo_2048", {}).get("official_peak_rss_mib"),
      "one_uhd": uhd.get("peak_rss_kb", 0) / 1024 or None,
  }
  # cdft at 5250f36 on the baseline's machine (the same workloads).
  eight = official.get("eight_photos_eight_shapes", {})
  old_there = {"eight_cold": eight.get("cdft_at_5250f36_empty_cache_s"),
               "eight_warm": eight.get("cdft_at_5250f36_warm_cache_s"),
               "one_512_second": official.get("one_photo_512", {}).get(
                   "cdft_at_5250f36_second_process_s"),
               "one_2048": official.get("one_photo_2048", {}).get(
                   "cdft_at_5250f36_process_median_s"),
               "import": ref["import"]}
  old_here = {}
  if args.calibration is not None:
    old_here = {k: v["median_s"] for k, v in
                json.loads(args.calibration.read_text())["results"].items()}
  print("\n| workload | cdft median (s) | cdft peak RSS (MiB) | official (s) | time ratio "
        "| official RSS (MiB) | RSS ratio | 5250f36 here / there (s) | ratio transferred |")
  print("|---|---|---|---|---|---|---|---|---|")
  transferred = {}
  for name, row in results.items():
    r, m = ref.get(name), ref_rss.get(name)
    ratio = f"{row['median_s'] / r:.2f}x" if r else "-"
    mratio = f"{row['peak_rss_mib'] / m:.2f}x" if m else "-"
    here, there = old_here.get(name), old_there.get(name)
    cal = "-"
    if here and there and r:
      transferred[name] = row["median_s"] / here * there / r
      cal = f"{transferred[name]:.2f}x"
    print(f"| {name} | {row['median_s']} ({', '.join(map(str, row['runs_s']))}) | "
          f"{row['peak_rss_mib']} | {r if r else '-'} | {ratio} | {round(m) if m else '-'} | "
          f"{mratio} | {here or '-'} / {there or '-'} | {cal} |")
  here = {name: _median_row(rows) for name, rows in reference.items()}
  versus = {"eight_cold": "eight", "eight_warm": "eight", "eight_after_warmup": "eight",
            "one_512_second": "one_512", "one_2048": "one_2048", "one_uhd": "one_uhd"}
  ratio_here = {}
  if here:
    print("\n| workload | cdft median (s) | reference on this machine (s) | cdft / reference "
          "| cdft / reference, peak RSS |")
    print("|---|---|---|---|---|")
    for name, row in results.items():
      ref_row = here.get(versus.get(name))
      if ref_row is None:
        continue
      ratio_here[name] = {"time": round(row["median_s"] / ref_row["median_s"], 3),
                          "peak_rss": round(row["peak_rss_mib"] / ref_row["peak_rss_mib"], 3)}
      print(f"| {name} | {row['median_s']} | {ref_row['median_s']} "
            f"({', '.join(map(str, ref_row['runs_s']))}) | {ratio_here[name]['time']:.2f}x | "
            f"{ratio_here[name]['peak_rss']:.2f}x |")
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "what": "whole cdft-stylize processes (launch/bench_cli.py)",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, "
                   f"avx512f={'avx512f' in pathlib.Path('/proc/cpuinfo').read_text()}",
        "repeats": args.repeats, "results": results, "official_s": ref,
        "official_peak_rss_mib": ref_rss, "cdft_5250f36_baseline_machine_s": old_there,
        "cdft_5250f36_this_machine_s": old_here, "ratio_transferred": transferred,
        "tree": None if args.tree is None else str(args.tree),
        "reference_cmd": args.reference, "reference_this_machine": here,
        "ratio_to_reference_this_machine": ratio_here,
        "measured": time.strftime("%Y-%m-%d %H:%M"),
    }, indent=1) + "\n")


if __name__ == "__main__":
  main()
