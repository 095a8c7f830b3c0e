"""The conversion report: a JSON document for machines and rich tables for people.

Schema: ``docs/report-format.md`` (and :data:`SCHEMA`, which the tests validate against).
"""

from __future__ import annotations

import base64
import zlib
from typing import Any

import numpy as np
import torch

from ..conversion import Conversion, LayerResult

__all__ = [
    "build_report",
    "family_counts_shown",
    "kernel_columns",
    "decode_columns",
    "layer_summary",
    "SCHEMA",
    "REPORT_FORMAT",
]

REPORT_FORMAT = "acl-convert/report"
#: Version 2: compact per-kernel columns instead of one JSON object per kernel.
REPORT_VERSION = 2


def _quantiles(values: torch.Tensor) -> dict[str, float | None]:
    if values.numel() == 0:
        return {"median": None, "p90": None, "max": None}
    v = values.double()
    return {
        "median": float(v.median()),
        "p90": float(torch.quantile(v, 0.9)),
        "max": float(v.max()),
    }


def kernel_columns(res: LayerResult) -> dict[str, Any]:
    """The layer's per-kernel section, in kernel order (``k = out * Ci/groups + in``): a few
    columns, each a little-endian typed array, zlib-compressed and base64-encoded, so that a
    ResNet-50's 1.26 M kernels take a few MB (:func:`decode_columns` reads them back).

    ``family``, ``best_family`` (uint8: indices into ``families``, the chosen family and the one
    with the lowest residual), ``residual`` (float16: the chosen family's plain relative residual,
    0 for plain kernels), ``best_residual`` (float16) and, with calibration, ``output_residual``
    (float16, activation-weighted). A channel-tied fit's residuals are its output channel's.
    The AKPs, gains and offsets are in the AnaNN: ``acl-convert export`` lists them per kernel
    with the same field names."""
    fit, acl = res.fit, res.acl
    families = [*fit.families, "P"]
    per = acl.num_kernels // len(fit)
    chosen_plain, chosen_out = _chosen(res)
    if fit.residuals.shape[1]:
        best, best_col = fit.residuals.min(1)
    else:
        best, best_col = torch.zeros(len(fit)), torch.full((len(fit),), len(families) - 1)
    columns = {
        "family": _encode(torch.tensor([families.index(c) for c in acl.codes], dtype=torch.uint8)),
        "best_family": _encode(best_col.repeat_interleave(per).to(torch.uint8)),
        "residual": _encode(chosen_plain.repeat_interleave(per).half()),
        "best_residual": _encode(best.repeat_interleave(per).half()),
    }
    if chosen_out is not None:
        columns["output_residual"] = _encode(chosen_out.repeat_interleave(per).half())
    return {"families": families, "encoding": ENCODING, "columns": columns}


#: How per-kernel columns are stored: see :func:`kernel_columns`.
ENCODING = "zlib+base64, little-endian"


def _encode(values: torch.Tensor) -> dict[str, str]:
    array = values.contiguous().numpy()
    raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
    return {"dtype": str(array.dtype), "data": base64.b64encode(zlib.compress(raw, 6)).decode()}


def decode_columns(section: dict[str, Any]) -> dict[str, np.ndarray]:
    """The per-kernel columns of a report layer's ``per_kernel`` section as numpy arrays
    (``family`` and ``best_family`` as arrays of family codes)."""
    out = {}
    for name, col in section["columns"].items():
        raw = zlib.decompress(base64.b64decode(col["data"]))
        values = np.frombuffer(raw, dtype=np.dtype(col["dtype"]).newbyteorder("<"))
        if name in ("family", "best_family"):
            values = np.asarray(section["families"], dtype=object)[values]
        out[name] = values
    return out


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


def family_counts_shown(layer: dict[str, Any]) -> dict[str, int]:
    """A report layer's kernels per family as people see them: pruned (all-zero) kernels as
    their own ``zero`` count, taken out of the family the fit gave them (Mean; plain when a
    threshold or budget kept them plain)."""
    counts, left = dict(layer["family_counts"]), layer.get("zero_kernels", 0)
    for code in ("M", "P"):
        take = min(left, counts.get(code, 0))
        counts[code] = counts.get(code, 0) - take
        left -= take
    counts = {c: n for c, n in counts.items() if n}
    return counts | ({"zero": layer["zero_kernels"]} if layer.get("zero_kernels") else {})


#: Longest run-length pattern the report spells out.
PATTERN_LIMIT = 256


def _short(pattern: str) -> str | None:
    return pattern if len(pattern) <= PATTERN_LIMIT else None


def layer_summary(res: LayerResult, weight: torch.Tensor | None = None) -> dict[str, Any]:
    """The numbers of one layer (see docs/report-format.md); ``weight``, the original, tells
    which kernels are all zero (pruned)."""
    sel = res.selection
    per_row = res.acl.num_kernels // len(res.fit)
    zero = torch.zeros(res.acl.num_kernels, dtype=torch.bool)
    if weight is not None:
        zero = weight.detach().flatten(0, 1).flatten(1).eq(0).all(1).cpu()
    # A fitted row counts when it is not all zero: every family fits a zero kernel exactly, so
    # they would only pull the residual quantiles to 0.
    real = ~zero.view(-1, per_row).all(1)
    converted = (sel.choice >= 0) & real
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
        # All-zero (pruned) kernels: counted among the families (the fit makes them Mean with
        # gain 0), left out of the residual quantiles.
        "zero_kernels": int(zero.sum()),
        "family_counts": res.acl.family_totals(),
        # The run-length pattern of a big layer is as long as a list of its kernels' families
        # (which ``per_kernel`` holds): it is given only when short.
        "pattern": _short(res.pattern),
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
        "best_residual": _quantiles(best[real]),
    }


def build_report(conv: Conversion, *, per_kernel: bool = True) -> dict[str, Any]:
    """The report document (see :data:`SCHEMA`)."""
    layers = []
    for res in conv.layers:
        entry = layer_summary(res, conv.source.state_dict.get(res.layer.weight_key))
        if per_kernel:
            entry["per_kernel"] = kernel_columns(res)
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
                    "zero_kernels": {"type": "integer", "minimum": 0},
                    "family_counts": {
                        "type": "object",
                        "additionalProperties": {"type": "integer"},
                    },
                    "pattern": {"type": ["string", "null"]},
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
                    "per_kernel": {
                        "type": "object",
                        "required": ["families", "encoding", "columns"],
                        "properties": {
                            "families": {"type": "array", "items": {"type": "string"}},
                            "encoding": {"const": ENCODING},
                            "columns": {
                                "type": "object",
                                "required": [
                                    "family",
                                    "best_family",
                                    "residual",
                                    "best_residual",
                                ],
                                "additionalProperties": {
                                    "type": "object",
                                    "required": ["dtype", "data"],
                                    "properties": {
                                        "dtype": {"enum": ["uint8", "float16"]},
                                        "data": {"type": "string"},
                                    },
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
