"""Tao General Difference kernels (paper Eqs. 16-22): first- and second-order, oriented.

Decision (SPEC §2): Eq. 16 prints ``sign(cos theta)``, a constant that would make the kernel
one-signed, while the text says the kernel has a positive and a negative part split at
``|x'| > delta``. We read it as ``sign(x')``.
"""

from __future__ import annotations

import math

import torch

from .family import KernelFamily, Param, fold_pi
from .registry import register

#: Half-width of the dead band of TGD1st's indicator ``|x'| > delta`` (paper: "such as 1e-4").
DELTA = 1e-4


def _rotate(x, y, theta):
    c, s = torch.cos(theta), torch.sin(theta)
    return x * c + y * s, -x * s + y * c


def _tgd1st(x, y, theta, g1, g2):
    # sign() and the indicator are piecewise constant, so the theta-gradient of this kernel
    # comes from the envelope only; jumps of the sign are invisible to autograd.
    xr, yr = _rotate(x, y, theta)
    envelope = torch.exp(-(xr * xr) / (g1 * g1) - (yr * yr) / (g2 * g2))
    return envelope * torch.sign(xr) * (xr.abs() > DELTA).to(xr.dtype)


def _canonical_tgd1st(akp, gain):
    theta, g1, g2 = akp.unbind(-1)
    if gain is None:
        # theta + pi flips the sign; without a gain to absorb it the period is 2 pi.
        theta = torch.remainder(theta, 2 * math.pi)
        theta = torch.where(theta >= 2 * math.pi, theta - 2 * math.pi, theta)  # rounding
    else:
        theta, odd = fold_pi(theta)
        gain = torch.where(odd, -gain, gain)
    return torch.stack([theta, g1, g2], -1), gain


def _origin_mask(x, y):
    return (x == 0) & (y == 0)  # only true somewhere when h and w are both odd


def _tgd2nd(x, y, theta, gamma):
    xr, _ = _rotate(x, y, theta)
    r2 = x * x + y * y  # rotation keeps x'^2 + y'^2 = x^2 + y^2
    at0 = _origin_mask(x, y)
    # V(0, 0) = 0; the safe denominator keeps the origin's gradient finite (not NaN).
    v = torch.exp(-r2 / (gamma * gamma)) * xr.abs() / torch.where(at0, torch.ones_like(r2), r2)
    v = torch.where(at0, torch.zeros_like(v), v)
    return v - v.sum((-2, -1), keepdim=True) * at0.to(v.dtype)


def _canonical_tgd2nd(akp, gain):
    theta, gamma = akp.unbind(-1)
    return torch.stack([fold_pi(theta)[0], gamma], -1), gain


TGD1ST = register(
    KernelFamily(
        code="Tf",
        name="tgd1st",
        params=(
            Param(
                "theta",
                "rad",
                "angle",
                "[0, pi) with a gain, else [0, 2 pi)",
                lambda h, w: (0.0, 2 * math.pi),
                "orientation of the difference axis x'",
            ),
            Param(
                "gamma1",
                "px",
                "positive",
                "(0, inf)",
                lambda h, w: (0.5, max(1.0, float(max(h, w)))),
                "decay along x'",
            ),
            Param(
                "gamma2",
                "px",
                "positive",
                "(0, inf)",
                lambda h, w: (0.5, max(1.0, float(max(h, w)))),
                "decay along y'",
            ),
        ),
        formula=_tgd1st,
        colour=(30, 90, 230),
        canonical=_canonical_tgd1st,
        smooth=False,
        tex=r"e^{-x'^2/\gamma_1^2 - y'^2/\gamma_2^2}\,\mathrm{sign}(x')\,\mathbf{I}_{|x'|>\delta}",
        doc="First-order TGD: an oriented, antisymmetric edge detector. The theta-gradient "
        "comes from the envelope only (sign and indicator are piecewise constant).",
    )
)

TGD2ND = register(
    KernelFamily(
        code="Ts",
        name="tgd2nd",
        params=(
            Param(
                "theta",
                "rad",
                "angle",
                "[0, pi)",
                lambda h, w: (0.0, math.pi),
                "orientation (period pi)",
            ),
            Param(
                "gamma",
                "px",
                "positive",
                "(0, inf)",
                lambda h, w: (0.5, max(1.0, float(max(h, w)))),
                "decay of the envelope",
            ),
        ),
        formula=_tgd2nd,
        colour=(20, 160, 60),
        canonical=_canonical_tgd2nd,
        tex=r"V - \mathrm{sum}(V)\,\mathbf{I}_{x=y=0},\ V = e^{-(x'^2+y'^2)/\gamma^2}"
        r"\left|\frac{x'}{x'^2+y'^2}\right|,\ V(0,0)=0",
        doc="Second-order TGD: an oriented line/ridge detector that sums to zero (odd sizes).",
    )
)
