"""Coarse initialisation: a dictionary of each family's kernels over a grid of AKPs.

Under variable projection the best gain and offset for a kernel ``W`` and a candidate ``F`` are
closed-form, and the residual only depends on the normalised correlation of the *projected*
kernels (centred when the offset is on). So one matrix product of all kernels with all unit-norm
projected atoms scores every (kernel, grid point) pair at once, and the best atoms are the
starting points of the local refinement. This is what makes non-smooth AKPs (TGD1st's sign,
TGD2nd's ``|x'|``) safe: their orientation is found by the grid, not by gradients.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from ..kernels import KernelFamily

__all__ = ["Dictionary", "build", "orientation_points", "search_box"]

#: Points per positive (scale) AKP, by the family's number of AKPs: the dictionary stays near a
#: few thousand atoms, and one- and two-AKP families get a dense enough grid that the best atom
#: already sits in the global minimum's basin.
SCALE_POINTS = {1: 96, 2: 16, 3: 12, 4: 8}
#: Points of a phase axis (psi): the cosine's shape changes slowly with the phase.
PHASE_POINTS = 6

# Scales searched, in pixels: from below a pixel up to about the kernel's extent. The refinement
# may leave this range; it only has to contain good starting points.
_SCALE_RANGE = {
    "lambda": lambda e: (1.4, max(4.0, 3.0 * e)),
    "default": lambda e: (0.35, max(2.0, 3.0 * e)),
}


def orientation_points(family: KernelFamily, h: int, w: int) -> int:
    """Orientation grid size. A kernel of radius R resolves angles of about 1/R rad, so the grid
    grows with the kernel; a non-smooth family (TGD1st's sign) gets no help from gradients and
    half as many points again. Families with at most two AKPs have tiny dictionaries and get a
    dense grid whatever the size: on 3x3 and 4x4 kernels TGD2nd's |x'| makes the orientation
    objective piecewise, with many local minima."""
    if len(family.params) <= 2:
        return 48
    n = 3 * max(h, w)
    if not family.smooth:
        n = n * 3 // 2
    return int(min(40, max(8, n)))


def search_box(family: KernelFamily, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Bounds ``(P,)`` on the unconstrained AKPs during refinement: scales stay within
    [0.1 px, 64x the kernel's extent]. Beyond them a kernel is a delta or has reached its limit
    shape (a Gabor with huge wavelength is a Gaussian derivative), and the gain and offset that
    rescale the nearly flat kernel grow like scale^2, until float32 storage loses the shape to
    cancellation. Measured on SqueezeNet conv1: 64x loses nothing against no bound, 16x costs
    0.003 of median Gabor residual. Angles are free (infinite bounds)."""
    lo = torch.full((len(family.params),), -math.inf, dtype=torch.float64)
    hi = torch.full((len(family.params),), math.inf, dtype=torch.float64)
    for k, p in enumerate(family.params):
        if p.kind == "positive":
            lo[k], hi[k] = math.log(0.1), math.log(64.0 * max(h, w))
    return lo, hi


class Dictionary:
    """Unit-norm projected atoms of one family on one kernel size.

    Attributes:
        u: ``(K, P)`` unconstrained AKPs of the atoms.
        atoms: ``(K, h*w)`` projected (centred if ``offset``) atoms of unit L2 norm; atoms whose
            projection vanishes (e.g. a constant under centring) are zero and never win.
    """

    def __init__(self, u: Tensor, atoms: Tensor) -> None:
        self.u = u
        self.atoms = atoms

    def best(self, w_proj: Tensor, k: int = 1, chunk: int = 4096) -> Tensor:
        """Indices ``(N, k)`` of the ``k`` atoms best correlated (in absolute value, since the gain
        takes any sign) with the projected kernels ``w_proj`` of shape ``(N, h*w)``."""
        out = []
        for start in range(0, w_proj.shape[0], chunk):
            scores = (w_proj[start : start + chunk] @ self.atoms.T).abs_()
            out.append(scores.topk(k, dim=1).indices)
        return torch.cat(out) if out else torch.empty(0, k, dtype=torch.long, device=w_proj.device)


def _axis(family: KernelFamily, k: int, h: int, w: int, shift: float) -> Tensor:
    p = family.params[k]
    if p.kind == "positive":
        lo, hi = _SCALE_RANGE.get(p.name, _SCALE_RANGE["default"])(max(h, w))
        n = SCALE_POINTS[min(len(family.params), max(SCALE_POINTS))]
        steps = (torch.arange(n, dtype=torch.float64) + shift) / n
        return math.log(lo) + steps * (math.log(hi) - math.log(lo))
    # With a gain of either sign, pi-periodicity covers every orientation and phase: theta + pi
    # and psi + pi are a sign flip (Gabor, TGD1st) or the same kernel (TGD2nd).
    n = orientation_points(family, h, w) if p.name.startswith("theta") else PHASE_POINTS
    axis = (torch.arange(n, dtype=torch.float64) + shift) * (math.pi / n)
    if p.name.startswith("theta") and not family.smooth:
        # A non-smooth family can have kernels that exist only at exact angles: TGD1st's dead
        # band |x'| <= delta zeroes a whole row, column or diagonal of pixels only within delta
        # of the axis (a Sobel/Prewitt-like kernel). No shifted grid point lands there and no
        # gradient leads there, so the multiples of pi/4 are always in the grid.
        axis = torch.cat([axis, torch.arange(4, dtype=torch.float64) * (math.pi / 4)])
    return axis


@lru_cache(maxsize=64)
def _build_cached(
    family: KernelFamily, h: int, w: int, offset: bool, seed: int, device: str, dtype: torch.dtype
) -> Dictionary:
    gen = torch.Generator().manual_seed(seed)
    # A random shift of the whole grid (one per axis) makes the dictionary depend on the seed
    # while keeping its regular coverage: a randomly shifted lattice.
    shifts = torch.rand(len(family.params), generator=gen, dtype=torch.float64).tolist()
    axes = [_axis(family, k, h, w, shifts[k]) for k in range(len(family.params))]
    u = torch.cartesian_prod(*axes) if len(axes) > 1 else axes[0][:, None]
    atoms = family(family.from_unconstrained(u), h, w).reshape(len(u), h * w)
    if offset:
        atoms = atoms - atoms.mean(1, keepdim=True)
    norm = atoms.norm(dim=1, keepdim=True)
    atoms = torch.where(norm > 1e-9, atoms / norm.clamp_min(1e-30), torch.zeros_like(atoms))
    return Dictionary(u.to(device=device, dtype=dtype), atoms.to(device=device, dtype=dtype))


def build(
    family: KernelFamily,
    h: int,
    w: int,
    *,
    offset: bool,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Dictionary:
    """The (cached) dictionary of ``family`` for ``h x w`` kernels. Built in float64 on the CPU
    (it is small) and moved to ``device``/``dtype``."""
    return _build_cached(family, h, w, bool(offset), int(seed), str(device), dtype)
