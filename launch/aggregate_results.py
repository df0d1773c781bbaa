r"""Final test accuracy of classification runs as a markdown table, mean ± std over seeds.

  python launch/aggregate_results.py 'runs/ft_*_seed*' --out results.md

Each argument is a workdir or a glob of workdirs (expanded here, so quoting it
is fine) of a ``classifier`` (ft_teacher.py) or ``ft_student`` (ft_student.py)
run. A run's result is the last ``eval/accuracy`` of its ``metrics.jsonl``
(the trainer always evaluates at the final step; RepDistiller and CRD also
report the last epoch), its group is read from its ``config.json``: (dataset,
teacher -> student, method), where a teacher run is method ``teacher`` and
non-standard ResNet widths are shown as ``resnet20(8/16/32)``. The table has
one row per group: the number of runs, their seeds, and the accuracy in % as
mean ± sample standard deviation (ddof 1; ± 0.00 for a single run). Runs
without an evaluation are reported on stderr and left out.
"""
import argparse
import glob
import json
import pathlib
import statistics
import sys

from cdft.errors import CdftError

METHOD_ORDER = ("teacher", "none", "kd", "fitnets", "at", "ft")


class ResultError(CdftError):
  """A workdir that is not a finished, evaluated classification run."""


def _arch(name, widths):
  widths = tuple(widths or ())
  return f"{name}({'/'.join(str(w) for w in widths)})" if widths else name


def run_result(workdir):
  """The group and final accuracy of one run.

  Returns:
    dict with ``dataset``, ``pair``, ``method``, ``seed``, ``accuracy`` (fraction),
    ``step`` (of that evaluation) and ``workdir``.

  Raises:
    ResultError: no config.json / metrics.jsonl, another task, or no evaluation.
  """
  workdir = pathlib.Path(workdir)
  config_path, metrics_path = workdir / "config.json", workdir / "metrics.jsonl"
  if not config_path.is_file():
    raise ResultError(f"{workdir}: no config.json (not a cdft training workdir)")
  config = json.loads(config_path.read_text())
  task = config.get("task")
  if task == "classifier":
    method = "teacher"
    pair = _arch(config["model"]["name"], config["model"].get("widths"))
  elif task == "ft_student":
    method = config["distill"]["method"]
    t, s = config["teacher"], config["student"]
    pair = f"{_arch(t['model'], t.get('widths'))} → {_arch(s['model'], s.get('widths'))}"
  else:
    raise ResultError(f"{workdir}: task {task!r} is not a classification run "
                      "(classifier or ft_student)")
  last = None
  if metrics_path.is_file():
    for line in metrics_path.read_text().splitlines():
      if line.strip():
        row = json.loads(line)
        if "eval/accuracy" in row:
          last = row
  if last is None:
    raise ResultError(f"{workdir}: no eval/accuracy in metrics.jsonl (unfinished, or "
                      "eval_every = 0)")
  return {"dataset": config["input"]["dataset"], "pair": pair, "method": method,
          "seed": config.get("seed"), "accuracy": float(last["eval/accuracy"]),
          "step": int(last["step"]), "workdir": str(workdir)}


def _sort_key(key):
  dataset, pair, method = key
  rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
  # A teacher's row first, then its students by pair and method.
  return dataset, pair.split(" → ")[0], method != "teacher", pair, rank, method


def aggregate(results):
  """Rows ``{dataset, pair, method, n, seeds, mean, std}`` (accuracy in %), sorted."""
  groups = {}
  for r in results:
    groups.setdefault((r["dataset"], r["pair"], r["method"]), []).append(r)
  rows = []
  for key in sorted(groups, key=_sort_key):
    runs = groups[key]
    acc = [100.0 * r["accuracy"] for r in runs]
    rows.append({"dataset": key[0], "pair": key[1], "method": key[2], "n": len(runs),
                 "seeds": sorted(r["seed"] for r in runs), "mean": statistics.fmean(acc),
                 "std": statistics.stdev(acc) if len(acc) > 1 else 0.0})
  return rows


def markdown(rows):
  """The rows as a markdown table."""
  lines = ["| dataset | teacher → student | method | runs | seeds | top-1 (%) |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    seeds = ",".join(str(s) for s in r["seeds"])
    lines.append(f"| {r['dataset']} | {r['pair']} | {r['method']} | {r['n']} | {seeds} | "
                 f"{r['mean']:.2f} ± {r['std']:.2f} |")
  return "\n".join(lines) + "\n"


def expand(patterns):
  """Workdirs named by the arguments (globs expanded, sorted, deduplicated)."""
  found = []
  for pattern in patterns:
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    found.extend(m for m in matches if pathlib.Path(m).is_dir())
  return list(dict.fromkeys(found))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdirs", nargs="+", help="workdirs or globs of workdirs")
  parser.add_argument("--out", type=pathlib.Path, default=None,
                      help="also write the table to this markdown file")
  args = parser.parse_args(argv)
  workdirs = expand(args.workdirs)
  if not workdirs:
    print(f"aggregate_results: error: no workdir matches {' '.join(args.workdirs)}",
          file=sys.stderr)
    return 2
  results = []
  for workdir in workdirs:
    try:
      results.append(run_result(workdir))
    except ResultError as e:
      print(f"aggregate_results: skipped {e}", file=sys.stderr)
  if not results:
    print("aggregate_results: error: none of the workdirs has a final evaluation",
          file=sys.stderr)
    return 2
  table = markdown(aggregate(results))
  print(table, end="")
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
