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

__all__ = ["Dictionary", "build", "orientation_points", "search_box", "top_k"]

#: Points per positive (scale) AKP, by the family's number of AKPs (a count between two keys
#: takes the lower key's entry): the dictionary stays near a few thousand atoms (below 20,000
#: for the 7-AKP extended Gabor), and one- and two-AKP families get a dense enough grid that the
#: best atom already sits in the global minimum's basin.
SCALE_POINTS = {1: 96, 2: 16, 3: 12, 4: 8, 7: 4}
#: Points of a dimensionless positive axis (a ratio: Ge's aspect ratio), whatever the count: its
#: range is one decade, and on planted 7x7 Ge kernels 5 points recover no more than 3.
RATIO_POINTS = 3
#: Points of a phase axis (psi), by the family's number of AKPs: the cosine's shape changes
#: slowly with the phase; with 7 AKPs 4 points recover planted kernels as well as 6.
PHASE_POINTS = {1: 6, 7: 4}
#: Points of a real (centre offset) axis, spaced :data:`REAL_STEP` px apart around 0. A centre
#: grid of one point ({0}) loses 5 % of planted 7x7 Ge kernels; 5 points 0.75 px apart gain
#: about 1 % at 2.8x the atoms.
REAL_POINTS = 3
REAL_STEP = 1.0


def _by_count(table: dict[int, int], family: KernelFamily) -> int:
    return table[max(c for c in table if c <= len(family.params))]


def _real_bound(h: int, w: int) -> float:
    """Largest |value| of a real AKP (a centre offset, px) in refinement: the kernel's half-size
    plus a pixel. Further out only the envelope's tail is sampled, which a larger scale mimics."""
    return (max(h, w) - 1) / 2 + 1.0


def orientation_points(family: KernelFamily, h: int, w: int) -> int:
    """Orientation grid size. A kernel of radius R resolves angles of about 1/R rad, so the grid
    grows with the kernel; a non-smooth family (TGD1st's sign) gets no help from gradients and
    half as many points again. Families with at most two AKPs have tiny dictionaries and get a
    dense grid whatever the size: on 3x3 and 4x4 kernels TGD2nd's |x'| makes the orientation
    objective piecewise, with many local minima. A family with more than four AKPs (the extended
    Gabor) multiplies the grid by its extra axes, so it gets half the points: on planted 7x7 Ge
    kernels 10 orientations recover as many as 21."""
    if len(family.params) <= 2:
        return 48
    n = 3 * max(h, w)
    if not family.smooth:
        n = n * 3 // 2
    if len(family.params) > 4:
        n //= 2
    return int(min(40, max(8, n)))


def search_box(family: KernelFamily, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Bounds ``(P,)`` on the unconstrained AKPs during refinement: scales stay within
    [0.1 px, 64x the kernel's extent]. Beyond them a kernel is a delta or has reached its limit
    shape (a Gabor with huge wavelength is a Gaussian derivative), and the gain and offset that
    rescale the nearly flat kernel grow like scale^2, until float32 storage loses the shape to
    cancellation. Measured on SqueezeNet conv1: 64x loses nothing against no bound, 16x costs
    0.003 of median Gabor residual. Real AKPs (Ge's centre offsets) stay within the kernel's
    half-size + 1 px (:func:`_real_bound`). Angles are free (infinite bounds)."""
    lo = torch.full((len(family.params),), -math.inf, dtype=torch.float64)
    hi = torch.full((len(family.params),), math.inf, dtype=torch.float64)
    for k, p in enumerate(family.params):
        if p.kind == "positive":
            lo[k], hi[k] = math.log(0.1), math.log(64.0 * max(h, w))
        elif p.kind == "real":
            lo[k], hi[k] = -_real_bound(h, w), _real_bound(h, w)
    return lo, hi


#: Scores per score matrix in :meth:`Dictionary.best` (float32: 2 MiB, a core's L2 cache).
_SCORES = 2**19
#: Atoms per block in :func:`top_k`.
_BLOCK = 64


def top_k(scores: Tensor, k: int) -> Tensor:
    """Indices ``(R, k)`` of the ``k`` largest of each row of ``scores`` ``(R, K)``, largest
    first: ``scores.topk(k).indices`` up to ties, but several times cheaper for a dictionary's
    thousands of atoms. Every one of the ``k`` largest scores lies in one of the ``k`` blocks of
    atoms with the largest maxima, so one pass takes the blocks' maxima (a vectorised
    reduction, unlike ``topk``'s per-row selection) and ``topk`` only runs on those ``k``
    blocks."""
    n_rows, n_atoms = scores.shape
    n_blocks = -(-n_atoms // _BLOCK)
    if n_blocks <= 2 * k:
        return scores.topk(k, dim=1).indices
    full = n_atoms // _BLOCK * _BLOCK
    maxima = scores[:, :full].view(n_rows, -1, _BLOCK).amax(-1)
    if full < n_atoms:  # a last, shorter block
        maxima = torch.cat([maxima, scores[:, full:].amax(-1, keepdim=True)], 1)
    blocks = maxima.topk(k, dim=1).indices  # (R, k)
    cols = (blocks[..., None] * _BLOCK + torch.arange(_BLOCK, device=scores.device)).flatten(1)
    picked = scores.gather(1, cols.clamp_max(n_atoms - 1))
    # Past the last atom (the shorter block's padding) nothing may win.
    picked = picked.masked_fill_(cols >= n_atoms, -torch.inf)
    return cols.gather(1, picked.topk(k, dim=1).indices)


class Dictionary:
    """Unit-norm projected atoms of one family on one kernel size.

    Attributes:
        u: ``(K, P)`` unconstrained AKPs of the atoms.
        atoms: ``(K, h*w)`` projected (centred if ``offset``) atoms of unit L2 norm; atoms whose
            projection vanishes (e.g. a constant under centring) are zero and never win.
        raw: ``(K, h*w)`` the atoms as sampled, for scoring under an activation-weighted norm.
    """

    def __init__(self, u: Tensor, atoms: Tensor, raw: Tensor | None = None) -> None:
        self.u = u
        self.atoms = atoms
        self.raw = atoms if raw is None else raw

    def best(self, w_proj: Tensor, k: int = 1) -> Tensor:
        """Indices ``(N, k)`` of the ``k`` atoms best correlated (in absolute value, since the gain
        takes any sign) with the projected kernels ``w_proj`` of shape ``(N, h*w)``, or summed
        over the channels of stacks ``(N, T, h*w)`` that share an atom (squared correlations
        add, since each channel has its own gain)."""
        out = []
        # Kernels per score matrix: small enough that it stays in the cache between the product
        # that writes it and the reductions that read it.
        n_chan = w_proj.shape[1] if w_proj.ndim == 3 else 1
        rows = max(1, _SCORES // (self.atoms.shape[0] * n_chan))
        for start in range(0, w_proj.shape[0], rows):
            part = w_proj[start : start + rows]
            if part.ndim == 2:
                scores = (part @ self.atoms.T).abs_()
            else:
                scores = ((part @ self.atoms.T) ** 2).sum(1)
            out.append(top_k(scores, k))
        return torch.cat(out) if out else torch.empty(0, k, dtype=torch.long, device=w_proj.device)

    def best_weighted(self, w_proj: Tensor, proj: Tensor, group: Tensor, k: int = 1) -> Tensor:
        """Like :meth:`best` under per-channel projectors (see :mod:`.metric`).

        Args:
            w_proj: ``(N, T, n)`` kernels already projected by their channel's projector.
            proj: ``(G, n, n)`` projectors, one per input channel (group).
            group: ``(N, T)`` long, the projector of every kernel channel.

        The score of an atom ``a`` is the cost it removes, summed over a kernel's channels:
        ``(w~ . M a)^2 / |M a|^2``. The numerator is ``((M^T w~) . a)^2``, one matrix product
        with the raw atoms for all kernels whatever their group; only the denominators
        ``a^T M^T M a`` depend on the group, ``(G, K)`` of them (a depthwise layer has as many
        groups as kernels, so nothing may be built per group and atom and pixel)."""
        n_k = self.raw.shape[0]
        gram = proj.transpose(1, 2) @ proj  # (G, n, n)
        den = torch.einsum("kn,gnm,km->gk", self.raw, gram, self.raw)
        # Atoms whose projection vanishes (a constant under the offset) never win.
        ok = den > 1e-9 * den.amax(1, keepdim=True).clamp_min(1e-30)
        inv = torch.where(ok, 1.0 / den.clamp_min(1e-30), torch.zeros_like(den))
        out = []
        for start in range(0, w_proj.shape[0], 1024):
            part, grp = w_proj[start : start + 1024], group[start : start + 1024]
            scores = part.new_zeros(part.shape[0], n_k)
            for t in range(part.shape[1]):
                v = torch.einsum("rij,ri->rj", proj[grp[:, t]], part[:, t])  # M^T w~
                scores += (v @ self.raw.T).square_() * inv[grp[:, t]]
            out.append(top_k(scores, min(k, n_k)))
        if not out:
            return torch.empty(0, k, dtype=torch.long, device=w_proj.device)
        return torch.cat(out)


def _axis(family: KernelFamily, k: int, h: int, w: int, shift: float) -> Tensor:
    """The grid of AKP ``k`` in unconstrained units, as its :class:`~acl_convert.kernels.Search`
    declares it, shifted by ``shift`` (in grid steps, ``[0, 1)``)."""
    search = family.params[k].search
    if search.axis in ("scale", "ratio"):
        lo, hi = search.range(h, w)
        n = RATIO_POINTS if search.axis == "ratio" else _by_count(SCALE_POINTS, family)
        steps = (torch.arange(n, dtype=torch.float64) + shift) / n
        return math.log(lo) + steps * (math.log(hi) - math.log(lo))
    if search.axis == "centre":
        # Unshifted and symmetric about 0: a centred kernel must have an atom at offset 0.
        return (torch.arange(REAL_POINTS, dtype=torch.float64) - (REAL_POINTS - 1) / 2) * REAL_STEP
    # With a gain of either sign, pi-periodicity covers every orientation and phase: theta + pi
    # and psi + pi are a sign flip (Gabor, TGD1st, Dx) or the same kernel (TGD2nd, Dxx).
    theta = search.axis == "orientation"
    n = orientation_points(family, h, w) if theta else _by_count(PHASE_POINTS, family)
    axis = (torch.arange(n, dtype=torch.float64) + shift) * (math.pi / n)
    if theta and not family.smooth:
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
    raw = family(family.from_unconstrained(u), h, w).reshape(len(u), h * w)
    atoms = raw
    if offset:
        atoms = atoms - atoms.mean(1, keepdim=True)
    norm = atoms.norm(dim=1, keepdim=True)
    atoms = torch.where(norm > 1e-9, atoms / norm.clamp_min(1e-30), torch.zeros_like(atoms))
    return Dictionary(
        u.to(device=device, dtype=dtype),
        atoms.to(device=device, dtype=dtype),
        raw.to(device=device, dtype=dtype),
    )


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
