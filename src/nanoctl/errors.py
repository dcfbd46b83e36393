"""User-facing errors: one line saying what was wrong and how to fix it.

The CLI prints `error: <message>` (plus `hint: <fix>` when given) on stderr and exits with the
error's code; no traceback unless NANOCTL_DEBUG=1. Library callers catch `NanoctlError`.
"""

from __future__ import annotations


class NanoctlError(Exception):
    """A known failure the user can fix. Exit code 1."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(NanoctlError):
    """Options that cannot work together or are out of range. Exit code 2."""

    exit_code = 2


class Interrupted(NanoctlError):
    """Work stopped by Ctrl+C after saving what could be saved. Exit code 130."""

    exit_code = 130
