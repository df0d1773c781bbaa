"""Writing files so that a killed or failed run never leaves a half-written one."""
import contextlib
import os
import pathlib
import secrets


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
  """Opens a temporary sibling of ``path``; renames it onto ``path`` only on success.

  The parent folder is created. If the ``with`` block raises (or the process
  dies), ``path`` is untouched and the temporary file is removed (or, after a
  kill, left as a hidden ``.name.<pid>.<random>.part`` file). The temporary
  file honours the umask, like a plain ``open``.

  Raises:
    OSError: from creating, writing or renaming.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part"
  fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(temp, path)
  finally:
    with contextlib.suppress(OSError):
      temp.unlink()  # still there only if something failed
