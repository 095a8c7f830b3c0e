"""The trade-off before converting: compact factor against fidelity, one conversion per budget.

:func:`sweep_checkpoint` / :func:`sweep_model` convert the same layers at a series of
``target_compact`` budgets with the same calibration images and measure every point on images
the conversions did not fit to: the held-out calibration images (logits error, top-1
agreement, each layer's output error) and, when given, a labelled evaluation set (top-1 and
top-5 next to the original's). A user picks the budget from the curve, then converts once.

With a model-wide budget (``budget_scope="model"``, the sweep's default) every layer's
per-kernel fits are made on the original network's inputs, so they are the same for every
budget: they are made once and reused, and each point is exactly the conversion
:func:`~acl_convert.pipeline.convert_checkpoint` makes at that budget. Only the choice, the
network-order refinement and the measurements are repeated. Per-layer budgets fit each layer on
the inputs the layers converted before it give, which depend on the budget: every point is then
a conversion of its own.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .conversion import Conversion
from .errors import UsageError, option
from .io.header import settings_dict
from .pipeline import Job, Layers, prepare_checkpoint, prepare_model
from .train.evaluate import evaluate

__all__ = ["SweepPoint", "Sweep", "sweep", "sweep_checkpoint", "sweep_model"]

#: ``progress(target, index, total)``: the conversion at budget ``target`` (the ``index``-th of
#: ``total``) starts.
SweepProgress = Callable[[float, int, int], None]


@dataclass
class SweepPoint:
    """One budget of a sweep.

    Attributes:
        target: the ``target_compact`` asked for.
        compact_factor: what the conversion reached over the selected layers (Eq. 25).
        fidelity: on the held-out calibration images (see
            :func:`~acl_convert.calibration.fidelity.measure_fidelity`; ``on`` says which).
        evaluation: with an evaluation set: ``top1``, ``top5``, ``agreement``,
            ``logits_rel_error`` and ``images`` on it; else None.
        layers: per layer, ``name``, ``compact_factor``, ``params_after`` and ``output_error``
            (measured inside the converted network, on the held-out images).
        seconds: wall time of the conversion and its measurements.
        notes: what the conversion said (e.g. a budget out of reach).
        conversion: the conversion itself, when the sweep was asked to keep them.
    """

    target: float
    compact_factor: float
    fidelity: dict[str, Any]
    evaluation: dict[str, Any] | None
    layers: list[dict[str, Any]]
    seconds: float
    notes: list[str] = field(default_factory=list)
    conversion: Conversion | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(dataclasses.replace(self, conversion=None))
        del out["conversion"]
        return out


@dataclass
class Sweep:
    """A sweep's points in the order of the targets, and what they were measured against.

    Attributes:
        points: one :class:`SweepPoint` per target.
        reference: the original network on the evaluation set (``top1``, ``top5``), or None.
        settings: the conversions' settings (``target_compact`` aside), as JSON values.
        layers: the selected layers' names, in network order.
        reused_fits: whether the per-kernel fits were made once for all points.
    """

    points: list[SweepPoint]
    reference: dict[str, Any] | None
    settings: dict[str, Any]
    layers: list[str]
    reused_fits: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "acl-convert/sweep",
            "settings": self.settings,
            "layers": self.layers,
            "reused_fits": self.reused_fits,
            "reference": self.reference,
            "points": [p.to_dict() for p in self.points],
        }

    def largest(self, *, max_top1_loss: float | None = None, min_agreement: float | None = None):
        """The point with the largest compact factor that loses at most ``max_top1_loss``
        top-1 (a fraction, on the evaluation set) and keeps at least ``min_agreement`` (on the
        evaluation set when there is one, else on the held-out images); None if none does."""
        ok = []
        for p in self.points:
            measured = p.evaluation or p.fidelity
            agree = measured.get("agreement", measured.get("top1_agreement"))
            if min_agreement is not None and agree < min_agreement:
                continue
            if max_top1_loss is not None:
                if p.evaluation is None or self.reference is None:
                    raise UsageError("a top-1 loss needs a labelled evaluation set")
                if self.reference["top1"] - p.evaluation["top1"] > max_top1_loss:
                    continue
            ok.append(p)
        return max(ok, key=lambda p: p.compact_factor, default=None)


def sweep_checkpoint(
    path: str | os.PathLike,
    layers: Layers = "all",
    *,
    targets: Sequence[float],
    calibration: Iterable | str | os.PathLike,
    evaluation: Iterable | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
    progress: SweepProgress | None = None,
    keep: bool = False,
    **settings,
) -> Sweep:
    """Convert the checkpoint at ``path`` at every ``target_compact`` of ``targets``.

    Args:
        path, layers, arch, trust_pickle: as for :func:`~acl_convert.convert_checkpoint`.
        targets: compact factors in ``[0, 1]``.
        calibration: a folder of images or image batches (needed: the points are measured on
            held-out calibration images; ``holdout`` says how many).
        evaluation: ``(images, labels)`` batches not among the calibration images (e.g.
            :meth:`acl_convert.io.labelled.LabelledImages.batches`): adds top-1 and top-5.
        progress: see :data:`SweepProgress`.
        keep: keep every point's :class:`~acl_convert.conversion.Conversion` (memory: one
            converted network per point).
        **settings: the conversion settings (:class:`~acl_convert.settings.Settings`), except
            ``target_compact``; ``budget_scope`` defaults to ``model``.
    """
    settings = _sweep_settings(settings)
    job = prepare_checkpoint(
        path, layers, arch=arch, calibration=calibration, trust_pickle=trust_pickle, **settings
    )
    return sweep(job, targets, evaluation=evaluation, progress=progress, keep=keep)


def sweep_model(
    model: nn.Module,
    layers: Layers = "all",
    *,
    targets: Sequence[float],
    calibration: Iterable,
    evaluation: Iterable | None = None,
    progress: SweepProgress | None = None,
    keep: bool = False,
    **settings,
) -> Sweep:
    """:func:`sweep_checkpoint` for a model in memory (see :func:`~acl_convert.convert_model`)."""
    settings = _sweep_settings(settings)
    job = prepare_model(model, layers, calibration=calibration, **settings)
    return sweep(job, targets, evaluation=evaluation, progress=progress, keep=keep)


def _sweep_settings(settings: dict) -> dict:
    if "target_compact" in settings or "max_output_error" in settings:
        raise UsageError(
            f"a sweep sets {option('target_compact')} itself; give the budgets as targets"
        )
    return {"budget_scope": "model", **settings}


def sweep(
    job: Job,
    targets: Sequence[float],
    *,
    evaluation: Iterable | None = None,
    progress: SweepProgress | None = None,
    keep: bool = False,
) -> Sweep:
    """Run ``job`` (prepared with calibration images, without a budget) at every target."""
    targets = _checked_targets(targets)
    if job.calibration is None:
        raise UsageError(f"a sweep needs calibration images; give {option('calibration')}")
    batches = None if evaluation is None else [(x, y) for x, y in evaluation]
    reference = None
    if batches is not None:
        reference = _accuracy(evaluate(job.model, batches))
    reuse = job.settings.budget_scope == "model"
    fits, points = None, []
    for i, target in enumerate(targets):
        if progress is not None:
            progress(target, i, len(targets))
        start = time.perf_counter()
        settings = dataclasses.replace(job.settings, target_compact=target)
        conv = dataclasses.replace(job, settings=settings).run(fits=fits if reuse else None)
        if reuse and fits is None:
            fits = {r.layer.name: r.fit for r in conv.layers}
        measured = None
        if batches is not None:
            measured = evaluate(conv.model, batches, reference=job.model)
            measured = {**_accuracy(measured), **_agreement(measured)}
        points.append(_point(target, conv, measured, time.perf_counter() - start, keep))
    return Sweep(
        points=points,
        reference=reference,
        settings={k: v for k, v in _settings_json(job).items() if k != "target_compact"},
        layers=[r["name"] for r in points[0].layers] if points else [],
        reused_fits=reuse,
    )


def _settings_json(job: Job) -> dict[str, Any]:
    return settings_dict(dataclasses.asdict(job.settings))


def _checked_targets(targets: Sequence[float]) -> list[float]:
    out = [float(t) for t in targets]
    if not out:
        raise UsageError("give at least one compact factor to sweep")
    bad = [t for t in out if not 0 <= t <= 1]
    if bad:
        raise UsageError(f"compact factors must be in [0, 1], got {bad[0]:g}")
    return out


def _accuracy(result: dict) -> dict[str, Any]:
    return {"images": result["images"], "top1": result["top1"], "top5": result["top5"]}


def _agreement(result: dict) -> dict[str, Any]:
    return {"agreement": result["agreement"], "logits_rel_error": result["logits_rel_error"]}


def _point(target: float, conv: Conversion, measured, seconds: float, keep: bool) -> SweepPoint:
    fid = conv.fidelity
    layers = [
        {
            "name": r.layer.name,
            "compact_factor": r.compact_factor,
            "params_after": r.params_after,
            "params_before": r.params_before,
            "output_error": fid["layer_rel_error"][r.layer.name],
        }
        for r in conv.layers
    ]
    return SweepPoint(
        target=target,
        compact_factor=conv.compact_factor,
        fidelity=fid,
        evaluation=measured,
        layers=layers,
        seconds=seconds,
        notes=list(dict.fromkeys(conv.notes)),
        conversion=conv if keep else None,
    )
