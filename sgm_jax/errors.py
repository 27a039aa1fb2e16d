"""What counts as a mistake in the input rather than a fault of the program.

main.py prints a UserError as one line `error: ...` and exits with code 2; every other exception
(a bug, an out-of-memory error from XLA) keeps its traceback. Each class also derives from the
built-in type a library caller would catch (ValueError, FileNotFoundError, ...).
"""


class UserError(Exception):
  """A config value, flag, file or workdir that cannot be used as given; the message says why
  and what is allowed."""


class InputError(UserError, ValueError):
  """A value (config field, flag, sampler option, argument) outside what is allowed."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or folder that the input names does not exist."""


class MissingDependencyError(UserError, ImportError):
  """An optional package that this input needs is not installed."""


class TrainingDiverged(UserError, RuntimeError):
  """The training loss became NaN or infinite; the last good checkpoint is kept (lower the
  learning rate, or look at the data)."""
