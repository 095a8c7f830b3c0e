"""Compensated targets: fit a layer to undo what the layers converted before it changed."""

from __future__ import annotations

import torch
from torch import Tensor

from .moments import LayerMoments

__all__ = ["compensated", "RIDGES"]

#: Ridges the compensation may use, relative to the mean diagonal of ``S``, tried on half the
#: calibration images and checked on the other half; None is no compensation at all.
RIDGES = (1e-8, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, None)
#: The ridge without a half to check on (fewer than two calibration images).
DEFAULT_RIDGE = 1e-8


def compensated(
    weight: Tensor, bias: Tensor | None, mom: LayerMoments
) -> tuple[Tensor, Tensor | None]:
    """The weight and bias that best reproduce the *original* network's output of a conv
    (``weight`` ``(Co, Ci/groups, h, w)``, ``bias`` ``(Co,)`` or None) from the inputs the
    converted network gives it:
    ``argmin E[(a' . [x; 1] - a . [x_ref; 1])^2] = S^-1 C a`` (``S`` the converted inputs'
    moment, ``C`` their cross moment with the original's; ``C a`` is collected directly, see
    :class:`LayerMoments`). Fitting to it makes a layer undo what earlier layers changed,
    instead of faithfully passing it on. Without a bias the constant coordinate is held at 0.
    The first converted layer sees the original inputs: unchanged. ``mom.cross`` must have been
    collected against a network whose conv has this ``weight`` and ``bias``.

    The solve is a regression with ``D + 1`` unknowns per output channel, and a wide layer late
    in a network has few patches per image (ResNet-50's last 3x3 convs: 4,609 unknowns, 49
    patches an image): fitted exactly to 48 images it reproduced them to 6 % and raised the
    error on others 30-fold. So it is a ridge regression towards the original weights, and the
    ridge is the one of :data:`RIDGES` that does best on the odd-numbered images when fitted to
    the even-numbered ones (``mom.half``), scaled to the whole set's size; where no ridge beats
    the original weights there, they are kept."""
    co = weight.shape[0]
    d = weight[0].numel()
    a = torch.zeros(co, d + 1, dtype=torch.float64)
    a[:, :d] = weight.detach().double().reshape(co, d)
    if bias is not None:
        a[:, d] = bias.detach().double()
    keep = d + 1 if bias is not None else d
    grouped = a[:, :keep].reshape(mom.groups, co // mom.groups, keep)
    if mom.half is None:
        ridge = DEFAULT_RIDGE
    else:
        ridge = _validated_ridge(grouped, mom, keep)
        if ridge is None:
            return weight, bias
    step = _step(mom.full[:, :keep, :keep], mom.cross[:, :keep], grouped, ridge)
    out = a.clone()
    out[:, :keep] += step.reshape(co, keep)
    new_weight = out[:, :d].reshape(weight.shape).to(weight.dtype)
    return new_weight, None if bias is None else out[:, d].to(bias.dtype)


def _step(s: Tensor, cross: Tensor, a: Tensor, ridge: float) -> Tensor:
    """``(G, Co/G, keep)``: the ridge step from the weights ``a`` ``(G, Co/G, keep)`` towards
    ``S^-1 C a`` under moments ``s`` ``(G, keep, keep)`` and ``cross`` ``(G, keep, Co/G)``; the
    ridge is relative to each group's mean diagonal. Directions the inputs never excite (a dead
    channel) keep the original values instead of collapsing to 0."""
    rhs = cross - s @ a.transpose(1, 2)
    lam = ridge * torch.diagonal(s, dim1=1, dim2=2).mean(1) + 1e-300
    m = s + lam[:, None, None] * torch.eye(s.shape[1], dtype=s.dtype)
    factor, info = torch.linalg.cholesky_ex(m)  # half an LU's work, where it succeeds
    if bool((info == 0).all()):
        return torch.cholesky_solve(rhs, factor).transpose(1, 2)
    return torch.linalg.solve(m, rhs).transpose(1, 2)


def _validated_ridge(a: Tensor, mom: LayerMoments, keep: int) -> float | None:
    """The ridge of :data:`RIDGES` whose step, solved on the even-numbered images, leaves the
    least output error on the odd-numbered ones (``mom.half``), scaled from that half's size to
    the whole set's; None when the original weights do best."""
    half, n = mom.half, mom.count
    n_even = n - half.count
    s_odd, c_odd = half.full[:, :keep, :keep], half.cross[:, :keep]
    s_even = (mom.full[:, :keep, :keep] * n - s_odd * half.count) / n_even
    c_even = (mom.cross[:, :keep] * n - c_odd * half.count) / n_even

    def error(w: Tensor) -> float:  # E_odd[(w . x - y_ref)^2] less its constant E[y_ref^2]
        return float(((w @ s_odd) * w).sum() - 2 * (w * c_odd.transpose(1, 2)).sum())

    best, best_error = None, error(a)
    for ridge in RIDGES:
        if ridge is None:
            continue
        try:
            step = _step(s_even, c_even, a, ridge)
        except torch.linalg.LinAlgError:
            continue  # too small a ridge for a singular half
        if not bool(torch.isfinite(step).all()):
            continue  # too small a ridge for a singular half
        err = error(a + step)
        if err < best_error:
            best, best_error = ridge, err
    return None if best is None else best * n_even / n
