"""``cdft-stylize``: universal style transfer (WCT coarse to fine, or AdaIN) from the command line.

Examples::

  cdft-stylize --content photo.jpg --style painting.jpg --output out.jpg
  cdft-stylize --content photos/ --style paintings/ --output results/ --alpha 0.8
  cdft-stylize --content photo.jpg --style a.jpg b.jpg --style-weights 0.7,0.3 \\
      --preserve-color --output out.png
  cdft-stylize --method adain --model adain-vgg --content photo.jpg --style painting.jpg \\
      --output out.png
  cdft-stylize --method adain --model runs/adain_small_decoder --content photo.jpg ...
"""
import argparse
import itertools
import os
import pathlib
import sys
import time

from cdft.errors import CdftError, ImageError
from cdft.stylize import cpu_tuning


def _levels(text):
  try:
    levels = tuple(int(t) for t in text.split(",") if t.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"--levels wants comma-separated numbers, got {text!r}")
  if not levels or any(k not in (1, 2, 3, 4, 5) for k in levels):
    raise argparse.ArgumentTypeError(f"--levels wants numbers in 1..5, got {text!r}")
  return levels


def _weights(text):
  try:
    w = [float(t) for t in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--style-weights wants comma-separated numbers, got {text!r}")
  if any(x < 0 for x in w) or sum(w) <= 0:
    raise argparse.ArgumentTypeError("--style-weights must be non-negative and not all zero")
  return w


def _alpha(text):
  a = float(text)
  if not 0.0 <= a <= 1.0:
    raise argparse.ArgumentTypeError(f"--alpha must be in [0, 1], got {text}")
  return a


def _size(text):
  s = int(text)
  if s < 16:
    raise argparse.ArgumentTypeError(f"sizes must be at least 16 px, got {text}")
  return s


def _memory(text):
  from cdft.stylize import tile_plan
  try:
    return tile_plan.parse_bytes(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e))


def _tile(text):
  t = int(text)
  if t < 64 or t % 16:
    raise argparse.ArgumentTypeError(f"--tile must be a multiple of 16 and at least 64, got {text}")
  return t


def build_parser():
  p = argparse.ArgumentParser(
      prog="cdft-stylize",
      description="Universal style transfer with WCT (levels 5->1) and the Collaborative "
                  "Distillation 16x models (or the original VGG-19), or with AdaIN "
                  "(--method adain: pytorch-AdaIN's VGG, or a trained cdft 16x student and "
                  "small decoder).")
  p.add_argument("--method", choices=("wct", "adain"), default="wct",
                 help="wct: the multi-level WCT cascade (default); adain: AdaIN at relu4_1")
  p.add_argument("--content", help="content image, or a folder of them")
  p.add_argument("--style", nargs="+",
                 help="style image(s) (several are blended, see --style-weights), or one folder "
                      "(every content x style pair is stylized)")
  p.add_argument("--output",
                 help="output image (.jpg/.png/.tif), or a folder when inputs are folders")
  p.add_argument("--alpha", type=_alpha, default=1.0, help="style strength in [0, 1] (default 1)")
  p.add_argument("--levels", type=_levels, default=None,
                 help="WCT levels in the order run (default 5,4,3,2,1; not for adain)")
  p.add_argument("--content-size", type=_size, default=None,
                 help="resize the content's shorter side to this (default: original size)")
  p.add_argument("--style-size", type=_size, default=None,
                 help="resize the style's shorter side to this (default: original size)")
  p.add_argument("--model", default=None,
                 help="wct: cd16x, the released 16x students (default), or vgg19, the "
                      "original WCT VGG-19 (needs its .t7 files in --weights-dir); adain: "
                      "adain-vgg, pytorch-AdaIN's VGG and decoder (default; adain/*.pth in "
                      "--weights-dir), or the workdir of a cdft adain_small_decoder run "
                      "(the 16x student and its small decoder)")
  p.add_argument("--weights-dir", default=None,
                 help="local weights folder (default: $CDFT_WEIGHTS_DIR, else download to the cache)")
  p.add_argument("--style-weights", type=_weights, default=None,
                 help="blend weights of several --style images, e.g. 0.7,0.3")
  p.add_argument("--preserve-color", action="store_true",
                 help="keep the content's colours (stylized luminance, content chroma)")
  p.add_argument("--format", default="jpg", choices=("jpg", "png", "tif"),
                 help="file type of outputs written into a folder (default jpg)")
  p.add_argument("--max-memory", type=_memory, default=None,
                 help="memory budget, e.g. 4G: images whose whole-image cascade would not fit "
                      "are stylized exactly in tiles sized to it (default: half the RAM)")
  p.add_argument("--tile", type=_tile, default=None,
                 help="force tiling with this tile size in px (a multiple of 16)")
  p.add_argument("--warmup", action="store_true",
                 help="compile ahead, into the cache, the programs of photos and styles "
                      "resized to --content-size / --style-size (default 512) with aspect "
                      "ratios up to 2.5, then exit: later runs of such images compile nothing "
                      "(no --content/--style/--output needed)")
  p.add_argument("--stats", choices=("exact", "thumbnail"), default="exact",
                 help="content statistics of tiled runs: exact (whole image, default) or from a "
                      "1024-px thumbnail (URST's approximation; implies tiling)")
  return p


def _plan(args):
  """Resolves the inputs into a list of (content_path, [style paths], output_path)."""
  from cdft.io import images

  content = pathlib.Path(args.content)
  styles = [pathlib.Path(s) for s in args.style]
  output = pathlib.Path(args.output)
  for path in [content] + styles:
    if not path.exists():
      raise ImageError(f"{path}: no such file or folder")
  style_dir = len(styles) == 1 and styles[0].is_dir()
  if any(s.is_dir() for s in styles) and not style_dir:
    raise ImageError("give either one style folder or one or more style images")
  if args.style_weights is not None and len(args.style_weights) != len(styles):
    raise ImageError(f"--style-weights has {len(args.style_weights)} values for "
                     f"{len(styles)} style images")
  if content.is_dir() or style_dir:
    if output.exists() and not output.is_dir():
      raise ImageError(f"{output}: with folder inputs --output must be a folder")
    contents = images.list_images(content) if content.is_dir() else [content]
    style_sets = [[s] for s in images.list_images(styles[0])] if style_dir else [styles]
    plan = []
    for ss, c in itertools.product(style_sets, contents):  # styles outer: loaded once
      name = f"{c.stem}_stylized_{'+'.join(s.stem for s in ss)}.{args.format}"
      plan.append((c, ss, output / name))
    return plan
  if output.is_dir():
    raise ImageError(f"{output}: is a folder; give an output file name for one content image")
  return [(content, styles, output)]


def _resolve_method(args):
  """Fills in ``args.model`` / ``args.levels`` for ``args.method``; bad combinations fail here."""
  from cdft.weights import pretrained
  if args.method == "adain":
    if args.levels not in (None, (pretrained.ADAIN_STAGE,)):
      raise CdftError("--levels is for --method wct (AdaIN works at relu4_1 alone)")
    args.model = args.model or pretrained.ADAIN_MODELS[0]
    args.levels = (pretrained.ADAIN_STAGE,)
    return
  args.model = args.model or "cd16x"
  args.levels = args.levels or (5, 4, 3, 2, 1)
  if args.model not in pretrained.MODELS:
    raise CdftError(f"--model {args.model!r} is not a WCT model (choose from "
                    f"{', '.join(pretrained.MODELS)}; AdaIN models need --method adain)")


def _what(method, levels):
  return "AdaIN" if method == "adain" else "levels " + ",".join(map(str, levels))


def _stylizer(args):
  """The :class:`~cdft.stylize.cascade.Stylizer` of ``args.method`` and ``args.model``."""
  from cdft.stylize import cascade
  from cdft.weights import pretrained
  if args.method == "adain":
    return cascade.Stylizer(pretrained.load_adain(args.model, args.weights_dir), method="adain")
  return cascade.Stylizer(pretrained.load_levels(args.model, args.levels, args.weights_dir))


def run(args, out=None):
  """Stylizes every planned pair, printing progress to ``out`` (stdout); returns the paths."""
  out = out or sys.stdout
  from cdft.stylize import programs
  programs.enable_compile_cache()  # before anything compiles
  from cdft.io import images
  from cdft.stylize import tile_plan, tiled

  _resolve_method(args)
  plan = _plan(args)
  budget = args.max_memory or tile_plan.default_memory_budget()
  t0 = time.perf_counter()
  stylizer = _stylizer(args)
  net_width = tile_plan.full_resolution_width(stylizer.levels)  # for the memory estimates
  print(f"loaded {args.model} {_what(args.method, sorted(stylizer.levels))} in "
        f"{time.perf_counter() - t0:.2f}s", file=out, flush=True)
  loaded_styles, styles, style_stats = None, None, None
  written = []

  def whole_image(h, w):
    return not (args.tile or args.stats != "exact" or
                tile_plan.whole_image_bytes(h, w, net_width) > budget)

  def compile_ahead(index):
    """Starts compiling for the content after this one while this one runs."""
    if index < len(plan):
      size = images.probe_size(plan[index][0], args.content_size)
      if size is not None and whole_image(*size):
        stylizer.warm_up((1,) + size + (3,), args.levels)

  for i, (content_path, style_paths, output_path) in enumerate(plan, 1):
    start = time.perf_counter()
    content = images.load_image(content_path, args.content_size, keep_uint8=True)
    if style_paths != loaded_styles:
      styles = [images.load_image(s, args.style_size) for s in style_paths]
      loaded_styles, style_stats = style_paths, None
    h, w = content.shape[:2]
    print(f"[{i}/{len(plan)}] {content_path.name} ({w}x{h}) + "
          f"{' + '.join(p.name for p in style_paths)}", file=out, flush=True)

    def report(level, seconds):
      print(f"    level {level}: {seconds:.2f}s", file=out, flush=True)

    if not whole_image(h, w):
      try:
        runner = tiled.TiledStylizer(stylizer, tile=args.tile, max_memory=budget,
                                     stats_mode=args.stats)
      except ValueError as e:  # a budget too small for any tile
        raise CdftError(str(e)) from None
      print(f"    tiled ({args.stats} statistics), {runner.describe(h, w, args.levels)}",
            file=out, flush=True)
      try:
        result = runner.stylize(content, styles, args.alpha, args.levels, args.style_weights,
                                callback=report, progress=_tile_progress(out)).to_uint8()
      except ValueError as e:  # an image the tiles cannot take (ceil pooling)
        raise CdftError(f"{content_path}: {e}") from None
    else:
      content = images.as_float(content)
      stylizer.warm_up((1, h, w, 3), args.levels)  # compiles meanwhile
      if style_stats is None:  # once per style set, for every content
        style_stats = stylizer.style_stats(styles, args.levels, args.style_weights)
      compile_ahead(i)
      result = stylizer.stylize(content, style_stats, args.alpha, args.levels, callback=report)
    if args.preserve_color:
      result = _preserve_color_bands(content, result)
    images.save_image(output_path, result)
    written.append(output_path)
    oh, ow = result.shape[:2]
    print(f"    wrote {output_path} ({ow}x{oh}) in {time.perf_counter() - start:.2f}s",
          file=out, flush=True)
  return written


def _preserve_color_bands(content, result, rows=512):
  """Content chroma + stylized luminance, a band of rows at a time (uint8 or float)."""
  import numpy as np
  from cdft.io import images
  from cdft.stylize import cascade
  out = np.empty(result.shape, np.float32)
  for r0 in range(0, result.shape[0], rows):
    out[r0:r0 + rows] = cascade.preserve_color(
        images.as_float(content[r0:r0 + rows, :result.shape[1]]),
        images.as_float(result[r0:r0 + rows]))
  return out


def _tile_progress(out, every_s=2.0):
  """A progress callback printing the tile count of a level at most every few seconds."""
  last = [0.0]

  def progress(level, stage, done, total):
    now = time.perf_counter()
    if done == total or now - last[0] >= every_s:
      last[0] = now
      print(f"      level {level} {stage}: tile {done}/{total}", file=out, flush=True)

  return progress


def warmup(args, out=None):
  """Compiles the common buckets' programs into the cache (``--warmup``); returns their count."""
  out = out or sys.stdout
  from cdft.stylize import programs
  if programs.enable_compile_cache() is None:
    raise CdftError("--warmup fills the compile cache, which CDFT_NO_COMPILE_CACHE=1 turns off")
  from cdft.stylize import cascade
  _resolve_method(args)
  start = time.perf_counter()
  stylizer = _stylizer(args)
  side, style_side = args.content_size or 512, args.style_size or 512
  futures = []
  for shape in cascade.common_buckets(side, args.levels):
    futures += stylizer.warm_up(shape, args.levels)
  for shape in cascade.common_buckets(style_side, args.levels):
    futures += stylizer.warm_up_style(shape, args.levels)
  futures = list({id(f): f for f in futures}.values())
  print(f"compiling {len(futures)} programs for {side}-px photos and {style_side}-px styles "
        f"({args.model}, {_what(args.method, args.levels)})", file=out, flush=True)
  for done, future in enumerate(futures, 1):
    future.result()
    if done % 6 == 0 or done == len(futures):
      print(f"  {done}/{len(futures)} programs, {time.perf_counter() - start:.1f}s",
            file=out, flush=True)
  print(f"cache ready in {programs.cache_root()}", file=out, flush=True)
  return len(futures)


def main(argv=None):
  parser = build_parser()
  args = parser.parse_args(argv)
  if not args.warmup and not (args.content and args.style and args.output):
    parser.error("--content, --style and --output are required (or give --warmup)")
  cpu_tuning.tune_xla_cpu()  # before jax starts its backend
  try:
    if args.warmup:
      warmup(args)
    else:
      run(args)
  except CdftError as e:
    print(f"cdft-stylize: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("cdft-stylize: interrupted", file=sys.stderr)
    return 130
  return 0


def entry():
  """The ``cdft-stylize`` command: :func:`main`, then a prompt exit.

  Once every output is written (and every compiled program stored), a
  successful process leaves without tearing the interpreter down: freeing the
  JAX runtime, its loaded programs and the modules took 0.4-0.5 s, a fifth of
  a 512x512 photo's whole process. Failures exit normally.
  """
  code = main()
  if code == 0:
    from cdft.stylize import programs  # pylint: disable=import-outside-toplevel
    programs.wait_all()  # nothing left half-written (in practice all are done)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # pylint: disable=protected-access
  sys.exit(code)


if __name__ == "__main__":
  entry()
