"""The per-kernel table: one flat row per kernel, the schema ``acl-convert/kernels`` version 1
(docs/report-format.md, "Per-kernel table"). ``acl-convert export`` writes it as JSON, JSON Lines
or CSV, streamed layer by layer; the report's per-kernel columns use the same field names.

Columns: ``layer``, ``kernel`` (``k = out * Ci/groups + in``), ``out``, ``in``, ``h``, ``w``,
``family`` (code), ``family_name``, ``tied`` (shares its AKP row with other kernels), ``gain``,
``offset`` (empty where the kernel has none), then one column ``<code>.<akp>`` per AKP of every
family in the table, in the paper's units and canonical ranges (empty for other families). A plain
kernel has no AKPs, gain or offset: its rows are left out unless asked for (``values`` then holds
its ``h*w`` weights, row-major).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator
from typing import IO, Any

import torch

from .. import kernels
from ..io.anann import AnaNNFile, build_layer
from ..nn.acl import ACL

__all__ = ["SCHEMA", "VERSION", "FORMATS", "BASE_COLUMNS", "akp_columns", "layer_rows", "write"]

SCHEMA = "acl-convert/kernels"
VERSION = 1
FORMATS = ("json", "jsonl", "csv")
BASE_COLUMNS = (
    "layer",
    "kernel",
    "out",
    "in",
    "h",
    "w",
    "family",
    "family_name",
    "tied",
    "gain",
    "offset",
)


def akp_columns(codes: Iterable[str]) -> list[str]:
    """``<code>.<akp>`` for the AKPs of the given families, in registry order."""
    present = set(codes)
    return [
        f"{fam.code}.{name}"
        for fam in kernels.families()
        if fam.code in present and not fam.plain
        for name in fam.param_names
    ]


def units(columns: Iterable[str]) -> dict[str, str]:
    """The unit of each AKP column (``px`` or ``rad``, ``1`` for a ratio)."""
    out = {}
    for col in columns:
        code, _, name = col.partition(".")
        if name:
            fam = kernels.get(code)
            out[col] = next(p.unit for p in fam.params if p.name == name)
    return out


def layer_rows(name: str, acl: ACL, *, plain: bool = False) -> Iterator[dict[str, Any]]:
    """The rows of one layer's kernels, in kernel order (see the module docstring); its AKPs
    canonical. Plain kernels only with ``plain``."""
    a = acl.assignment()
    cig = a.shape[1]
    h, w = a.kernel_size
    has_offset = a.has_offset()
    tied = torch.zeros(len(a), dtype=torch.bool) if a.tie is None else a.tie >= 0
    names = {c: kernels.get(c).param_names for c in a.present()}
    akps, gains, offsets = a.akps.tolist(), a.gain.tolist(), a.offset.tolist()
    for k, code in enumerate(a.codes):
        fam = kernels.get(code)
        if fam.plain and not plain:
            continue
        row: dict[str, Any] = {
            "layer": name,
            "kernel": k,
            "out": k // cig,
            "in": k % cig,
            "h": h,
            "w": w,
            "family": code,
            "family_name": fam.name,
            "tied": bool(tied[k]),
            "gain": None if fam.plain else gains[k],
            "offset": offsets[k] if bool(has_offset[k]) else None,
        }
        if fam.plain:
            row["values"] = a.plain[k].reshape(-1).tolist()
        else:
            row.update({f"{code}.{n}": akps[k][j] for j, n in enumerate(names[code])})
        yield row


def _layers(ana: AnaNNFile) -> Iterator[tuple[str, ACL]]:
    """Each converted layer of an AnaNN as an ACL with canonical AKPs, one at a time."""
    for name, record in ana.layers.items():
        tensors = ana.layer_tensors(name)
        layer = build_layer(record, tensors).to_empty(device="cpu")
        layer.load_state_dict(tensors, strict=True)
        yield name, layer.canonicalize_()


def write(ana: AnaNNFile, out: IO[str], fmt: str = "csv", *, plain: bool = False) -> int:
    """Write the table of every converted layer of ``ana`` to ``out`` (text) in ``fmt`` (one of
    :data:`FORMATS`), one layer at a time: memory holds one layer's rows, not the table.
    Returns the number of rows."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    codes = {c for rec in ana.layers.values() for c in rec.family_counts}
    columns = [*BASE_COLUMNS, *akp_columns(codes)] + (["values"] if plain else [])
    writer = _Writer(out, fmt, columns)
    n = 0
    for name, layer in _layers(ana):
        for row in layer_rows(name, layer, plain=plain):
            writer.row(row)
            n += 1
    writer.close()
    return n


class _Writer:
    def __init__(self, out: IO[str], fmt: str, columns: list[str]) -> None:
        self.out, self.fmt, self.columns, self.first = out, fmt, columns, True
        if fmt == "csv":
            self.csv = csv.writer(out, lineterminator="\n")
            self.csv.writerow(columns)
        elif fmt == "json":
            head = {"schema": SCHEMA, "version": VERSION, "columns": columns}
            head["units"] = units(columns)
            out.write(json.dumps(head)[:-1] + ', "rows": [\n')

    def row(self, row: dict[str, Any]) -> None:
        if self.fmt == "csv":
            self.csv.writerow([_cell(row.get(c)) for c in self.columns])
            return
        text = json.dumps(row, allow_nan=False)
        if self.fmt == "jsonl":
            self.out.write(text + "\n")
        else:
            self.out.write(("" if self.first else ",\n") + text)
        self.first = False

    def close(self) -> None:
        if self.fmt == "json":
            self.out.write("\n]}\n")


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, list):
        return " ".join(repr(v) for v in value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("a non-finite value in the table")
    return value
