"""Oriented Gaussian derivatives of first and second order (not in the paper). Opt-in.

The scale-space model of receptive fields (Lindeberg): derivatives along ``x'`` of the isotropic
Gaussian ``g = exp(-(x^2 + y^2) / (2 sigma^2))``. They are the smooth counterparts of the paper's
TGD1st and TGD2nd, with a scale instead of TGD's sign and ``|x'|``, so gradients reach every AKP.

Normalisation: ``sigma^n d^n g / dx'^n`` of the *unnormalised* Gaussian (Lindeberg's
scale-normalised derivative with gamma-normalisation 1, without the ``1 / (2 pi sigma^2)``). Its
peak magnitude does not depend on sigma (``e^{-1/2}`` for Dx, 1 for Dxx), which keeps the fitted
gain of the same order at every scale; any other constant would be absorbed by the gain.

Codes ``Dx`` and ``Dxx`` (scale-space notation for the derivatives), not ``D1``/``D2``: in an
arrangement pattern the count follows the code, and ``D110`` would read as "D, 110 kernels".
"""

from __future__ import annotations

import math

import torch

from .family import KernelFamily, Param, fold_pi
from .registry import register


def _gauss1st(x, y, theta, sigma):
    xr = (x * torch.cos(theta) + y * torch.sin(theta)) / sigma
    return -xr * torch.exp(-(x * x + y * y) / (2 * sigma * sigma))


def _gauss2nd(x, y, theta, sigma):
    xr = (x * torch.cos(theta) + y * torch.sin(theta)) / sigma
    return (xr * xr - 1) * torch.exp(-(x * x + y * y) / (2 * sigma * sigma))


def _canonical_1st(akp, gain):
    theta, sigma = akp.unbind(-1)
    if gain is None:
        # theta + pi negates x' and so the kernel; without a gain to absorb it the period is 2 pi.
        theta = torch.remainder(theta, 2 * math.pi)
        theta = torch.where(theta >= 2 * math.pi, theta - 2 * math.pi, theta)  # rounding
    else:
        theta, odd = fold_pi(theta)
        gain = torch.where(odd, -gain, gain)
    return torch.stack([theta, sigma], -1), gain


def _canonical_2nd(akp, gain):
    theta, sigma = akp.unbind(-1)
    return torch.stack([fold_pi(theta)[0], sigma], -1), gain


def _sigma() -> Param:
    return Param(
        "sigma",
        "px",
        "positive",
        "(0, inf)",
        lambda h, w: (0.4, max(1.0, 0.5 * max(h, w))),
        "standard deviation of the Gaussian",
    )


GAUSS1ST = register(
    KernelFamily(
        code="Dx",
        name="gauss1st",
        params=(
            Param(
                "theta",
                "rad",
                "angle",
                "[0, pi) with a gain, else [0, 2 pi)",
                lambda h, w: (0.0, 2 * math.pi),
                "direction of the derivative x'",
            ),
            _sigma(),
        ),
        formula=_gauss1st,
        colour=(140, 85, 40),
        canonical=_canonical_1st,
        tex=r"\sigma\,\partial_{x'} e^{-\frac{x^2+y^2}{2\sigma^2}}"
        r" = -\frac{x'}{\sigma}\,e^{-\frac{x^2+y^2}{2\sigma^2}}",
        doc="First-order Gaussian derivative (opt-in, not in the paper): a smooth oriented edge "
        "detector, negative on the side x' > 0.",
    )
)

GAUSS2ND = register(
    KernelFamily(
        code="Dxx",
        name="gauss2nd",
        params=(
            Param(
                "theta",
                "rad",
                "angle",
                "[0, pi)",
                lambda h, w: (0.0, math.pi),
                "direction of the derivative x' (period pi)",
            ),
            _sigma(),
        ),
        formula=_gauss2nd,
        colour=(150, 150, 0),
        canonical=_canonical_2nd,
        tex=r"\sigma^2\,\partial_{x'}^2 e^{-\frac{x^2+y^2}{2\sigma^2}}"
        r" = \left(\frac{x'^2}{\sigma^2} - 1\right)e^{-\frac{x^2+y^2}{2\sigma^2}}",
        doc="Second-order Gaussian derivative (opt-in, not in the paper): a smooth oriented "
        "line/ridge detector, negative along the line y' through the centre.",
    )
)
