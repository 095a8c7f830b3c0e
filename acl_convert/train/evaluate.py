"""Accuracy of a classifier on labelled images, optionally side by side with a reference model
(the original network an AnaNN was converted from)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UsageError, UserError, option

__all__ = ["evaluate", "evaluate_files", "num_outputs"]


@torch.no_grad()
def num_outputs(model: nn.Module, example: Tensor) -> int:
    """How many classes ``model`` scores: the width of its logits for one ``example`` image
    ``(3, H, W)``. Asking the model itself works for any head (Linear, 1x1 conv, ...)."""
    model.eval()
    return int(model(example[None].to(_device(model))).shape[-1])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    reference: nn.Module | None = None,
    topk: Sequence[int] = (1, 5),
    progress: Callable[[int], None] | None = None,
    names: Sequence[str] = ("the model", "the reference"),
) -> dict[str, Any]:
    """Top-k accuracy of ``model`` and, with a ``reference``, how closely the two agree.

    Both models are put in eval mode; each batch is moved to the model's device.

    Args:
        model: a classifier returning logits ``(B, C)``.
        batches: ``(images (B, 3, H, W), labels (B,) int64)`` pairs, labels in ``0 .. C-1``.
        reference: a second classifier with the same ``C`` outputs, run on the same images.
        topk: the ``k`` of the accuracies to report (clipped to ``C``).
        progress: called with the number of images of each finished batch.
        names: how messages call ``model`` and ``reference`` (e.g. their file names).

    Returns:
        ``images``: how many; ``top{k}`` per ``k``: fraction (0..1) of images whose label is among
        the model's ``k`` highest logits. With a reference also ``reference``: its own
        ``top{k}``; ``agreement``: fraction of images where both models' top-1 classes agree;
        ``logits_rel_error``: ``||z - z_ref|| / ||z_ref||`` over all logits (0 when
        ``z_ref`` is all zero).

    Raises:
        UserError: a model's logits hold NaN or Inf (broken weights or batch-norm statistics):
            no accuracy of such a model means anything.
    """
    models = {"model": model} if reference is None else {"model": model, "reference": reference}
    for m in models.values():
        m.eval()
    correct = {name: dict.fromkeys(topk, 0) for name in models}
    images = agree = 0
    # Sums of squares in float64, so the relative error needs no logits kept across batches.
    err2 = ref2 = 0.0
    said = dict(zip(("model", "reference"), names, strict=True))
    for x, labels in batches:
        logits = {name: m(x.to(_device(m))).cpu() for name, m in models.items()}
        for name, z in logits.items():
            if not bool(torch.isfinite(z).all()):
                raise UserError(
                    f"{said[name]} gives NaN or Inf logits on images {images + 1}.."
                    f"{images + len(labels)}; its weights or batch-norm statistics are broken: "
                    "repair the checkpoint (no accuracy of it would mean anything)"
                )
            for k in topk:
                hits = z.topk(min(k, z.shape[1]), dim=1).indices == labels[:, None]
                correct[name][k] += int(hits.any(dim=1).sum())
        if reference is not None:
            z, zr = logits["model"].double(), logits["reference"].double()
            agree += int((z.argmax(1) == zr.argmax(1)).sum())
            err2 += float((z - zr).square().sum())
            ref2 += float(zr.square().sum())
        images += len(labels)
        if progress is not None:
            progress(len(labels))
    if images == 0:
        raise ValueError("no images to evaluate: the batches were empty")
    result: dict[str, Any] = {"images": images}
    result.update({f"top{k}": n / images for k, n in correct["model"].items()})
    if reference is not None:
        result["reference"] = {f"top{k}": n / images for k, n in correct["reference"].items()}
        result["agreement"] = agree / images
        result["logits_rel_error"] = (err2 / ref2) ** 0.5 if ref2 > 0 else 0.0
    return result


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def evaluate_files(
    model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    compare: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    classes: str | os.PathLike | None = None,
    arch: str | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    device: str = "auto",
    trust_pickle: bool = False,
    trust_code: bool = False,
    progress: Callable[[int], None] | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """``acl-convert evaluate`` in one call: the top-k accuracy of the network in ``model`` (an
    AnaNN or a checkpoint) on the labelled images of ``data`` (docs/evaluate.md), and with
    ``compare`` its agreement with that reference network.

    Returns :func:`evaluate`'s result plus ``model``, ``arch``, ``data``, ``layout`` (how the
    labels were found) and, with a reference, ``reference["model"]``. ``notes`` receives what was
    found on the way (the architecture, unwrapping); ``progress(images)`` follows the batches.
    """
    from ..io.images import load_image, preprocessing
    from ..io.labelled import labelled_images
    from ..io.network import load_network
    from ..settings import check_device

    if batch_size < 1:
        raise UsageError(f"{option('batch_size')} must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UsageError(f"{option('limit')} must be at least 1, got {limit}; leave it out for all")
    dev = check_device(device)
    # The data first: a wrong folder is found before a large model is loaded.
    dataset = labelled_images(data, labels=labels, classes=classes).head(limit)
    kw = dict(trust_pickle=trust_pickle, trust_code=trust_code, notes=notes)
    network, spec = load_network(model, arch=arch, **kw)
    reference = None if compare is None else load_network(compare, arch=spec, **kw)[0]
    transform = preprocessing(spec, network)
    example = load_image(dataset.samples[0].path, transform)
    n_classes = num_outputs(network.to(dev), example)
    if reference is not None and num_outputs(reference.to(dev), example) != n_classes:
        raise UsageError(
            f"{compare} scores {num_outputs(reference, example)} classes but {model} scores "
            f"{n_classes}; compare with the network it was converted from"
        )
    dataset.check_labels(n_classes)
    result = evaluate(
        network,
        dataset.batches(transform, batch_size),
        reference=reference,
        progress=progress,
        names=(str(model), str(compare)),
    )
    out = {"model": str(model), "arch": spec, "data": str(data), "layout": dataset.layout}
    out.update(result)
    if reference is not None:
        out["reference"] = {"model": str(compare), **result["reference"]}
    return out
