"""The cdft cache folder, the one place that names it.

Downloaded and converted weights (``cdft.weights.zoo``), compiled programs
(``cdft.stylize.programs``, ``cdft.train``) and built kernels
(``cdft.kernels.build``) live in sub-folders of :func:`resolve`'s answer.
"""
import os
import pathlib

ENV = "CDFT_CACHE_DIR"


def resolve(cache_dir=None):
  """The cache folder: ``cache_dir``, else $CDFT_CACHE_DIR, else ~/.cache/cdft.

  ``$XDG_CACHE_HOME/cdft`` replaces ``~/.cache/cdft`` when XDG_CACHE_HOME is
  set; a leading ``~`` is expanded. The folder is not created here.
  """
  if cache_dir is None:
    cache_dir = os.environ.get(ENV)
  if not cache_dir:
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache"
    return root / "cdft"
  return pathlib.Path(cache_dir).expanduser()
