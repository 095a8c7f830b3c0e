"""Gabor kernel (paper Eqs. 12-14), real part, aspect ratio fixed to 1 as in the paper."""

from __future__ import annotations

import math

import torch

from .family import KernelFamily, Param, Search, fold_pi, wrap_pi
from .registry import register


def _gabor(x, y, lam, theta, psi, sigma):
    # gamma = 1 makes the envelope isotropic, so it needs x^2 + y^2, not the rotated pair.
    xr = x * torch.cos(theta) + y * torch.sin(theta)
    envelope = torch.exp(-(x * x + y * y) / (2 * sigma * sigma))
    return envelope * torch.cos(2 * math.pi * xr / lam + psi)


def _canonical(akp, gain):
    lam, theta, psi, sigma = akp.unbind(-1)
    if gain is not None:
        # cos(a + psi + pi) = -cos(a + psi): a negative gain becomes a phase shift.
        neg = gain < 0
        psi = torch.where(neg, psi + math.pi, psi)
        gain = gain.abs()
    # theta + pi mirrors x' -> -x', which the cosine absorbs as psi -> -psi.
    theta, odd = fold_pi(theta)
    psi = wrap_pi(torch.where(odd, -psi, psi))
    return torch.stack([lam, theta, psi, sigma], -1), gain


GABOR = register(
    KernelFamily(
        code="G",
        name="gabor",
        params=(
            Param(
                "lambda",
                "px",
                "positive",
                "(0, inf)",
                lambda h, w: (2.0, max(3.0, 2.0 * max(h, w))),
                "wavelength of the sinusoid",
                # From the diagonal Nyquist wavelength (1.4 px) up: shorter is aliased.
                Search("scale", lo=1.4, hi_min=4.0),
            ),
            Param(
                "theta",
                "rad",
                "angle",
                "[0, pi) canonical",
                lambda h, w: (0.0, math.pi),
                "orientation of the wave vector (from the row axis)",
            ),
            Param(
                "psi",
                "rad",
                "angle",
                "(-pi, pi] canonical",
                lambda h, w: (-math.pi, math.pi),
                "phase offset",
                Search("phase"),
            ),
            Param(
                "sigma",
                "px",
                "positive",
                "(0, inf)",
                lambda h, w: (0.4, max(1.0, 0.6 * max(h, w))),
                "standard deviation of the Gaussian envelope",
            ),
        ),
        formula=_gabor,
        colour=(220, 30, 30),
        canonical=_canonical,
        tex=r"\exp\!\left(-\frac{x'^2 + y'^2}{2\sigma^2}\right)"
        r"\cos\!\left(\frac{2\pi x'}{\lambda} + \psi\right)",
        doc="Real Gabor function: an oriented sinusoid under an isotropic Gaussian (gamma = 1).",
    )
)
