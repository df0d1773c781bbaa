"""Loss curves of training runs: their ``metrics.jsonl`` as one PNG, and a text summary.

A run's ``metrics.jsonl`` (:class:`cdft.training.metrics.MetricWriter`) has one
JSON object per line: ``step`` and the metrics logged at that step (training
lines: ``loss``, the task's terms, ``grad_norm``, ``learning_rate``, throughput;
evaluation lines: ``eval/...`` keys). A resumed run appends to the same file;
when a step is logged twice (a restart from an earlier checkpoint), its last
line counts.

:func:`plot` draws one panel per metric key (x = step, one line per run, a
legend of the run folder names) with matplotlib (the ``plots`` extra:
``pip install 'cdft[plots]'``), on its Agg canvas: no display and no global
backend change. The PNG has :func:`figure_size` pixels.
"""
import dataclasses
import io
import json
import math
import os
import pathlib

import numpy as np

from cdft.errors import CdftError
from cdft.io import files

__all__ = ["Run", "FILE_NAME", "BOOKKEEPING", "PANEL_SIZE", "TITLE_HEIGHT", "COLORS",
           "read_run", "read_runs", "metric_keys", "series", "summary", "format_summary",
           "figure_size", "plot"]

FILE_NAME = "metrics.jsonl"
# Logged per line but not curves worth a panel by default (still plottable by --keys).
BOOKKEEPING = ("steps_per_sec", "images_per_sec", "data_skipped")
PANEL_SIZE = (480, 360)  # px per panel
TITLE_HEIGHT = 32  # px above the panels for the figure title
MAX_COLUMNS = 3
# matplotlib's tab10: run j has colour COLORS[j % 10].
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


def plot(runs, keys, out, log_y=False, title=None):
  """Draws the loss curves of ``runs`` into the PNG ``out`` with matplotlib.

  Args:
    runs: :class:`Run` list (:func:`read_runs`).
    keys: metric keys, one panel each (:func:`metric_keys`).
    out: the PNG file (parent folders are created; written atomically).
    log_y: logarithmic y axes (a panel with values <= 0 stays linear and says so).
    title: the figure title (default: the metric file's name and the run count).

  Returns:
    The labels of the panels, in order.

  Raises:
    CdftError: no runs or keys, matplotlib missing, an unwritable file.
  """
  if not runs or not keys:
    raise CdftError("nothing to plot (no runs or no metric keys)")
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel,unused-import  # noqa: F401
  except ImportError as e:
    raise CdftError("plots need matplotlib: pip install 'cdft[plots]' (or matplotlib)") from e
  if title is None:
    title = f"{FILE_NAME} of {len(runs)} run{'s' if len(runs) > 1 else ''}"
  panels = []
  for key in keys:
    data = [(run.name, *series(run, key)) for run in runs]
    log = log_y and _log_ok([v for _, _, v in data])
    label = key if log == log_y else f"{key} (linear: values <= 0)"
    panels.append((label, data, log))
  image_bytes = _plot_matplotlib(panels, title)
  out = pathlib.Path(out)
  try:
    with files.atomic_open(out) as f:
      f.write(image_bytes)
  except OSError as e:
    raise CdftError(f"{out}: cannot write the plot ({e.strerror or e})") from e
  return [label for label, _, _ in panels]


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
