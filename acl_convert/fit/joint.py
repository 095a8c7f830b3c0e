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

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import kernels, pattern
from ..nn.assignment import PLAIN, Assignment
from . import dictionary, lm, metric
from .engine import _linear_fit, fit_kernels
from .metric import channel_blocks
from .threads import map_in_order, single_threaded, workers

__all__ = [
    "JointSolution",
    "resolve",
    "refine_channels",
    "refit_layer",
    "output_errors",
    "SWEEP_LIMIT",
]

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
    full = _with_bias(weight, bias)
    fitted = _with_bias(
        approx, None if bias is None else approx_bias if approx_bias is not None else bias
    )
    return _quadratic(full - fitted, moments), _quadratic(full, moments)


def _quadratic(v: Tensor, moments: Tensor) -> Tensor:
    """``v_q^T S_g(q) v_q`` ``(Co,)`` for vectors ``(Co, D + 1)`` and per-group moments
    ``(G, D + 1, D + 1)``, output channels in consecutive groups (``S`` is not copied per
    channel: 256 copies of a 577x577 moment would be 680 MB)."""
    co, n_groups = v.shape[0], moments.shape[0]
    grouped = v.view(n_groups, co // n_groups, -1)
    return torch.einsum("gqi,gij,gqj->gq", grouped, moments.double(), grouped).reshape(co)


@dataclass
class JointSolution:
    """A layer after the joint re-solve, and what it changed.

    Attributes:
        assignment: the layer with re-solved gains, offsets, plain kernels and bias (AKPs and
            families as given).
        error_before, error_after: ``(Co,)`` expected squared output error of each output
            channel as given and after the re-solve.
        energy: ``(Co,)`` expected squared output ``E[y^2]`` of each original output channel.
    """

    assignment: Assignment
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
    assignment: Assignment, weight: Tensor, bias: Tensor | None, moments: Tensor
) -> JointSolution:
    """Re-solve the gains, offsets, plain kernels and bias of one layer, its families and AKPs
    fixed.

    Args:
        assignment: the layer as fitted (its bias is the starting point too).
        weight: the original ``(Co, Ci/groups, h, w)`` weight, the target.
        bias: the original ``(Co,)`` bias, or None (the layer has none: it stays without).
        moments: ``(G, D + 1, D + 1)`` patch moments (``D = Ci/groups * h * w``, the last entry
            the constant 1; see :class:`acl_convert.calibration.moments.LayerMoments`).

    Returns:
        A :class:`JointSolution`; output channels whose kernels are all plain are left as they
        are (they are exact already), and so is a channel where rounding would make the exact
        solution worse than its start.
    """
    co, cg, h, w = weight.shape
    d = cg * h * w
    if moments.shape[1:] != (d + 1, d + 1):
        raise ValueError(f"moments must be (G, {d + 1}, {d + 1}), got {tuple(moments.shape)}")
    sig = moments.double()
    target = _with_bias(weight, bias)
    start = _with_bias(assignment.weight(), None if bias is None else assignment.bias)
    err_before = _quadratic(target - start, sig)
    energy = _quadratic(target, sig)
    err_after = err_before.clone()
    problem = _Linear(assignment, sig, bias is not None)
    gain, offset = assignment.gain.clone(), assignment.offset.clone()
    plain = assignment.plain.clone().reshape(co * cg, -1)
    new_bias = None if assignment.bias is None else assignment.bias.clone()
    chunks = problem.chunks()
    solved_chunks = map_in_order(lambda qs: problem.solve_chunk(qs, target), chunks, workers())
    channels = (q for qs in chunks for q in qs)
    for q, solved in zip(channels, itertools.chain.from_iterable(solved_chunks), strict=True):
        if solved is None:
            continue  # all plain: exact already
        (g_new, o_new, p_new, b_new), err = solved
        if not bool(err <= err_before[q]):
            continue  # only rounding can make the exact solution worse than the start
        err_after[q] = err
        ks = q * cg
        gain[ks + problem.analytic[q]] = g_new
        offset[ks + problem.offs[q]] = o_new
        plain[ks + problem.plains[q]] = p_new
        if new_bias is not None:
            new_bias[q] = b_new
    out = assignment.replace(
        gain=gain, offset=offset, plain=plain.view(co * cg, h, w), bias=new_bias
    )
    return JointSolution(out, err_before, err_after, energy)


def _with_bias(weight: Tensor, bias: Tensor | None) -> Tensor:
    """``(Co, D + 1)`` float64: each output channel's weights, then its bias (0 without)."""
    co = weight.shape[0]
    out = torch.zeros(co, weight[0].numel() + 1, dtype=torch.float64)
    out[:, :-1] = weight.detach().double().reshape(co, -1)
    if bias is not None:
        out[:, -1] = bias.detach().double()
    return out


#: Most unknowns of one output channel's re-solve with its plain kernels free. Every plain kernel
#: adds ``h*w`` of them and the solve costs their cube: a 512-channel 3x3 layer kept mostly
#: plain has ~4600, ~10^13 operations per layer. Beyond this the plain kernels stay as they are
#: and only the ACKs' gains, offsets and the bias are re-solved (with the plain part fixed).
PLAIN_RESOLVE_LIMIT = 1200

#: Float64 entries of ``S`` times the kernel shapes of one chunk of output channels (64 MB).
_CHUNK_ENTRIES = 1 << 23


class _Linear:
    """The linear least-squares problem of each output channel: its ACKs' gains (columns: the
    unscaled family shapes), their offsets, its plain kernels' values (unless that would make
    more than :data:`PLAIN_RESOLVE_LIMIT` unknowns) and its bias, under the patch moments
    ``S``; ``min (t - Phi c)^T S (t - Phi c)`` over ``c``."""

    def __init__(self, assignment: Assignment, sig: Tensor, with_bias: bool) -> None:
        co, cg, h, w = assignment.shape
        self.cg, self.n, self.sig, self.with_bias = cg, h * w, sig, with_bias
        # The fitted shape of every ACK, unscaled: the columns of its gain.
        unit = assignment.replace(
            gain=torch.ones_like(assignment.gain), offset=torch.zeros_like(assignment.offset)
        )
        self.base = unit.kernels().view(co, cg, self.n)
        self.plain = assignment.plain.double().reshape(co, cg, self.n)
        self._sums: dict[int, Tensor] = {}
        is_plain = torch.tensor([c == PLAIN for c in assignment.codes]).view(co, cg)
        has_offset = assignment.has_offset().view(co, cg)
        self.analytic = [(~is_plain[q]).nonzero()[:, 0] for q in range(co)]
        self.plains = [is_plain[q].nonzero()[:, 0] for q in range(co)]
        self.offs = [has_offset[q].nonzero()[:, 0] for q in range(co)]
        self.per_group = co // len(sig)
        self._by_channel: dict[int, Tensor] = {}
        self._lock = threading.Lock()

    def chunks(self) -> list[range]:
        """The output channels in the consecutive runs :meth:`solve_chunk` takes, each within
        one group and small enough that ``S`` times its kernels' shapes stays ~64 MB; fixed by
        the layer's shape alone, so the result does not depend on the thread count."""
        d = self.cg * self.n
        size = max(1, min(16, _CHUNK_ENTRIES // (self.cg * (d + 1))))
        co = self.per_group * len(self.sig)
        return [
            range(lo, min(lo + size, start + self.per_group))
            for start in range(0, co, self.per_group)
            for lo in range(start, start + self.per_group, size)
        ]

    def _channel_major(self, g: int) -> Tensor:
        """``(Ci/groups, D + 1, n)``: group ``g``'s ``S`` columns by input channel, made
        contiguous once per group (a batched product over channels then reads ``S`` once)."""
        with self._lock:  # one copy per group, whichever thread gets there first
            if g in self._by_channel:
                return self._by_channel[g]
            d = self.cg * self.n
            s3 = self.sig[g][:, :d].reshape(d + 1, self.cg, self.n)
            self._by_channel[g] = s3.permute(1, 0, 2).contiguous()
            return self._by_channel[g]

    def solve_chunk(self, qs: range, targets: Tensor) -> list[tuple[tuple, Tensor] | None]:
        """:meth:`solve` for the output channels ``qs`` (one of :meth:`chunks`), ``S``
        applied to all their kernel shapes in one batched product: per channel its
        coefficients and the expected squared output error they leave, or None."""
        g = qs[0] // self.per_group
        shapes = self.base[qs.start : qs.stop].transpose(0, 1)  # (Ci/groups, |qs|, n)
        # (Ci/groups, |qs|, D + 1): each channel's rows contiguous, so picking its analytic
        # kernels' rows copies whole rows (picking columns of a strided view missed the cache on
        # every element: a fifth of the re-solve's time).
        s_base = torch.bmm(shapes, self._channel_major(g).transpose(1, 2))
        solved = [self.solve(q, targets[q], s_base[:, i]) for i, q in enumerate(qs)]
        done = [i for i, one in enumerate(solved) if one is not None]
        if not done:
            return [None] * len(qs)
        diff = targets[[qs[i] for i in done]] - torch.stack([solved[i][0] for i in done])
        errs = ((diff @ self.sig[g]) * diff).sum(1)
        out: list[tuple[tuple, Tensor] | None] = [None] * len(qs)
        for i, err in zip(done, errs, strict=True):
            out[i] = (solved[i][1], err)
        return out

    def _channel_sums(self, q: int) -> Tensor:
        """``(Ci/groups, D + 1)``: the columns of ``S`` summed over each input channel's pixels
        (what an offset adds), a row per input channel, for output channel ``q``'s group;
        computed once per group."""
        g = q // self.per_group
        with self._lock:
            if g not in self._sums:
                d = self.cg * self.n
                sums = self.sig[g][:, :d].reshape(d + 1, self.cg, self.n).sum(-1)
                self._sums[g] = sums.T.contiguous()
            return self._sums[g]

    def solve(self, q: int, target: Tensor, s_base: Tensor) -> tuple[Tensor, tuple] | None:
        """The best ``(D + 1,)`` weights-and-bias of output channel ``q`` and its coefficients
        (gains, offsets, plain values ``(n_plain, n)``, bias), or None when it is all plain.
        ``s_base``: ``(Ci/groups, D + 1)``, ``S`` times each of its kernels' unscaled shapes."""
        analytic, plains, offs = self.analytic[q], self.plains[q], self.offs[q]
        if analytic.numel() == 0:
            return None
        cg, n = self.cg, self.n
        d = cg * n
        sigma = self.sig[q // self.per_group]
        fixed = None
        if len(analytic) + len(offs) + len(plains) * n + 1 > PLAIN_RESOLVE_LIMIT:
            # Too many unknowns: the plain kernels keep their values, the rest fits around them.
            fixed = torch.zeros(d + 1, dtype=torch.float64)
            fixed[:d].view(cg, n)[plains] = self.plain[q, plains]
            target = target - fixed
            plains = plains[:0]
        s3 = sigma[:, :d].reshape(d + 1, cg, n)  # columns of S by (input channel, pixel)
        base = self.base[q]
        # S @ Phi without forming Phi: every column of Phi lives in one input channel's block.
        s_cols = [
            s_base[analytic].T,
            self._channel_sums(q)[offs].T,
            s3[:, plains].reshape(d + 1, -1),
        ]
        if self.with_bias:
            s_cols.append(sigma[:, d:])
        s_phi = torch.cat(s_cols, 1)  # (D + 1, m)
        x3 = s_phi[:d].reshape(cg, n, -1)
        rows = [
            torch.einsum("pn,pnm->pm", base[analytic], x3[analytic]),
            x3[offs].sum(1),
            x3[plains].reshape(-1, s_phi.shape[1]),
        ]
        if self.with_bias:
            rows.append(s_phi[d:])
        normal = torch.cat(rows, 0)  # Phi^T S Phi, (m, m)
        rhs = s_phi.T @ target
        # A whisper of ridge: a Mean kernel's gain and a neighbour's offset can be collinear.
        ridge = RIDGE * torch.diagonal(normal).mean().clamp_min(1e-30)
        coef = torch.linalg.solve(normal + ridge * torch.eye(len(rhs), dtype=torch.float64), rhs)
        n_a, n_o, n_p = len(analytic), len(offs), len(plains) * n
        g_new, o_new = coef[:n_a], coef[n_a : n_a + n_o]
        p_new = coef[n_a + n_o : n_a + n_o + n_p].view(-1, n)
        new = torch.zeros(d + 1, dtype=torch.float64)
        new_view = new[:d].view(cg, n)
        new_view[analytic] = g_new[:, None] * base[analytic]
        new_view[offs] += o_new[:, None]
        new_view[plains] = p_new
        b_new = coef[-1] if self.with_bias else None
        if b_new is not None:
            new[d] = b_new
        if fixed is not None:
            new += fixed
            p_new = self.plain[q, self.plains[q]]
        return new, (g_new, o_new, p_new, b_new)


@single_threaded
def refine_channels(
    assignment: Assignment,
    weight: Tensor,
    moments: Tensor,
    *,
    sweeps: int = 1,
    max_iter: int = 20,
    switch: Sequence[str] | None = None,
) -> Assignment:
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
        assignment: the layer as fitted (untied).
        weight: ``(Co, Ci/groups, h, w)`` original weight.
        moments: ``(G, D + 1, D + 1)`` full patch moments (last entry the constant 1).
        sweeps: passes over the input channels.
        switch: families an ACK may switch to at each step (fitted afresh to its shifted
            target), among those with no more parameters than its own, so a parameter budget
            stays met; None keeps every kernel's family.

    Returns:
        The refined assignment (families changed only by ``switch``; plain kernels hold their
        refitted values).
    """
    state = _Sweep(assignment, weight, moments, switch)
    for _ in range(sweeps):
        for p in range(state.cg):
            target = state.shifted_target(p)
            ks = torch.arange(state.co) * state.cg + p
            for code in state.present():
                state.refit(code, ks, target, p, max_iter)
            if state.switch:
                state.switch_families(p, ks, target)
    return state.result()


class _Sweep:
    """The state of :func:`refine_channels`: the current per-kernel values and kernels."""

    def __init__(self, assignment, weight, moments, switch) -> None:
        co, cg, h, w = weight.shape
        self.co, self.cg, self.h, self.w, self.n = co, cg, h, w, h * w
        self.d = cg * self.n
        self.a = assignment
        self.codes = list(assignment.codes)
        self.akps = assignment.akps.double().clone()
        self.gain = assignment.gain.double().clone()
        self.offset = assignment.offset.double().clone()
        self.has_offset = assignment.has_offset()
        self.w64 = weight.detach().double().reshape(co, self.d)
        self.plain = self.w64.reshape(co * cg, self.n).clone()
        self.sig = moments.double()
        self.group_of = torch.arange(co) // (co // len(self.sig))
        # The norm of every input channel's own block, factored once.
        self.blocks = channel_blocks(self.sig, self.n)
        self.factors, _ = metric.factor(self.blocks)
        self.switch = [] if cg == 1 else list(switch or ())  # one channel: the first fit is exact
        # The current kernels (K, n), updated channel by channel as they are refitted.
        self.approx = self._current().kernels().reshape(co * cg, self.n)

    def _current(self) -> Assignment:
        return self.a.replace(
            codes=list(self.codes),
            akps=self.akps,
            gain=self.gain,
            offset=self.offset,
            plain=self.plain.view(-1, self.h, self.w),
        )

    def result(self) -> Assignment:
        return self._current()

    def present(self) -> list[str]:
        return list(dict.fromkeys(self.codes))

    def _kernels(self, idx: Tensor, code: str) -> Tensor:
        fam = kernels.get(code)
        akps = self.akps[idx, : fam.num_params]
        f = fam.synthesize(akps, self.h, self.w, self.gain[idx], self.offset[idx])
        return f.reshape(len(idx), self.n)

    def shifted_target(self, p: int) -> Tensor:
        """``(Co, n)``: what input channel ``p``'s kernels should be, given the others."""
        rows = slice(p * self.n, (p + 1) * self.n)
        err = self.w64 - self.approx.view(self.co, self.d)  # (Co, D)
        err[:, rows] = 0
        target = self.w64[:, rows].clone()
        for g in range(len(self.sig)):
            qs = (self.group_of == g).nonzero()[:, 0]
            s_pp = self.sig[g, rows, rows]
            s_pr = self.sig[g, rows, : self.d]
            # A channel that is always zero (a dead ReLU's) has S_pp = 0: the ridge, scaled by
            # the whole moment, keeps the solve defined (its shift is then ~0).
            ridge = 1e-10 * float(torch.diagonal(self.sig[g]).mean()) + 1e-300
            shift = torch.linalg.solve(
                s_pp + ridge * torch.eye(self.n, dtype=self.sig.dtype), s_pr @ err[qs].T
            )
            target[qs] += shift.T
        return target

    def refit(self, code: str, ks: Tensor, target: Tensor, p: int, max_iter: int) -> None:
        """Refit channel ``p``'s kernels of family ``code`` (kernels ``ks[j]``) to ``target``."""
        sel = [j for j, k in enumerate(ks.tolist()) if self.codes[k] == code]
        if not sel:
            return
        sel_t = torch.tensor(sel)
        k_sel, t = ks[sel_t], target[sel_t]
        if code == PLAIN:
            self.plain[k_sel] = t
            self.approx[k_sel] = t
            return
        fam = kernels.get(code)
        a = self.factors[self.group_of[sel_t] * self.cg + p][:, None]  # (N, 1, n, n)
        with_off = bool(self.has_offset[k_sel].any())
        scale = lm.apply(t, a, False).square().sum((1, 2)).sqrt().clamp_min(1e-30)
        unit = t / scale[:, None]
        h, w = self.h, self.w
        if fam.num_params:
            u, _ = lm.refine(
                fam,
                unit,
                fam.to_unconstrained(self.akps[k_sel, : fam.num_params]),
                h,
                w,
                offset=with_off,
                bounds=dictionary.search_box(fam, h, w),
                max_iter=max_iter,
                proj=metric.projector(a, with_off),
            )
            self.akps[k_sel, : fam.num_params] = fam.from_unconstrained(u)
        g_new, b_new, _, _ = _linear_fit(
            fam, self.akps[k_sel, : fam.num_params], unit[:, None], h, w, with_off, a
        )
        self.gain[k_sel] = g_new[:, 0] * scale
        self.offset[k_sel] = b_new[:, 0] * scale
        self.approx[k_sel] = self._kernels(k_sel, code)

    def _count(self, code: str) -> int:
        return pattern.params_per_kernel(
            code, self.h, self.w, gain=True, offset=self.a.offset_enabled
        )

    def switch_families(self, p: int, ks: Tensor, target: Tensor) -> None:
        """Refit input channel ``p``'s ACKs to their shifted targets ``(Co, n)`` with every
        family of ``switch`` and move a kernel to the family with the lowest error among those
        with no more parameters than its current one, when that beats its refitted current
        family."""
        rows = [j for j, k in enumerate(ks.tolist()) if self.codes[k] != PLAIN]
        if not rows:
            return
        rows_t = torch.tensor(rows)
        k_sel, t = ks[rows_t], target[rows_t]
        chan = self.group_of[rows_t] * self.cg + p
        a = self.factors[chan][:, None]
        norm2 = lm.apply(t, a, False).square().sum((1, 2))
        current = lm.apply(t - self.approx[k_sel], a, False).square().sum((1, 2))
        fit = fit_kernels(
            t.reshape(-1, self.h, self.w).float(),
            families=self.switch,
            offset=self.a.offset_enabled,
            moments=self.blocks.float(),
            channel=chan,
        )
        cost = fit.weighted.double().square() * norm2[:, None]  # (N, F), absolute
        allowed = torch.tensor(
            [
                [self._count(f) <= self._count(self.codes[k]) for f in fit.families]
                for k in k_sel.tolist()
            ]
        )
        cost = torch.where(allowed, cost, torch.full_like(cost, float("inf")))
        best, col = cost.min(1)
        better = best < current * (1 - 1e-6)
        for j in better.nonzero()[:, 0].tolist():
            k, f = int(k_sel[j]), fit.families[int(col[j])]
            n_akp = kernels.get(f).num_params
            self.codes[k] = f
            self.akps[k] = 0
            self.akps[k, :n_akp] = fit.params[f][j].double()
            self.gain[k] = float(fit.gain[f][j])
            self.offset[k] = float(fit.offset[f][j])
            self.has_offset[k] = kernels.get(f).carries_offset(self.a.offset_enabled)
            self.approx[k] = self._kernels(torch.tensor([k]), f)[0]


#: Largest ``Ci/groups * h * w`` whose AKPs are refitted under the full input moments (channel
#: sweeps); wider layers keep the block-diagonal fit, whose sweeps cost ``Ci/groups`` sequential
#: refits each (SqueezeNet's 64-channel 3x3 layers: ~1 min per sweep on 2 cores). The joint
#: re-solve of the linear parameters is exact for every layer.
SWEEP_LIMIT = 160


def refit_layer(
    assignment: Assignment,
    weight: Tensor,
    bias: Tensor | None,
    moments: Tensor,
    *,
    sweeps: int,
    switch: Sequence[str] | None,
    steps: int = 0,
) -> JointSolution:
    """A fitted layer refined under its full input moments: AKPs channel by channel
    (:func:`refine_channels`, ``sweeps`` passes, for untied layers with
    ``Ci/groups * h * w <= SWEEP_LIMIT``; a kernel may switch to a family of ``switch`` with no
    more parameters), then all linear parameters together (:func:`resolve`); with ``steps``,
    then gradient steps on all parameters at once
    (:func:`~acl_convert.fit.reconstruct.reconstruct`) and the linear re-solve again.
    ``error_before`` is the error of ``assignment`` as given."""
    from .reconstruct import reconstruct  # it builds ACLs, which import the fitting engine

    before, _ = output_errors(weight, assignment.weight(), moments, bias, assignment.bias)
    cig, h, w = weight.shape[1:]
    if sweeps and assignment.tie is None and cig * h * w <= SWEEP_LIMIT:
        assignment = refine_channels(assignment, weight, moments, sweeps=sweeps, switch=switch)
    sol = resolve(assignment, weight, bias, moments)
    if steps:
        stepped = reconstruct(sol.assignment, weight, bias, moments, steps=steps)
        sol = resolve(stepped, weight, bias, moments)
    sol.error_before = before
    return sol
