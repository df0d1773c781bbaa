r"""Are the stylization outputs of this checkout bit-identical to another one's?

For refactors that must not change a pixel: runs the same ``cdft-stylize``
commands with this checkout's cdft and with another checkout's (e.g. a
``git worktree`` of the commit before), each with its own fresh cache, and
compares the written files byte for byte.

  git worktree add /tmp/before HEAD~5
  python launch/compare_outputs.py --other /tmp/before --weights-dir ../shared/weights

The commands cover the whole-image cascade over a folder of 8 photos of 8 shapes
(landscapes and a portrait, 4 shape buckets), exact tiles, and two blended
styles with ``--alpha`` and ``--preserve-color``. Exit status 1 if any file
differs or is missing.
"""
import argparse
import filecmp
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
EIGHT = ("adain_avril.jpg", "adain_blonde_girl.jpg", "adain_brad_pitt.jpg", "adain_flowers.jpg",
         "adain_newyork.jpg", "artflow_atlanta.jpg", "artflow_kitten_440379.jpg",
         "ust_tubingen.jpg")


def _commands(images, out, weights):
  style = images / "style" / "adain_la_muse.jpg"
  common = ["--weights-dir", str(weights)]
  return [
      ["--content", str(out.parent / "eight"), "--style", str(style), "--output", str(out),
       "--content-size", "512", "--style-size", "512", "--format", "png"] + common,
      ["--content", str(images / "content" / "adain_brad_pitt.jpg"), "--style", str(style),
       "--output", str(out / "tiled.png"), "--content-size", "1024", "--style-size", "512",
       "--tile", "256"] + common,
      ["--content", str(images / "content" / "adain_avril.jpg"), "--style", str(style),
       str(images / "style" / "adain_mondrian.jpg"), "--style-weights", "0.7,0.3",
       "--alpha", "0.8", "--preserve-color", "--output", str(out / "blend.png"),
       "--content-size", "384"] + common,
  ]


def _run(tree, work, images, weights):
  out = work / "out"
  out.mkdir(parents=True)
  env = dict(os.environ, CDFT_CACHE_DIR=str(work / "cache"), PYTHONPATH=str(tree))
  env.pop("CDFT_NO_COMPILE_CACHE", None)
  for argv in _commands(images, out, weights):
    proc = subprocess.run([sys.executable, "-m", "cdft.stylize.cli"] + argv, cwd=tree, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
      raise SystemExit(f"{tree}: cdft-stylize {' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--other", type=pathlib.Path, required=True,
                 help="the other checkout (its cdft/ is imported for its run)")
  p.add_argument("--weights-dir", type=pathlib.Path, default=REPO.parent / "shared" / "weights")
  p.add_argument("--images", type=pathlib.Path, default=REPO.parent / "shared" / "images")
  args = p.parse_args()
  args.images = args.images.resolve()
  with tempfile.TemporaryDirectory(prefix="cdft-compare-") as tmp:
    tmp = pathlib.Path(tmp)
    outs = {}
    for label, tree in (("this", REPO), ("other", args.other.resolve())):
      work = tmp / label
      (work / "eight").mkdir(parents=True)
      for name in EIGHT:
        (work / "eight" / name).symlink_to(args.images / "content" / name)
      outs[label] = _run(tree, work, args.images, args.weights_dir.resolve())
    names = sorted({p.name for o in outs.values() for p in o.iterdir()})
    bad = 0
    for name in names:
      a, b = outs["this"] / name, outs["other"] / name
      same = a.exists() and b.exists() and filecmp.cmp(a, b, shallow=False)
      bad += not same
      print(f"{'same     ' if same else 'DIFFERENT'}  {name}")
    print(f"{len(names) - bad} of {len(names)} outputs bit-identical to {args.other}")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
