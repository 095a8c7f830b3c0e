"""Held-out calibration images: the fidelity a conversion reports is measured on images it did
not fit to, so the numbers a user sees are not optimistic."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import UsageError, option
from .moments import Calibration

__all__ = [
    "DEFAULT_HOLDOUT_SHARE",
    "DEFAULT_HOLDOUT_CAP",
    "default_holdout",
    "held_positions",
    "split_holdout",
    "split_calibration",
]

#: By default a quarter of the calibration images is held out, at most 64: enough for a top-1
#: agreement within a few points, while the fit keeps three quarters (192 of the default 256).
DEFAULT_HOLDOUT_SHARE = 4
DEFAULT_HOLDOUT_CAP = 64


def default_holdout(images: int) -> int:
    """How many of ``images`` calibration images are held out when the user does not say."""
    return min(DEFAULT_HOLDOUT_CAP, images // DEFAULT_HOLDOUT_SHARE)


def held_positions(images: int, holdout: int) -> list[int]:
    """``holdout`` positions spread evenly over ``0 .. images-1`` (a folder sorted by class
    name would give a block of a few classes if the last ones were taken)."""
    return sorted({(2 * i + 1) * images // (2 * holdout) for i in range(holdout)})


def split_holdout(batches: Sequence[Tensor], holdout: int) -> tuple[list[Tensor], list[Tensor]]:
    """Split ``(B, C, H, W)`` image batches into the images to fit to and ``holdout`` held-out
    images (both as batches of at most the largest given batch size; disjoint, together all)."""
    images = torch.cat(list(batches)) if batches else torch.empty(0)
    n = len(images)
    if not 0 <= holdout < n:
        raise ValueError(f"holdout must be in 0..{n - 1} for {n} images, got {holdout}")
    held = torch.zeros(n, dtype=torch.bool)
    if holdout:
        held[held_positions(n, holdout)] = True
    size = max(len(b) for b in batches)
    return _batched(images[~held], size), _batched(images[held], size)


def _batched(images: Tensor, size: int) -> list[Tensor]:
    return list(images.split(size)) if len(images) else []


def split_calibration(calib: Calibration, holdout: int | None) -> tuple[Calibration, list[Tensor]]:
    """``calib`` without its held-out images, and those images as batches. ``holdout``: how
    many (None: :func:`default_holdout`). Raises :class:`UsageError` when none would be left
    to fit to."""
    n = calib.images
    count = default_holdout(n) if holdout is None else holdout
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise UsageError(f"{option('holdout')} must be an integer >= 0, got {holdout!r}")
    if count >= n:
        raise UsageError(
            f"{option('holdout', count)} leaves none of the {n} calibration images to fit "
            f"to; hold out fewer than {n}"
        )
    fit, held = split_holdout(calib.batches, count)
    return Calibration(fit), held
