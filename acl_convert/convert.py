"""Conversion: the selected convolutions of a checkpoint become ACLs.

:func:`convert` is the one reusable function behind ``acl-convert CHECKPOINT``: fit every kernel
of every selected layer (all layers of one kernel size in one batched fit), choose a family per
kernel, and build each layer's :class:`ACL`. Writing files is left to the caller
(:func:`Conversion.save`), so the library can convert in memory.
"""

from __future__ import annotations

import copy
import math
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__, kernels, pattern
from .anann import save_anann, set_submodule
from .checkpoint import Checkpoint
from .errors import UsageError, UserError
from .fit import SELECT_MODES, FitResult, Selection, fit_kernels
from .layer import ACL
from .layers import ConvLayer

__all__ = ["Settings", "LayerResult", "Conversion", "convert", "DEFAULT_THRESHOLD"]

#: Default residual threshold. A kernel becomes analytic only when its best family reproduces it
#: to within 30 % (relative L2); looser thresholds convert more kernels and cost more accuracy
#: (see docs/results.md).
DEFAULT_THRESHOLD = 0.3


@dataclass(frozen=True)
class Settings:
    """Conversion settings (the CLI options of the same names)."""

    families: tuple[str, ...] = kernels.PAPER_FAMILIES
    offset: bool = True
    threshold: float = DEFAULT_THRESHOLD
    select: str = "best"
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.select not in SELECT_MODES:
            raise UsageError(
                f"--select must be one of {', '.join(SELECT_MODES)}, got {self.select!r}"
            )
        if not (
            isinstance(self.threshold, (int, float))
            and math.isfinite(self.threshold)
            and self.threshold >= 0
        ):
            raise UsageError(f"--threshold must be a number >= 0, got {self.threshold!r}")
        for code in self.families:
            try:
                fam = kernels.get(code)
            except KeyError as exc:
                raise UsageError(f"--families: {exc.args[0]}") from None
            if fam.plain:
                raise UsageError(
                    "--families: plain (P) is what unconverted kernels stay; "
                    "list only analytic families"
                )


@dataclass
class LayerResult:
    """One converted layer: the fit of its kernels, the choice per kernel, and its ACL."""

    layer: ConvLayer
    fit: FitResult
    selection: Selection
    acl: ACL

    @property
    def compact_factor(self) -> float:
        return self.acl.compact_factor()

    @property
    def params_before(self) -> int:
        co, cig, h, w = self.layer.shape
        return co * cig * h * w

    @property
    def params_after(self) -> int:
        """Learnable kernel parameters of the ACL (Eq. 25's numerator; bias excluded)."""
        return round(self.params_before * (1 - self.compact_factor))

    def record(self) -> dict[str, Any]:
        """The per-layer header entry of the AnaNN file."""
        lay = self.layer
        return {
            "name": lay.name,
            "shape": list(lay.shape),
            "groups": lay.groups,
            "stride": _listify(lay.stride),
            "padding": _listify(lay.padding),
            "dilation": _listify(lay.dilation),
            "padding_mode": lay.padding_mode,
            "bias": lay.bias,
            "gain": self.acl.gain_enabled,
            "offset": self.acl.offset_enabled,
            "family_counts": self.acl.family_totals(),
            "pattern": self.acl.pattern,
            "compact_factor": self.compact_factor,
        }


@dataclass
class Conversion:
    """The result of :func:`convert`."""

    source: Checkpoint
    arch: str | None
    settings: Settings
    layers: list[LayerResult] = field(default_factory=list)

    def tensors(self) -> dict[str, Tensor]:
        """The AnaNN state dict: the source tensors, converted weights replaced by ACL tensors."""
        out = dict(self.source.state_dict)
        for res in self.layers:
            del out[res.layer.weight_key]
            for key, value in res.acl.state_dict().items():
                out[f"{res.layer.name}.{key}"] = value
        return out

    def header(self) -> dict[str, Any]:
        """The AnaNN metadata header (see docs/anann-format.md)."""
        return {
            "tool": "acl-convert",
            "tool_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "source": {"file": Path(self.source.path).name, "sha256": self.source.sha256},
            "arch": self.arch,
            "settings": asdict(self.settings),
            "layers": {res.layer.name: res.record() for res in self.layers},
        }

    def save(self, path: str | Path) -> Path:
        """Write the AnaNN checkpoint atomically."""
        return save_anann(path, self.tensors(), self.header())

    def patched(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` (the source architecture, loaded or not) with every converted
        conv replaced by a copy of its ACL; the layers were built with the conv's own
        hyper-parameters, so they drop in."""
        out = copy.deepcopy(model)
        for res in self.layers:
            set_submodule(out, res.layer.name, copy.deepcopy(res.acl))
        return out


def _listify(value):
    return list(value) if isinstance(value, tuple) else value


def convert(
    checkpoint: Checkpoint,
    layers: Sequence[ConvLayer],
    settings: Settings = Settings(),
    *,
    arch: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Conversion:
    """Fit and convert ``layers`` of ``checkpoint``.

    Args:
        checkpoint: the loaded source checkpoint.
        layers: the selected convolutions (see :func:`acl_convert.layers.select_layers`).
        settings: families, offset, threshold, selection rule, device and seed.
        arch: the torchvision architecture, when known (recorded in the header).
        progress: called as ``progress(task, kernels_done, kernels_total)`` while fitting, with
            one task per kernel size and family (e.g. ``"7x7 gabor"``).

    Returns:
        A :class:`Conversion` holding one :class:`LayerResult` per layer, in the given order.
    """
    for lay in layers:
        # Checked per layer before any fitting: the fit itself can only count bad kernels, not
        # say which layer holds them.
        weight = checkpoint.state_dict[lay.weight_key]
        bad = int((~torch.isfinite(weight)).flatten(1).any(1).sum())
        if bad:
            raise UserError(
                f"layer {lay.name} has NaN or Inf weights in {bad} output channel(s); repair the "
                "checkpoint or leave the layer out of --layers"
            )
    by_size: dict[tuple[int, int], list[ConvLayer]] = {}
    for lay in layers:
        by_size.setdefault(tuple(lay.kernel_size), []).append(lay)
    results: dict[str, LayerResult] = {}
    for (h, w), group in by_size.items():
        # One batched fit per kernel size: small layers share the per-iteration overhead.
        weights = [
            checkpoint.state_dict[lay.weight_key].detach().float().reshape(-1, h, w)
            for lay in group
        ]
        total = sum(len(x) for x in weights)

        def report(code: str, done: int, h=h, w=w, total=total) -> None:
            if progress is not None:
                progress(f"{h}x{w} {kernels.get(code).name}", done, total)

        fit = fit_kernels(
            torch.cat(weights),
            families=settings.families,
            offset=settings.offset,
            device=settings.device,
            seed=settings.seed,
            progress=report,
        )
        start = 0
        for lay, flat in zip(group, weights, strict=True):
            part = _slice_fit(fit, start, start + len(flat))
            start += len(flat)
            selection = part.select(settings.threshold, settings.select)
            results[lay.name] = LayerResult(
                lay, part, selection, build_acl(lay, part, selection, checkpoint.state_dict)
            )
    return Conversion(
        source=checkpoint,
        arch=arch,
        settings=settings,
        layers=[results[lay.name] for lay in layers],
    )


def _slice_fit(fit: FitResult, lo: int, hi: int) -> FitResult:
    return FitResult(
        families=fit.families,
        residuals=fit.residuals[lo:hi],
        params={c: v[lo:hi] for c, v in fit.params.items()},
        gain={c: v[lo:hi] for c, v in fit.gain.items()},
        offset={c: v[lo:hi] for c, v in fit.offset.items()},
        kernel_size=fit.kernel_size,
        offset_enabled=fit.offset_enabled,
    )


def build_acl(
    layer: ConvLayer, fit: FitResult, selection: Selection, state_dict: dict[str, Tensor]
) -> ACL:
    """The ACL of one converted layer: fitted ACKs where selected, the original kernels elsewhere.

    Without a model the conv's groups are unknown; ``(Co, Ci/groups)`` is all the ACL's tensors
    depend on, so it is built with ``groups=1`` and ``in_channels = Ci/groups``; loading onto a
    model (:func:`acl_convert.load_anann`) takes the real hyper-parameters from the model.
    """
    weight = state_dict[layer.weight_key].detach()
    co, cig, h, w = weight.shape
    codes = selection.codes
    plain_idx = [k for k, c in enumerate(codes) if c == "P"]
    akps, gains, offsets = {}, {}, {}
    for code in pattern.totals(codes):
        if code == "P":
            continue
        idx = torch.tensor([k for k, c in enumerate(codes) if c == code])
        akps[code] = fit.params[code][idx]
        gains[code] = fit.gain[code][idx]
        if fit.offset_enabled and kernels.get(code).num_params:
            offsets[code] = fit.offset[code][idx]
    bias = state_dict.get(f"{layer.name}.bias")
    groups = layer.groups or 1
    conv_args = {}
    if layer.groups:
        conv_args = dict(
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            padding_mode=layer.padding_mode,
        )
    return ACL.from_assignment(
        cig * groups,
        co,
        (h, w),
        codes,
        akps,
        gains=gains or None,
        offsets=offsets or None,
        plain=weight.reshape(-1, h, w)[plain_idx] if plain_idx else None,
        bias=None if bias is None else bias.detach(),
        groups=groups,
        # AKPs need more precision than half floats give; float64 sources stay float64.
        dtype=torch.float64 if weight.dtype == torch.float64 else torch.float32,
        **conv_args,
    )
