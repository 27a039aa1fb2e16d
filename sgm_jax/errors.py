"""What counts as a mistake in the input rather than a fault of the program.

main.py prints a UserError as one line `error: ...` and exits with code 2; every other exception
(a bug, an out-of-memory error from XLA) keeps its traceback. Each class also derives from the
built-in type a library caller would catch (ValueError, FileNotFoundError, ...).
"""
import math
import numbers


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


def check_positive(name: str, value) -> float:
  """value as a float if it is a finite number > 0 (not a bool); else an InputError naming it."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
      or not value > 0):
    raise InputError(f"{name} must be a positive number, got {value!r}")
  return float(value)


def check_positive_int(name: str, value) -> int:
  """value as an int if it is an integer >= 1 (not a bool); else an InputError naming it."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise InputError(f"{name} must be a positive integer, got {value!r}")
  return int(value)
