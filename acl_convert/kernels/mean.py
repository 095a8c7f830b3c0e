"""Mean kernel (paper Eq. 11): the all-ones kernel of unit L2 norm, no AKPs."""

from __future__ import annotations

import math

import torch

from .family import KernelFamily
from .registry import register


def _mean(x, y):
    h, w = x.shape[0], y.shape[1]
    return torch.ones(h, w, dtype=x.dtype, device=x.device) / math.sqrt(h * w)


MEAN = register(
    KernelFamily(
        code="M",
        name="mean",
        params=(),
        formula=_mean,
        colour=(60, 60, 60),
        tex=r"\mathbf{1}_{h\times w} / \sqrt{h w}",
        doc="Constant kernel of unit L2 norm. No AKPs; as an ACK it never changes.",
    )
)
