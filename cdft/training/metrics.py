"""Training metrics: a JSONL file on process 0, console progress, and the NaN guard.

Metrics are a flat dict of scalars per step. The trainer fetches them only at
log steps, one step late, so logging never stalls the device pipeline.
"""
import json
import math
import sys
import time

import jax

from cdft.errors import CdftError


class DivergenceError(CdftError):
  """The loss (or another metric) became NaN or Inf."""


def check_finite(metrics, step, last_good_step, params_finite=True):
  """Raises :class:`DivergenceError` naming the first non-finite metric (or the parameters)."""
  bad = [f"{name} is {value}" for name, value in metrics.items()
         if not math.isfinite(float(value))]
  if not params_finite:
    bad.append("the parameters hold nan or inf")
  if bad:
    raise DivergenceError(
        f"{bad[0]} at step {step}: training diverged; stopped without saving. "
        f"The last good checkpoint is step {last_good_step} (lower the learning rate or "
        "check the data, then rerun to resume from it)")


class MetricWriter:
  """Appends ``{"step": s, ...}`` lines to ``workdir/metrics.jsonl`` and prints progress.

  Only process 0 writes and prints. The file is line-buffered and opened in append
  mode, so a resumed run continues the same file.
  """

  def __init__(self, workdir, total_steps, global_batch_size, stream=None):
    self._main = jax.process_index() == 0
    self._total = total_steps
    self._batch = global_batch_size
    self._stream = stream or sys.stdout
    self._file = None
    if self._main:
      path = workdir / "metrics.jsonl"
      self._file = path.open("a")
    self._last_time = None
    self._last_step = None

  def info(self, message):
    """Prints a line (process 0 only)."""
    if self._main:
      print(message, file=self._stream, flush=True)

  def write(self, step, metrics, timing=True):
    """Records the metrics of ``step`` and prints a progress line.

    With ``timing``, adds throughput since the previous timed write.
    """
    if not self._main:
      return
    now = time.time()
    row = {"step": int(step)}
    row.update({k: float(v) for k, v in metrics.items()})
    if not timing:
      self._file.write(json.dumps(row) + "\n")
      self._file.flush()
      print(f"step {step} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
            file=self._stream, flush=True)
      return
    if self._last_time is not None and step > self._last_step:
      dt = now - self._last_time
      row["steps_per_sec"] = (step - self._last_step) / dt
      row["images_per_sec"] = row["steps_per_sec"] * self._batch
    self._last_time, self._last_step = now, step
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    shown = " ".join(f"{k}={v:.4g}" for k, v in row.items()
                     if k not in ("step", "steps_per_sec"))
    eta = ""
    if "steps_per_sec" in row and row["steps_per_sec"] > 0:
      eta = f" eta {(self._total - step) / row['steps_per_sec']:.0f}s"
    print(f"step {step}/{self._total} {shown}{eta}", file=self._stream, flush=True)

  def start_timer(self, step):
    """Marks the start of the timed interval (after compilation)."""
    self._last_time, self._last_step = time.time(), int(step)

  def close(self):
    if self._file is not None:
      self._file.close()
      self._file = None
