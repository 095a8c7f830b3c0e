"""``fit_kernels``: every kernel against every analytic family, batched, on one device.

Pipeline per family and chunk of kernels: normalise kernels to unit norm (the residual is
relative, and it keeps the numerics scale-free) -> score against the family's dictionary
(one matrix product) -> refine the best ``starts`` atoms of every kernel by batched
Levenberg-Marquardt with variable projection -> keep the best start -> solve gain and offset in
closed form, undo the normalisation, canonicalise the AKPs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import kernels
from . import dictionary, lm
from .result import FitResult

__all__ = ["fit_kernels", "resolve_device", "DEFAULT_MEMORY"]

#: Default working-memory budget of one chunk, in bytes. A ResNet-50-sized job (1.26 M kernels)
#: is processed in chunks that stay within it.
DEFAULT_MEMORY = 512 * 2**20

ProgressFn = Callable[[str, int], None]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> the GPU when present, else the CPU; ``"cuda"`` without a GPU is an
    error that says so."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} was requested but no CUDA GPU is available; "
            "use --device cpu or auto"
        )
    return dev


def _check_input(W: Tensor) -> Tensor:
    if not isinstance(W, Tensor):
        raise TypeError(
            f"kernels must be a torch.Tensor of shape (N, h, w), got {type(W).__name__}"
        )
    if W.ndim != 3:
        raise ValueError(f"kernels must have shape (N, h, w), got {tuple(W.shape)}")
    if W.shape[1] * W.shape[2] < 2:
        raise ValueError(
            f"{W.shape[1]}x{W.shape[2]} kernels have nothing to fit (a 1x1 kernel is just a "
            "gain); skip 1x1 layers"
        )
    if not W.is_floating_point():
        W = W.float()
    bad = (~torch.isfinite(W)).flatten(1).any(1)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} of {len(W)} kernels contain NaN or Inf values; "
            "fix or drop them before fitting"
        )
    return W


def _resolve_families(families: Sequence[str] | None) -> list[str]:
    codes = [kernels.get(f).code for f in (families or kernels.PAPER_FAMILIES)]
    if "P" in codes:
        raise ValueError(
            "'plain' is the fallback for kernels no family fits, not a family to fit; "
            "leave it out of families"
        )
    if len(set(codes)) != len(codes):
        raise ValueError(f"families listed twice: {codes}")
    return codes


def fit_kernels(
    W: Tensor,
    families: Sequence[str] | None = None,
    offset: bool = True,
    device: str | torch.device | None = None,
    seed: int = 0,
    *,
    starts: int = 2,
    max_iter: int = 30,
    memory: int = DEFAULT_MEMORY,
    dtype: torch.dtype = torch.float32,
    progress: ProgressFn | None = None,
) -> FitResult:
    """Fit every kernel to every family by least squares (SPEC §4).

    Minimises ``|W - g f(AKPs) - b|^2`` per kernel and family, with ``g`` and ``b`` in closed
    form (``b = 0`` when ``offset`` is False).

    Args:
        W: kernels ``(N, h, w)``, any N >= 0, ``h*w >= 2``; finite values.
        families: codes or names of the families to fit (default: the paper's six).
        offset: fit a constant offset ``b`` too (SPEC §2); False gives the paper's pure ACKs
            (with a gain).
        device: ``"auto"``/None (GPU if present), ``"cpu"``, ``"cuda[:n]"``.
        seed: seeds the random shift of the initialisation grid; the same seed on the same device
            gives identical results.
        starts: how many of the best dictionary atoms of each kernel are refined.
        max_iter: Levenberg-Marquardt iterations at most (kernels stop earlier when converged).
        memory: working-memory budget per chunk in bytes; bigger chunks are faster on a GPU.
        dtype: computation dtype (float32 is accurate to ~1e-6 in relative residual).
        progress: called as ``progress(code, kernels_done)`` after every chunk.

    Returns:
        A :class:`FitResult` on the CPU, with results in the dtype of ``W`` (float32 if it was not
        floating point).
    """
    W = _check_input(W)
    codes = _resolve_families(families)
    dev = resolve_device(device)
    if starts < 1:
        raise ValueError(f"starts must be >= 1, got {starts}")
    n_kernels, h, w = W.shape
    n = h * w
    flat = W.reshape(n_kernels, n).to(dev, dtype)
    norms = flat.norm(dim=1)
    zero = norms == 0
    unit = flat / torch.where(zero, torch.ones_like(norms), norms)[:, None]

    residuals = torch.zeros(n_kernels, len(codes), dtype=dtype, device=dev)
    # AKPs pass through both the working and the output dtype: the coarser one is what is kept.
    store = min(dtype, W.dtype, key=lambda t: torch.finfo(t).bits)
    params, gains, offsets = {}, {}, {}
    for col, code in enumerate(codes):
        fam = kernels.get(code)
        n_akp = fam.num_params
        # Bytes per kernel in refinement: value, Jacobian and a few temporaries per start.
        per_kernel = starts * n * (n_akp + 8) * 8 * torch.finfo(dtype).bits // 8
        chunk = max(256, min(1 << 20, memory // max(per_kernel, 1)))
        akp_out = torch.zeros(n_kernels, n_akp, dtype=dtype, device=dev)
        gain_out = torch.zeros(n_kernels, dtype=dtype, device=dev)
        off_out = torch.zeros(n_kernels, dtype=dtype, device=dev)
        book = (
            dictionary.build(fam, h, w, offset=offset, seed=seed, device=dev, dtype=dtype)
            if n_akp
            else None
        )
        for lo in range(0, n_kernels, chunk):
            hi = min(lo + chunk, n_kernels)
            akp, cost, g, b = _fit_chunk(
                fam,
                book,
                unit[lo:hi],
                h,
                w,
                offset=offset,
                starts=starts,
                max_iter=max_iter,
                store_dtype=store,
            )
            residuals[lo:hi, col] = cost.sqrt()
            akp_out[lo:hi] = akp
            gain_out[lo:hi] = g * norms[lo:hi]
            off_out[lo:hi] = b * norms[lo:hi]
            if progress is not None:
                progress(code, hi - lo)
        params[code], gains[code], offsets[code] = akp_out, gain_out, off_out
    # An all-zero kernel is matched exactly by every family with gain 0 (SPEC §4).
    residuals[zero] = 0
    out_dtype = W.dtype
    return FitResult(
        families=codes,
        residuals=residuals.to("cpu", out_dtype),
        params={c: v.to("cpu", out_dtype) for c, v in params.items()},
        gain={c: v.to("cpu", out_dtype) for c, v in gains.items()},
        offset={c: v.to("cpu", out_dtype) for c, v in offsets.items()},
        kernel_size=(h, w),
        offset_enabled=bool(offset),
    )


def _fit_chunk(
    fam: kernels.KernelFamily,
    book: dictionary.Dictionary | None,
    unit: Tensor,
    h: int,
    w: int,
    *,
    offset: bool,
    starts: int,
    max_iter: int,
    store_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fit unit-norm kernels ``(C, n)``; returns canonical AKPs ``(C, P)``, squared relative
    residual ``(C,)``, gain and offset ``(C,)`` for the unit-norm kernels."""
    n_chunk, n = unit.shape
    if book is None:
        # No AKPs (Mean): the fit is the kernel's mean; carried by the gain alone, since a
        # constant kernel with a gain needs no separate offset (SPEC §4).
        atom = torch.full((n,), n**-0.5, dtype=unit.dtype, device=unit.device)
        gain = unit @ atom
        resid = unit - gain[:, None] * atom
        return unit.new_zeros(n_chunk, 0), (resid * resid).sum(1), gain, torch.zeros_like(gain)
    w_t = lm.project(unit, offset)
    # Gradients cannot carry a non-smooth family's fit across its jumps: more starts instead.
    k = min(starts if fam.smooth else 2 * starts, book.u.shape[0])
    idx = book.best(w_t, k)  # (C, k)
    u0 = book.u[idx.reshape(-1)]
    bounds = tuple(b.to(unit) for b in dictionary.search_box(fam, h, w))
    u, cost = lm.refine(
        fam,
        unit.repeat_interleave(k, 0),
        u0,
        h,
        w,
        offset=offset,
        bounds=bounds,
        max_iter=max_iter,
    )
    pick = cost.view(n_chunk, k).argmin(1)
    rows = torch.arange(n_chunk, device=unit.device) * k + pick
    exact = unit.double()
    akp = fam.from_unconstrained(u[rows].double())
    # Canonical ranges (SPEC §2) need the gain's sign; then the AKPs are rounded to the dtype
    # they are stored in, and gain, offset and residual are solved again, in float64, for
    # exactly those AKPs: the reported residual is that of the kernel the ACL will synthesise
    # (a near-flat kernel has a large gain, which magnifies any rounding of its AKPs).
    gain, _, _ = _linear_fit(fam, akp, exact, h, w, offset)
    akp, gain = fam.canonicalize(akp, gain)
    # Rounding can push an angle just past its range (float32(pi) > pi): fold once more, with
    # the gain that goes with the folded AKPs.
    akp = fam.canonicalize(akp.to(store_dtype).double(), gain)[0].to(store_dtype).double()
    gain, b, cost = _linear_fit(fam, akp, exact, h, w, offset)
    return akp.to(unit.dtype), cost.to(unit.dtype), gain.to(unit.dtype), b.to(unit.dtype)


def _linear_fit(
    fam: kernels.KernelFamily, akp: Tensor, w: Tensor, h: int, kw: int, offset: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Least-squares gain and offset ``(C,)`` of kernels ``w`` ``(C, n)`` for fixed AKPs, and the
    squared residual ``(C,)``, recomputed from the reconstruction (the shortcut
    ``|w|^2 - g<w, f>`` cancels badly near 0)."""
    f = fam(akp, h, kw).reshape(len(w), -1)
    gain, _ = lm.solve_linear(lm.project(w, offset), lm.project(f, offset))
    b = (w - gain[:, None] * f).mean(1) if offset else torch.zeros_like(gain)
    resid = w - gain[:, None] * f - b[:, None]
    return gain, b, (resid * resid).sum(1)
