"""What a fit produces, and how a family is chosen per kernel (SPEC §4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import kernels, pattern
from ..nn.assignment import Assignment

__all__ = ["FitResult", "Selection", "SELECT_MODES"]

SELECT_MODES = ("best", "compact")


@dataclass
class Selection:
    """The family chosen for every kernel.

    Attributes:
        codes: family code per kernel (``P`` where no family qualified), length ``N``.
        choice: ``(N,)`` column of :attr:`FitResult.residuals` chosen, ``-1`` for plain.
        residual: ``(N,)`` relative residual of the chosen family (0 for plain).
    """

    codes: list[str]
    choice: Tensor
    residual: Tensor

    def totals(self) -> dict[str, int]:
        return pattern.totals(self.codes)


@dataclass
class FitResult:
    """Per-kernel, per-family fits of ``N`` kernels of size ``h x w``.

    Attributes:
        families: family codes, the column order of :attr:`residuals`.
        residuals: ``(N, F)`` relative L2 residual ``|W - W_hat| / |W|`` (0 for all-zero kernels).
        params: ``code -> (N, P)`` canonical AKPs in the paper's units.
        gain: ``code -> (N,)`` gains ``g`` of ``g * f + b``.
        offset: ``code -> (N,)`` offsets ``b`` (zeros when the offset is off, and for Mean,
            whose constant is carried by the gain).
        kernel_size: ``(h, w)``.
        offset_enabled: whether offsets were fitted.
        weighted: ``(N, F)`` activation-weighted relative residual ``sqrt(e^T S e / w^T S w)``
            (the share of the kernel's output it gets wrong on the calibration inputs), or None
            when fitted without input moments; the fit minimised this one then.
        energy: ``(N,)`` float64 output energy ``w^T S w`` of each kernel (``|w|^2``, i.e.
            white inputs, without moments); ``residual**2 * energy`` is the squared output error
            a family adds.
        channels: ``T`` for channel-tied stacks (gains and offsets are then ``(N, T)`` and a row
            is one output channel), None for single kernels.
    """

    families: list[str]
    residuals: Tensor
    params: dict[str, Tensor]
    gain: dict[str, Tensor]
    offset: dict[str, Tensor]
    kernel_size: tuple[int, int]
    offset_enabled: bool
    weighted: Tensor | None = None
    energy: Tensor | None = None
    channels: int | None = None

    def __len__(self) -> int:
        return self.residuals.shape[0]

    def rows(self, lo: int, hi: int) -> FitResult:
        """The result of rows ``lo:hi`` alone (views, no copies): e.g. one layer of a batch
        that fitted several."""
        return FitResult(
            families=self.families,
            residuals=self.residuals[lo:hi],
            params={c: v[lo:hi] for c, v in self.params.items()},
            gain={c: v[lo:hi] for c, v in self.gain.items()},
            offset={c: v[lo:hi] for c, v in self.offset.items()},
            kernel_size=self.kernel_size,
            offset_enabled=self.offset_enabled,
            weighted=None if self.weighted is None else self.weighted[lo:hi],
            energy=None if self.energy is None else self.energy[lo:hi],
            channels=self.channels,
        )

    def param_count(self, code: str) -> int:
        """Learnable values of one converted row of family ``code``: AKPs + gain (+ offset), and
        for a channel-tied stack the AKPs once plus a gain (and offset) per channel."""
        h, w = self.kernel_size
        per = pattern.params_per_kernel(code, h, w, gain=True, offset=self.offset_enabled)
        if self.channels is None:
            return per
        n_akp = kernels.get(code).num_params
        return n_akp + (per - n_akp) * self.channels

    def plain_count(self) -> int:
        """Values of one row left plain: ``h*w``, times ``T`` for a stack."""
        h, w = self.kernel_size
        return h * w * (self.channels or 1)

    def eligible(self) -> Tensor:
        """``(F,)`` bool: a family only saves parameters when it needs fewer than plain."""
        return torch.tensor([self.param_count(c) < self.plain_count() for c in self.families])

    def measure(self, on: str = "plain") -> Tensor:
        """``(N, F)`` relative residuals: ``plain`` (L2 of the kernel) or ``output``
        (activation-weighted, only when fitted with input moments)."""
        if on == "plain":
            return self.residuals
        if on == "output":
            if self.weighted is None:
                raise ValueError("output residuals need a fit with input moments (--calibration)")
            return self.weighted
        raise ValueError(f"residual must be 'plain' or 'output', got {on!r}")

    def fitted(self, code: str) -> Tensor:
        """The fitted kernels ``g * f(AKPs) + b`` of family ``code``, ``(N, h, w)`` (``(N, T, h,
        w)`` for stacks), evaluated in float64 (see :meth:`ACL.synthesize` for why) and returned
        in the result's dtype."""
        h, w = self.kernel_size
        params = self.params[code]
        if self.channels is not None:
            params = params[:, None]  # one AKP set per stack, a gain and offset per channel
        fitted = kernels.get(code).synthesize(params, h, w, self.gain[code], self.offset[code])
        return fitted.to(self.residuals.dtype)

    def select(self, threshold: float, mode: str = "best", on: str = "plain") -> Selection:
        """Choose a family per kernel (SPEC §4).

        ``best``: the eligible family with the lowest residual, kept if ``r <= threshold``.
        ``compact``: among eligible families with ``r <= threshold``, the one with the fewest
        parameters (ties: lower residual). In both modes exact residual ties go to the family
        with fewer parameters, so an all-zero kernel becomes Mean. Kernels with no qualifying
        family stay plain (``P``). ``on`` says which residual the threshold and the ranking use
        (see :meth:`measure`).
        """
        if mode not in SELECT_MODES:
            raise ValueError(f"selection mode must be one of {SELECT_MODES}, got {mode!r}")
        if not threshold >= 0:
            raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
        counts = torch.tensor([float(self.param_count(c)) for c in self.families])
        res = self.measure(on).double()
        ok = self.eligible()[None, :] & torch.isfinite(res)
        if mode == "best":
            # Lexicographic (residual, parameter count): the count only breaks exact ties.
            key = res + counts[None, :] * 1e-12
        else:
            ok = ok & (res <= threshold)
            key = counts[None, :] + res.clamp(0, 1e3) * 1e-6
        key = torch.where(ok, key, torch.full_like(key, float("inf")))
        best_key, choice = key.min(1)
        chosen_res = res.gather(1, choice[:, None])[:, 0] if res.shape[1] else best_key
        keep = torch.isfinite(best_key) & (chosen_res <= threshold)
        choice = torch.where(keep, choice, torch.full_like(choice, -1))
        codes = [self.families[c] if c >= 0 else "P" for c in choice.tolist()]
        residual = torch.where(keep, chosen_res, torch.zeros_like(chosen_res)).to(
            self.residuals.dtype
        )
        return Selection(codes=codes, choice=choice, residual=residual)

    def assignment(
        self, selection: Selection, weight: Tensor, bias: Tensor | None = None
    ) -> Assignment:
        """The :class:`~acl_convert.nn.assignment.Assignment` of a layer whose kernels
        ``weight`` ``(Co, Ci/groups, h, w)`` (and ``bias``) this result fitted, with the families
        of ``selection``: the chosen fits where selected, the original kernels elsewhere. A
        channel-tied fit (one row per output channel) gives each channel's kernels its family
        and AKPs, tied together, each with its own gain and offset."""
        per_row = self.channels or 1
        out = Assignment.all_plain(weight, bias, self.offset_enabled)
        if len(out) != len(self) * per_row:
            raise ValueError(f"{len(out)} kernels in the weight, {len(self) * per_row} fitted")
        p_max = max([self.params[c].shape[1] for c in self.families] + [0])
        akps = torch.zeros(len(out), p_max, dtype=torch.float64)
        rows_of = torch.arange(len(out)) // per_row
        codes = [selection.codes[r] for r in rows_of.tolist()]
        for col, code in enumerate(self.families):
            rows = (selection.choice == col).nonzero()[:, 0]
            if not len(rows):
                continue
            kern = (rows[:, None] * per_row + torch.arange(per_row)).reshape(-1)
            akps[kern, : self.params[code].shape[1]] = (
                self.params[code][rows].double().repeat_interleave(per_row, 0)
            )
            out.gain[kern] = self.gain[code][rows].double().reshape(-1)
            out.offset[kern] = self.offset[code][rows].double().reshape(-1)
        tie = None
        if self.channels is not None:
            tie = torch.where(torch.tensor([c != "P" for c in codes]), rows_of, -1)
        return out.replace(codes=codes, akps=akps, tie=tie)

    def selection_from(self, choice: Tensor, on: str = "plain") -> Selection:
        """A :class:`Selection` from a column per kernel (``-1`` plain), e.g. a budget's
        choice (:mod:`.budget`); ``residual`` is then measured ``on`` (see :meth:`measure`)."""
        choice = torch.as_tensor(choice, dtype=torch.long)
        if choice.shape != (len(self),):
            raise ValueError(f"choice must have shape ({len(self)},), got {tuple(choice.shape)}")
        res = self.measure(on if on == "plain" or self.weighted is not None else "plain")
        keep = choice >= 0
        picked = res.gather(1, choice.clamp_min(0)[:, None])[:, 0] if res.shape[1] else res[:, 0]
        codes = [self.families[c] if c >= 0 else "P" for c in choice.tolist()]
        residual = torch.where(keep, picked, torch.zeros_like(picked))
        return Selection(codes=codes, choice=choice, residual=residual)
