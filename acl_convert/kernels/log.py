"""Laplacian of Gaussian kernel (paper Eq. 15), isotropic, one AKP."""

from __future__ import annotations

import math

import torch

from .family import KernelFamily, Param
from .registry import register


def _log(x, y, sigma):
    s2 = sigma * sigma
    q = (x * x + y * y) / (2 * s2)
    return -1.0 / (math.pi * s2 * s2) * (1 - q) * torch.exp(-q)


LOG = register(
    KernelFamily(
        code="Lg",
        name="log",
        params=(
            Param(
                "sigma",
                "px",
                "positive",
                "(0, inf)",
                lambda h, w: (0.4, max(1.0, 0.5 * max(h, w))),
                "standard deviation of the Gaussian",
            ),
        ),
        formula=_log,
        colour=(130, 50, 190),
        tex=r"-\frac{1}{\pi\sigma^4}\left[1 - \frac{x^2+y^2}{2\sigma^2}\right]"
        r"e^{-\frac{x^2+y^2}{2\sigma^2}}",
        doc="Laplacian of Gaussian: a centre-surround blob detector, negative at the centre.",
    )
)
