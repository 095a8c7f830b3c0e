"""Which BatchNorm consumes a conv's output, and folding a bias into it.

A conv without a bias that feeds a BatchNorm can still get one at no cost in the file: in eval
mode ``BN(y + b) = gamma (y + b - mu) / sqrt(var + eps) + beta`` is the same BN with running
mean ``mu - b``. So a converted layer's joint re-solve may solve a bias (the mean shift its
approximation adds), and the AnaNN stores it in the BN's ``running_mean`` only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["following_batchnorms", "fold_bias"]


def following_batchnorms(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """For each conv of ``names`` whose output goes to one ``BatchNorm2d`` with running
    statistics and to nothing else, that BN's name. Found on the traced graph
    (``torch.fx``); a model that cannot be traced has none (nothing is folded)."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # any tracing failure only means: nothing is folded
        return {}
    wanted = set(names)
    out = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in wanted or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op != "call_module" or user.args[:1] != (node,):
            continue
        bn = model.get_submodule(user.target)
        if isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None:
            out[node.target] = user.target
    return out


@torch.no_grad()
def fold_bias(model: nn.Module, bn_name: str, bias: Tensor) -> None:
    """Make the BatchNorm ``bn_name`` of ``model`` compute ``BN(y + bias)`` from ``y``, in eval
    mode: its running mean becomes ``running_mean - bias`` (``bias`` ``(C,)``)."""
    bn = model.get_submodule(bn_name)
    bn.running_mean.sub_(bias.to(bn.running_mean))
