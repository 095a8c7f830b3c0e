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
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import UsageError, UserError, option, os_error

__all__ = [
    "OutputPlan",
    "default_output",
    "sibling",
    "check_writable",
    "atomic_path",
    "atomic_paths",
    "write_atomic",
    "written",
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


#: How much longer than the final name a temporary file's name is (see :func:`_new_temp`).
_TEMP_EXTRA = len("..") + 8 + len(".tmp")


def check_writable(path: str | os.PathLike, *, force: bool) -> Path:
    """Refuse to overwrite ``path`` unless ``force``, and refuse what a file cannot replace
    safely (a folder, a device, a symbolic link); check the name fits the file system, and that
    its folder exists and takes a new file (by creating and removing one: permission bits alone
    do not tell, e.g. under ``/proc`` or on a read-only mount). Call this for every output
    before any long work starts."""
    path = Path(path)
    folder = path.parent
    try:
        limit = os.pathconf(folder if folder.is_dir() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(path.name))
    if size + _TEMP_EXTRA > limit:
        raise UsageError(
            f"output name {path.name[:40]}... is too long for the file system "
            f"({size} bytes, at most {limit - _TEMP_EXTRA}); choose a shorter one"
        )
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # the folder is checked below
        st = None
    except OSError as exc:
        raise os_error(exc, path) from None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise UsageError(
                f"{path} is a symbolic link; writing would replace the link by a file: give the "
                "file it points to, or another name"
            )
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{path} is a folder; give a file name")
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path} is not a regular file (a device or pipe); give a file name")
        if not force:
            raise UsageError(
                f"{path} already exists; pass {option('force', True)} to overwrite it or "
                "choose another output name"
            )
    if not folder.is_dir():
        raise UserError(
            f"output folder {folder} does not exist; create it or choose another output"
        )
    with _signals_held():
        try:
            tmp = _new_temp(path)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise UserError(
                f"output folder {folder} is not writable ({reason}); choose another output"
            ) from None
        Path(tmp).unlink(missing_ok=True)
        _untrack(tmp)
    return path


_LIVE: set[str] = set()
_LIVE_LOCK = threading.Lock()
_WRITTEN: list[Path] = []


def written() -> list[Path]:
    """Every file this process has written through :func:`atomic_path`, in order (a command
    that is interrupted says which of its outputs are complete)."""
    return list(_WRITTEN)


def _remove_live_and_reraise(signum, frame) -> None:
    with _LIVE_LOCK:
        for tmp in list(_LIVE):
            Path(tmp).unlink(missing_ok=True)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the block ends, then act as usual: a temporary file is
    never created without being recorded, and files renamed together are renamed together.
    (Python-level handlers, not a signal mask: with torch's worker threads about, the process
    would take a signal on a thread that does not block it.) SIGTERM, when it acts, removes
    the recorded temporary files. Main thread only; elsewhere signals are not handled."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _remove_live_and_reraise)
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


def _new_temp(path: Path) -> str:
    """A new empty temporary file beside ``path`` (its name ``.<name>.XXXXXXXX.tmp``), recorded
    so that SIGTERM removes it. Call with signals held; raises ``OSError``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = os.path.abspath(tmp)
    with _LIVE_LOCK:
        _LIVE.add(tmp)
    return tmp


def _untrack(tmp: str) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(tmp)


def _new_mode(path: Path) -> int:
    """The mode of the file ``path`` replaces, or that of a new file (0666 less the umask)."""
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            return st.st_mode & 0o7777
    except OSError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike]):
    """Yield one temporary path beside each of ``paths``; when the block succeeds, each is
    renamed onto its final name (with the mode of the file it replaces, or that of a new file),
    all in one go with SIGINT and SIGTERM held, so that an interrupt replaces all of them or
    none. On any error or interrupt inside the block every temporary file is removed (SIGTERM
    too, by a handler). Readers never see a partial file."""
    finals = [Path(p) for p in paths]
    tmps: list[str] = []
    try:
        for final in finals:
            with _signals_held():
                try:
                    tmps.append(_new_temp(final))
                except OSError as exc:
                    raise os_error(exc, final) from None
        yield [Path(t) for t in tmps]
        with _signals_held():
            modes = [_new_mode(final) for final in finals]
            for tmp, final, mode in zip(tmps, finals, modes, strict=True):
                try:
                    # mkstemp made the file 0600 (and writers may have recreated it).
                    os.chmod(tmp, mode)
                    os.replace(tmp, final)
                except OSError as exc:
                    raise os_error(exc, final) from None
                _untrack(tmp)
                # A file written into another write's temporary file is not one the user sees.
                if os.path.abspath(final) not in _LIVE:
                    _WRITTEN.append(final)
    finally:
        for tmp in tmps:
            if tmp in _LIVE:
                Path(tmp).unlink(missing_ok=True)
                _untrack(tmp)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """One file of :func:`atomic_paths`: yield a temporary path next to ``path``, renamed onto
    it when the block succeeds and removed on any error or interrupt."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp_path)`` then rename onto ``path`` (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)
