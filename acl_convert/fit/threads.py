"""How many CPU threads the fitting code uses, and how.

``fit_kernels`` splits its kernels into chunks and fits as many chunks at once as the process
may use cores (:func:`workers`), one chunk per thread, with torch itself single-threaded in
every thread (:func:`map_in_order`). Torch's own intra-op threads are the wrong tool for this
work: it is thousands of small tensor operations (a chunk's Jacobians, its 4x4 normal
equations), and splitting each across threads makes every thread wait at an OpenMP barrier for
the others; on a busy machine that means waiting for a core another process holds. Measured on
the 2-core VM with other jobs running, SqueezeNet's largest 3x3 layer fitted in 2.4 s on one
intra-op thread and 45 s on two, and the joint re-solve took 0.6 s against 57 s. Chunks on
separate threads wait for each other at no barrier, so a busy core mostly slows the thread that
runs there (they do share Python's lock: on a saturated machine two threads cost up to ~20 %
more than one, docs/performance.md). And the result does not depend on the thread count: every
chunk is fitted the same way, single-threaded, whichever thread runs it.

The rest of the fitting code (the joint re-solve, the budget) runs on one torch thread
(:func:`fit_threads`); the calibration passes, whole forwards and large moment products, use
torch's threads on every core (:func:`compute_threads`). ``ACL_CONVERT_THREADS=N`` overrides
all three: ``N`` chunk threads in ``fit_kernels``, ``N`` torch threads elsewhere.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = [
    "fit_threads",
    "compute_threads",
    "single_threaded",
    "workers",
    "map_in_order",
    "Contention",
]

T = TypeVar("T")
R = TypeVar("R")


def _override() -> int | None:
    value = os.environ.get("ACL_CONVERT_THREADS", "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            pass  # a malformed override is ignored rather than breaking a conversion
    return None


def _cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and ``taskset``
    restrict)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def workers() -> int:
    """Threads ``fit_kernels`` fits chunks on: ``ACL_CONVERT_THREADS``, else one per core."""
    return _override() or _cores()


@contextmanager
def fit_threads() -> Iterator[None]:
    """Run the block with the fitting code's torch thread count (one unless overridden), then
    restore the caller's."""
    before = torch.get_num_threads()
    torch.set_num_threads(_override() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def compute_threads() -> Iterator[None]:
    """Run the block with torch's intra-op threads on every core the process may use
    (``ACL_CONVERT_THREADS`` overrides): for the calibration passes, whole-network forwards and
    large moment products, where each operation is big enough to split."""
    before = torch.get_num_threads()
    torch.set_num_threads(workers())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_threaded(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator form of :func:`fit_threads`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with fit_threads():
            return fn(*args, **kwargs)

    return wrapper


def map_in_order(fn: Callable[[T], R], items: Iterable[T], n_threads: int) -> Iterator[R]:
    """``fn`` over ``items`` on ``n_threads`` threads, each running torch single-threaded; the
    results come in the order of ``items``. ``fn`` calls must be independent (torch releases
    Python's lock inside its operations, so the threads run in parallel). With one thread
    everything runs in the caller's thread (under :func:`fit_threads`: single-threaded too).
    """
    if n_threads <= 1:
        yield from map(fn, items)
        return
    # A thread's first torch operation takes the process-wide thread count, so each one sets
    # its own (OpenMP and MKL keep the count per thread; the caller's is restored afterwards
    # by fit_threads).
    pool = ThreadPoolExecutor(n_threads, initializer=torch.set_num_threads, initargs=(1,))
    try:
        for future in [pool.submit(fn, item) for item in items]:
            yield future.result()
    finally:
        # On an error (or an abandoned generator) chunks not yet started are dropped.
        pool.shutdown(wait=True, cancel_futures=True)


#: Other processes using more than this many cores during a fit make it say so.
BUSY_CORES = 0.5
#: Fits shorter than this are not worth a warning (and their CPU shares are noisy).
_MIN_SECONDS = 2.0
_warned = False


def busy_seconds() -> float | None:
    """CPU time all processes have used since boot (Linux /proc/stat; steal time counts, since
    the hypervisor gave it to someone else), or None where unavailable."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Contention:
    """How much CPU other processes took from the moment this is made: a fit on a busy machine
    takes longer than on an idle one, and the user should know why. Measured over the fit
    itself, so this process's own work never counts (a load average would include the previous
    fit of the same conversion)."""

    def __init__(self) -> None:
        self._busy, self._own, self._t0 = busy_seconds(), time.process_time(), time.perf_counter()

    def warning(self, n_threads: int) -> str | None:
        """A one-line explanation when other processes used more than :data:`BUSY_CORES` cores
        during a fit of at least a few seconds; None otherwise, and after the first one of the
        process (a conversion fits many layers on the same busy machine)."""
        global _warned
        wall = time.perf_counter() - self._t0
        after = busy_seconds()
        if _warned or self._busy is None or after is None or wall < _MIN_SECONDS:
            return None
        other = max(0.0, (after - self._busy) - (time.process_time() - self._own)) / wall
        if other <= BUSY_CORES:
            return None
        _warned = True
        return (
            f"other processes kept {other:.1f} of {_cores()} cores busy while fitting, so it "
            f"took longer than on an idle machine (fitted on {n_threads} thread(s); "
            "ACL_CONVERT_THREADS sets how many)"
        )
