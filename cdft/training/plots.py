"""Loss curves of training runs: their ``metrics.jsonl`` as one PNG, and a text summary.

A run's ``metrics.jsonl`` (:class:`cdft.training.metrics.MetricWriter`) has one
JSON object per line: ``step`` and the metrics logged at that step (training
lines: ``loss``, the task's terms, ``grad_norm``, ``learning_rate``, throughput;
evaluation lines: ``eval/...`` keys). A resumed run appends to the same file;
when a step is logged twice (a restart from an earlier checkpoint), its last
line counts.

:func:`plot` draws one panel per metric key (x = step, one line per run, a
legend of the run folder names) with matplotlib when it is importable (the Agg
canvas, no display and no global backend change), else with a PIL line chart.
Both backends give a PNG of :func:`figure_size` pixels.
"""
import dataclasses
import io
import json
import math
import os
import pathlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cdft.errors import CdftError
from cdft.io import files

__all__ = ["Run", "FILE_NAME", "BOOKKEEPING", "BACKENDS", "PANEL_SIZE", "TITLE_HEIGHT", "COLORS",
           "read_run", "read_runs", "metric_keys", "series", "summary", "format_summary",
           "figure_size", "plot"]

FILE_NAME = "metrics.jsonl"
# Logged per line but not curves worth a panel by default (still plottable by --keys).
BOOKKEEPING = ("steps_per_sec", "images_per_sec", "data_skipped")
BACKENDS = ("auto", "matplotlib", "pil")
PANEL_SIZE = (480, 360)  # px per panel
TITLE_HEIGHT = 32  # px above the panels for the figure title
MAX_COLUMNS = 3
# matplotlib's tab10, so both backends colour the runs alike.
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")
_DPI = 100


@dataclasses.dataclass(frozen=True)
class Run:
  """The metrics of one training run.

  Attributes:
    name: the run's label (its folder name, made unique among the runs).
    path: its workdir.
    rows: the metric lines by step (last line of a step wins), sorted by step.
  """
  name: str
  path: pathlib.Path
  rows: tuple


def read_run(workdir, name=None):
  """Reads ``workdir/metrics.jsonl``.

  An unparseable last line without a newline (a run still writing) is skipped.

  Args:
    workdir: a training workdir, or its ``metrics.jsonl`` (any ``.jsonl`` file).
    name: the label (default: the workdir's folder name).

  Returns:
    a :class:`Run`.

  Raises:
    CdftError: no such file, a bad line, or no metric line.
  """
  path = pathlib.Path(workdir)
  if path.suffix != ".jsonl" or path.is_dir():
    path = path / FILE_NAME
  workdir = path.parent
  if not path.is_file():
    raise CdftError(f"{path}: no such file (not a training workdir, or no step logged yet)")
  try:
    text = path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise CdftError(f"{path}: unreadable ({e})") from e
  lines = text.split("\n")
  by_step = {}
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError as e:
      if n == len(lines):  # no newline after it: being written
        continue
      raise CdftError(f"{path}:{n}: not a JSON line ({e})") from e
    if (not isinstance(row, dict) or not isinstance(row.get("step"), (int, float))
        or not math.isfinite(row["step"])):
      raise CdftError(f"{path}:{n}: a metrics line needs a numeric 'step'")
    step = int(row["step"])
    by_step.setdefault(step, {}).update(row)  # train and eval lines of one step merge
    by_step[step]["step"] = step
  if not by_step:
    raise CdftError(f"{path}: no metrics logged")
  return Run(name=name or workdir.name, path=workdir,
             rows=tuple(by_step[s] for s in sorted(by_step)))


def _unique_names(paths):
  """Folder names, or longer path tails where two runs share a folder name."""
  parts = [pathlib.Path(os.path.abspath(p)).parts for p in paths]
  depth = 1
  while True:
    names = ["/".join(p[-depth:]) for p in parts]
    if len(set(names)) == len(names) or depth >= max(len(p) for p in parts):
      return names
    depth += 1


def read_runs(workdirs):
  """:func:`read_run` of every workdir, labelled by unique folder names."""
  workdirs = list(workdirs)
  if not workdirs:
    raise CdftError("no run directories given")
  paths = [pathlib.Path(w) for w in workdirs]
  paths = [p.parent if p.suffix == ".jsonl" and not p.is_dir() else p for p in paths]
  if len({p.resolve() for p in paths}) != len(paths):
    raise CdftError(f"a run is given twice: {' '.join(str(w) for w in workdirs)}")
  return [read_run(w, name) for w, name in zip(workdirs, _unique_names(paths))]


def metric_keys(runs, keys=None):
  """The keys to plot: ``keys`` (checked), or every metric the runs logged.

  Args:
    runs: :class:`Run` list.
    keys: metric names, or None for all but :data:`BOOKKEEPING`, in the order
      they first appear.

  Raises:
    CdftError: a key that none of the runs logged.
  """
  present = []
  for run in runs:
    for row in run.rows:
      present.extend(k for k in row if k != "step" and k not in present)
  if keys is None:
    keys = [k for k in present if k not in BOOKKEEPING]
    if not keys:
      raise CdftError("the runs logged no metrics besides the step")
    return keys
  keys = [k.strip() for k in keys if k.strip()]
  if not keys:
    raise CdftError("no metric keys given")
  for key in keys:
    if key not in present:
      raise CdftError(f"unknown metric {key!r}: the runs logged {', '.join(present)}")
  return list(dict.fromkeys(keys))


def series(run, key):
  """``(steps, values)`` float64 arrays of ``key`` in ``run`` (finite values only)."""
  points = [(row["step"], float(row[key])) for row in run.rows
            if isinstance(row.get(key), (int, float)) and math.isfinite(float(row[key]))]
  if not points:
    return np.zeros(0), np.zeros(0)
  steps, values = zip(*points)
  return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def summary(runs, keys):
  """Per key and run: ``first``, ``last``, ``min``, ``min_step``, ``points``.

  Returns:
    ``{key: {run name: {...} or None}}`` (None: the run did not log the key).
  """
  out = {}
  for key in keys:
    out[key] = {}
    for run in runs:
      steps, values = series(run, key)
      if not len(values):
        out[key][run.name] = None
        continue
      i = int(np.argmin(values))
      out[key][run.name] = {"first": float(values[0]), "last": float(values[-1]),
                            "min": float(values[i]), "min_step": int(steps[i]),
                            "first_step": int(steps[0]), "last_step": int(steps[-1]),
                            "points": int(len(values))}
  return out


def format_summary(table):
  """:func:`summary` as aligned text: one block per key, one row per run."""
  lines = []
  for key, per_run in table.items():
    rows = [("run", "first", "last", "min (step)", "points")]
    for name, s in per_run.items():
      if s is None:
        rows.append((name, "-", "-", "-", "0"))
      else:
        rows.append((name, f"{s['first']:.6g}", f"{s['last']:.6g}",
                     f"{s['min']:.6g} ({s['min_step']})", str(s["points"])))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    lines.append(key)
    for r in rows:
      lines.append("  " + "  ".join(
          r[c].ljust(widths[c]) if c == 0 else r[c].rjust(widths[c]) for c in range(5)).rstrip())
  return "\n".join(lines) + "\n"


def _grid(n):
  cols = min(n, MAX_COLUMNS)
  return (n + cols - 1) // cols, cols


def figure_size(num_keys):
  """(width, height) in px of the PNG of ``num_keys`` panels."""
  rows, cols = _grid(num_keys)
  return cols * PANEL_SIZE[0], rows * PANEL_SIZE[1] + TITLE_HEIGHT


def _log_ok(values_per_run):
  """Whether a panel can have a log y axis (some points, all positive)."""
  values = [v for vs in values_per_run for v in vs]
  return bool(values) and min(values) > 0


def plot(runs, keys, out, log_y=False, title=None, backend="auto"):
  """Draws the loss curves of ``runs`` into the PNG ``out``.

  Args:
    runs: :class:`Run` list (:func:`read_runs`).
    keys: metric keys, one panel each (:func:`metric_keys`).
    out: the PNG file (parent folders are created).
    log_y: logarithmic y axes (a panel with values <= 0 stays linear and says so).
    title: the figure title (default: the metric file's name and the run count).
    backend: ``'auto'`` (matplotlib if importable, else PIL), ``'matplotlib'`` or
      ``'pil'``.

  Returns:
    the backend used, ``'matplotlib'`` or ``'pil'``.

  Raises:
    CdftError: no runs or keys, an unknown or missing backend, an unwritable file.
  """
  if backend not in BACKENDS:
    raise CdftError(f"unknown plot backend {backend!r}; choose from {', '.join(BACKENDS)}")
  if not runs or not keys:
    raise CdftError("nothing to plot (no runs or no metric keys)")
  if title is None:
    title = f"{FILE_NAME} of {len(runs)} run{'s' if len(runs) > 1 else ''}"
  if backend in ("auto", "matplotlib"):
    try:
      import matplotlib  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError as e:
      if backend == "matplotlib":
        raise CdftError("the matplotlib backend needs matplotlib (pip install matplotlib); "
                        "the pil backend does not") from e
      backend = "pil"
    else:
      backend = "matplotlib"
  panels = []
  for key in keys:
    data = [(run.name, *series(run, key)) for run in runs]
    log = log_y and _log_ok([v for _, _, v in data])
    label = key if log == log_y else f"{key} (linear: values <= 0)"
    panels.append((label, data, log))
  draw = _plot_matplotlib if backend == "matplotlib" else _plot_pil
  image_bytes = draw(panels, title)
  out = pathlib.Path(out)
  try:
    with files.atomic_open(out) as f:
      f.write(image_bytes)
  except OSError as e:
    raise CdftError(f"{out}: cannot write the plot ({e.strerror or e})") from e
  return backend


def _plot_matplotlib(panels, title):
  """The PNG bytes of the panels, drawn by matplotlib's Agg canvas."""
  # pylint: disable=import-outside-toplevel
  # Not pyplot: no global backend switch and no figure registry (works headless).
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  width, height = figure_size(len(panels))
  rows, cols = _grid(len(panels))
  fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, layout="constrained")
  FigureCanvasAgg(fig)
  fig.suptitle(title)
  axes = fig.subplots(rows, cols, squeeze=False)
  for i, ax in enumerate(axes.flat):
    if i >= len(panels):
      ax.set_visible(False)
      continue
    label, data, log = panels[i]
    for j, (name, steps, values) in enumerate(data):
      if len(values):
        ax.plot(steps, values, color=COLORS[j % len(COLORS)], label=name, linewidth=1.5,
                marker="o" if len(values) <= 50 else None, markersize=3)
    if log:
      ax.set_yscale("log")
    ax.set_title(label)
    ax.set_xlabel("step")
    ax.grid(True, color="#dddddd", linewidth=0.8)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize="small")
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=_DPI, facecolor="white")
  return buffer.getvalue()


# --- the PIL fallback ------------------------------------------------------------------------


def _font(size):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: the fixed bitmap font
    return ImageFont.load_default()


def _text_size(draw, text, font):
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  return right - left, bottom - top


def _nice_ticks(lo, hi, count=5):
  """Round tick values covering [lo, hi] (steps of 1, 2, 2.5 or 5 x 10^n)."""
  span = hi - lo
  raw = span / max(count, 1)
  magnitude = 10.0 ** math.floor(math.log10(raw))
  step = magnitude * 10
  for m in (1, 2, 2.5, 5, 10):
    if span / (m * magnitude) <= count:
      step = m * magnitude
      break
  first = math.ceil(lo / step - 1e-9) * step
  ticks = []
  t = first
  while t <= hi + step * 1e-9:
    ticks.append(0.0 if abs(t) < step * 1e-9 else t)
    t = first + len(ticks) * step
  return ticks


def _log_ticks(lo, hi):
  """Tick positions (log10 values) in [lo, hi]: the decades, else 1, 2, 5 x 10^n, else all
  of 1..9 x 10^n, whichever first gives 3 ticks (1, 2, 5 with 2 already will do)."""
  decades = range(math.floor(lo) - 1, math.ceil(hi) + 1)

  def ticks(mantissas):
    out = [d + math.log10(m) for d in decades for m in mantissas]
    return [t for t in out if lo <= t <= hi]

  decade, coarse = ticks((1,)), ticks((1, 2, 5))
  if len(decade) >= 3:
    out = decade
  elif len(coarse) >= 2:
    out = coarse
  else:
    out = ticks(range(1, 10))
  while len(out) > 8:
    out = out[::2]
  return out if len(out) >= 2 else _nice_ticks(lo, hi)


def _limits(values, pad=0.05):
  lo, hi = float(min(values)), float(max(values))
  if hi - lo <= 1e-12 * max(abs(lo), abs(hi), 1e-300):
    half = abs(lo) * 0.1 or 1.0
    return lo - half, hi + half
  margin = (hi - lo) * pad
  return lo - margin, hi + margin


def _tick_label(value, log):
  return f"{10.0 ** value:.3g}" if log else f"{value:.4g}"


def _draw_panel(draw, box, label, data, log, fonts, k):
  """One panel in ``box`` = (left, top, right, bottom), drawn at ``k`` x scale."""
  small, medium = fonts
  left, top, right, bottom = box
  title_w, title_h = _text_size(draw, label, medium)
  draw.text(((left + right - title_w) // 2, top + 6 * k), label, fill="black", font=medium)
  curves = [(name, steps, np.log10(values) if log else values)
            for name, steps, values in data if len(values)]
  if not curves:
    draw.text((left + 20 * k, (top + bottom) // 2), "no data", fill="#888888", font=small)
    return
  all_steps = np.concatenate([c[1] for c in curves])
  all_values = np.concatenate([c[2] for c in curves])
  x_lo, x_hi = float(all_steps.min()), float(all_steps.max())
  if x_hi == x_lo:
    x_lo, x_hi = x_lo - 1, x_hi + 1
  y_lo, y_hi = _limits(all_values)
  y_ticks = _log_ticks(y_lo, y_hi) if log else _nice_ticks(y_lo, y_hi)
  y_ticks = [t for t in y_ticks if y_lo <= t <= y_hi]
  x_ticks = [t for t in _nice_ticks(x_lo, x_hi) if x_lo <= t <= x_hi]
  y_labels = [_tick_label(t, log) for t in y_ticks]
  label_w = max([_text_size(draw, s, small)[0] for s in y_labels] + [0])
  char_h = draw.textbbox((0, 0), "Agy|", font=small)[3]  # a line's height, descenders too
  plot_l = left + label_w + 14 * k
  plot_t = top + title_h + 16 * k
  plot_r = right - 14 * k
  plot_b = bottom - 2 * char_h - 16 * k

  def px(step, value):
    x = plot_l + (step - x_lo) / (x_hi - x_lo) * (plot_r - plot_l)
    y = plot_b - (value - y_lo) / (y_hi - y_lo) * (plot_b - plot_t)
    return x, y

  for t, text in zip(y_ticks, y_labels):
    _, y = px(x_lo, t)
    draw.line([(plot_l, y), (plot_r, y)], fill="#dddddd", width=k)
    draw.line([(plot_l - 4 * k, y), (plot_l, y)], fill="black", width=k)
    w, _ = _text_size(draw, text, small)
    draw.text((plot_l - 6 * k - w, y - char_h // 2), text, fill="black", font=small)
  for t in x_ticks:
    x, _ = px(t, y_lo)
    draw.line([(x, plot_t), (x, plot_b)], fill="#dddddd", width=k)
    draw.line([(x, plot_b), (x, plot_b + 4 * k)], fill="black", width=k)
    text = _tick_label(t, False)
    w, _ = _text_size(draw, text, small)
    draw.text((x - w // 2, plot_b + 6 * k), text, fill="black", font=small)
  w, _ = _text_size(draw, "step", small)
  draw.text(((plot_l + plot_r - w) // 2, plot_b + char_h + 8 * k), "step", fill="black",
            font=small)
  draw.rectangle([plot_l, plot_t, plot_r, plot_b], outline="black", width=k)
  for j, (name, steps, values) in enumerate(data):
    if not len(values):
      continue
    color = COLORS[j % len(COLORS)]
    points = [px(s, v) for s, v in zip(steps, np.log10(values) if log else values)]
    if len(points) > 1:
      draw.line(points, fill=color, width=2 * k, joint="curve")
    if len(points) <= 50:
      r = 2.5 * k
      for x, y in points:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
  # Legend: top right inside the plot, one swatch per run with data.
  entries = [(COLORS[j % len(COLORS)], name) for j, (name, _, values) in enumerate(data)
             if len(values)]
  text_w = max(_text_size(draw, name, small)[0] for _, name in entries)
  line_h = char_h + 6 * k
  lx1, ly0 = plot_r - 6 * k, plot_t + 6 * k
  lx0, ly1 = lx1 - text_w - 34 * k, ly0 + line_h * len(entries) + 6 * k
  draw.rectangle([lx0, ly0, lx1, ly1], fill="white", outline="#999999", width=k)
  for i, (color, name) in enumerate(entries):
    y = ly0 + 4 * k + i * line_h + line_h // 2
    draw.line([(lx0 + 6 * k, y), (lx0 + 24 * k, y)], fill=color, width=3 * k)
    draw.text((lx0 + 30 * k, y - char_h // 2), name, fill="black", font=small)


def _plot_pil(panels, title, supersample=2):
  """The PNG bytes of the panels, drawn with PIL at ``supersample`` x size, then reduced
  (antialiased lines and text)."""
  k = supersample
  width, height = figure_size(len(panels))
  _, cols = _grid(len(panels))
  image = Image.new("RGB", (width * k, height * k), "white")
  draw = ImageDraw.Draw(image)
  fonts = (_font(12 * k), _font(14 * k))
  w, h = _text_size(draw, title, _font(16 * k))
  draw.text(((width * k - w) // 2, (TITLE_HEIGHT * k - h) // 2), title, fill="black",
            font=_font(16 * k))
  for i, (label, data, log) in enumerate(panels):
    r, c = divmod(i, cols)
    left, top = c * PANEL_SIZE[0] * k, (TITLE_HEIGHT + r * PANEL_SIZE[1]) * k
    _draw_panel(draw, (left, top, left + PANEL_SIZE[0] * k, top + PANEL_SIZE[1] * k), label,
                data, log, fonts, k)
  if k > 1:
    image = image.resize((width, height), Image.LANCZOS)
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()
