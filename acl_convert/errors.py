"""User-facing errors: one line that names the problem and the fix.

The CLI prints ``error: <message>`` for these and exits with :attr:`UserError.exit_code`
(2 for usage errors, 1 for the rest) without a traceback; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

__all__ = ["UserError", "UsageError"]


class UserError(Exception):
    """A problem with the user's input or environment (exit code 1)."""

    exit_code = 1


class UsageError(UserError):
    """The command was called wrongly: a bad option value, a selector matching nothing (exit 2)."""

    exit_code = 2
