"""How closely a converted network computes what the original computes, on real images."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["measure_fidelity"]


def _capture(model: nn.Module, names: Sequence[str], store: dict[str, Tensor]):
    handles = []
    for name in names:

        def hook(_m, _inp, out, name=name):
            # A copy: the next module may be an in-place ReLU that overwrites ``out``.
            store[name] = out.detach().clone()

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
    # Only one batch of layer outputs is held at a time (a first conv's output is ~4 MB per
    # image); the relative errors are accumulated as sums of squares.
    outs_o: dict[str, Tensor] = {}
    outs_c: dict[str, Tensor] = {}
    err = {n: 0.0 for n in layer_names}
    ref = {n: 0.0 for n in layer_names}
    handles = _capture(original, layer_names, outs_o) + _capture(converted, layer_names, outs_c)
    logits_o, logits_c = [], []
    try:
        with torch.no_grad():
            for x in batches:
                logits_o.append(original(x))
                logits_c.append(converted(x))
                for n in layer_names:
                    a, b = outs_c.pop(n).double(), outs_o.pop(n).double()
                    err[n] += float((a - b).square().sum())
                    ref[n] += float(b.square().sum())
    finally:
        for h in handles:
            h.remove()
    zo, zc = torch.cat(logits_o), torch.cat(logits_c)
    return {
        "images": len(zo),
        "logits_rel_error": _rel(zc, zo),
        "top1_agreement": float((zo.argmax(1) == zc.argmax(1)).double().mean()),
        "layer_rel_error": {
            n: (err[n] / ref[n]) ** 0.5 if ref[n] > 0 else 0.0 for n in layer_names
        },
    }
