"""The exporter's user error: a bad request, folder or checkpoint the user can fix.

A leaf module, so every floor of the exporter (the weights' source, the stages, the build plan)
raises the same error without importing the build plan.
"""

from __future__ import annotations

from runtime.errors import UserError


class BuildError(UserError):
    """A user error: the message says what is wrong and what is allowed."""
