"""The conversion report: a JSON document for machines and rich tables for people.

Schema: ``docs/report-format.md`` (and :data:`SCHEMA`, which the tests validate against).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import kernels
from ..conversion import Conversion, LayerResult

__all__ = ["build_report", "kernel_rows", "layer_summary", "SCHEMA", "REPORT_FORMAT"]

REPORT_FORMAT = "acl-convert/report"
REPORT_VERSION = 1


def _quantiles(values: torch.Tensor) -> dict[str, float | None]:
    if values.numel() == 0:
        return {"median": None, "p90": None, "max": None}
    v = values.double()
    return {
        "median": float(v.median()),
        "p90": float(torch.quantile(v, 0.9)),
        "max": float(v.max()),
    }


def kernel_rows(res: LayerResult) -> list[dict[str, Any]]:
    """One row per kernel: indices, chosen family, named AKPs, gain, offset, whether it shares
    its AKPs with other kernels (channel-tied), residuals. The chosen family's values are read
    from the layer, so a tied kernel shows its row's AKPs and its own gain and offset. A fit of
    channel-tied stacks (``fit.channels``) has one row per output channel: each kernel shows
    its channel's residuals. ``residual``/``residuals`` are plain (relative L2 of the kernel);
    with calibration ``output_residual``/``output_residuals`` are activation-weighted (the
    relative output error of the per-kernel fit, before any joint re-solve)."""
    _, cig, _, _ = res.layer.shape
    fit, acl = res.fit, res.acl
    residuals = fit.residuals.tolist()
    weighted = None if fit.weighted is None else fit.weighted.tolist()
    plain_res, out_res = _chosen(res)
    per_row = cig if fit.channels is not None else 1
    chosen: dict[int, dict[str, Any]] = {}
    for code in acl.codes_present():
        index = acl.index(code).tolist()
        if code == "P":
            for k in index:
                chosen[k] = dict(
                    akps={}, gain=None, offset=None, tied=False, residual=0.0, output_residual=None
                )
            continue
        names = kernels.get(code).param_names
        akps = acl.kernel_akps(code).tolist()
        gains = acl.gain[code].tolist() if code in acl.gain else [None] * len(index)
        offs = acl.offset[code].tolist() if code in acl.offset else [None] * len(index)
        tied = acl.tied_kernels(code).tolist()
        for j, k in enumerate(index):
            chosen[k] = dict(
                akps=dict(zip(names, akps[j], strict=True)),
                gain=gains[j],
                offset=offs[j],
                tied=tied[j],
                residual=float(plain_res[k // per_row]),
                output_residual=None if out_res is None else float(out_res[k // per_row]),
            )
    rows = []
    for k, code in enumerate(acl.codes):
        row: dict[str, Any] = {"index": k, "out": k // cig, "in": k % cig, "family": code}
        row.update(chosen[k])
        row["residuals"] = dict(zip(fit.families, residuals[k // per_row], strict=True))
        if weighted is not None:
            row["output_residuals"] = dict(zip(fit.families, weighted[k // per_row], strict=True))
        rows.append(row)
    return rows


def _chosen(res: LayerResult) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain and activation-weighted (or None) residual ``(rows,)`` of each row's chosen family
    (0 where plain)."""
    choice = res.selection.choice
    keep = choice >= 0

    def pick(table: torch.Tensor) -> torch.Tensor:
        if table.shape[1] == 0:
            return torch.zeros(len(choice), dtype=table.dtype)
        got = table.gather(1, choice.clamp_min(0)[:, None])[:, 0]
        return torch.where(keep, got, torch.zeros_like(got))

    weighted = res.fit.weighted
    return pick(res.fit.residuals), None if weighted is None else pick(weighted)


def layer_summary(res: LayerResult) -> dict[str, Any]:
    sel = res.selection
    converted = sel.choice >= 0
    best = res.fit.residuals.min(1).values if res.fit.residuals.shape[1] else torch.zeros(0)
    plain_res, out_res = _chosen(res)
    joint = res.joint
    return {
        "name": res.layer.name,
        "shape": list(res.layer.shape),
        "groups": res.layer.groups,
        # Counted on the layer: a fit of channel-tied stacks selects per output channel.
        "kernels": res.acl.num_kernels,
        "converted": sum(c != "P" for c in res.acl.codes),
        "family_counts": res.acl.family_totals(),
        "pattern": res.acl.pattern,
        "compact_factor": res.compact_factor,
        "params_before": res.params_before,
        "params_after": res.params_after,
        # Over the kernels that became analytic: what the conversion changed.
        "residual": _quantiles(plain_res[converted]),
        "output_residual": None if out_res is None else _quantiles(out_res[converted]),
        # The layer's relative output error on the calibration inputs, as fitted and after the
        # joint re-solve (None without calibration).
        "output_error": None
        if joint is None
        else {
            "fitted": joint.relative_error(after=False),
            "resolved": joint.relative_error(after=True),
        },
        # Over all kernels, the best family's residual: how analytic the layer is at all.
        "best_residual": _quantiles(best),
    }


def build_report(conv: Conversion, *, per_kernel: bool = True) -> dict[str, Any]:
    """The report document (see :data:`SCHEMA`)."""
    layers = []
    for res in conv.layers:
        entry = layer_summary(res)
        if per_kernel:
            entry["kernels_detail"] = kernel_rows(res)
        layers.append(entry)
    before = sum(x["params_before"] for x in layers)
    after = sum(x["params_after"] for x in layers)
    header = conv.header()
    return {
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        "tool_version": header.tool_version,
        "source": {"file": header.source_file, "sha256": header.source_sha256},
        "arch": conv.arch,
        "settings": header.settings,
        "layers": layers,
        "totals": {
            "layers": len(layers),
            "kernels": sum(x["kernels"] for x in layers),
            "converted": sum(x["converted"] for x in layers),
            "params_before": before,
            "params_after": after,
            "compact_factor": (1 - after / before) if before else 0.0,
        },
        "fidelity": conv.fidelity,
    }


_QUANT = {
    "type": "object",
    "required": ["median", "p90", "max"],
    "properties": {k: {"type": ["number", "null"]} for k in ("median", "p90", "max")},
}

#: JSON Schema (draft 2020-12) of the report; docs/report-format.md explains each field.
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "acl-convert report",
    "type": "object",
    "required": [
        "format",
        "format_version",
        "tool_version",
        "source",
        "arch",
        "settings",
        "layers",
        "totals",
        "fidelity",
    ],
    "properties": {
        "format": {"const": REPORT_FORMAT},
        "format_version": {"type": "integer"},
        "tool_version": {"type": "string"},
        "source": {"type": "object", "required": ["file", "sha256"]},
        "arch": {"type": ["string", "null"]},
        "settings": {
            "type": "object",
            "required": ["families", "offset", "threshold", "select", "device", "seed"],
        },
        "layers": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "name",
                    "shape",
                    "groups",
                    "kernels",
                    "converted",
                    "family_counts",
                    "pattern",
                    "compact_factor",
                    "params_before",
                    "params_after",
                    "residual",
                    "best_residual",
                ],
                "properties": {
                    "name": {"type": "string"},
                    "shape": {
                        "type": "array",
                        "items": {"type": "integer"},
                        "minItems": 4,
                        "maxItems": 4,
                    },
                    "groups": {"type": ["integer", "null"]},
                    "kernels": {"type": "integer", "minimum": 0},
                    "converted": {"type": "integer", "minimum": 0},
                    "family_counts": {
                        "type": "object",
                        "additionalProperties": {"type": "integer"},
                    },
                    "pattern": {"type": "string"},
                    "compact_factor": {"type": "number", "maximum": 1},
                    "params_before": {"type": "integer"},
                    "params_after": {"type": "integer"},
                    "residual": _QUANT,
                    "output_residual": {"oneOf": [{"type": "null"}, _QUANT]},
                    "output_error": {
                        "oneOf": [
                            {"type": "null"},
                            {
                                "type": "object",
                                "required": ["fitted", "resolved"],
                                "properties": {
                                    "fitted": {"type": "number", "minimum": 0},
                                    "resolved": {"type": "number", "minimum": 0},
                                },
                            },
                        ]
                    },
                    "best_residual": _QUANT,
                    "kernels_detail": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": [
                                "index",
                                "out",
                                "in",
                                "family",
                                "akps",
                                "gain",
                                "offset",
                                "residual",
                                "residuals",
                            ],
                            "properties": {
                                "index": {"type": "integer"},
                                "out": {"type": "integer"},
                                "in": {"type": "integer"},
                                "family": {"type": "string"},
                                "akps": {
                                    "type": "object",
                                    "additionalProperties": {"type": "number"},
                                },
                                "gain": {"type": ["number", "null"]},
                                "offset": {"type": ["number", "null"]},
                                "tied": {"type": "boolean"},
                                "residual": {"type": "number", "minimum": 0},
                                "residuals": {
                                    "type": "object",
                                    "additionalProperties": {"type": "number"},
                                },
                                "output_residual": {"type": ["number", "null"]},
                                "output_residuals": {
                                    "type": "object",
                                    "additionalProperties": {"type": "number"},
                                },
                            },
                        },
                    },
                },
            },
        },
        "totals": {
            "type": "object",
            "required": [
                "layers",
                "kernels",
                "converted",
                "params_before",
                "params_after",
                "compact_factor",
            ],
        },
        "fidelity": {"type": ["object", "null"]},
    },
}
