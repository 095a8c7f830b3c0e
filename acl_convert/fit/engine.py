"""``fit_kernels``: every kernel against every analytic family, batched, on one device.

Pipeline per family and chunk of kernels: normalise kernels to unit norm (the residual is
relative, and it keeps the numerics scale-free) -> score against the family's dictionary
(one matrix product) -> refine the best ``starts`` atoms of every kernel by batched
Levenberg-Marquardt with variable projection -> keep the best start -> solve gain and offset in
closed form, undo the normalisation, canonicalise the AKPs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import kernels
from . import dictionary, lm, metric, threads
from .result import FitResult

__all__ = ["fit_kernels", "resolve_device", "DEFAULT_MEMORY"]

#: Default working-memory budget of one chunk, in bytes. A ResNet-50-sized job (1.26 M kernels)
#: is processed in chunks that stay within it.
DEFAULT_MEMORY = 512 * 2**20
#: On the CPU the refinement iterates on about this many kernel values at a time (starts x
#: channels x pixels: 16384 starts of 3x3 kernels). An iteration is ~250 tensor operations
#: whose Python side costs ~0.5-1 ms whatever their size, so a batch must be large; but past a
#: few MiB per temporary (``2P`` evaluations of each start) they leave the cache. Measured on
#: 100k random 3x3 kernels, one thread: 4096 starts 4.6-4.8 s of CPU, 16384-32768 4.0-4.4 s,
#: 65536 4.4-4.7 s. It also keeps temporaries small enough for the allocator to reuse: with all
#: of a 512 MiB chunk's starts in one batch, 35 % of the time went to page faults (the operating
#: system mapping and zeroing every large temporary afresh).
LM_VALUES = 16384 * 9

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
            "use the CPU ('cpu' or 'auto')"
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


@threads.single_threaded
def fit_kernels(
    W: Tensor,
    families: Sequence[str] | None = None,
    offset: bool = True,
    device: str | torch.device | None = None,
    seed: int = 0,
    *,
    moments: Tensor | None = None,
    channel: Tensor | None = None,
    starts: int = 2,
    max_iter: int = 30,
    memory: int = DEFAULT_MEMORY,
    dtype: torch.dtype = torch.float32,
    progress: ProgressFn | None = None,
) -> FitResult:
    """Fit every kernel to every family by least squares (SPEC §4).

    Minimises ``|W - g f(AKPs) - b|^2`` per kernel and family, with ``g`` and ``b`` in closed
    form (``b = 0`` when ``offset`` is False). With ``moments`` the squared error is weighted by
    the input patches' second moment instead, ``e^T S e`` (the expected squared output error the
    kernel adds, see :mod:`.metric`): the AKPs, gain and offset are all fitted under that norm.

    Args:
        W: kernels ``(N, h, w)``, any N >= 0, ``h*w >= 2``; finite values. Stacks
            ``(N, T, h, w)`` are channel-tied: the ``T`` kernels of a stack share one family and
            one set of AKPs, each with its own gain and offset.
        families: codes or names of the families to fit (default: the paper's six).
        offset: fit a constant offset ``b`` too (SPEC §2); False gives the paper's pure ACKs
            (with a gain).
        device: ``"auto"``/None (GPU if present), ``"cpu"``, ``"cuda[:n]"``.
        seed: seeds the random shift of the initialisation grid; the same seed on the same device
            gives identical results.
        moments: ``(C, h*w, h*w)`` uncentred second moments of the input patches of ``C`` input
            channels, in the kernels' flattening order; None fits the plain residual.
        channel: ``(N,)`` (or ``(N, T)`` for stacks) long, the input channel (row of
            ``moments``) each kernel reads; required with ``moments`` unless ``C == 1``.
        starts: how many of the best dictionary atoms of each kernel are refined.
        max_iter: Levenberg-Marquardt iterations at most (kernels stop earlier when converged).
        memory: working-memory budget per chunk in bytes; bigger chunks are faster on a GPU. On
            the CPU the refinement streams a chunk through a cache-sized working set
            (:data:`LM_VALUES`), so a chunk uses far less than this, and several chunks are
            fitted at once, one per thread (one thread per core, ``ACL_CONVERT_THREADS``
            overrides), with the same results whatever the number of threads.
        dtype: computation dtype (float32 is accurate to ~1e-6 in relative residual).
        progress: called as ``progress(code, kernels_done)`` after every chunk.

    Returns:
        A :class:`FitResult` on the CPU, with results in the dtype of ``W`` (float32 if it was not
        floating point). Gains and offsets are ``(N,)``, or ``(N, T)`` for stacks.
    """
    tied = isinstance(W, Tensor) and W.ndim == 4
    W = _check_input(W.flatten(0, 1)).view(W.shape) if tied else _check_input(W)
    codes = _resolve_families(families)
    dev = resolve_device(device)
    if starts < 1:
        raise ValueError(f"starts must be >= 1, got {starts}")
    stack = W if tied else W[:, None]
    n_kernels, n_chan, h, w = stack.shape
    flat = stack.reshape(n_kernels, n_chan, h * w).to(dev, dtype)
    factors, group, scale = _metric(moments, channel, n_kernels, n_chan, h * w, dev, dtype)
    a = None if factors is None else factors[group]  # (N, T, n, n)
    plain_norm = flat.square().sum((1, 2)).sqrt()
    norms = plain_norm if a is None else lm.apply(flat, a, False).square().sum((1, 2)).sqrt()
    zero = plain_norm == 0
    unit = flat / torch.where(zero, torch.ones_like(norms), norms)[:, None, None]

    tables = _Tables.zeros(codes, n_kernels, n_chan, dtype, dev)
    tasks = []
    for col, fam in enumerate(map(kernels.get, codes)):
        book, k, chunk = _plan(fam, unit, h, w, seed, starts, memory, offset, a is not None)
        tasks += [
            (col, fam, book, k, lo, min(lo + chunk, n_kernels)) for lo in range(0, n_kernels, chunk)
        ]
    # AKPs pass through both the working and the output dtype: the coarser one is what is kept.
    store = min(dtype, W.dtype, key=lambda t: torch.finfo(t).bits)
    proj_groups = None if factors is None else metric.projector(factors, offset)

    def fit_chunk(task: tuple) -> tuple[str, int]:
        col, fam, book, k, lo, hi = task
        fitted = _fit_chunk(
            fam,
            book,
            unit[lo:hi],
            h,
            w,
            offset=offset,
            k=k,
            max_iter=max_iter,
            store_dtype=store,
            factor=None if a is None else a[lo:hi],
            proj_groups=proj_groups,
            group=None if group is None else group[lo:hi],
        )
        tables.put(col, fam.code, lo, hi, fitted, unit[lo:hi], norms[lo:hi])
        return fam.code, hi - lo

    _run(fit_chunk, tasks, dev, progress)
    energy = _energy(flat, plain_norm, a, scale, group)
    channels = n_chan if tied else None
    return tables.result(
        zero, energy, (h, w), channels, W.dtype, offset=offset, with_moments=a is not None
    )


def _plan(
    fam: kernels.KernelFamily,
    unit: Tensor,
    h: int,
    w: int,
    seed: int,
    starts: int,
    memory: int,
    offset: bool,
    with_moments: bool,
) -> tuple[dictionary.Dictionary | None, int, int]:
    """How ``fam`` is fitted to the unit kernel stacks ``unit`` ``(N, T, h*w)``, on their device
    and in their dtype (the other arguments are :func:`fit_kernels`'s): its dictionary (None
    for a family without AKPs), the starts ``k`` refined per kernel, and the kernels per chunk."""
    n_chan, n = unit.shape[1:]
    n_akp = fam.num_params
    book = (
        dictionary.build(fam, h, w, offset=offset, seed=seed, device=unit.device, dtype=unit.dtype)
        if n_akp
        else None
    )
    # Gradients cannot carry a non-smooth family's fit across its jumps: more starts instead.
    k = 0 if book is None else min(starts if fam.smooth else 2 * starts, book.u.shape[0])
    # Bytes per kernel when all of a chunk's starts refine in one batch (on a GPU): value,
    # Jacobian and a few temporaries per start, and the projector of every channel under a
    # metric. On the CPU the refinement's batch is LM_VALUES, and chunks are just the units
    # of work the threads share.
    per_kernel = max(k, 1) * n * (n_akp + 8 + (n_chan * n if with_moments else 0)) * 8
    per_kernel = per_kernel * torch.finfo(unit.dtype).bits // 8 * n_chan
    return book, k, max(256, min(1 << 20, memory // max(per_kernel, 1)))


def _run(
    fit_chunk: Callable[[tuple], tuple[str, int]],
    tasks: list[tuple],
    dev: torch.device,
    progress: ProgressFn | None,
) -> None:
    """``fit_chunk`` on every task, on :func:`.threads.workers` threads on the CPU (one on a
    GPU), with ``progress`` called after each in order; then a warning if other processes kept
    the CPU busy meanwhile."""
    n_threads = threads.workers() if dev.type == "cpu" else 1
    contention = threads.Contention()
    for code, done in threads.map_in_order(fit_chunk, tasks, n_threads):
        if progress is not None:
            progress(code, done)
    if dev.type == "cpu" and (note := contention.warning(n_threads)):
        # stacklevel: the caller of fit_kernels, past this function and the single_threaded
        # wrapper.
        warnings.warn(note, RuntimeWarning, stacklevel=4)


def _energy(
    flat: Tensor, plain_norm: Tensor, a: Tensor | None, scale: Tensor | None, group: Tensor | None
) -> Tensor:
    """Output energy ``(N,)`` float64 on the CPU of kernel stacks ``flat`` ``(N, T, n)`` whose
    plain norms are ``plain_norm`` ``(N,)``: ``|w|^2`` without a metric, else ``E[(w . x)^2]`` in
    the layer's units (summed over a stack's channels) from the factors ``a`` ``(N, T, n, n)``,
    the moments' scales ``(C,)`` and each kernel's channel ``group`` ``(N, T)``."""
    if a is None:
        return plain_norm.square().to("cpu", torch.float64)
    per_chan = lm.apply(flat, a, False).square().sum(-1) * scale[group]
    return per_chan.sum(1).to("cpu", torch.float64)


@dataclass
class _Tables:
    """What :func:`fit_kernels` fills in on the working device: relative residuals ``(N, F)``,
    plain and under the metric, and per family code AKPs ``(N, P)``, gains and offsets
    ``(N, T)`` at the kernels' own scale. A chunk writes rows ``lo:hi`` only, so chunks fill the
    tables from separate threads."""

    residuals: Tensor
    weighted: Tensor
    params: dict[str, Tensor]
    gains: dict[str, Tensor]
    offsets: dict[str, Tensor]

    @classmethod
    def zeros(
        cls,
        codes: Sequence[str],
        n_kernels: int,
        n_chan: int,
        dtype: torch.dtype,
        dev: torch.device,
    ) -> _Tables:
        """Tables of ``n_kernels`` stacks of ``n_chan`` kernels, all zero."""

        def table(width: int) -> Tensor:
            return torch.zeros(n_kernels, width, dtype=dtype, device=dev)

        residuals = table(len(codes))
        return cls(
            residuals,
            torch.zeros_like(residuals),
            {c: table(kernels.get(c).num_params) for c in codes},
            {c: table(n_chan) for c in codes},
            {c: table(n_chan) for c in codes},
        )

    def put(
        self, col: int, code: str, lo: int, hi: int, fitted: tuple, unit: Tensor, norms: Tensor
    ) -> None:
        """Store rows ``lo:hi`` of family ``code`` (column ``col``): ``fitted`` is what
        :func:`_fit_chunk` returned for the unit stacks ``unit`` ``(hi-lo, T, n)``, whose norms
        before scaling were ``norms`` ``(hi-lo,)``."""
        akp, cost_w, cost_p, g, b = fitted
        unit_norm = unit.square().sum((1, 2)).sqrt().clamp_min(1e-30)
        self.residuals[lo:hi, col] = cost_p.sqrt() / unit_norm
        self.weighted[lo:hi, col] = cost_w.sqrt()
        self.params[code][lo:hi] = akp
        self.gains[code][lo:hi] = g * norms[:, None]
        self.offsets[code][lo:hi] = b * norms[:, None]

    def result(
        self,
        zero: Tensor,
        energy: Tensor,
        kernel_size: tuple[int, int],
        channels: int | None,
        out_dtype: torch.dtype,
        *,
        offset: bool,
        with_moments: bool,
    ) -> FitResult:
        """The filled tables as a :class:`FitResult` on the CPU in ``out_dtype``: ``zero``
        ``(N,)`` marks the all-zero kernels, ``energy`` is :func:`_energy`'s, ``channels`` the
        ``T`` of channel-tied stacks (None for single kernels)."""
        # An all-zero kernel is matched exactly by every family with gain 0 (SPEC §4).
        self.residuals[zero] = 0
        self.weighted[zero] = 0

        def out(t: Tensor) -> Tensor:
            return (t if channels is not None else t[:, 0]).to("cpu", out_dtype)

        return FitResult(
            families=list(self.params),
            residuals=self.residuals.to("cpu", out_dtype),
            params={c: v.to("cpu", out_dtype) for c, v in self.params.items()},
            gain={c: out(v) for c, v in self.gains.items()},
            offset={c: out(v) for c, v in self.offsets.items()},
            kernel_size=kernel_size,
            offset_enabled=bool(offset),
            weighted=self.weighted.to("cpu", out_dtype) if with_moments else None,
            energy=energy,
            channels=channels,
        )


def _metric(
    moments: Tensor | None,
    channel: Tensor | None,
    n_kernels: int,
    n_chan: int,
    n: int,
    dev: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Factors ``(C, n, n)``, the channel of every kernel ``(N, T)`` and the moments' scales
    ``(C,)``; all None without moments."""
    if moments is None:
        if channel is not None:
            raise ValueError("channel only means something together with moments")
        return None, None, None
    if moments.ndim != 3 or tuple(moments.shape[1:]) != (n, n):
        raise ValueError(
            f"moments must have shape (C, {n}, {n}) for {n}-pixel kernels, "
            f"got {tuple(moments.shape)}"
        )
    if not bool(torch.isfinite(moments).all()):
        raise ValueError("moments contain NaN or Inf values")
    if channel is None:
        if moments.shape[0] != 1:
            raise ValueError(f"{moments.shape[0]} moments given: say each kernel's with channel")
        channel = torch.zeros(n_kernels, n_chan, dtype=torch.long)
    channel = torch.as_tensor(channel, dtype=torch.long)
    channel = channel.reshape(n_kernels, n_chan) if channel.numel() == n_kernels * n_chan else None
    if channel is None:
        raise ValueError(f"channel must have one entry per kernel ({n_kernels} x {n_chan})")
    if n_kernels and (int(channel.min()) < 0 or int(channel.max()) >= moments.shape[0]):
        raise ValueError(f"channel values must lie in [0, {moments.shape[0]})")
    factors, scale = metric.factor(moments.to(dev, torch.float64))
    return factors.to(dtype), channel.to(dev), scale.to(dtype)


def _fit_chunk(
    fam: kernels.KernelFamily,
    book: dictionary.Dictionary | None,
    unit: Tensor,
    h: int,
    w: int,
    *,
    offset: bool,
    k: int,
    max_iter: int,
    store_dtype: torch.dtype,
    factor: Tensor | None = None,
    proj_groups: Tensor | None = None,
    group: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fit normalised kernel stacks ``(C, T, n)``; returns canonical AKPs ``(C, P)``, squared
    residuals ``(C,)`` under the objective's norm and the plain one, and gain and offset
    ``(C, T)`` for the normalised kernels. ``factor`` ``(C, T, n, n)`` is every channel's metric
    factor, ``proj_groups`` ``(G, n, n)`` the projectors and ``group`` ``(C, T)`` which one."""
    n_chunk, n_chan, n = unit.shape
    exact = unit.double()
    a64 = None if factor is None else factor.double()
    if book is None:
        # No AKPs (Mean): a constant kernel carried by the gain alone, since a constant kernel
        # with a gain needs no separate offset (SPEC §4).
        akp = unit.new_zeros(n_chunk, 0, dtype=torch.float64)
        gain, b, cost_w, cost_p = _linear_fit(fam, akp, exact, h, w, False, a64)
        return akp.to(unit.dtype), *(t.to(unit.dtype) for t in (cost_w, cost_p, gain, b))
    proj = None if factor is None else proj_groups[group]
    w_t = lm.apply(unit, proj, offset)
    if proj is None:
        idx = book.best(w_t[:, 0] if n_chan == 1 else w_t, k)  # (C, k)
    else:
        idx = book.best_weighted(w_t, proj_groups, group, k)
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
        proj=None if proj is None else proj.repeat_interleave(k, 0),
        batch=max(256, LM_VALUES // (n * n_chan)) if unit.device.type == "cpu" else None,
    )
    pick = cost.view(n_chunk, k).argmin(1)
    rows = torch.arange(n_chunk, device=unit.device) * k + pick
    akp = fam.from_unconstrained(u[rows].double())
    # Canonical ranges (SPEC §2) need the gain's sign; then the AKPs are rounded to the dtype
    # they are stored in, and gain, offset and residual are solved again, in float64, for
    # exactly those AKPs: the reported residual is that of the kernel the ACL will synthesise
    # (a near-flat kernel has a large gain, which magnifies any rounding of its AKPs).
    gain = _linear_fit(fam, akp, exact, h, w, offset, a64)[0]
    # A stack's channels share the AKPs, so one gain sign decides the fold: the largest one's.
    lead = gain.gather(1, gain.abs().argmax(1, keepdim=True))[:, 0]
    akp, lead_new = fam.canonicalize(akp, lead)
    # Rounding can push an angle just past its range (float32(pi) > pi): fold once more, with
    # the gain that goes with the folded AKPs.
    akp = fam.canonicalize(akp.to(store_dtype).double(), lead_new)[0].to(store_dtype).double()
    gain, b, cost_w, cost_p = _linear_fit(fam, akp, exact, h, w, offset, a64)
    return akp.to(unit.dtype), *(t.to(unit.dtype) for t in (cost_w, cost_p, gain, b))


def _linear_fit(
    fam: kernels.KernelFamily,
    akp: Tensor,
    w: Tensor,
    h: int,
    kw: int,
    offset: bool,
    factor: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Least-squares gain and offset ``(C, T)`` of kernel stacks ``w`` ``(C, T, n)`` for fixed
    AKPs, and the squared residual ``(C,)`` under the metric (``factor`` ``(C, T, n, n)``, or
    plain) and plain, recomputed from the reconstruction (the shortcut ``|w|^2 - g<w, f>``
    cancels badly near 0)."""
    f = fam(akp, h, kw).reshape(len(w), -1)
    proj = None if factor is None else metric.projector(factor, offset)
    gain, _ = lm.solve_linear(lm.apply(w, proj, offset), lm.apply(f, proj, offset))
    left = w - gain[..., None] * f[:, None, :]
    if not offset:
        b = torch.zeros_like(gain)
    elif factor is None:
        b = left.mean(-1)
    else:
        # The best offset under the metric: project A(w - g f) on the offset's direction A 1.
        q = metric.offset_direction(factor)  # (C, T, n)
        b = (lm.apply(left, factor, False) * q).sum(-1) / q.square().sum(-1).clamp_min(1e-30)
    resid = left - b[..., None]
    cost_p = resid.square().sum((1, 2))
    cost_w = cost_p if factor is None else lm.apply(resid, factor, False).square().sum((1, 2))
    return gain, b, cost_w, cost_p
