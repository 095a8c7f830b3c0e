"""User-facing errors: one line that names the problem and the fix.

The CLI prints ``error: <message>`` for these and exits with :attr:`UserError.exit_code`
(2 for usage errors, 1 for the rest) without a traceback; anything else is a bug and keeps
its traceback.

A message names a setting with :func:`option`, so the library and the command line each say it
their own way: ``target_compact`` / ``force=True`` from Python, ``--target-compact`` /
``--force`` from the CLI (:meth:`UserError.cli_message`).
"""

from __future__ import annotations

import errno
import os
import re

__all__ = ["UserError", "UsageError", "Note", "note", "option", "os_error"]

# An option inside a message: name, then optionally "=" and the value, between two separators
# that never occur in text.
_OPTION = re.compile("\x1e([A-Za-z_][A-Za-z0-9_]*)(?:=([^\x1f]*))?\x1f")


def option(name: str, value: object = None) -> str:
    """How a message names setting ``name`` (its Python name), optionally with a value:
    ``option("arch", "NAME")`` reads ``arch=NAME`` from Python and ``--arch NAME`` on the
    command line; ``option("force", True)`` reads ``force=True`` and ``--force``;
    ``option("offset", False)`` reads ``offset=False`` and ``--no-offset``."""
    return f"\x1e{name}" + ("" if value is None else f"={value}") + "\x1f"


def _python(match: re.Match) -> str:
    name, value = match.group(1), match.group(2)
    return name if value is None else f"{name}={value}"


def _flag(match: re.Match) -> str:
    name, value = match.group(1), match.group(2)
    flag = "--" + name.replace("_", "-")
    if value == "True":
        return flag
    if value == "False":
        return "--no-" + name.replace("_", "-")
    return flag if value is None else f"{flag} {value}"


class UserError(Exception):
    """A problem with the user's input or environment (exit code 1)."""

    exit_code = 1

    def __str__(self) -> str:
        return _OPTION.sub(_python, super().__str__())

    def cli_message(self) -> str:
        """The message with settings named by their command-line flags."""
        return _OPTION.sub(_flag, super().__str__())


class UsageError(UserError):
    """The command was called wrongly: a bad option value, a selector matching nothing (exit 2)."""

    exit_code = 2


class Note(str):
    """A sentence for the user (a conversion's notes): the text reads as from Python, and
    :attr:`cli` names the settings by their command-line flags."""

    cli: str

    def __new__(cls, text: str, cli: str | None = None) -> Note:
        self = super().__new__(cls, text)
        self.cli = text if cli is None else cli
        return self


def note(text: str) -> Note:
    """A :class:`Note` from a message whose settings are named with :func:`option`."""
    return Note(_OPTION.sub(_python, text), _OPTION.sub(_flag, text))


_OS_FIX = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EACCES: "check the permissions or choose another location",
    errno.EPERM: "check the permissions or choose another location",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.ENAMETOOLONG: "choose a shorter name",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path",
    errno.EISDIR: "give a file, not a folder",
    errno.EMFILE: "close other programs or raise the open-file limit",
}


def os_error(
    exc: OSError, path: str | os.PathLike | None = None, doing: str = "write"
) -> UserError:
    """The one place an ``OSError`` becomes a message: ``cannot <doing> <path> (<reason>);
    <fix>``. ``path`` defaults to the file the error names."""
    path = path if path is not None else exc.filename
    reason = exc.strerror or str(exc) or type(exc).__name__
    fix = _OS_FIX.get(exc.errno, "check the file and its folder")
    where = f" {os.fsdecode(path)}" if path is not None else ""
    return UserError(f"cannot {doing}{where} ({reason}); {fix}")
