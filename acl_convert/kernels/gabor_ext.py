"""Extended Gabor kernel (not in the paper): free aspect ratio and a centre offset. Opt-in.

The paper fixes the aspect ratio gamma to 1 and centres the envelope on the kernel. Real first-
layer kernels can be elongated along their stripes and centred off the grid's centre, so this
family frees both (on SqueezeNet conv1 that cuts the median Gabor residual from 0.40 to 0.30,
docs/kernels.md); with ``gamma = 1`` and ``x0 = y0 = 0`` it is the paper's Gabor (:mod:`.gabor`)
exactly.
"""

from __future__ import annotations

import math

import torch

from .family import KernelFamily, Param, Search
from .gabor import GABOR
from .gabor import _canonical as _gabor_canonical
from .registry import register


def _gabor_ext(x, y, lam, theta, psi, sigma, gamma, x0, y0):
    xs, ys = x - x0, y - y0
    c, s = torch.cos(theta), torch.sin(theta)
    xr = xs * c + ys * s
    yr = -xs * s + ys * c
    envelope = torch.exp(-(xr * xr + gamma * gamma * yr * yr) / (2 * sigma * sigma))
    return envelope * torch.cos(2 * math.pi * xr / lam + psi)


def _canonical(akp, gain):
    # A half-turn negates x' and y' about the (shifted) centre: the envelope is even in both, so
    # gamma and the centre stay, and the cosine absorbs the mirror as psi -> -psi, exactly the
    # paper's Gabor rule on the first four AKPs (which have the same meaning and order).
    head, gain = _gabor_canonical(akp[..., :4], gain)
    return torch.cat([head, akp[..., 4:]], -1), gain


def _offset_init(n: int) -> tuple[float, float]:
    # Up to half the kernel's half-size (at least half a pixel): off-centre, as real kernels
    # often are, but never a centre outside the kernel.
    a = max(0.5, (n - 1) / 4)
    return (-a, a)


GABOR_EXT = register(
    KernelFamily(
        code="Ge",
        name="gabor_ext",
        # Wavelength and orientation mean exactly what they mean in the paper's Gabor.
        params=(
            *GABOR.params[:2],
            Param(
                "psi",
                "rad",
                "angle",
                "(-pi, pi] canonical",
                lambda h, w: (-math.pi, math.pi),
                "phase offset (at the centre x0, y0)",
                Search("phase"),
            ),
            Param(
                "sigma",
                "px",
                "positive",
                "(0, inf)",
                lambda h, w: (0.4, max(1.0, 0.6 * max(h, w))),
                "standard deviation of the envelope along x' (across the stripes)",
            ),
            Param(
                "gamma",
                "1",
                "positive",
                "(0, inf)",
                lambda h, w: (0.5, 2.0),
                "aspect ratio: the envelope's s.d. along y' (the stripes) is sigma / gamma",
                # A ratio, not a length: one decade around 1 whatever the kernel's size.
                Search("ratio", lo=0.3, hi=3.0),
            ),
            Param(
                "x0",
                "px",
                "real",
                "(-inf, inf)",
                lambda h, w: _offset_init(h),
                "centre offset down the rows",
            ),
            Param(
                "y0",
                "px",
                "real",
                "(-inf, inf)",
                lambda h, w: _offset_init(w),
                "centre offset along the columns",
            ),
        ),
        formula=_gabor_ext,
        colour=(0, 150, 160),
        canonical=_canonical,
        tex=r"\exp\!\left(-\frac{x'^2 + \gamma^2 y'^2}{2\sigma^2}\right)"
        r"\cos\!\left(\frac{2\pi x'}{\lambda} + \psi\right),\ "
        r"x' = (x - x_0)\cos\theta + (y - y_0)\sin\theta,\ "
        r"y' = -(x - x_0)\sin\theta + (y - y_0)\cos\theta",
        doc="Extended Gabor (opt-in, not in the paper): an oriented sinusoid under an elongated "
        "Gaussian envelope (aspect ratio gamma) centred at (x0, y0).",
    )
)
