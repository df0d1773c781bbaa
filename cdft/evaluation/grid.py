"""The content x style grid evaluator: stylize every pair with every model, score, report.

For each model and each (content, style) pair the evaluator stylizes the content,
clamps the result to [0, 1] (the image as saved), and computes with a teacher VGG
(:mod:`cdft.evaluation.metrics`):

* the style distances D_1..D_k (Eq. 7) of the stylized image against the style,
* the content loss (MSE of relu4_1 by default) against the content,
* the SSIM of the stylized image against the content.

Written to ``out_dir``:

* ``<model>/<content>__<style>.png``: every stylized image;
* ``results.json``: the settings, one row per pair and the mean per model;
* ``results.md``: the same as markdown tables (mean per model, then per pair);
* ``contact_<model>.png``: one contact sheet per model. Row 0 holds the style
  thumbnails, column 0 the content thumbnails, cell (i, j) the stylization of
  content i with style j; the top-left cell is blank. One sheet per model keeps
  each sheet readable for large grids; compare models by opening their sheets
  side by side.

Inputs are resized so their shorter side is ``content_size`` / ``style_size``
(bilinear, as ``torchvision.transforms.Resize``), and optionally center-cropped
to a square (one shape for all images: one compilation instead of one per
aspect ratio).
"""
import dataclasses
import functools
import json
import math
import pathlib
import re
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cdft.errors import CdftError
from cdft.evaluation import metrics
from cdft.io import files
from cdft.io import images as image_io
from cdft.stylize import cascade

__all__ = ["Teacher", "as_stylize_fn", "load_input", "contact_sheet", "evaluate",
           "to_markdown"]

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclasses.dataclass(frozen=True)
class Teacher:
  """The VGG whose features score the stylizations.

  Attributes:
    encoder: a ``vgg.Encoder``; its stage k sets the layers relu1_1..relu{k}_1.
    params: its ``{'params': ...}``.
    description: where it came from (written into the report).
  """
  encoder: Any
  params: Any
  description: str = "teacher"

  @property
  def layers(self):
    return metrics.LAYER_NAMES[:self.encoder.stage]


def as_stylize_fn(model, levels=cascade.DEFAULT_LEVELS, alpha=1.0, method="wct"):
  """A ``f(content (H, W, 3), style (h, w, 3)) -> (H', W', 3)`` function for a model.

  Args:
    model: a callable of that signature (used as is), a
      :class:`cdft.stylize.cascade.Stylizer`, or a mapping ``{level:
      LevelModel}`` (wrapped in a Stylizer).
    levels: the cascade's levels, in order (for Stylizer models); levels the
      model does not have are skipped.
    alpha: style strength (for Stylizer models).
    method: the feature transform of a ``{level: LevelModel}`` model.
  """
  if isinstance(model, Mapping):
    model = cascade.Stylizer(model, method=method)
  if isinstance(model, cascade.Stylizer):
    run = tuple(k for k in levels if k in model.levels)
    if not run:
      raise CdftError(f"none of the levels {tuple(levels)} is loaded "
                      f"(the model has {sorted(model.levels)})")
    return lambda content, style: model.stylize(content, style, alpha=alpha, levels=run)
  if callable(model):
    return model
  raise CdftError(f"a model must be a callable, a Stylizer or {{level: LevelModel}}, "
                  f"got {type(model).__name__}")


def load_input(path, size, square=False):
  """An evaluation input: shorter side ``size`` (bilinear), optionally center-cropped square."""
  image = image_io.load_image(path, shorter_side=size, min_side=16)
  if square:
    h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    image = np.ascontiguousarray(image[top:top + size, left:left + size])
  return image


def _paths(source, what):
  if isinstance(source, (str, pathlib.Path)):
    path = pathlib.Path(source)
    return image_io.list_images(path) if path.is_dir() else [path]
  paths = [pathlib.Path(p) for p in source]
  if not paths:
    raise CdftError(f"no {what} images")
  return paths


def _names(paths):
  """Display names (file names) and file-name stems, unique within the list."""
  stems = [p.stem for p in paths]
  out = []
  for p, stem in zip(paths, stems):
    if stems.count(stem) > 1:
      stem = p.name
    out.append(_SAFE.sub("_", stem))
  if len(set(out)) != len(out):
    raise CdftError(f"image names are not unique: {[p.name for p in paths]}")
  return [p.name for p in paths], out


def _safe_name(name):
  safe = _SAFE.sub("_", name).strip("._")
  if not safe:
    raise CdftError(f"model name {name!r} has no usable characters for a file name")
  return safe


def _fit(image, side):
  """An (H, W, 3) float image resized to fit a side x side box, as uint8."""
  data = np.floor(np.clip(np.nan_to_num(np.asarray(image, np.float32)), 0, 1) * 255 + 0.5)
  pil = Image.fromarray(data.astype(np.uint8), mode="RGB")
  scale = side / max(pil.size)
  size = (max(1, round(pil.size[0] * scale)), max(1, round(pil.size[1] * scale)))
  return np.asarray(pil.resize(size, Image.BICUBIC))


def contact_sheet(contents, styles, stylized, thumb=128, gutter=4):
  """A (1 + rows) x (1 + columns) grid of thumbnails on white.

  Args:
    contents: the R content images (H, W, 3) in [0, 1] (column 0).
    styles: the C style images (row 0).
    stylized: ``{(i, j): image}`` for content i and style j; missing cells stay
      white.
    thumb: cell size in px (each image is scaled to fit, centered).
    gutter: white space between cells and around the sheet, px.

  Returns:
    uint8 (H, W, 3) sheet of ``(1 + R) * (thumb + gutter) + gutter`` rows and
    ``(1 + C) * (thumb + gutter) + gutter`` columns.
  """
  rows, cols = len(contents) + 1, len(styles) + 1
  sheet = np.full((rows * (thumb + gutter) + gutter, cols * (thumb + gutter) + gutter, 3),
                  255, np.uint8)

  def put(r, c, image):
    small = _fit(image, thumb)
    h, w = small.shape[:2]
    top = gutter + r * (thumb + gutter) + (thumb - h) // 2
    left = gutter + c * (thumb + gutter) + (thumb - w) // 2
    sheet[top:top + h, left:left + w] = small

  for j, style in enumerate(styles):
    put(0, j + 1, style)
  for i, content in enumerate(contents):
    put(i + 1, 0, content)
  for (i, j), image in stylized.items():
    put(i + 1, j + 1, image)
  return sheet


@functools.lru_cache(maxsize=None)
def _metrics_program(encoder, content_layer, method="wct", alpha=1.0):
  if method == "adain":
    return jax.jit(functools.partial(metrics.adain_pair_metrics, encoder, alpha=alpha))
  return jax.jit(functools.partial(metrics.pair_metrics, encoder, content_layer=content_layer))


def _finite_or_none(x):
  x = float(x)
  return x if math.isfinite(x) else None


def _mean(values):
  vals = [v for v in values if v is not None]
  return float(np.mean(vals)) if len(vals) == len(values) and vals else None


def _fmt(x):
  return "n/a" if x is None else f"{x:.4g}"


def to_markdown(report):
  """The report (the dict of ``results.json``) as markdown tables."""
  layers = report["layers"]
  crops = ", square crops" if report["square"] else ""
  if report.get("method") == "adain":
    content = "content relu4_1"
    what = ("AdaIN's losses (pytorch-AdaIN): style S_k = MSE of the channel means + MSE of the "
            f"channel stds at {layers[0]}..{layers[-1]}; content = MSE of relu4_1 against "
            "AdaIN's target t (lower is better)")
    head = [f"S {name}" for name in layers] + [content, "SSIM"]
  else:
    content = f"content MSE {report['content_layer']}"
    what = (f"D_k = ‖G(stylized) − G(style)‖_F with G = F Fᵀ / (C·H·W) at "
            f"{layers[0]}..{layers[-1]} (lower is better); content MSE lower is better")
    head = [f"D {name}" for name in layers] + [content, "SSIM"]
  lines = [
      "# Style evaluation",
      "",
      f"Teacher: {report['teacher']}. Content {report['content_size']} px, style "
      f"{report['style_size']} px (shorter side{crops}). {what}; SSIM (stylized vs content) "
      "higher keeps more structure. Seconds include compilation on first use.",
      "",
      "## Mean per model",
      "",
  ]
  lines.append("| model | pairs | " + " | ".join(head) + " | s/pair |")
  lines.append("|---" * (len(head) + 3) + "|")
  for model, row in report["mean"].items():
    cells = [_fmt(row["style_distance"][n]) for n in layers]
    cells += [_fmt(row["content_loss"]), _fmt(row["ssim"])]
    lines.append(f"| {model} | {row['pairs']} | " + " | ".join(cells)
                 + f" | {row['seconds']:.2f} |")
  lines += ["", "## Per pair", ""]
  lines.append("| model | content | style | " + " | ".join(head) + " | s |")
  lines.append("|---" * (len(head) + 4) + "|")
  for row in report["pairs"]:
    cells = [_fmt(row["style_distance"][n]) for n in layers]
    cells += [_fmt(row["content_loss"]), _fmt(row["ssim"])]
    lines.append(f"| {row['model']} | {row['content']} | {row['style']} | "
                 + " | ".join(cells) + f" | {row['seconds']:.2f} |")
  return "\n".join(lines) + "\n"


def evaluate(models, contents, styles, teacher, out_dir, content_size=256, style_size=256,
             square=False, content_layer=4, levels=cascade.DEFAULT_LEVELS, alpha=1.0,
             thumb=128, log: Callable[[str], None] = print, method="wct"):
  """Evaluates models over a content x style grid and writes the report.

  Args:
    models: ``{name: model}``, each model as :func:`as_stylize_fn` accepts
      (a callable, a Stylizer or ``{level: LevelModel}``).
    contents: a folder of content images, or a sequence of image files.
    styles: a folder of style images, or a sequence of image files.
    teacher: the :class:`Teacher` scoring the results.
    out_dir: where the report is written (created).
    content_size, style_size: shorter sides of the inputs, px.
    square: center-crop the inputs to squares.
    content_layer: relu{l}_1 of the content loss.
    levels, alpha: cascade settings of Stylizer models.
    thumb: contact-sheet cell size, px.
    log: progress lines (one per pair); ``None`` for silence.
    method: ``'wct'`` (Gram distances D_1..D_k, content MSE at ``content_layer``)
      or ``'adain'`` (AdaIN's style and content losses,
      :func:`cdft.evaluation.metrics.adain_pair_metrics`; models run AdaIN).

  Returns:
    The report dict (also written as ``results.json``), with the written
    files under ``files``.

  Raises:
    CdftError: bad inputs (``ImageError`` for unreadable images).
  """
  if not models:
    raise CdftError("no models to evaluate")
  log = log or (lambda _: None)
  out_dir = pathlib.Path(out_dir)
  content_paths, style_paths = _paths(contents, "content"), _paths(styles, "style")
  content_names, content_stems = _names(content_paths)
  style_names, style_stems = _names(style_paths)
  safe = {name: _safe_name(name) for name in models}
  if len(set(safe.values())) != len(safe):
    raise CdftError(f"model names clash as file names: {sorted(models)}")
  content_images = [load_input(p, content_size, square) for p in content_paths]
  style_images = [load_input(p, style_size, square) for p in style_paths]
  program = _metrics_program(teacher.encoder, content_layer, method, alpha)
  layers = teacher.layers[:4] if method == "adain" else teacher.layers
  if method == "adain":
    levels, content_layer = (4,), 4

  pairs, sheets = [], {}
  total = len(models) * len(content_paths) * len(style_paths)
  done = 0
  for name, model in models.items():
    stylize = as_stylize_fn(model, levels, alpha, method)
    cells = {}
    for j, style in enumerate(style_images):  # styles outer, as cdft-stylize
      for i, content in enumerate(content_images):
        t0 = time.perf_counter()
        out = np.asarray(stylize(content, style), np.float32)
        seconds = time.perf_counter() - t0
        if out.ndim != 3 or out.shape[-1] != 3:
          raise CdftError(f"model {name!r} returned shape {out.shape}, expected (H, W, 3)")
        out = np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0)
        values = jax.device_get(program(teacher.params, jnp.asarray(out)[None],
                                        jnp.asarray(content)[None], jnp.asarray(style)[None]))
        rel = f"{safe[name]}/{content_stems[i]}__{style_stems[j]}.png"
        image_io.save_image(out_dir / rel, out)
        cells[(i, j)] = out
        row = {
            "model": name, "content": content_names[i], "style": style_names[j],
            "image": rel,
            "style_distance": {n: _finite_or_none(v)
                               for n, v in zip(layers, values["style_distance"][0])},
            "content_loss": _finite_or_none(values["content_loss"][0]),
            "ssim": _finite_or_none(values["ssim"][0]),
            "seconds": seconds,
        }
        pairs.append(row)
        done += 1
        dist = ", ".join(_fmt(row["style_distance"][n]) for n in layers)
        log(f"[{done}/{total}] {name}: {content_names[i]} x {style_names[j]}: "
            f"{'S' if method == 'adain' else 'D'} = {dist}; "
            f"content {_fmt(row['content_loss'])}; SSIM {_fmt(row['ssim'])} ({seconds:.2f} s)")
    sheet = contact_sheet(content_images, style_images, cells, thumb)
    sheets[name] = f"contact_{safe[name]}.png"
    image_io.save_image(out_dir / sheets[name], sheet)

  mean = {}
  for name in models:
    rows = [r for r in pairs if r["model"] == name]
    mean[name] = {
        "pairs": len(rows),
        "style_distance": {n: _mean([r["style_distance"][n] for r in rows]) for n in layers},
        "content_loss": _mean([r["content_loss"] for r in rows]),
        "ssim": _mean([r["ssim"] for r in rows]),
        "seconds": float(np.mean([r["seconds"] for r in rows])),
    }
  report = {
      "teacher": teacher.description,
      "layers": list(layers),
      "method": method,
      "gram": "per image F F^T / (C*H*W)" if method == "wct" else None,
      "content_layer": f"relu{content_layer}_1",
      "content_size": content_size,
      "style_size": style_size,
      "square": bool(square),
      "levels": list(levels),
      "alpha": alpha,
      "contents": [str(p) for p in content_paths],
      "styles": [str(p) for p in style_paths],
      "models": list(models),
      "pairs": pairs,
      "mean": mean,
      "sheets": sheets,
  }
  md = to_markdown(report)
  report["files"] = {"json": "results.json", "markdown": "results.md", "sheets": sheets}
  try:
    with files.atomic_open(out_dir / "results.json") as f:
      f.write(json.dumps(report, indent=1).encode("utf-8"))
    with files.atomic_open(out_dir / "results.md") as f:
      f.write(md.encode("utf-8"))
  except OSError as e:
    raise CdftError(f"{out_dir}: cannot write the report ({e.strerror or e})") from e
  return report
