"""Layer-wise reconstruction: gradient steps on all of a converted layer's parameters at once,
on its exact output error under the full input moments (what AdaRound and BRECQ do for
quantisation, with the calibration images' second moments in place of the images).

The per-kernel fits see one input channel at a time and the channel sweeps
(:func:`~acl_convert.fit.joint.refine_channels`) cost a sequential refit per input channel, so
wide layers keep block-diagonal AKPs. The exact objective of a layer is a quadratic form in its
weights, ``sum_q e_q^T S e_q`` with ``e_q`` output channel ``q``'s weight-and-bias error and
``S`` the ``(D + 1, D + 1)`` patch moment, so one step costs a weight synthesis and a
``Co x D x D`` product, whatever the number of images: every AKP of the layer moves together,
in a few seconds even for SqueezeNet's 256x64x3x3 layers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..nn.acl import ACL
from ..nn.assignment import Assignment
from ..train.finetune import FinetuneConfig, _akp_damping, _hold_jumpy_angles, param_groups
from .joint import _quadratic, _with_bias

__all__ = ["reconstruct", "DampedAdam", "RECONSTRUCT_LR"]

#: Relative learning rates (see :func:`acl_convert.train.finetune.param_groups`): the AKPs
#: (radians, log-scales) and the gains, offsets and plain kernels (on the layer's kernel size).
#: Measured on SqueezeNet's layers (docs/results.md): larger AKP rates lower the error faster
#: at first and then stall higher.
RECONSTRUCT_LR = {"akp": 1e-2, "plain": 1e-2, "rest": 1e-2}


def reconstruct(
    assignment: Assignment,
    weight: Tensor,
    bias: Tensor | None,
    moments: Tensor,
    *,
    steps: int,
    lr: dict[str, float] | None = None,
) -> Assignment:
    """``steps`` Adam steps (cosine-decayed) on every AKP, gain, offset, plain kernel and the
    bias of one layer, minimising its relative output error
    ``sum_q e_q^T S_g(q) e_q / sum_q t_q^T S_g(q) t_q`` under the full patch moments.

    Args:
        assignment: the layer as fitted (untied; families stay as they are).
        weight: ``(Co, Ci/groups, h, w)`` the target weight.
        bias: ``(Co,)`` the target bias, or None (the layer has none and stays without).
        moments: ``(G, D + 1, D + 1)`` full patch moments (last entry the constant 1).
        steps: how many gradient steps.
        lr: relative learning rates by group (default :data:`RECONSTRUCT_LR`).

    Returns:
        The assignment with the lowest error seen, the start included: never worse.
    """
    if steps <= 0 or assignment.tie is not None:
        return assignment
    acl = ACL.from_assignment(assignment, dtype=torch.float64).train()
    target = _with_bias(weight, bias)
    sig = moments.double()
    energy = float(_quadratic(target, sig).sum())
    if energy <= 0:
        return assignment
    best, best_state = math.inf, None
    with DampedAdam(acl, {"": acl}, dict(lr or RECONSTRUCT_LR)) as optimizer:
        for step in range(steps + 1):
            loss = _error(acl, target, sig) / energy
            if float(loss.detach()) < best:
                best = float(loss.detach())
                best_state = {k: v.detach().clone() for k, v in acl.state_dict().items()}
            if step == steps:
                break
            optimizer.step(loss, step / steps)
    acl.load_state_dict(best_state)
    out = acl.eval().assignment()
    return out.replace(bias=None if assignment.bias is None else out.bias)


class DampedAdam:
    """Adam on every AKP, gain, offset, plain kernel and bias of ``model`` (relative rates
    ``lr`` by group, see :func:`~acl_convert.train.finetune.param_groups`), cosine-decayed over
    the run, each AKP's move shrunk by its damping factor
    (:func:`~acl_convert.train.finetune._akp_damping`) and the fine-tune's jumpy angles held,
    for the layers ``acls`` (by name). A context manager: leaving it removes the angle hooks.
    """

    def __init__(self, model: nn.Module, acls: dict[str, ACL], lr: dict[str, float]) -> None:
        config = FinetuneConfig(train=("akp", "plain", "rest"), lr=lr)
        groups = param_groups(model, config)
        self.optimizer = torch.optim.Adam(groups)
        self.base = [g["lr"] for g in groups]
        self.damp = _akp_damping(acls)
        self.hooks = _hold_jumpy_angles(acls)

    def __enter__(self) -> DampedAdam:
        return self

    def __exit__(self, *_exc) -> None:
        for h in self.hooks:
            h.remove()

    def step(self, loss: Tensor, progress: float) -> None:
        """One step on ``loss``, the rates decayed to where ``progress`` (0 to 1) puts them."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        decay = 0.5 * (1 + math.cos(math.pi * progress))
        for group, rate in zip(self.optimizer.param_groups, self.base, strict=True):
            group["lr"] = rate * decay
        before = [p.detach().clone() for p, _ in self.damp]
        self.optimizer.step()
        with torch.no_grad():
            for (p, scale), old in zip(self.damp, before, strict=True):
                p.copy_(old + (p - old) * scale)


def _error(acl: ACL, target: Tensor, sig: Tensor) -> Tensor:
    """The layer's summed squared output error (autograd through the synthesis)."""
    co = target.shape[0]
    full = torch.zeros_like(target)
    full = full.index_copy(1, torch.arange(target.shape[1] - 1), acl.synthesize().reshape(co, -1))
    if acl.bias is not None:
        full = full.index_copy(1, torch.tensor([target.shape[1] - 1]), acl.bias[:, None])
    diff = target - full
    n_groups = sig.shape[0]
    grouped = diff.view(n_groups, co // n_groups, -1)
    return torch.einsum("gqi,gij,gqj->", grouped, sig, grouped)
