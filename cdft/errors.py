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
