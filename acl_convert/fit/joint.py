"""Joint re-solve of a converted layer's linear parameters under the full input moments.

Kernels are fitted one at a time (:func:`fit_kernels` weights each by its own input channel's
patch moment, a block-diagonal approximation), but an output channel's error is the *sum* of its
kernels' errors, and the inputs of different channels are correlated (an RGB image's channels
nearly move together). With the AKPs fixed, every other parameter of an output channel enters
its output linearly: the ACKs' gains and offsets, the plain kernels' values and the bias. So
they are re-solved together, exactly, minimising ``E[(y_hat - y)^2]`` over the calibration
patches, with ``y = w . x + beta`` the original channel's output. Plain kernels thereby absorb
what the analytic ones miss, and the bias absorbs the mean shift.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import kernels, pattern
from ..calibrate import channel_blocks
from . import dictionary, lm, metric
from .engine import _linear_fit, fit_kernels
from .threads import single_threaded

__all__ = ["JointSolution", "resolve", "refine_channels", "output_errors"]

#: Ridge of :func:`resolve`'s normal equations, relative to their mean diagonal. It costs at
#: most ``RIDGE * mean(diag) * |c|^2`` of output error (``c`` the unregularised least-squares
#: coefficients of minimum norm).
RIDGE = 1e-10


def output_errors(
    weight: Tensor,
    approx: Tensor,
    moments: Tensor,
    bias: Tensor | None = None,
    approx_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Expected squared output error and energy ``E[y^2]`` ``(Co,)`` of replacing the conv
    ``weight`` ``(Co, Ci/groups, h, w)`` and ``bias`` ``(Co,)`` (None: none) by ``approx`` and
    ``approx_bias`` (None: the same bias), under patch moments ``(G, D + 1, D + 1)``."""
    co = weight.shape[0]
    d = weight[0].numel()
    full = torch.zeros(co, d + 1, dtype=torch.float64)
    full[:, :d] = weight.double().reshape(co, d)
    if bias is not None:
        full[:, d] = bias.double()
    diff = full.clone()
    diff[:, :d] -= approx.double().reshape(co, d)
    if bias is not None:
        diff[:, d] -= (bias if approx_bias is None else approx_bias).double()
    return _quadratic(diff, moments), _quadratic(full, moments)


def _quadratic(v: Tensor, moments: Tensor) -> Tensor:
    """``v_q^T S_g(q) v_q`` ``(Co,)`` for vectors ``(Co, D + 1)`` and per-group moments
    ``(G, D + 1, D + 1)``, output channels in consecutive groups (``S`` is not copied per
    channel: 256 copies of a 577x577 moment would be 680 MB)."""
    co, n_groups = v.shape[0], moments.shape[0]
    grouped = v.view(n_groups, co // n_groups, -1)
    return torch.einsum("gqi,gij,gqj->gq", grouped, moments.double(), grouped).reshape(co)


@dataclass
class JointSolution:
    """Re-solved linear parameters of one layer (kernel order ``k = q * Ci/groups + p``).

    Attributes:
        akps: ``(K, P_max)`` AKPs per kernel in the paper's units (not re-solved here; see
            :func:`refine_channels`).
        gain, offset: ``(K,)`` per ACK (0 for plain kernels, and offset 0 where the kernel has
            none).
        plain: ``(K, h, w)`` values of the plain kernels (the original values elsewhere).
        bias: ``(Co,)`` or None.
        error_before, error_after: ``(Co,)`` expected squared output error of each output
            channel with the fitted parameters and after the re-solve.
        energy: ``(Co,)`` expected squared output ``E[y^2]`` of each original output channel.
    """

    akps: Tensor
    gain: Tensor
    offset: Tensor
    plain: Tensor
    bias: Tensor | None
    error_before: Tensor
    error_after: Tensor
    energy: Tensor

    def relative_error(self, after: bool = True) -> float:
        """The layer's relative output error ``sqrt(sum err / sum E[y^2])``."""
        err = self.error_after if after else self.error_before
        den = float(self.energy.sum())
        return (float(err.sum()) / den) ** 0.5 if den > 0 else 0.0


@single_threaded
def resolve(
    weight: Tensor,
    bias: Tensor | None,
    codes: Sequence[str],
    akps: Tensor,
    gain: Tensor,
    offset: Tensor,
    has_offset: Tensor,
    moments: Tensor,
    plain: Tensor | None = None,
) -> JointSolution:
    """Re-solve gains, offsets, plain kernels and bias of one layer.

    Args:
        weight: the original ``(Co, Ci/groups, h, w)`` weight.
        bias: the original ``(Co,)`` bias, or None (the layer has none: it stays without).
        codes: family code per kernel (``P`` for plain), length ``K = Co * Ci/groups``.
        akps: ``(K, P_max)`` AKPs in the paper's units per kernel (only the first
            ``num_params`` columns of a kernel's family are read).
        gain, offset: ``(K,)`` the fitted values (the starting point, for ``error_before``).
        has_offset: ``(K,)`` bool, which ACKs carry an offset.
        moments: ``(G, D + 1, D + 1)`` patch moments of :class:`acl_convert.calibrate.LayerMoments`
            (``D = Ci/groups * h * w``, the last entry the constant 1).
        plain: ``(K, h, w)`` current values of the plain kernels (default: the original ones).

    Returns:
        A :class:`JointSolution`; output channels whose kernels are all plain are left as they
        are (they are exact already).
    """
    co, cg, h, w = weight.shape
    n = h * w
    d = cg * n
    n_groups = moments.shape[0]
    if moments.shape[1:] != (d + 1, d + 1):
        raise ValueError(f"moments must be (G, {d + 1}, {d + 1}), got {tuple(moments.shape)}")
    w64 = weight.detach().double().reshape(co, d)
    b64 = None if bias is None else bias.detach().double()
    # The fitted shape of every ACK, unscaled: the columns of its gain.
    base = torch.zeros(co * cg, n, dtype=torch.float64)
    for code in set(codes) - {"P"}:
        idx = torch.tensor([k for k, c in enumerate(codes) if c == code])
        fam = kernels.get(code)
        base[idx] = fam(akps[idx, : fam.num_params].double(), h, w).reshape(len(idx), n)
    gain64, off64 = gain.double().clone(), offset.double().clone()
    plain = (weight if plain is None else plain).detach().double().reshape(co * cg, h, w).clone()
    new_bias = None if b64 is None else b64.clone()
    per_group = co // n_groups
    is_plain = torch.tensor([c == "P" for c in codes]).view(co, cg)
    off_mask = has_offset.bool().view(co, cg) & ~is_plain
    # The current kernels and the target, with the bias as the last (constant-input) entry.
    approx = torch.where(
        is_plain.reshape(-1, 1),
        plain.reshape(co * cg, n),
        gain64[:, None] * base + off64[:, None],
    ).reshape(co, d)
    target = torch.zeros(co, d + 1, dtype=torch.float64)
    target[:, :d] = w64
    start = torch.zeros(co, d + 1, dtype=torch.float64)
    start[:, :d] = approx
    if b64 is not None:
        target[:, d] = b64
        start[:, d] = b64
    sig = moments.double()
    err_before = _quadratic(target - start, sig)
    energy = _quadratic(target, sig)
    err_after = err_before.clone()
    base3 = base.view(co, cg, n)
    for q in range(co):
        analytic = (~is_plain[q]).nonzero()[:, 0]
        if analytic.numel() == 0:
            continue  # all plain: exact already
        sigma = sig[q // per_group]
        s3 = sigma[:, :d].reshape(d + 1, cg, n)  # columns of S by (input channel, pixel)
        plains = is_plain[q].nonzero()[:, 0]
        offs = off_mask[q].nonzero()[:, 0]
        # S @ Phi without forming Phi: every column of Phi lives in one input channel's block.
        s_cols = [
            torch.einsum("dpn,pn->dp", s3[:, analytic], base3[q, analytic]),
            s3[:, offs].sum(-1),
            s3[:, plains].reshape(d + 1, -1),
        ]
        if b64 is not None:
            s_cols.append(sigma[:, d:])
        s_phi = torch.cat(s_cols, 1)  # (D + 1, m)
        x3 = s_phi[:d].reshape(cg, n, -1)
        rows = [
            torch.einsum("pn,pnm->pm", base3[q, analytic], x3[analytic]),
            x3[offs].sum(1),
            x3[plains].reshape(-1, s_phi.shape[1]),
        ]
        if b64 is not None:
            rows.append(s_phi[d:])
        normal = torch.cat(rows, 0)  # Phi^T S Phi, (m, m)
        rhs = s_phi.T @ target[q]
        # A whisper of ridge: a Mean kernel's gain and a neighbour's offset can be collinear.
        ridge = RIDGE * torch.diagonal(normal).mean().clamp_min(1e-30)
        coef = torch.linalg.solve(normal + ridge * torch.eye(len(rhs), dtype=torch.float64), rhs)
        n_a, n_o, n_p = len(analytic), len(offs), len(plains) * n
        new = torch.zeros(d + 1, dtype=torch.float64)
        new_view = new[:d].view(cg, n)
        g_new, o_new = coef[:n_a], coef[n_a : n_a + n_o]
        p_new = coef[n_a + n_o : n_a + n_o + n_p].view(-1, n)
        new_view[analytic] = g_new[:, None] * base3[q, analytic]
        new_view[offs] += o_new[:, None]
        new_view[plains] = p_new
        if b64 is not None:
            new[d] = coef[-1]
        diff = target[q] - new
        err = diff @ sigma @ diff
        if not bool(err <= err_before[q]):
            continue  # only rounding can make the exact solution worse than the start
        err_after[q] = err
        ks = q * cg
        gain64[ks + analytic] = g_new
        off64[ks + offs] = o_new
        plain.view(co * cg, n)[ks + plains] = p_new
        if b64 is not None:
            new_bias[q] = coef[-1]
    return JointSolution(
        akps=akps.double(),
        gain=gain64,
        offset=off64,
        plain=plain,
        bias=new_bias,
        error_before=err_before,
        error_after=err_after,
        energy=energy,
    )


@single_threaded
def refine_channels(
    weight: Tensor,
    codes: Sequence[str],
    akps: Tensor,
    gain: Tensor,
    offset: Tensor,
    has_offset: Tensor,
    moments: Tensor,
    *,
    sweeps: int = 1,
    max_iter: int = 20,
    switch: Sequence[str] | None = None,
    offset_enabled: bool = True,
) -> tuple[list[str], Tensor, Tensor, Tensor, Tensor]:
    """Refit every ACK's AKPs, gain and offset under the *full* input moments, one input channel
    at a time (block Gauss-Seidel).

    The exact objective of an output channel is ``e^T S e`` over all its input channels'
    errors ``e``. With every other channel's kernel fixed, kernel ``p`` minimises it by fitting,
    in its own channel's norm ``S_pp``, the shifted target ``w_p + S_pp^-1 S_p,rest e_rest``: it
    compensates what the other channels get wrong along directions they share (an RGB image's
    channels are nearly equal, so three kernels only have to get their *sum* right where the
    channels agree). Each step starts from the current AKPs and only accepts improvements, so the
    objective never increases. Plain kernels take their shifted target exactly.

    Args:
        weight: ``(Co, Ci/groups, h, w)`` original weight.
        codes: family per kernel (``P`` plain), length ``K``.
        akps: ``(K, P_max)`` AKPs in the paper's units; gain, offset, has_offset: ``(K,)``.
        moments: ``(G, D + 1, D + 1)`` full patch moments (last entry the constant 1).
        sweeps: passes over the input channels.
        switch: families an ACK may switch to at each step (fitted afresh to its shifted
            target), among those with no more parameters than its own, so a parameter budget
            stays met; None keeps every kernel's family.
        offset_enabled: whether ACKs carry offsets (for counting parameters when switching).

    Returns:
        The codes (changed only by ``switch``), new ``akps``, ``gain``, ``offset`` (float64)
        and the plain kernels' values ``(K, h, w)`` (original values where the kernel is an
        ACK).
    """
    co, cg, h, w = weight.shape
    n, d = h * w, cg * h * w
    n_groups = moments.shape[0]
    per_group = co // n_groups
    w64 = weight.detach().double().reshape(co, d)
    akps, gain, offset = akps.double().clone(), gain.double().clone(), offset.double().clone()
    plain = w64.reshape(co * cg, n).clone()
    group_of = torch.arange(co) // per_group
    sig = moments.double()
    # The norm of every input channel's own block, factored once.
    blocks = channel_blocks(sig, n)
    factors, _ = metric.factor(blocks)
    fams = {c: kernels.get(c) for c in (set(codes) | set(switch or ())) - {"P"}}
    code_arr = list(codes)
    switch = [] if cg == 1 else list(switch or ())  # one channel: the first fit is exact

    def count(c: str) -> int:
        return pattern.params_per_kernel(c, h, w, gain=True, offset=offset_enabled)

    def kernels_of(idx: Tensor, c: str) -> Tensor:
        fam = fams[c]
        f = fam(akps[idx, : fam.num_params], h, w).reshape(len(idx), n)
        return gain[idx, None] * f + offset[idx, None]

    def switch_families(p: int, ks: Tensor, target: Tensor) -> None:
        """Refit input channel ``p``'s ACKs to their shifted targets ``(Co, n)`` with every
        family of ``switch`` and move a kernel to the family with the lowest error among those
        with no more parameters than its current one, when that beats its refitted current
        family (in place)."""
        rows = [j for j, k in enumerate(ks.tolist()) if code_arr[k] != "P"]
        if not rows:
            return
        rows_t = torch.tensor(rows)
        k_sel = ks[rows_t]
        t = target[rows_t]
        chan = group_of[rows_t] * cg + p
        a = factors[chan][:, None]
        norm2 = lm.apply(t, a, False).square().sum((1, 2))
        current = lm.apply(t - approx[k_sel], a, False).square().sum((1, 2))
        fit = fit_kernels(
            t.reshape(-1, h, w).float(),
            families=switch,
            offset=offset_enabled,
            moments=blocks.float(),
            channel=chan,
        )
        cost = fit.weighted.double().square() * norm2[:, None]  # (N, F), absolute
        allowed = torch.tensor(
            [[count(f) <= count(code_arr[k]) for f in fit.families] for k in k_sel.tolist()]
        )
        cost = torch.where(allowed, cost, torch.full_like(cost, float("inf")))
        best, col = cost.min(1)
        better = best < current * (1 - 1e-6)
        for j in better.nonzero()[:, 0].tolist():
            k, f = int(k_sel[j]), fit.families[int(col[j])]
            n_akp = fams[f].num_params
            code_arr[k] = f
            akps[k] = 0
            akps[k, :n_akp] = fit.params[f][j].double()
            gain[k] = float(fit.gain[f][j])
            offset[k] = float(fit.offset[f][j])
            approx[k] = kernels_of(torch.tensor([k]), f)[0]

    # The current kernels (K, n), updated channel by channel as they are refitted.
    approx = plain.clone()
    for c in fams:
        idx = torch.tensor([k for k, x in enumerate(code_arr) if x == c], dtype=torch.long)
        if len(idx):
            approx[idx] = kernels_of(idx, c)

    for _ in range(sweeps):
        for p in range(cg):
            rows = slice(p * n, (p + 1) * n)
            err = w64 - approx.view(co, d)  # (Co, D)
            err[:, rows] = 0
            target = w64[:, rows].clone()
            for g in range(n_groups):
                qs = (group_of == g).nonzero()[:, 0]
                s_pp = sig[g, rows, rows]
                s_pr = sig[g, rows, :d]
                # A channel that is always zero (a dead ReLU's) has S_pp = 0: the ridge, scaled
                # by the whole moment, keeps the solve defined (its shift is then ~0).
                ridge = 1e-10 * float(torch.diagonal(sig[g]).mean()) + 1e-300
                shift = torch.linalg.solve(
                    s_pp + ridge * torch.eye(n, dtype=sig.dtype), s_pr @ err[qs].T
                )
                target[qs] += shift.T
            ks = torch.arange(co) * cg + p
            for c, fam in list(fams.items()) + [("P", None)]:
                sel = [j for j, k in enumerate(ks.tolist()) if code_arr[k] == c]
                if not sel:
                    continue
                sel_t = torch.tensor(sel)
                k_sel = ks[sel_t]
                t = target[sel_t]
                if fam is None:
                    plain[k_sel] = t
                    approx[k_sel] = t
                    continue
                chan = group_of[sel_t] * cg + p
                a = factors[chan][:, None]  # (N, 1, n, n)
                with_off = bool(has_offset[k_sel].any())
                scale = lm.apply(t, a, False).square().sum((1, 2)).sqrt().clamp_min(1e-30)
                unit = t / scale[:, None]
                if fam.num_params:
                    u0 = fam.to_unconstrained(akps[k_sel, : fam.num_params])
                    bounds = dictionary.search_box(fam, h, w)
                    u, _ = lm.refine(
                        fam,
                        unit,
                        u0,
                        h,
                        w,
                        offset=with_off,
                        bounds=bounds,
                        max_iter=max_iter,
                        proj=metric.projector(a, with_off),
                    )
                    akps[k_sel, : fam.num_params] = fam.from_unconstrained(u)
                g_new, b_new, _, _ = _linear_fit(
                    fam, akps[k_sel, : fam.num_params], unit[:, None], h, w, with_off, a
                )
                gain[k_sel] = g_new[:, 0] * scale
                offset[k_sel] = b_new[:, 0] * scale
                approx[k_sel] = kernels_of(k_sel, c)
            if switch:
                switch_families(p, ks, target)
    return code_arr, akps, gain, offset, plain.reshape(co * cg, h, w)
