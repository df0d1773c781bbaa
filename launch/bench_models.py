"""The stylizers the benchmarks time, by name (shared by launch/bench_*.py).

* ``cd16x``: the released 16x WCT students (levels 5..1), from ``weights_dir``;
* ``adain-16x`` / ``adain-vgg``: AdaIN with the 16x student + small decoder
  (widths 16/32/64/128, floor pooling) or pytorch-AdaIN's VGG + decoder
  (64..512, ceil pooling). With ``adain-vgg`` and pytorch-AdaIN's files in
  ``<weights_dir>/adain/`` those are used; otherwise (and always for
  ``adain-16x``, which has no released weights) the networks get random
  weights: the time and memory of a network do not depend on its weights.
"""
import os

MODELS = ("cd16x", "adain-16x", "adain-vgg")


def stylizer(name, weights_dir=None):
  """``(Stylizer, levels, description)`` of benchmark model ``name``."""
  from cdft import weights
  from cdft.errors import WeightError
  from cdft.stylize import cascade
  from cdft.weights import pretrained
  if name not in MODELS:
    raise SystemExit(f"unknown benchmark model {name!r}; choose from {', '.join(MODELS)}")
  if name == "cd16x":
    return (cascade.Stylizer(pretrained.load_levels("cd16x", weights_dir=weights_dir)),
            cascade.DEFAULT_LEVELS, "released 16x WCT students")
  preset = "16x" if name == "adain-16x" else "vgg19"
  if preset == "vgg19":
    try:
      level = pretrained.load_adain("adain-vgg", weights_dir or os.environ.get("CDFT_WEIGHTS_DIR"))
      return cascade.Stylizer(level, method="adain"), (4,), "pytorch-AdaIN's released VGG"
    except WeightError:
      pass
  trees = [{"params": weights.resolve("random", kind, stage=4, preset=preset, seed=i)}
           for i, kind in enumerate(("encoder", "decoder"))]
  return (cascade.Stylizer(pretrained.adain_level(preset, *trees), method="adain"), (4,),
          f"AdaIN {preset} architecture, random weights")
