"""What a conversion produces: per converted layer its fit, choice, assignment and ACL, and for
the whole network the converted model, the AnaNN tensors and header, the report and fidelity.

Built by :mod:`acl_convert.pipeline`; written to files by :meth:`Conversion.save` (the AnaNN)
and :mod:`acl_convert.report` (report, pictures).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .fit import FitResult, Selection
from .fit.joint import JointSolution
from .io.anann import save_anann
from .io.header import AnaNNHeader, LayerRecord, settings_dict
from .network.batchnorm import fold_bias
from .network.convs import ConvLayer
from .network.surgery import set_submodule
from .nn.acl import ACL
from .nn.assignment import Assignment
from .settings import Settings

__all__ = ["Source", "LayerResult", "Conversion", "state_dict_sha256"]


@dataclass
class Source:
    """The network that was converted.

    Attributes:
        state_dict: its tensors (read only: never modified).
        file: the checkpoint's file name, or None for a model converted in memory.
        sha256: of the file's bytes, or of the tensors of a model converted in memory.
        notes: what loading it did (unwrapping, prefixes), for the user.
    """

    state_dict: dict[str, Tensor]
    file: str | None
    sha256: str
    notes: list[str] = field(default_factory=list)


def state_dict_sha256(state_dict: dict[str, Tensor]) -> str:
    """A fingerprint of tensors: names, dtypes, shapes and bytes, in key order."""
    digest = hashlib.sha256()
    for key, value in state_dict.items():
        t = value.detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass
class LayerResult:
    """One converted layer.

    Attributes:
        layer: the conv (name, shape, hyper-parameters).
        fit: every kernel's fit to every family (channel-tied: one row per output channel).
        selection: the family chosen per fitted row.
        assignment: what every kernel became (after the joint re-solve, when there was one).
        acl: the layer built from it.
        joint: with calibration, the layer's output error before and after the re-solve.
        fold: for a conv without bias followed by a BatchNorm, ``(bn_name, bias)``: the bias
            ``(Co,)`` the re-solve gave the layer, folded into that BN's running mean
            (:mod:`acl_convert.network.batchnorm`); None otherwise.
    """

    layer: ConvLayer
    fit: FitResult
    selection: Selection
    assignment: Assignment
    acl: ACL
    joint: JointSolution | None = None
    fold: tuple[str, Tensor] | None = None

    @property
    def compact_factor(self) -> float:
        return self.acl.compact_factor()

    @functools.cached_property
    def pattern(self) -> str:
        """The layer's run-length pattern (Eq. 9), computed once: a big layer's runs to
        hundreds of kilobytes, and the header and the report both want it."""
        return self.acl.pattern

    @property
    def params_before(self) -> int:
        co, cig, h, w = self.layer.shape
        return co * cig * h * w

    @property
    def params_after(self) -> int:
        """Learnable kernel parameters of the ACL (Eq. 25's numerator; bias excluded)."""
        return round(self.params_before * (1 - self.compact_factor))

    def record(self) -> LayerRecord:
        """The layer's entry in the AnaNN header."""
        lay, acl = self.layer, self.acl
        return LayerRecord(
            name=lay.name,
            shape=lay.shape,
            groups=lay.groups,
            stride=lay.stride,
            padding=lay.padding,
            dilation=lay.dilation,
            padding_mode=lay.padding_mode,
            bias=acl.bias is not None,
            gain=acl.gain_enabled,
            offset=acl.offset_enabled,
            family_counts=acl.family_totals(),
            pattern=self.pattern,
            compact_factor=self.compact_factor,
            tied=bool(self.fit.channels),
        )


@dataclass
class Conversion:
    """The result of :func:`acl_convert.convert_model` / :func:`acl_convert.convert_checkpoint`.

    Attributes:
        source: the converted network's tensors and provenance.
        arch: its architecture's spec (see :mod:`acl_convert.io.arch`), or None when unknown.
        settings: the settings used, every default filled in.
        layers: one :class:`LayerResult` per converted layer, in network order when calibrated,
            else in state-dict order.
        model: the converted network (ACLs in place, a copy: the input is untouched), or None
            when the architecture is unknown (tensors only).
        fidelity: with calibration, how closely ``model`` computes what the original computes
            (see :func:`acl_convert.calibration.fidelity.measure_fidelity`), else None.
        notes: sentences for the user (a budget out of reach, how the checkpoint was unwrapped).
    """

    source: Source
    arch: str | None
    settings: Settings
    layers: list[LayerResult]
    model: nn.Module | None = None
    fidelity: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def compact_factor(self) -> float:
        """Eq. 25 over all converted layers' kernels together."""
        before = sum(r.params_before for r in self.layers)
        after = sum(r.params_after for r in self.layers)
        return 1 - after / before if before else 0.0

    @property
    def report(self) -> dict[str, Any]:
        """The report document (docs/report-format.md)."""
        from .report.document import build_report

        return build_report(self)

    def tensors(self) -> dict[str, Tensor]:
        """The AnaNN state dict: the source tensors, converted weights replaced by ACL tensors."""
        out = dict(self.source.state_dict)
        for res in self.layers:
            del out[res.layer.weight_key]
            for key, value in res.acl.state_dict().items():
                out[f"{res.layer.name}.{key}"] = value
            if res.fold is not None:
                bn, bias = res.fold
                mean = out[f"{bn}.running_mean"]
                out[f"{bn}.running_mean"] = mean - bias.to(mean)
        return out

    def header(self) -> AnaNNHeader:
        """The AnaNN header (docs/anann-format.md)."""
        return AnaNNHeader(
            source_file=self.source.file,
            source_sha256=self.source.sha256,
            arch=self.arch,
            settings=settings_dict(dataclasses.asdict(self.settings)),
            layers={res.layer.name: res.record() for res in self.layers},
        )

    def save(self, path: str | Path) -> Path:
        """Write the AnaNN checkpoint atomically."""
        return save_anann(path, self.tensors(), self.header())

    def patched(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` (the source architecture) with every converted conv replaced
        by a copy of its ACL (and folded biases in their BatchNorms); the layers were built with
        the conv's own hyper-parameters, so they drop in."""
        out = copy.deepcopy(model)
        for res in self.layers:
            set_submodule(out, res.layer.name, copy.deepcopy(res.acl))
            if res.fold is not None:
                fold_bias(out, *res.fold)
        return out
