"""Choosing a family per kernel over one or several fitted layers: by threshold (SPEC §4) or by
a budget of parameters or output error (:mod:`.budget`), per layer or over the whole model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from . import budget
from .joint import output_errors
from .result import FitResult, Selection

__all__ = ["Rule", "choose", "meet_error_bound", "fitted_error"]


@dataclass(frozen=True)
class Rule:
    """How kernels are chosen.

    Attributes:
        threshold: keep a family when its residual is at most this (without a budget).
        mode: ``best`` or ``compact`` (see :meth:`FitResult.select`).
        on: which residual ranks families and meets the threshold: ``plain`` or ``output``.
        target_compact: a compact factor to reach, adding the least output error.
        max_output_error: a relative output error to spend, saving the most parameters.
        scope: ``layer`` (a budget per layer) or ``model`` (one budget over all layers).
    """

    threshold: float
    mode: str = "best"
    on: str = "plain"
    target_compact: float | None = None
    max_output_error: float | None = None
    scope: str = "layer"

    @property
    def budget(self) -> bool:
        return self.target_compact is not None or self.max_output_error is not None


def choose(
    fits: Mapping[str, FitResult], rule: Rule, notes: list[str] | None = None
) -> dict[str, Selection]:
    """A :class:`Selection` per layer of ``fits`` (by name, in the given order). A budget that
    cannot be met adds a sentence to ``notes``."""
    if not rule.budget:
        return {name: fit.select(rule.threshold, rule.mode, rule.on) for name, fit in fits.items()}
    names = list(fits)
    parts = [_budget_terms(fits[name]) for name in names]
    if rule.scope == "layer":
        choices = [_budget_choice(err, sav, plain, rule, notes) for err, sav, plain in parts]
    else:
        err = torch.cat([p[0] for p in parts])
        sav = torch.cat([p[1] for p in parts])
        plain = sum(p[2] for p in parts)
        all_choices = _budget_choice(err, sav, plain, rule, notes)
        choices = list(torch.split(all_choices, [len(p[0]) for p in parts]))
    return {
        name: fits[name].selection_from(choice, rule.on)
        for name, choice in zip(names, choices, strict=True)
    }


def _budget_terms(fit: FitResult) -> tuple[Tensor, Tensor, int]:
    """Error ``(N, F)`` each family would add, relative to the layer's output energy (squared,
    so additive over kernels and comparable across layers), its saving ``(N, F)`` in
    parameters, and the layer's plain parameter count."""
    on = "output" if fit.weighted is not None else "plain"
    res = fit.measure(on).double()
    energy = fit.energy
    total = float(energy.sum())
    err = res.square() * (energy / total if total > 0 else energy)[:, None]
    err = torch.where(fit.eligible()[None, :], err, torch.full_like(err, float("inf")))
    sav = torch.tensor([float(fit.plain_count() - fit.param_count(c)) for c in fit.families])
    # Per kernel: layers of other kernel sizes save other amounts, and a model budget mixes them.
    return err, sav[None, :].expand(len(fit), -1), fit.plain_count() * len(fit)


def _budget_choice(
    err: Tensor, sav: Tensor, plain: int, rule: Rule, notes: list[str] | None
) -> Tensor:
    if rule.target_compact is not None:
        choice, met = budget.select_for_saving(err, sav, rule.target_compact * plain)
        if not met and notes is not None:
            # Every kernel at its cheapest family still keeps more parameters than asked.
            notes.append(
                f"compact factor {rule.target_compact:g} is out of reach with these families: "
                "converted as compactly as they allow"
            )
        return choice
    return budget.select_for_error(err, sav, rule.max_output_error**2)


def fitted_error(
    fit: FitResult, selection: Selection, weight: Tensor, bias: Tensor | None, moments: Tensor
) -> float:
    """The layer's true relative output error with the per-kernel fits as selected, under its
    full patch moments ``(G, D + 1, D + 1)`` (cross-channel terms included)."""
    approx = fit.assignment(selection, weight, bias).weight()
    err, energy = output_errors(weight.detach(), approx, moments, bias)
    return float(err.sum() / energy.sum()) ** 0.5 if float(energy.sum()) > 0 else 0.0


def meet_error_bound(
    fit: FitResult,
    selection: Selection,
    rule: Rule,
    weight: Tensor,
    bias: Tensor | None,
    moments: Tensor,
) -> Selection:
    """The budget adds up per-kernel errors (each in its own channel's norm); the errors of an
    output channel's kernels also correlate across channels. Tighten the bound until the layer's
    true error, as fitted, is within ``rule.max_output_error`` (the joint re-solve only lowers
    it)."""
    limit = rule.max_output_error
    bound = limit
    for _ in range(8):
        err = fitted_error(fit, selection, weight, bias, moments)
        if err <= limit or bound < 1e-6:
            break
        bound *= 0.9 * limit / err
        tighter = Rule(rule.threshold, rule.mode, rule.on, max_output_error=bound, scope=rule.scope)
        selection = choose({"layer": fit}, tighter)["layer"]
    return selection
