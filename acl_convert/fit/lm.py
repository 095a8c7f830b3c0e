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
they converge.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import KernelFamily

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
    """Centre the rows of ``x`` ``(N, n)`` when the offset is on (projects out the constant)."""
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


def _evaluate(family: KernelFamily, u: Tensor, h: int, w: int) -> Tensor:
    return family(family.from_unconstrained(u), h, w).flatten(-2)


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


def _apply_jacobian(jac: Tensor, proj: Tensor | None, offset: bool) -> Tensor:
    """``df/du`` ``(N, n, P)`` projected like :func:`apply`: ``(N, T or 1, n, P)``."""
    if proj is None:
        return (jac - jac.mean(1, keepdim=True) if offset else jac)[:, None]
    return torch.einsum("ntij,njp->ntip", proj, jac)


def _normal_equations(jac: Tensor, resid: Tensor) -> tuple[Tensor, Tensor]:
    """``J^T J`` ``(N, P, P)`` and ``J^T r`` ``(N, P)`` of every kernel, summed over its channels
    and pixels (``jac`` ``(N, T, n, P)``, ``resid`` ``(N, T, n)``).

    Written as elementwise products and sums rather than ``einsum`` so that every kernel's numbers
    depend on its own values only, not on the batch around it: ``einsum`` becomes a batched BLAS
    product whose summation order may follow the batch's memory layout (``jac`` has stride
    ``N * n`` along ``P``), and on some CPUs (MKL's default code path on AMD EPYC) it does, so a
    kernel's float32 rounding, and with it the local search's path, changed with the batch size
    and with which other kernels were still active. A loop over ``P`` keeps the temporaries the
    Jacobian's size."""
    jtj = torch.stack([(jac * jac[..., p, None]).sum((1, 2)) for p in range(jac.shape[-1])], 1)
    jtr = (jac * resid[..., None]).sum((1, 2))
    return jtj, jtr


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
) -> tuple[Tensor, Tensor]:
    """Refine unconstrained AKPs ``u`` ``(N, P)`` for kernels ``w`` ``(N, h*kw)``, or for stacks
    ``(N, T, h*kw)`` of ``T`` kernels that share their AKPs but each have their own gain and
    offset (channel-tied ACKs); the cost is then the sum over the stack.

    ``bounds`` (``(P,)`` lower and upper) box the steps; a step that leaves the box is cut back
    to it. ``proj`` ``(N, T, n, n)`` replaces the plain residual by an activation-weighted one
    (see :func:`apply`). Returns the refined ``u`` and the squared residual ``(N,)`` of each
    kernel under the variable-projection objective. The cost never increases (a step is only
    taken when it lowers the true cost), so a non-smooth family cannot make a start worse.
    """
    if w.ndim == 2:
        w = w[:, None, :]
    w_t = apply(w, proj, offset)
    u = u.clone()
    f = _evaluate(family, u, h, kw)
    cost = solve_linear(w_t, apply(f, proj, offset))[1].sum(-1)
    damping = torch.full_like(cost, 1e-3)
    active = torch.arange(len(u), device=u.device)
    eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    for _ in range(max_iter):
        if active.numel() == 0:
            break
        ua, wa, ca, lam = u[active], w_t[active], cost[active], damping[active]
        pa = None if proj is None else proj[active]
        fa, jac = with_jacobian(family, ua, h, kw)
        fa, jac = apply(fa, pa, offset), _apply_jacobian(jac, pa, offset)
        gain, _ = solve_linear(wa, fa)  # (Na, T)
        ff = (fa * fa).sum(-1).clamp_min(_TINY)[..., None, None]
        # Kaufman: the part of dF/du along F itself is absorbed by the gain.
        jac = jac - fa[..., None] * ((fa[..., None] * jac).sum(-2, keepdim=True) / ff)
        jac = -gain[..., None, None] * jac  # (Na, T, n, P)
        resid = wa - gain[..., None] * fa
        jtj, jtr = _normal_equations(jac, resid)
        # Marquardt's scaling by diag(J^T J) makes the damping invariant to AKP units; the small
        # identity term keeps flat directions (e.g. a decayed envelope) solvable.
        diag = torch.diagonal(jtj, dim1=1, dim2=2)
        system = jtj + lam[:, None, None] * (diag[:, :, None] * eye + 1e-9 * eye)
        step = torch.linalg.solve(system, -jtr)
        step = torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0)
        u_new = ua + step
        if bounds is not None:
            u_new = torch.maximum(torch.minimum(u_new, bounds[1]), bounds[0])
        f_new = apply(_evaluate(family, u_new, h, kw), pa, offset)
        c_new = solve_linear(wa, f_new)[1].sum(-1)
        better = c_new < ca
        u[active] = torch.where(better[:, None], u_new, ua)
        cost[active] = torch.where(better, c_new, ca)
        damping[active] = torch.where(better, lam * _ACCEPT, lam * _REJECT).clamp(1e-9, 1e9)
        # A kernel is done when an accepted step lowers its cost by less than the fraction
        # ``rtol`` (relative to the cost itself, so fits at the noise level still polish), when
        # no step helps at any sensible damping, or when the fit is exact.
        scale = (wa * wa).sum((-2, -1)).clamp_min(_TINY)
        gained = (ca - torch.where(better, c_new, ca)) / ca.clamp_min(_TINY)
        done = (better & (gained < rtol)) | (~better & (lam > _GIVE_UP)) | (c_new / scale < 1e-12)
        active = active[~done]
    return u, cost
