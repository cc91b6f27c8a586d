"""The user's mistakes: exceptions every command reports without a traceback.

A mistake in what the user gave (a flag, a config field, a path, a file, the
data) raises a `UserError` whose message names the flag, field, value or
file and says what was expected. `runtime.run` prints that message alone and
exits with `exit_code`; anything else is a bug and keeps its traceback.
PAN_JAX_TRACEBACK=1 shows the traceback of a UserError too (bug reports).

The subclasses are also the built-in exception a caller in Python expects
(ValueError, FileNotFoundError, FileExistsError), so library code can be
used and tested without knowing this module.
"""


class UserError(Exception):
  """Something the user gave is wrong; the message says what and how to fix."""
  # Exit status of a command that stops on it: 1, or 2 for a usage error.
  exit_code = 1


class ConfigError(UserError, ValueError):
  """A config field or flag value that cannot work (named in the message)."""


class UsageError(UserError, ValueError):
  """A command line that does not make sense (missing or extra arguments)."""
  exit_code = 2


class MissingError(UserError, FileNotFoundError):
  """A path the user named does not exist or lacks a file (named)."""


class ExistsError(UserError, FileExistsError):
  """An output the user named exists already and would be overwritten."""


class DataError(UserError, ValueError):
  """Data the user gave (a source file, a dataset, an image) is unusable."""


class MismatchError(UserError, ValueError):
  """Two things the user gave do not fit together (both named in the message).

  A checkpoint and a dataset, a workdir and a config, a built dataset and
  the source it is asked to be built from.
  """


class StorageError(UserError, OSError):
  """A path the user named cannot be written (the path and cause named).

  A full disk, no permission, a read-only file system, a file where a
  directory should be.
  """


class DivergedError(UserError, FloatingPointError):
  """Training produced inf/NaN values (step, values, last good checkpoint)."""
