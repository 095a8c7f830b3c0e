"""The activation-weighted norm: a kernel's error measured by what it does to real inputs.

A kernel ``w`` (``n = h*w`` values) of a conv sees input patches ``x`` (``n`` values of one input
channel). Replacing it by ``w_hat`` changes the output by ``(w - w_hat) . x`` at every position,
so the expected squared output error is ``e^T S e`` with ``e = w - w_hat`` and ``S = E[x x^T]``
the (uncentred) second moment of the input patches. For white inputs ``S`` is a multiple of the
identity and this is the plain least-squares residual; natural images put almost all of their
energy in low frequencies, so ``S`` makes a kernel's sum and smooth part matter far more than its
pixel-level detail.

With a factor ``A`` (``A^T A = S``) the weighted residual is the plain residual of ``A e``, so the
whole least-squares machinery runs unchanged on ``A``-transformed kernels. With an offset ``b``
(the fit is ``g f + b``), the best ``b`` is projected out: ``M = (I - q q^T) A`` with
``q = A 1 / |A 1|``, and ``|M (w - g f)|^2 = min_b |A (w - g f - b 1)|^2``. Without a metric
(``A = I``) ``M`` is the plain centring projector.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["factor", "projector", "offset_direction", "channel_blocks", "RIDGE"]

#: Added to the second moment, relative to its mean eigenvalue: directions the calibration
#: images never excited (e.g. a padding-only corner) still cost a little, so every fit stays
#: determined and the factor exists.
RIDGE = 1e-4


def factor(moment: Tensor) -> tuple[Tensor, Tensor]:
    """``A`` ``(G, n, n)`` with ``A^T A = S / scale + ridge`` for second moments ``S``
    ``(G, n, n)``, and ``scale`` ``(G,)``.

    Each ``S`` is scaled to unit mean eigenvalue (``scale`` = trace / n), so weighted residuals
    are on the same scale as plain ones (for white inputs ``A = I`` exactly) and relative
    residuals do not depend on the input's overall scale; ``scale * |A w|^2`` is the kernel's
    output energy ``E[(w . x)^2]`` in the layer's own units."""
    if moment.ndim != 3 or moment.shape[1] != moment.shape[2]:
        raise ValueError(f"second moments must have shape (G, n, n), got {tuple(moment.shape)}")
    s = moment.double()
    s = 0.5 * (s + s.transpose(1, 2))
    n = s.shape[-1]
    scale = torch.diagonal(s, dim1=1, dim2=2).mean(1).clamp_min(1e-30)
    s = s / scale[:, None, None]
    eye = torch.eye(n, dtype=s.dtype, device=s.device)
    chol, info = torch.linalg.cholesky_ex(s + RIDGE * eye)
    if bool((info != 0).any()):
        # Only a numerically indefinite moment gets here; an eigen-decomposition clamps it.
        vals, vecs = torch.linalg.eigh(s)
        root = vecs * vals.clamp_min(0).add(RIDGE).sqrt()[:, None, :]
        return root.transpose(1, 2).to(moment.dtype), scale.to(moment.dtype)
    # S = L L^T, so A = L^T gives A^T A = S.
    return chol.transpose(1, 2).to(moment.dtype), scale.to(moment.dtype)


def offset_direction(a: Tensor) -> Tensor:
    """``A 1`` ``(..., n)``: how a constant offset shows up in the weighted space."""
    return a.sum(-1)


def projector(a: Tensor, offset: bool) -> Tensor:
    """``M`` ``(..., n, n)`` for factors ``a`` ``(..., n, n)``: ``A`` itself without an offset,
    ``(I - q q^T) A`` with one (the best offset minimised out, see the module docstring)."""
    if not offset:
        return a
    q = offset_direction(a)
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return a - q[..., :, None] * (q[..., None, :] @ a)


def channel_blocks(full: Tensor, n: int) -> Tensor:
    """The ``(n, n)`` diagonal blocks of every input channel of full patch moments
    ``(G, D + 1, D + 1)`` (``D = Ci/groups * n``), group by group: ``(Ci, n, n)``."""
    cg = (full.shape[1] - 1) // n
    return torch.stack(
        [
            full[g, c * n : (c + 1) * n, c * n : (c + 1) * n]
            for g in range(full.shape[0])
            for c in range(cg)
        ]
    )
