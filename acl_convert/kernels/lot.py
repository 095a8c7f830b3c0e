"""Laplacian of TGD kernel (paper Eqs. 23-24), isotropic, one AKP."""

from __future__ import annotations

import torch

from .family import KernelFamily, Param
from .registry import register


def _lot(x, y, sigma):
    v = torch.exp(-(x * x + y * y) / (sigma * sigma))
    at0 = ((x == 0) & (y == 0)).to(v.dtype)  # no sample at the origin for even sizes
    # V - sum(V) at the origin equals minus the sum of the other samples, since V(0, 0) = 1.
    # Written this way it does not cancel: for small sigma, 1 - (1 + 4e-9) is 0 in float32.
    ring = v * (1 - at0)
    return ring - ring.sum((-2, -1), keepdim=True) * at0


LOT = register(
    KernelFamily(
        code="Lt",
        name="lot",
        params=(
            Param(
                "sigma",
                "px",
                "positive",
                "(0, inf)",
                lambda h, w: (0.5, max(1.0, float(max(h, w)))),
                "decay of the surround",
            ),
        ),
        formula=_lot,
        colour=(240, 100, 190),
        tex=r"V - \mathrm{sum}(V)\,\mathbf{I}_{x=y=0},\ V = e^{-(x^2+y^2)/\sigma^2}",
        doc="Laplacian of TGD: a positive surround with a negative centre that sums to zero.",
    )
)
