"""Ultra-resolution benchmark: exact tiled WCT vs thumbnail statistics vs whole image.

Runs the 16x cascade (levels 5->1, alpha 1, style resized to 1024x1024) on the
UHD photo of ../shared/images/uhd (3840x2160) and on upscaled copies of it
(10240x4096 and 10000x10000), each mode in its own process so its peak RSS is
its own, at a fixed memory budget. The whole-image mode runs only where its
estimated memory fits the machine. Prints a table and writes JSON with time,
peak RSS, PSNR of the thumbnail result against the exact one, and the seam
ratio (mean |gradient| across tile boundaries / elsewhere) of exact outputs.

  python launch/bench_ultra.py --weights-dir ../shared/weights --max-memory 4G

``--model adain-16x`` (or ``adain-vgg``; see launch/bench_models.py) runs exact
tiled AdaIN instead, e.g. its 100 MP memory:

  python launch/bench_ultra.py --model adain-16x --sizes 100mp --modes exact \
      --out benchmarks/ultra_adain_cpu.json
"""
import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
UHD = "uhd/cd_green_park_wallpaper_3840x2160.jpg"
STYLE = "style/adain_la_muse.jpg"
SIZES = {"uhd": None, "42mp": (10240, 4096), "100mp": (10000, 10000)}  # (W, H)


def _content(args, name):
  """The content as uint8 (H, W, 3): the UHD photo, or an upscaled copy of it."""
  from PIL import Image
  Image.MAX_IMAGE_PIXELS = None
  img = Image.open(args.images / UHD).convert("RGB")
  if SIZES[name] is not None:
    img = img.resize(SIZES[name], Image.BICUBIC)
  return np.asarray(img)


def child(args):
  from cdft.stylize import cpu_tuning
  cpu_tuning.tune_xla_cpu()  # as cdft-stylize
  from PIL import Image
  from cdft.stylize import tile_store, tiled
  import bench_models

  content = _content(args, args.size)
  style = np.asarray(Image.open(args.images / STYLE).convert("RGB").resize((1024, 1024),
                                                                            Image.BICUBIC),
                     np.float32) / 255
  stylizer, order, _ = bench_models.stylizer(args.model, args.weights_dir)
  runs = []
  # Small images run twice so the second (reported) run excludes compilation.
  for _ in range(2 if content.size <= 3 * 16_000_000 else 1):
    if content is None:
      content = _content(args, args.size)
    levels = {}
    t0 = time.perf_counter()
    if args.mode == "whole":
      out = stylizer.stylize(content.astype(np.float32) / 255, style, levels=order,
                             callback=lambda k, s: levels.__setitem__(k, s))
      out = (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)
      tiles = None
    else:
      runner = tiled.TiledStylizer(stylizer, max_memory=args.max_memory, stats_mode=args.mode,
                                   temp_dir=args.tmp)
      tiles = {k: [r, c, nr, nc]
               for k, _, _, r, c, nr, nc in runner.plan(*content.shape[:2], order)}
      store = tile_store.ImageStore.from_array(content, runner.use_disk(*content.shape[:2]), args.tmp)
      if len(runs) == 0:
        content = None  # the image lives in the (disk) store from here on
      out = runner.stylize(store, style, levels=order,
                           callback=lambda k, s: levels.__setitem__(k, s))
      out = out.to_uint8()
    runs.append(time.perf_counter() - t0)
  seconds = runs[-1]
  np.save(args.tmp / f"{args.size}_{args.mode}.npy", out)
  print(json.dumps({"size": args.size, "mode": args.mode, "hw": list(out.shape[:2]),
                    "seconds": seconds, "runs_s": runs, "level_s": levels, "tiles": tiles,
                    "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def _psnr_bands(a, b, rows=1024):
  se, n = 0.0, 0
  for r in range(0, a.shape[0], rows):
    d = a[r:r + rows].astype(np.float64) - b[r:r + rows]
    se += float((d * d).sum())
    n += d.size
  mse = se / n / 255.0 ** 2
  return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def _seams(out, tiles):
  """Seam ratio on a 2048-px square around the first tile corner (tiles are >= 1024 px).

  ``tiles``: level -> (row core, column core, ...), as the child records them.
  """
  from cdft.evaluation import metrics as eval_metrics
  from cdft.stylize import tile_plan
  bounds = [sorted({b for k, cores in tiles.items() for b in tile_plan.tile_boundaries(
      n, cores[axis], tile_plan.level_halo(int(k)), 2 ** (int(k) - 1))})
      for axis, n in enumerate(out.shape[:2])]
  starts = [max(0, min(b[0] - 1024, n - 2048)) if b else 0
            for b, n in zip(bounds, out.shape[:2])]
  crop = out[starts[0]:starts[0] + 2048, starts[1]:starts[1] + 2048].astype(np.float32) / 255
  rows = [b - starts[0] for b in bounds[0] if 0 < b - starts[0] < crop.shape[0]]
  cols = [b - starts[1] for b in bounds[1] if 0 < b - starts[1] < crop.shape[1]]
  return eval_metrics.seam_ratio(crop, rows, cols) if rows or cols else None


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="uhd,42mp,100mp")
  p.add_argument("--modes", default="whole,exact,thumbnail")
  p.add_argument("--max-memory", default="4G")
  p.add_argument("--model", default="cd16x",
                 help="cd16x (WCT), adain-16x or adain-vgg (launch/bench_models.py)")
  p.add_argument("--weights-dir", default=os.environ.get("CDFT_WEIGHTS_DIR"))
  p.add_argument("--images", type=pathlib.Path, default=SHARED / "images")
  p.add_argument("--out", type=pathlib.Path, default=REPO / "benchmarks/ultra_cpu.json")
  p.add_argument("--size", help=argparse.SUPPRESS)
  p.add_argument("--mode", help=argparse.SUPPRESS)
  p.add_argument("--tmp", type=pathlib.Path, help=argparse.SUPPRESS)
  args = p.parse_args()
  from cdft.stylize import tile_plan
  if args.size:
    args.max_memory = tile_plan.parse_bytes(args.max_memory)
    return child(args)

  machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  results = []
  with tempfile.TemporaryDirectory(prefix="cdft-bench-") as tmp:
    for size in args.sizes.split(","):
      w, h = SIZES[size] or (3840, 2160)
      for mode in args.modes.split(","):
        if mode == "whole" and tile_plan.whole_image_bytes(h, w) > 0.6 * machine:
          print(f"skipping {size} {mode}: needs ~{tile_plan.whole_image_bytes(h, w) / 2**30:.0f} GiB",
                file=sys.stderr)
          continue
        print(f"running {size} {mode} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--size", size, "--mode", mode, "--tmp", tmp,
               "--model", args.model,
               "--max-memory", args.max_memory, "--images", str(args.images)]
        if args.weights_dir:
          cmd += ["--weights-dir", str(args.weights_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
          sys.exit(f"{size} {mode} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
      outs = {r["mode"]: np.load(pathlib.Path(tmp) / f"{size}_{r['mode']}.npy", mmap_mode="r")
              for r in results if r["size"] == size}
      for r in results:
        if r["size"] != size:
          continue
        if r["mode"] != "exact" and "exact" in outs:
          r["psnr_vs_exact_db"] = _psnr_bands(outs[r["mode"]], outs["exact"])
        if r["mode"] == "exact":
          r["seam_ratio"] = _seams(outs["exact"], r["tiles"])
      del outs
      for f in pathlib.Path(tmp).glob(f"{size}_*.npy"):
        f.unlink()

  print("| image | megapixels | mode | time (s) | peak RSS (GiB) | tiles (levels 5..1) "
        "| PSNR vs exact (dB) "
        "| seam ratio |")
  print("|" + "---|" * 8)
  for r in results:
    mp = r["hw"][0] * r["hw"][1] / 1e6
    psnr = r.get("psnr_vs_exact_db")
    seam = r.get("seam_ratio")
    grids = " ".join(f"{v[2]}×{v[3]}" for v in r["tiles"].values()) if r["tiles"] else "-"
    print(f"| {r['size']} ({r['hw'][1]}×{r['hw'][0]}) | {mp:.1f} | {r['mode']} | "
          f"{r['seconds']:.1f} | {r['peak_rss_kb'] / 2**20:.2f} | {grids} | "
          f"{'-' if psnr is None else f'{psnr:.1f}'} | {'-' if seam is None else f'{seam:.4f}'} |")
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps({
      "system": ("cdft 16x WCT cascade 5->1" if args.model == "cd16x" else f"cdft {args.model}")
                + " on ultra-resolution images, alpha 1, style 1024x1024",
      "model": args.model,
      "machine": f"{platform.machine()} {os.cpu_count()} cpus, {machine / 2**30:.0f} GiB",
      "max_memory": args.max_memory, "results": results}, indent=1))
  print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
  main()
