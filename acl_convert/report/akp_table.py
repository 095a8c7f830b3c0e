"""The AKP table of an AnaNN, read back from the file (no refitting)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from .. import kernels
from ..io.anann import build_layer, read_anann

__all__ = ["akp_table", "to_csv"]


def akp_table(path: str | Path) -> dict[str, Any]:
    """``{"source": ..., "arch": ..., "layers": [{"name", "pattern", "compact_factor",
    "kernels": [{"index", "out", "in", "family", "akps": {name: value}, "gain", "offset",
    "tied"}]}]}``; AKPs in the paper's units and canonical ranges, plain kernels listed with
    empty AKPs. A channel-tied kernel (``tied``) lists its shared row's AKPs."""
    ana = read_anann(path)
    layers = []
    for name, record in ana.layers.items():
        tensors = ana.layer_tensors(name)
        layer = build_layer(record, tensors).to_empty(device="cpu")
        layer.load_state_dict(tensors, strict=True)
        layer.canonicalize_()
        cig = record.shape[1]
        rows: list[dict[str, Any]] = [{} for _ in range(layer.num_kernels)]
        for code in layer.codes_present():
            fam = kernels.get(code)
            index = layer.index(code).tolist()
            akps = layer.kernel_akps(code).tolist() if code != "P" else [[] for _ in index]
            gains = layer.gain[code].tolist() if code in layer.gain else [None] * len(index)
            offs = layer.offset[code].tolist() if code in layer.offset else [None] * len(index)
            tied = layer.tied_kernels(code).tolist() if code != "P" else [False] * len(index)
            for j, k in enumerate(index):
                rows[k] = {
                    "index": k,
                    "out": k // cig,
                    "in": k % cig,
                    "family": code,
                    "akps": dict(zip(fam.param_names, akps[j], strict=False)),
                    "gain": gains[j],
                    "offset": offs[j],
                    "tied": tied[j],
                }
        layers.append(
            {
                "name": name,
                "pattern": record.pattern,
                "compact_factor": record.compact_factor,
                "kernels": rows,
            }
        )
    source = {"file": ana.header.source_file, "sha256": ana.header.source_sha256}
    return {"source": source, "arch": ana.header.arch, "layers": layers}


def to_csv(table: dict[str, Any]) -> str:
    """One CSV row per kernel; AKP columns are ``<family>.<akp>`` for every family present,
    after ``tied`` (1 for a channel-tied kernel, else 0)."""
    columns: list[str] = []
    for lay in table["layers"]:
        for row in lay["kernels"]:
            for akp in row["akps"]:
                col = f"{row['family']}.{akp}"
                if col not in columns:
                    columns.append(col)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["layer", "index", "out", "in", "family", "gain", "offset", "tied", *columns])
    for lay in table["layers"]:
        for row in lay["kernels"]:
            values = {f"{row['family']}.{k}": v for k, v in row["akps"].items()}
            writer.writerow(
                [
                    lay["name"],
                    row["index"],
                    row["out"],
                    row["in"],
                    row["family"],
                    "" if row["gain"] is None else row["gain"],
                    "" if row["offset"] is None else row["offset"],
                    int(row["tied"]),
                    *[values.get(c, "") for c in columns],
                ]
            )
    return buf.getvalue()
