"""Writing output files so that nothing the user had is lost or half-written.

A command first plans every path it will write (:class:`OutputPlan`): each is checked before any
long work starts (an existing file without ``force``, a folder, a device, a symbolic link, one of
the command's own inputs, two outputs on one path, a name too long for the file system, a folder
that is missing or not writable). Then each file is written to a temporary name beside it and
renamed onto the final name in one step (:func:`write_atomic`), keeping the mode of a file it
replaces; on any error or interrupt (SIGINT, SIGTERM) the temporary file is removed.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from ..errors import UsageError, UserError, option

__all__ = [
    "OutputPlan",
    "default_output",
    "sibling",
    "check_writable",
    "atomic_path",
    "write_atomic",
    "os_error",
]


class OutputPlan:
    """The files one command will write, checked together before the work starts.

    Args:
        force: existing files may be replaced.
        inputs: files the command reads; none of them may be an output.
    """

    def __init__(self, *, force: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> None:
        self.force = force
        self.inputs = [Path(p) for p in inputs]
        self.paths: dict[Path, str] = {}

    def add(self, path: str | os.PathLike, what: str) -> Path:
        """Plan to write ``path`` (``what``: e.g. ``"the AnaNN"``, for messages); returns it."""
        path = Path(path)
        key = Path(os.path.abspath(path))
        if key in self.paths:
            raise UsageError(
                f"{path} would be written twice, as {self.paths[key]} and as {what}; give them "
                "different names"
            )
        check_writable(path, force=self.force)
        for src in self.inputs:
            if _same_file(src, path):
                raise UsageError(
                    f"{path} is an input of this command; writing {what} there would destroy "
                    "it; choose another output name"
                )
        self.paths[key] = what
        return path


def default_output(source: str | os.PathLike, suffix: str) -> Path:
    """The default name of an output made from ``source``: its stem (up to the first dot) plus
    ``suffix``, in the working directory, not next to the source (checkpoints often live in
    read-only places): ``models/resnet50.pth`` -> ``resnet50.anann.safetensors``."""
    name = Path(source).name
    return Path(f"{name.split('.')[0] or Path(source).stem}{suffix}")


def sibling(output: str | os.PathLike, suffix: str) -> Path:
    """A second output named after an AnaNN ``output``: ``x.anann.safetensors`` ->
    ``x<suffix>`` in the same folder."""
    output = Path(output)
    stem = output.name.replace(".anann.safetensors", "").removesuffix(".safetensors")
    return output.with_name(stem + suffix)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_writable(path: str | os.PathLike, *, force: bool) -> Path:
    """Refuse to overwrite ``path`` unless ``force``, and refuse what a file cannot replace
    safely (a folder, a device, a symbolic link); check the name fits the file system and its
    folder exists and is writable. Call this for every output before any long work starts."""
    path = Path(path)
    if path.is_symlink():
        raise UsageError(
            f"{path} is a symbolic link; writing would replace the link by a file: give the "
            "file it points to, or another name"
        )
    if path.exists():
        if path.is_dir():
            raise UsageError(f"{path} is a folder; give a file name")
        if not path.is_file():
            raise UsageError(f"{path} is not a regular file (a device or pipe); give a file name")
        if not force:
            raise UsageError(
                f"{path} already exists; pass {option('force', True)} to overwrite it or "
                "choose another output name"
            )
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(
            f"output folder {folder} does not exist; create it or choose another output"
        )
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    # The temporary file's name is longer than the final one (see atomic_path).
    if len(os.fsencode(path.name)) + 16 > limit:
        raise UsageError(
            f"output name {path.name[:40]}... is too long for the file system "
            f"({len(os.fsencode(path.name))} bytes, at most {limit - 16}); choose a shorter one"
        )
    if not os.access(folder, os.W_OK):
        raise UserError(f"output folder {folder} is not writable; choose another output")
    return path


_LIVE: set[str] = set()
_LIVE_LOCK = threading.Lock()


def _remove_live_and_reraise(signum, frame) -> None:
    with _LIVE_LOCK:
        for tmp in list(_LIVE):
            Path(tmp).unlink(missing_ok=True)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path`` in one
    step (with the mode of the file it replaces, or that of a new file), on any error it is
    removed; SIGTERM removes it too before the process ends. Readers never see a partial file."""
    path = Path(path)
    try:
        old_mode = path.stat().st_mode & 0o7777 if path.is_file() else None
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    except OSError as exc:
        raise os_error(exc, path) from None
    os.close(fd)
    _track(tmp)
    try:
        yield Path(tmp)
        if old_mode is None:
            umask = os.umask(0)
            os.umask(umask)
            old_mode = 0o666 & ~umask
        # mkstemp made the file 0600 (writers may also recreate it).
        os.chmod(tmp, old_mode)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise os_error(exc, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _untrack(tmp)


def _track(tmp: str) -> None:
    with _LIVE_LOCK:
        _LIVE.add(tmp)
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _remove_live_and_reraise)


def _untrack(tmp: str) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(tmp)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp_path)`` then rename onto ``path`` (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def os_error(exc: OSError, path: str | os.PathLike) -> UserError:
    """One line for an ``OSError`` met while writing ``path``: what happened and what to do."""
    import errno

    reason = exc.strerror or str(exc) or type(exc).__name__
    fix = {
        errno.ENOSPC: "free some space or write elsewhere",
        errno.EDQUOT: "free some space or write elsewhere",
        errno.EACCES: "choose a writable location",
        errno.EPERM: "choose a writable location",
        errno.EROFS: "the file system is read-only; write elsewhere",
        errno.ENAMETOOLONG: "choose a shorter name",
    }.get(exc.errno, "check the output location")
    return UserError(f"cannot write {path} ({reason}); {fix}")
