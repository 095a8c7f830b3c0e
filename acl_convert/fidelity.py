"""How closely a converted network computes what the original computes, on real images."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["measure_fidelity"]


def _capture(model: nn.Module, names: Sequence[str], store: dict[str, list[Tensor]]):
    handles = []
    for name in names:

        def hook(_m, _inp, out, name=name):
            store.setdefault(name, []).append(out.detach())

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    return handles


def _rel(a: Tensor, b: Tensor) -> float:
    """``|a - b| / |b|`` over the whole tensor (0 when both are zero)."""
    den = b.double().norm()
    return float((a.double() - b.double()).norm() / den) if den > 0 else 0.0


@torch.no_grad()
def measure_fidelity(
    original: nn.Module, converted: nn.Module, batches: Iterable[Tensor], layer_names: Sequence[str]
) -> dict[str, Any]:
    """Run both networks on the same images and compare.

    Returns:
        ``images``: how many; ``logits_rel_error``: ``|z_conv - z_orig| / |z_orig|`` over all
        logits; ``top1_agreement``: fraction of images with the same top-1 class;
        ``layer_rel_error``: per converted layer, the relative error of its output inside the
        converted network (so it includes what earlier converted layers changed).
    """
    original.eval()
    converted.eval()
    outs_o: dict[str, list[Tensor]] = {}
    outs_c: dict[str, list[Tensor]] = {}
    handles = _capture(original, layer_names, outs_o) + _capture(converted, layer_names, outs_c)
    logits_o, logits_c = [], []
    try:
        for x in batches:
            logits_o.append(original(x))
            logits_c.append(converted(x))
    finally:
        for h in handles:
            h.remove()
    zo, zc = torch.cat(logits_o), torch.cat(logits_c)
    return {
        "images": len(zo),
        "logits_rel_error": _rel(zc, zo),
        "top1_agreement": float((zo.argmax(1) == zc.argmax(1)).double().mean()),
        "layer_rel_error": {
            n: _rel(torch.cat(outs_c[n]), torch.cat(outs_o[n])) for n in layer_names
        },
    }
