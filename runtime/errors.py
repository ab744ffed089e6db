"""The one user-error type of the runtime and the exporter.

A `UserError` is a bad input the user can fix (an argument, a path, an engine folder, a
checkpoint): the CLIs print its message as one line and exit with status 2. Anything else is a
bug and keeps its traceback. It subclasses `ValueError` so library callers can keep catching
that; `UserTypeError` is the same for a value of the wrong type.
"""

from __future__ import annotations


class UserError(ValueError):
    """A bad input, with a message that names the value and what is allowed."""


class UserTypeError(UserError, TypeError):
    """A user-supplied value of the wrong type."""


class ResultError(RuntimeError):
    """A result that is not a number (NaN or inf): never written out as if it were an image or
    an answer. The CLIs print it as one line and exit with status 1."""


class Cancelled(RuntimeError):
    """A job that was cancelled before it finished: its `result()` (and `step()`) raise this."""
