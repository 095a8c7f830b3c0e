"""How many CPU threads the fitting code uses: one, unless told otherwise.

Fitting is thousands of small tensor operations (a 3x3 kernel batch's Jacobians, one output
channel's normal equations). Splitting each across threads gains little even on an idle machine,
and on a busy one every operation waits for a core another process holds: measured on the
2-core VM with other jobs running, SqueezeNet's largest 3x3 layer fitted in 2.4 s on one thread
and 45 s on two, and its joint re-solve took 0.6 s against 57 s. ``ACL_CONVERT_THREADS=N``
overrides (e.g. on a many-core machine with big batches).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = ["fit_threads", "single_threaded"]

T = TypeVar("T")


def _wanted() -> int:
    value = os.environ.get("ACL_CONVERT_THREADS", "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            pass  # a malformed override is ignored rather than breaking a conversion
    return 1


@contextmanager
def fit_threads() -> Iterator[None]:
    """Run the block with the fitting thread count, then restore the caller's."""
    before = torch.get_num_threads()
    torch.set_num_threads(_wanted())
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
