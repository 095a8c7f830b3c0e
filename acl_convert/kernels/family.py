"""What a kernel family is: a sampled analytic function plus the meta-data of its parameters.

A family is data (a :class:`KernelFamily` instance), not a subclass: the fitter, the layer, the
report and the CLI only ever read these fields, so a new family is one definition in its own
module plus its tests.

Sampling grid (paper Eqs. 2-3, SPEC §2): ``W[i, j] = f(x_i, y_j)`` with
``x_i = i - (h+1)/2`` for rows ``i = 1..h`` and ``y_j = j - (w+1)/2`` for columns, so ``x``
runs down the rows, ``y`` along the columns, both centred (half-integers for even sizes).
Units are pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Param", "Search", "KernelFamily", "grid"]

#: How a parameter is kept valid during optimisation. ``positive``: AKP = exp(u), so any real u
#: gives a valid value and no clipping is ever needed. ``angle``/``real``: AKP = u.
PARAM_KINDS = ("positive", "angle", "real")
#: How the fitter's starting dictionary samples an AKP (see :class:`Search`).
SEARCH_AXES = ("scale", "ratio", "orientation", "phase", "centre")


@dataclass(frozen=True)
class Search:
    """How the fitter's starting dictionary (``acl_convert.fit.dictionary``) samples one AKP.

    Attributes:
        axis: ``scale`` (a length in px, log-spaced from ``lo`` to ``max(hi_min, hi * e)`` with
            ``e = max(h, w)``: from below a pixel to about the kernel's extent); ``ratio`` (a
            dimensionless positive value, log-spaced from ``lo`` to ``hi``); ``orientation`` and
            ``phase`` (angles over ``[0, pi)``: with a gain of either sign a half-turn is a sign
            flip or the same kernel; orientations get a grid that grows with the kernel);
            ``centre`` (a position in px, a few points around 0).
        lo, hi, hi_min: the range of ``scale`` and ``ratio`` axes, as above.
    """

    axis: str
    lo: float = 0.35
    hi: float = 3.0
    hi_min: float = 2.0

    def __post_init__(self) -> None:
        if self.axis not in SEARCH_AXES:
            raise ValueError(f"Search axis must be one of {SEARCH_AXES}, got {self.axis!r}")

    def range(self, h: int, w: int) -> tuple[float, float]:
        """``(lo, hi)`` of a ``scale`` or ``ratio`` axis for an ``h x w`` kernel."""
        if self.axis == "ratio":
            return self.lo, self.hi
        return self.lo, max(self.hi_min, self.hi * max(h, w))


#: The search of an AKP that does not declare one, by its kind.
_DEFAULT_SEARCH = {
    "positive": Search("scale"),
    "angle": Search("orientation"),
    "real": Search("centre"),
}


@dataclass(frozen=True)
class Param:
    """One analytic kernel parameter (AKP).

    Attributes:
        name: short name as used in reports (``sigma``, ``theta`` ...).
        unit: ``px`` (pixels of the kernel grid) or ``rad``.
        kind: one of ``positive``, ``angle``, ``real`` (see :data:`PARAM_KINDS`).
        valid: human-readable valid range, e.g. ``"(0, inf)"``.
        init: ``(h, w) -> (lo, hi)``, the range random initialisation draws from, in AKP units.
            Positive parameters are drawn log-uniformly, the others uniformly.
        doc: one line on what the parameter does.
        search: how the fitter's dictionary samples it; default by ``kind``: a length scale, an
            orientation, a centre offset.
    """

    name: str
    unit: str
    kind: str
    valid: str
    init: Callable[[int, int], tuple[float, float]]
    doc: str = ""
    search: Search | None = None

    def __post_init__(self) -> None:
        if self.kind not in PARAM_KINDS:
            raise ValueError(
                f"Param {self.name!r}: kind must be one of {PARAM_KINDS}, got {self.kind!r}"
            )
        if self.search is None:
            object.__setattr__(self, "search", _DEFAULT_SEARCH[self.kind])


def grid(h: int, w: int, *, device=None, dtype=None) -> tuple[Tensor, Tensor]:
    """Centred sampling coordinates of an ``h x w`` kernel.

    Returns:
        ``x`` of shape ``(h, 1)`` (row coordinate) and ``y`` of shape ``(1, w)`` (column
        coordinate), in pixels, broadcasting to ``(h, w)``.
    """
    if not (isinstance(h, int) and isinstance(w, int)) or h < 1 or w < 1:
        raise ValueError(f"kernel size must be two integers >= 1, got h={h!r}, w={w!r}")
    dtype = dtype or torch.get_default_dtype()
    x = torch.arange(h, device=device, dtype=dtype) - (h - 1) / 2
    y = torch.arange(w, device=device, dtype=dtype) - (w - 1) / 2
    return x[:, None], y[None, :]


def _identity_canonical(akp: Tensor, gain: Tensor | None) -> tuple[Tensor, Tensor | None]:
    return akp, gain


@dataclass(frozen=True)
class KernelFamily:
    """A kernel function ``f(x, y; AKPs)`` sampled on the kernel grid.

    Attributes:
        code: the paper's short code (``G``, ``Lg`` ...), used in arrangement patterns.
        name: long lower-case name (``gabor``, ``log`` ...).
        params: the AKPs, in the order they are stored and reported. Empty for Mean.
        formula: ``(x, y, *akps) -> values``: ``x`` is ``(h, 1)``, ``y`` is ``(1, w)``, each AKP is
            ``(..., 1, 1)``; returns ``(..., h, w)``. Must be differentiable w.r.t. the AKPs.
        canonical: ``(akp (..., P), gain (...) or None) -> (akp, gain)``: folds AKPs into their
            canonical ranges (SPEC §2) without changing the kernel ``gain * f``.
        plain: True only for the Plain family, whose parameters are the ``h*w`` kernel values.
        smooth: False when the kernel jumps as an AKP changes (TGD1st's sign): gradients cannot
            carry a fit across a jump, so the fitter refines more starting points.
        tex: the formula in LaTeX, for docs.
        doc: one paragraph for docs and ``--help``.
        colour: RGB of the family in pictures (the paper's Fig. 4a colours where it has them).
    """

    code: str
    name: str
    params: tuple[Param, ...]
    formula: Callable[..., Tensor]
    canonical: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor | None]] = _identity_canonical
    plain: bool = False
    smooth: bool = True
    tex: str = ""
    doc: str = ""
    colour: tuple[int, int, int] = (0, 150, 160)

    # --- shape meta-data -------------------------------------------------------------------

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def num_params(self) -> int | None:
        """Number of AKPs; ``None`` for Plain, whose count is ``h*w`` (see :meth:`param_count`)."""
        return None if self.plain else len(self.params)

    def param_count(self, h: int, w: int) -> int:
        """Number of values that define one ``h x w`` kernel of this family (no gain/offset)."""
        return h * w if self.plain else len(self.params)

    @property
    def label(self) -> str:
        """``"G gabor"``: code and name, as legends and tables show a family."""
        return f"{self.code} {self.name}"

    def carries_offset(self, offset: bool, gain: bool = True) -> bool:
        """Whether a kernel of this family has its own offset parameter when the layer's ACKs
        have offsets (``offset``) and gains (``gain``). A family without AKPs (Mean) is a
        constant kernel: with a gain the gain already sets the constant, so an offset would be a
        second parameter for the same thing (SPEC §4); without a gain the offset is its one.
        Plain kernels never have one."""
        if self.plain or not offset:
            return False
        return bool(self.params) or not gain

    # --- evaluation ------------------------------------------------------------------------

    def __call__(self, params: Tensor, h: int, w: int) -> Tensor:
        """Sample the kernel function.

        Args:
            params: AKPs of shape ``(..., P)`` with ``P = param_count(h, w)``, any leading shape,
                float32 or float64, any device.
            h, w: kernel height (rows) and width (columns), each >= 1.

        Returns:
            Kernels of shape ``(..., h, w)`` with the dtype and device of ``params``; exact
            formula, no gain and no offset.
        """
        if not isinstance(params, Tensor):
            raise TypeError(
                f"{self.name}: params must be a torch.Tensor, got {type(params).__name__}"
            )
        if not params.is_floating_point():
            raise TypeError(f"{self.name}: params must be floating point, got {params.dtype}")
        x, y = grid(h, w, device=params.device, dtype=params.dtype)  # validates h, w first
        expected = self.param_count(h, w)
        if params.ndim == 0 or params.shape[-1] != expected:
            raise ValueError(
                f"{self.name}: params must have shape (..., {expected}) for a {h}x{w} kernel, "
                f"got {tuple(params.shape)}"
            )
        if self.plain:
            return params.reshape(*params.shape[:-1], h, w)
        akps = [params[..., k, None, None] for k in range(expected)]
        if not akps:  # Mean: no AKPs, the leading shape comes from params alone
            return self.formula(x, y).expand(*params.shape[:-1], h, w).clone()
        return self.formula(x, y, *akps)

    def synthesize(
        self,
        params: Tensor,
        h: int,
        w: int,
        gain: Tensor | None = None,
        offset: Tensor | None = None,
    ) -> Tensor:
        """The analytic kernel ``gain * f(params) + offset`` (SPEC §2), the one place a fitted or
        trained ACK becomes kernel values.

        ``params`` ``(..., P)``; ``gain`` and ``offset`` broadcast against the leading shape
        ``(...)`` (None: 1 and 0). Evaluated in float64 whatever the inputs' dtype (kernels are
        tiny, so it costs nothing): a kernel near its flat limit is a large gain times a nearly
        constant shape plus a large offset, and in float32 that sum cancels. Returns float64
        ``(..., h, w)``, differentiable in all three inputs.
        """
        out = self(params.double(), h, w)
        if gain is not None:
            out = gain.double()[..., None, None] * out
        if offset is not None:
            out = out + offset.double()[..., None, None]
        return out

    # --- reparameterisation ----------------------------------------------------------------

    def to_unconstrained(self, akp: Tensor) -> Tensor:
        """Map AKPs ``(..., P)`` to the unconstrained space the optimiser works in."""
        cols = [
            torch.log(akp[..., k]) if p.kind == "positive" else akp[..., k]
            for k, p in enumerate(self.params)
        ]
        return torch.stack(cols, -1) if cols else akp

    def from_unconstrained(self, u: Tensor) -> Tensor:
        """Inverse of :meth:`to_unconstrained`: any real ``u`` gives valid AKPs."""
        cols = [
            torch.exp(u[..., k]) if p.kind == "positive" else u[..., k]
            for k, p in enumerate(self.params)
        ]
        return torch.stack(cols, -1) if cols else u

    # --- initialisation --------------------------------------------------------------------

    def init_ranges(self, h: int, w: int) -> list[tuple[float, float]]:
        """The ``(lo, hi)`` initialisation range of each AKP for an ``h x w`` kernel."""
        return [p.init(h, w) for p in self.params]

    def sample(
        self,
        n: int,
        h: int,
        w: int,
        *,
        generator: torch.Generator | None = None,
        device=None,
        dtype=None,
    ) -> Tensor:
        """Random AKPs ``(n, P)`` in the initialisation ranges (log-uniform for positive AKPs)."""
        dtype = dtype or torch.get_default_dtype()
        if self.plain:
            raise ValueError(
                "plain kernels have no AKPs to sample; initialise them as nn.Conv2d does"
            )
        u = torch.rand(n, len(self.params), generator=generator, dtype=dtype).to(device)
        cols = []
        for k, (p, (lo, hi)) in enumerate(zip(self.params, self.init_ranges(h, w), strict=True)):
            if p.kind == "positive":
                cols.append(torch.exp(math.log(lo) + u[:, k] * (math.log(hi) - math.log(lo))))
            else:
                cols.append(lo + u[:, k] * (hi - lo))
        return torch.stack(cols, -1) if cols else u

    def canonicalize(self, akp: Tensor, gain: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Fold AKPs ``(..., P)`` (and the sign of ``gain (...)`` where it can absorb one) into
        the canonical ranges of SPEC §2. ``gain * f(akp)`` is unchanged."""
        return self.canonical(akp, gain)


def fold_pi(theta: Tensor) -> tuple[Tensor, Tensor]:
    """Fold angles into ``[0, pi)``: returns the folded angle and whether an odd number of
    half-turns was removed (the caller decides what a half-turn does to the kernel)."""
    k = torch.floor(theta / math.pi)
    # An angle already in range is returned bit for bit (theta - 0 * pi can round otherwise).
    k = torch.where((theta >= 0) & (theta < math.pi), torch.zeros_like(k), k)
    folded = theta - k * math.pi
    # Rounding can land exactly on pi (e.g. theta = -1e-20): that is 0 with one half-turn less.
    over = folded >= math.pi
    folded = torch.where(over, folded - math.pi, folded).clamp_min(0)
    odd = torch.remainder(k + over.to(k.dtype), 2) == 1
    return folded, odd


def wrap_pi(a: Tensor) -> Tensor:
    """Wrap angles into ``(-pi, pi]``; an angle already there is returned bit for bit."""
    r = torch.remainder(a + math.pi, 2 * math.pi) - math.pi  # in [-pi, pi)
    r = torch.where(r <= -math.pi, r + 2 * math.pi, r)
    return torch.where((a > -math.pi) & (a <= math.pi), a, r)
