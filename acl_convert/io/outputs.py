"""Writing output files so that nothing the user had is lost or half-written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from ..errors import UsageError, UserError

__all__ = ["check_writable", "atomic_path", "write_atomic"]


def check_writable(path: str | os.PathLike, *, force: bool) -> Path:
    """Refuse to overwrite ``path`` unless ``force``, and check its folder exists and is writable.
    Call this for every output before any long work starts."""
    path = Path(path)
    if path.exists() and not force:
        raise UsageError(
            f"{path} already exists; pass --force to overwrite it or choose another output with -o"
        )
    if path.exists() and path.is_dir():
        raise UsageError(f"{path} is a folder; give a file name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(
            f"output folder {folder} does not exist; create it or choose another output"
        )
    if not os.access(folder, os.W_OK):
        raise UserError(f"output folder {folder} is not writable; choose another output with -o")
    return path


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path`` in one
    step, on any error it is removed. Readers never see a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp made the file 0600 (writers may also recreate it); give the finished file the
        # permissions any new file gets.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp_path)`` then rename onto ``path`` (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)
