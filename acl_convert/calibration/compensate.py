"""Compensated targets: fit a layer to undo what the layers converted before it changed."""

from __future__ import annotations

import torch
from torch import Tensor

from .moments import LayerMoments

__all__ = ["compensated"]


def compensated(
    weight: Tensor, bias: Tensor | None, mom: LayerMoments
) -> tuple[Tensor, Tensor | None]:
    """The weight and bias that best reproduce the *original* network's output of a conv
    (``weight`` ``(Co, Ci/groups, h, w)``, ``bias`` ``(Co,)`` or None) from the inputs the
    converted network gives it:
    ``argmin E[(a' . [x; 1] - a . [x_ref; 1])^2] = S^-1 C a`` (``S`` the converted inputs'
    moment, ``C`` their cross moment with the original's). Fitting to it makes a layer undo what
    earlier layers changed, instead of faithfully passing it on. Without a bias the constant
    coordinate is held at 0. The first converted layer sees the original inputs: unchanged."""
    co = weight.shape[0]
    d = weight[0].numel()
    a = torch.zeros(co, d + 1, dtype=torch.float64)
    a[:, :d] = weight.detach().double().reshape(co, d)
    if bias is not None:
        a[:, d] = bias.detach().double()
    keep = d + 1 if bias is not None else d
    per_group = co // mom.groups
    out = a.clone()
    for g in range(mom.groups):
        qs = slice(g * per_group, (g + 1) * per_group)
        s = mom.full[g, :keep, :keep]
        rhs = (mom.cross[g] @ a[qs].T)[:keep] - s @ a[qs, :keep].T
        # Regularised towards the original weights: directions the inputs never excite (a
        # dead channel) keep their values instead of collapsing to 0.
        ridge = 1e-8 * float(torch.diagonal(s).mean()) + 1e-300
        step = torch.linalg.solve(s + ridge * torch.eye(keep, dtype=s.dtype), rhs)
        out[qs, :keep] = a[qs, :keep] + step.T
    new_weight = out[:, :d].reshape(weight.shape).to(weight.dtype)
    return new_weight, None if bias is None else out[:, d].to(bias.dtype)
