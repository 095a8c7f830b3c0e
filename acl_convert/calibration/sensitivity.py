"""How much the logits feel an error in each layer's output, measured on calibration images.

A model-wide budget spends parameters where they add the least error; summed per-layer output
errors treat every layer alike, but the final logits are far more sensitive to some layers than
to others. Perturbing one layer's weights at a time by a small random amount and measuring, in
the same forward pass, the relative error of that layer's output (``e_l``) and of the logits
(``z_l``) gives the sensitivity ``s_l = z_l^2 / e_l^2``: to first order a relative output error
``e`` in layer ``l`` alone costs ``s_l e^2`` of squared relative logits error. A weight
perturbation is used, not output noise, because a conversion's error is one: it is smooth across
positions the way the layer's input is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["layer_sensitivity"]


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    names: Sequence[str],
    batches: Sequence[Tensor],
    *,
    scale: float = 0.05,
    seed: int = 0,
) -> dict[str, float]:
    """``{name: s_l}`` for the convs ``names`` of ``model`` (left as it was).

    Args:
        model: the network (eval mode is used).
        names: the convs to measure (``nn.Conv2d`` or anything with a ``weight`` parameter).
        batches: ``(B, C, H, W)`` images.
        scale: the perturbation's size relative to the layer's weights (RMS): small enough for
            the first-order picture, large enough to be far above rounding.
        seed: seeds the perturbations.
    """
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    reference = [model(x) for x in batches]
    out = {}
    outputs: dict[str, Tensor] = {}
    for name in names:
        conv = model.get_submodule(name)
        weight = conv.weight
        original = weight.detach().clone()
        noise = torch.randn(weight.shape, generator=gen, dtype=weight.dtype)
        perturbed = original + scale * float(original.square().mean().sqrt()) * noise
        layer_err = layer_ref = logit_err = logit_ref = 0.0
        hook = conv.register_forward_hook(lambda _m, _i, y: outputs.update(y=y.clone()))
        try:
            for x, z in zip(batches, reference, strict=True):
                model(x)
                y = outputs["y"]
                weight.copy_(perturbed)
                try:
                    z_hat = model(x)
                    y_hat = outputs["y"]
                finally:
                    weight.copy_(original)
                layer_err += float((y_hat - y).double().square().sum())
                layer_ref += float(y.double().square().sum())
                logit_err += float((z_hat - z).double().square().sum())
                logit_ref += float(z.double().square().sum())
        finally:
            hook.remove()
        rel_layer = layer_err / layer_ref if layer_ref > 0 else 0.0
        rel_logits = logit_err / logit_ref if logit_ref > 0 else 0.0
        out[name] = rel_logits / rel_layer if rel_layer > 0 else 0.0
    return out
