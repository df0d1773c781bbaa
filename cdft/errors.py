"""Exceptions that carry a one-line, user-facing message.

The command-line tools print ``str(error)`` of these and exit non-zero; anything
else is a bug and keeps its traceback.
"""


class CdftError(Exception):
  """Base class of the errors a user can cause (bad files, bad arguments)."""


class WeightError(CdftError):
  """A weight file is missing, unreadable, truncated or does not fit the model."""


class ImageError(CdftError):
  """An image is missing, unreadable, corrupt or unusable (e.g. too small)."""


def one_line(error, with_type=False):
  """``str(error)`` on one line (PIL and pickle messages may hold newlines).

  Args:
    error: an exception.
    with_type: prefix the exception's class name (``"ValueError: ..."``).

  Returns:
    The message with runs of whitespace collapsed; the class name when the
    message is empty.
  """
  text = " ".join(str(error).split())
  if with_type:
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
  return text or type(error).__name__
