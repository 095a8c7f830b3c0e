"""Batched Levenberg-Marquardt over AKPs, with gain and offset projected out (variable projection).

For one kernel ``W`` (flattened to ``n = h*w`` values) and a family ``f``, the objective is
``min over u, g, b of ||W - g f(u) - b||^2``. With ``P`` the centring projector (identity when the
offset is off), ``Wt = P W`` and ``Ft = P f(u)``, the inner minimum is closed-form:
``g = <Wt, Ft> / <Ft, Ft>``, ``b = mean(W - g f(u))`` and the residual vector is
``r(u) = Wt - g Ft``. Only ``u`` (the unconstrained AKPs, see
:meth:`KernelFamily.from_unconstrained`) is searched. The Jacobian is Kaufman's approximation
``J = -g (I - Ft Ft^T / |Ft|^2) P df/du``, the standard choice for variable projection: as good as
the exact one near a minimum and cheaper.

``df/du`` comes from central differences evaluated in one batched call, so a family needs no
hand-written derivative. Every kernel has its own damping, and kernels leave the batch once
they converge (:func:`refine` says how the batch is kept small and busy on the CPU).
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from ..kernels import KernelFamily, grid

__all__ = ["project", "apply", "solve_linear", "refine", "with_jacobian"]

_TINY = 1e-20
#: Central-difference step in unconstrained AKP units (radians, or log-scale for positive AKPs).
_FD_STEP = 1e-3
#: Damping after an accepted / a rejected step, and the damping at which a kernel whose steps
#: keep failing is given up as converged.
_ACCEPT, _REJECT, _GIVE_UP = 0.3, 10.0, 1e4
#: Stop when an accepted step lowers the cost by less than this fraction.
RTOL = 1e-3


def project(x: Tensor, offset: bool) -> Tensor:
    """Centre the rows of ``x`` ``(..., n)`` when the offset is on (projects out the constant)."""
    return x - x.mean(-1, keepdim=True) if offset else x


def solve_linear(w_t: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Closed-form gain ``(N,)`` and squared residual ``(N,)`` for projected kernels and atoms
    ``(N, n)``. A vanishing atom gets gain 0 (the residual is then all of ``w_t``)."""
    ff = (f_t * f_t).sum(-1)
    wf = (w_t * f_t).sum(-1)
    ok = ff > _TINY
    gain = torch.where(ok, wf / ff.clamp_min(_TINY), torch.zeros_like(wf))
    cost = (w_t * w_t).sum(-1) - gain * wf
    return gain, cost.clamp_min(0)


def _sample_flat(family: KernelFamily, akp: Tensor, h: int, w: int) -> Tensor:
    """``family.formula`` on the pixel coordinates laid out as one row ``(1, h*w)`` instead of
    the ``(h, 1)`` and ``(1, w)`` grid: ``(..., h*w)``."""
    x, y = torch.broadcast_tensors(*grid(h, w, device=akp.device, dtype=akp.dtype))
    akps = [akp[..., k, None, None] for k in range(akp.shape[-1])]
    return family.formula(x.reshape(1, -1), y.reshape(1, -1), *akps)[..., 0, :]


@cache
def _samples_flat(family: KernelFamily, h: int, w: int) -> bool:
    """Whether :func:`_sample_flat` gives ``family``'s kernels. It does for a formula of
    pointwise functions of ``(x, y)`` and sums over the whole kernel, as every family's is, and
    it is up to twice as fast: broadcasting ``(h, 1)`` against ``(1, w)`` leaves torch inner
    loops of ``w`` values (3 for a 3x3 kernel) where one row of ``h*w`` vectorises. A formula
    that relies on the grid's 2-D shape fails this check and is sampled as documented."""
    akp = family.sample(8, h, w, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    try:
        flat = _sample_flat(family, akp, h, w)
    except (RuntimeError, IndexError, ValueError):
        return False
    ref = family(akp, h, w).flatten(-2)
    return flat.shape == ref.shape and torch.allclose(flat, ref, rtol=1e-12, atol=1e-300)


def _evaluate(family: KernelFamily, u: Tensor, h: int, w: int) -> Tensor:
    """The kernels ``(..., h*w)`` of unconstrained AKPs ``u`` ``(..., P)``."""
    akp = family.from_unconstrained(u)
    if _samples_flat(family, h, w):
        return _sample_flat(family, akp, h, w)
    return family(akp, h, w).flatten(-2)


def with_jacobian(family: KernelFamily, u: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """``f(u)`` ``(N, n)`` and ``df/du`` ``(N, n, P)`` by central differences.

    All ``2P + 1`` evaluations go through the family in one batched call, which is several times
    cheaper than one forward-mode AD pass per AKP, and the step is small enough that the error
    (~1e-7 relative) is far below what Levenberg-Marquardt needs. Where a non-smooth family
    (TGD1st's sign) jumps inside the step, the Jacobian is wrong for that kernel in that
    iteration; the step is then rejected by the true cost, never taken.
    """
    n_akp = u.shape[1]
    shifts = torch.cat(
        [
            torch.zeros(1, n_akp, dtype=u.dtype, device=u.device),
            _FD_STEP * torch.eye(n_akp, dtype=u.dtype, device=u.device),
            -_FD_STEP * torch.eye(n_akp, dtype=u.dtype, device=u.device),
        ]
    )
    values = _evaluate(family, u[None] + shifts[:, None, :], h, w)  # (2P+1, N, n)
    jac = (values[1 : n_akp + 1] - values[n_akp + 1 :]) / (2 * _FD_STEP)
    return values[0], jac.permute(1, 2, 0)


def apply(x: Tensor, proj: Tensor | None, offset: bool) -> Tensor:
    """Project values shared by a kernel's channels, ``(N, n)``, or per channel, ``(N, T, n)``,
    into the space where the residual is measured: ``(N, T, n)``, or ``(N, 1, n)`` when the
    projection is the same for every channel (no ``proj``).

    Without ``proj`` that is the plain objective (centring when the offset is on). With ``proj``
    ``(N, T, n, n)``, row ``M`` of a channel makes ``|M r|^2`` the activation-weighted squared
    residual with the offset already minimised out (see :mod:`.metric`)."""
    if proj is None:
        x = project(x, offset)
        return x if x.ndim == 3 else x[:, None, :]
    if x.ndim == 2:
        return torch.einsum("ntij,nj->nti", proj, x)
    return torch.einsum("ntij,ntj->nti", proj, x)


def _projected_jacobian(
    family: KernelFamily, u: Tensor, h: int, w: int, proj: Tensor | None, offset: bool
) -> Tensor:
    """``d(apply(f))/du`` ``(P, N, T or 1, n)`` by central differences, one AKP per leading
    row (the layout the evaluations come in, and the one :func:`_normal_equations` wants).

    The value at ``u`` itself is not evaluated: :func:`refine` already has it from the step that
    led there."""
    n_akp = u.shape[1]
    eye = _FD_STEP * torch.eye(n_akp, dtype=u.dtype, device=u.device)
    values = _evaluate(family, u[None] + torch.cat([eye, -eye])[:, None, :], h, w)  # (2P, N, n)
    d = (values[:n_akp] - values[n_akp:]) / (2 * _FD_STEP)
    if proj is None:
        return project(d, offset)[:, :, None]
    return torch.einsum("ntij,pnj->pnti", proj, d)


def _normal_equations(d: Tensor, f_t: Tensor, w_t: Tensor, gain: Tensor) -> tuple[Tensor, Tensor]:
    """``J^T J`` ``(P, P, N)`` and ``J^T r`` ``(P, N)`` of Kaufman's Jacobian, summed over a
    stack's channels, one system per last index.

    With ``D`` the projected ``df/du`` ``(P, n)`` (``d``, see :func:`_projected_jacobian`),
    ``F`` the projected atom and ``g`` the gain of a channel, ``J = -g (I - F F^T / |F|^2) D^T
    = -g E^T`` with ``E`` the rows of ``D`` less their part along ``F``, and ``r = W - g F``.
    Since ``E F = 0``, ``J^T r = -g E W`` and ``J^T J = g^2 E E^T``. ``E`` is formed explicitly
    rather than expanding ``D D^T - (D F)(D F)^T / |F|^2``: where ``D`` is nearly parallel to
    ``F`` (a scale AKP that mostly changes the amplitude) the expansion cancels in float32."""
    ff = (f_t * f_t).sum(-1).clamp_min(_TINY)  # (N, T or 1)
    e = d - ((d * f_t).sum(-1) / ff)[..., None] * f_t
    ee = (e[:, None] * e[None]).sum(-1)  # (P, P, N, T or 1)
    ew = (e * w_t).sum(-1)  # (P, N, T): one E against every channel when it is shared
    g2 = gain.square()
    if e.shape[2] == 1:
        g2 = g2.sum(1, keepdim=True)
    return (ee * g2).sum(-1), -(ew * gain).sum(-1)


def _solve_spd(a: Tensor, b: Tensor) -> Tensor:
    """``x`` ``(P, N)`` with ``a x = b`` for ``N`` symmetric positive definite systems ``a``
    ``(P, P, N)``, ``b`` ``(P, N)``: the Cholesky factorisation and the two substitutions
    written out over the ``P x P`` entries, each step one operation on all ``N`` systems. For
    the few AKPs of a family that is a few dozen vector operations, where a batched LAPACK
    solve factors the ``N`` tiny matrices one at a time, at several times the cost. A system
    that is not numerically positive definite gives NaN (the caller takes no step then)."""
    n = a.shape[0]
    low: list[list[Tensor]] = [[] for _ in range(n)]  # low[i][j], j <= i
    for i in range(n):
        for j in range(i + 1):
            s = a[i, j]
            for k in range(j):
                s = s - low[i][k] * low[j][k]
            low[i].append(s.sqrt() if i == j else s / low[j][j])
    y: list[Tensor] = []
    for i in range(n):
        s = b[i]
        for k in range(i):
            s = s - low[i][k] * y[k]
        y.append(s / low[i][i])
    x = list(y)
    for i in reversed(range(n)):
        s = y[i]
        for k in range(i + 1, n):
            s = s - low[k][i] * x[k]
        x[i] = s / low[i][i]
    return torch.stack(x)


def _admit(
    family: KernelFamily,
    ids: Tensor,
    w: Tensor,
    u: Tensor,
    h: int,
    kw: int,
    proj: Tensor | None,
    offset: bool,
) -> dict[str, Tensor]:
    """The starting state of kernels ``ids`` in :func:`refine`: one row per kernel in every
    entry, so the working set is compacted and extended entry by entry."""
    w_t = apply(w, proj, offset)
    f_t = apply(_evaluate(family, u, h, kw), proj, offset)
    gain, cost = solve_linear(w_t, f_t)
    n_rows, n_akp = u.shape
    state = {
        "ids": ids,
        "u": u,
        "w": w_t,
        "f": f_t,
        "gain": gain,
        "cost": cost.sum(-1),
        "scale": (w_t * w_t).sum((-2, -1)).clamp_min(_TINY),
        "lam": u.new_full((n_rows,), 1e-3),
        # J^T J and J^T r at u; "fresh" marks the kernels whose u moved since they were formed.
        "jtj": u.new_zeros(n_rows, n_akp, n_akp),
        "jtr": u.new_zeros(n_rows, n_akp),
        "fresh": torch.ones(n_rows, dtype=torch.bool, device=u.device),
        "iters": torch.zeros(n_rows, dtype=torch.int32, device=u.device),
    }
    if proj is not None:
        state["proj"] = proj
    return state


def _linearise(
    family: KernelFamily, live: dict[str, Tensor], h: int, kw: int, offset: bool
) -> tuple[Tensor, Tensor]:
    """``J^T J`` ``(P, P, M)`` and ``J^T r`` ``(P, M)`` of the ``M`` kernels of the working set
    ``live`` (see :func:`_admit`) at their current ``u``, one system per last index, contiguous:
    what :func:`_solve_spd` reads. The Jacobian is formed only for the kernels whose ``u``
    moved; ``live``'s stored systems are brought up to date."""
    ua, wa, pa, f_t, gain = live["u"], live["w"], live.get("proj"), live["f"], live["gain"]
    jtj, jtr, fresh = live["jtj"], live["jtr"], live["fresh"]
    rows = fresh.nonzero()[:, 0]
    if len(rows) == len(fresh):
        d = _projected_jacobian(family, ua, h, kw, pa, offset)
        jtj_s, jtr_s = _normal_equations(d, f_t, wa, gain)
        live["jtj"], live["jtr"] = jtj_s.permute(2, 0, 1), jtr_s.T
        return jtj_s, jtr_s
    if len(rows):
        d = _projected_jacobian(family, ua[rows], h, kw, None if pa is None else pa[rows], offset)
        jtj_r, jtr_r = _normal_equations(d, f_t[rows], wa[rows], gain[rows])
        jtj.index_copy_(0, rows, jtj_r.permute(2, 0, 1))
        jtr.index_copy_(0, rows, jtr_r.T)
    return jtj.permute(1, 2, 0).contiguous(), jtr.T.contiguous()


def _damped_step(jtj_s: Tensor, jtr_s: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """The Levenberg-Marquardt step ``(P, M)`` of ``M`` kernels with normal equations
    ``jtj_s`` ``(P, P, M)``, ``jtr_s`` ``(P, M)`` and damping ``lam`` ``(M,)`` (a zero step
    where the damped system cannot be solved), and the decrease of the cost ``(M,)`` that the
    linearised model promises for it."""
    # Marquardt's scaling by diag(J^T J) makes the damping invariant to AKP units; the small
    # identity term keeps flat directions (e.g. a decayed envelope) solvable.
    system = jtj_s.clone()
    torch.diagonal(system).add_(lam[:, None] * (torch.diagonal(jtj_s) + 1e-9))
    step_t = torch.nan_to_num(_solve_spd(system, -jtr_s), nan=0.0, posinf=0.0, neginf=0.0)
    # The gain the linearised model promises for the step, before the box cuts it back: a
    # cut step can promise little (or nothing) in a direction that a more damped, shorter
    # step inside the box would not take.
    pred = -(2 * (step_t * jtr_s).sum(0) + ((jtj_s * step_t).sum(1) * step_t).sum(0))
    return step_t, pred


def _try_step(
    family: KernelFamily,
    live: dict[str, Tensor],
    step_t: Tensor,
    h: int,
    kw: int,
    offset: bool,
    bounds: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor]:
    """Take the step ``step_t`` ``(P, M)`` (cut back to ``bounds``) of every kernel of the
    working set ``live`` whose true cost it lowers; the others stay where they are with more
    damping. Updates ``live``; returns which kernels moved ``(M,)`` and the fraction of its
    cost each one gained ``(M,)``."""
    ua, wa, pa, cost, lam = live["u"], live["w"], live.get("proj"), live["cost"], live["lam"]
    u_new = ua + step_t.T
    if bounds is not None:
        u_new = torch.maximum(torch.minimum(u_new, bounds[1]), bounds[0])
    f_new = apply(_evaluate(family, u_new, h, kw), pa, offset)
    g_new, c_new = solve_linear(wa, f_new)
    c_new = c_new.sum(-1)
    better = c_new < cost
    gained = (cost - torch.where(better, c_new, cost)) / cost.clamp_min(_TINY)
    live.update(
        u=torch.where(better[:, None], u_new, ua),
        f=torch.where(better[:, None, None], f_new, live["f"]),
        gain=torch.where(better[:, None], g_new, live["gain"]),
        cost=torch.where(better, c_new, cost),
        lam=torch.where(better, lam * _ACCEPT, lam * _REJECT).clamp(1e-9, 1e9),
        fresh=better,
        iters=live["iters"] + 1,
    )
    return better, gained


def _converged(
    live: dict[str, Tensor],
    better: Tensor,
    gained: Tensor,
    pred: Tensor,
    rtol: float,
    max_iter: int,
) -> Tensor:
    """Which kernels ``(M,)`` of the working set ``live`` are done after a step that moved
    ``better`` ``(M,)`` of them, gaining the fractions ``gained`` ``(M,)`` of their cost where
    the model promised decreases ``pred`` ``(M,)``."""
    cost = live["cost"]
    # A kernel is done when an accepted step lowers its cost by less than the fraction
    # ``rtol`` (relative to the cost itself, so fits at the noise level still polish), when
    # a rejected step was not even predicted to gain that much (more damping only shortens
    # the step), when no step helps at any sensible damping, when the fit is exact, or
    # after ``max_iter`` iterations.
    return (
        (better & (gained < rtol))
        | (~better & ((pred < rtol * cost) | (live["lam"] > _GIVE_UP)))
        | (cost / live["scale"] < 1e-12)
        | (live["iters"] >= max_iter)
    )


def refine(
    family: KernelFamily,
    w: Tensor,
    u: Tensor,
    h: int,
    kw: int,
    *,
    offset: bool,
    bounds: tuple[Tensor, Tensor] | None = None,
    max_iter: int = 30,
    rtol: float = RTOL,
    proj: Tensor | None = None,
    batch: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Refine unconstrained AKPs ``u`` ``(N, P)`` for kernels ``w`` ``(N, h*kw)``, or for stacks
    ``(N, T, h*kw)`` of ``T`` kernels that share their AKPs but each have their own gain and
    offset (channel-tied ACKs); the cost is then the sum over the stack.

    ``bounds`` (``(P,)`` lower and upper) box the steps; a step that leaves the box is cut back
    to it. ``proj`` ``(N, T, n, n)`` replaces the plain residual by an activation-weighted one
    (see :func:`apply`). Returns the refined ``u`` and the squared residual ``(N,)`` of each
    kernel under the variable-projection objective. The cost never increases (a step is only
    taken when it lowers the true cost), so a non-smooth family cannot make a start worse.

    The kernels iterate in a working set of at most ``batch`` (None: all of them): a kernel
    leaves it when it converges (or after ``max_iter`` iterations) and waiting kernels take its
    place, so every iteration works on about ``batch`` kernels instead of a shrinking batch
    whose late iterations cost a fixed overhead for a few slow kernels. On the CPU a batch whose
    temporaries stay in the cache is faster per kernel than a larger one (see the engine's
    ``LM_VALUES``). A rejected step leaves ``u`` where it was, so its normal equations are kept
    and only the damping changes: the Jacobian (``2P`` family evaluations) is formed only for
    kernels whose last step was taken.
    """
    if w.ndim == 2:
        w = w[:, None, :]
    n_rows = len(u)
    if max_iter < 1:
        cost = solve_linear(
            apply(w, proj, offset), apply(_evaluate(family, u, h, kw), proj, offset)
        )
        return u.clone(), cost[1].sum(-1)
    batch = n_rows if batch is None else max(1, batch)
    if bounds is not None:
        bounds = (bounds[0].to(u), bounds[1].to(u))
    u_out = u.clone()
    cost_out = u.new_zeros(n_rows)
    live: dict[str, Tensor] | None = None
    waiting = 0  # kernels [waiting, N) have not entered the working set yet
    while True:
        room = batch - (0 if live is None else len(live["ids"]))
        # Refill in batches of at least a quarter: fewer, larger concatenations.
        if waiting < n_rows and room >= max(1, batch // 4):
            end = min(n_rows, waiting + room)
            new = _admit(
                family,
                torch.arange(waiting, end, device=u.device),
                w[waiting:end],
                u[waiting:end],
                h,
                kw,
                None if proj is None else proj[waiting:end],
                offset,
            )
            live = new if live is None else {k: torch.cat([live[k], new[k]]) for k in live}
            waiting = end
        if live is None or len(live["ids"]) == 0:
            break
        jtj_s, jtr_s = _linearise(family, live, h, kw, offset)
        step_t, pred = _damped_step(jtj_s, jtr_s, live["lam"])
        better, gained = _try_step(family, live, step_t, h, kw, offset, bounds)
        done = _converged(live, better, gained, pred, rtol, max_iter)
        if bool(done.any()):
            ids = live["ids"][done]
            u_out[ids] = live["u"][done]
            cost_out[ids] = live["cost"][done]
            keep = (~done).nonzero()[:, 0]
            live = {k: v.index_select(0, keep) for k, v in live.items()}
    return u_out, cost_out
