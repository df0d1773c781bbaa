r"""Loss curves of training runs as one PNG, and a text summary of them.

  python launch/plot_metrics.py runs/cd_decoder_stage3 runs/cd_small_decoder_stage3 \
      --out runs/curves.png --keys loss,pixel,perceptual --log-y

Reads each run's ``metrics.jsonl`` (see :mod:`cdft.training.plots`) and draws
one panel per metric (x = step, one line per run, the legend names the run
folders); evaluation metrics are keys such as ``eval/loss``. Without
``--keys``, every logged metric but the throughput counters gets a panel.
matplotlib draws the figure (``pip install 'cdft[plots]'``). Prints the
first, last and minimum value of each metric per run. A missing or empty
metrics file or an unknown key stops with a one-line message and exit code 2.
"""
import argparse
import pathlib
import sys

from cdft.errors import CdftError
from cdft.training import plots


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                      help="training workdirs (or their metrics.jsonl files)")
  parser.add_argument("--out", type=pathlib.Path, required=True, help="the PNG to write")
  parser.add_argument("--keys", default=None,
                      help="comma-separated metrics, one panel each (default: all logged "
                      "but throughput), e.g. loss,pixel,perceptual,eval/loss")
  parser.add_argument("--log-y", action="store_true", help="logarithmic y axes")
  parser.add_argument("--title", default=None, help="figure title")
  args = parser.parse_args(argv)
  try:
    runs = plots.read_runs(args.runs)
    keys = plots.metric_keys(runs, args.keys.split(",") if args.keys is not None else None)
    plots.plot(runs, keys, args.out, log_y=args.log_y, title=args.title)
  except CdftError as e:
    print(f"plot_metrics: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  print(plots.format_summary(plots.summary(runs, keys)), end="")
  print(f"wrote {args.out} ({len(keys)} panel{'s' if len(keys) > 1 else ''})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
