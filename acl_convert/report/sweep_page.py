"""A sweep (:mod:`acl_convert.sweep`) for people: its table, its plot and an HTML page."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure

from .html import Cell, figure, page, paragraph, section, table

__all__ = ["sweep_table", "layer_table", "sweep_figure", "sweep_html"]


def _pct(x: float | None) -> float | None:
    return None if x is None else round(100 * x, 2)


def sweep_table(doc: Mapping[str, Any]) -> tuple[list[str], list[list[Cell]]]:
    """One row per point of a sweep's JSON document (:meth:`Sweep.to_dict`): target, compact
    factor, held-out logits error and agreement and, with an evaluation set, its logits error,
    agreement, top-1 and the top-1 change against the original (points)."""
    ref = doc.get("reference")
    header = ["target", "compact", "logits err (held-out)", "agree % (held-out)"]
    if ref:
        header += ["logits err (eval)", "agree % (eval)", "top-1 %", "Δ top-1 pt"]
    header.append("s")
    rows = []
    for p in doc["points"]:
        fid, ev = p["fidelity"], p.get("evaluation")
        row: list[Cell] = [
            p["target"],
            p["compact_factor"],
            fid["logits_rel_error"],
            _pct(fid["top1_agreement"]),
        ]
        if ref:
            row += [
                ev["logits_rel_error"],
                _pct(ev["agreement"]),
                _pct(ev["top1"]),
                round(100 * (ev["top1"] - ref["top1"]), 2),
            ]
        rows.append([*row, round(p["seconds"], 1)])
    return header, rows


def layer_table(doc: Mapping[str, Any]) -> tuple[list[str], list[list[Cell]]]:
    """Per layer and point: the layer's compact factor and its output error inside the converted
    network (held-out images), one column pair per point."""
    header = ["layer"]
    for p in doc["points"]:
        header += [f"cf @{p['target']:g}", f"out err @{p['target']:g}"]
    rows = []
    for i, name in enumerate(doc["layers"]):
        row: list[Cell] = [name]
        for p in doc["points"]:
            lay = p["layers"][i]
            row += [lay["compact_factor"], lay["output_error"]]
        rows.append(row)
    return header, rows


def sweep_figure(doc: Mapping[str, Any], title: str = "") -> Figure:
    """Left: the model, compact factor against logits error (held-out and evaluation) and
    against agreement and top-1; right: each layer's output error against its compact factor."""
    fig = Figure(figsize=(11, 4.2), dpi=110, layout="constrained")
    ax, ax_layers = fig.subplots(1, 2)
    pts = doc["points"]
    cf = [p["compact_factor"] for p in pts]
    ax.plot(
        cf, [p["fidelity"]["logits_rel_error"] for p in pts], "o-", label="logits error (held-out)"
    )
    if doc.get("reference"):
        ax.plot(
            cf,
            [p["evaluation"]["logits_rel_error"] for p in pts],
            "s-",
            label="logits error (eval)",
        )
    ax.set_xlabel("compact factor")
    ax.set_ylabel("logits relative error")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    right.plot(
        cf,
        [100 * p["fidelity"]["top1_agreement"] for p in pts],
        "o--",
        color="C2",
        label="agreement % (held-out)",
    )
    if doc.get("reference"):
        ref = doc["reference"]["top1"]
        right.plot(
            cf,
            [100 * p["evaluation"]["agreement"] for p in pts],
            "s--",
            color="C3",
            label="agreement % (eval)",
        )
        right.plot(
            cf,
            [100 * p["evaluation"]["top1"] for p in pts],
            "^--",
            color="C4",
            label="top-1 % (eval)",
        )
        right.axhline(100 * ref, color="C4", lw=0.8, ls=":", label="top-1 % original")
    right.set_ylabel("%")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="center left")
    ax.set_title(title or "model")
    n = len(doc["layers"])
    depth = colormaps["viridis"]  # a layer's colour says how deep it is
    for i, name in enumerate(doc["layers"]):
        xs = [p["layers"][i]["compact_factor"] for p in pts]
        ys = [p["layers"][i]["output_error"] for p in pts]
        ax_layers.plot(xs, ys, "o-", ms=3, color=depth(i / max(n - 1, 1)), label=name)
    ax_layers.set_xlabel("layer compact factor")
    ax_layers.set_ylabel("layer output relative error (held-out)")
    ax_layers.set_title("per layer (one dot per point; darker: earlier)")
    ax_layers.grid(alpha=0.3)
    ax_layers.legend(fontsize=6, ncol=2)
    return fig


def sweep_html(doc: Mapping[str, Any], png: bytes, title: str) -> str:
    """The sweep as one self-contained HTML page: the plot, the table of points and the table
    of layers."""
    header, rows = sweep_table(doc)
    lheader, lrows = layer_table(doc)
    st = doc.get("settings") or {}
    ref = doc.get("reference")
    held = doc["points"][0]["fidelity"] if doc["points"] else {}
    where = (
        f"held-out: {held.get('images')} calibration images not fitted to"
        if held.get("on") == "holdout"
        else f"{held.get('images')} calibration images (fitted to: optimistic)"
    )
    if ref:
        top1 = 100 * ref["top1"]
        where += f"; evaluation: {ref['images']} labelled images (original top-1 {top1:.1f} %)"
    sub = (
        f"families {','.join(st.get('families') or [])}, budget scope {st.get('budget_scope')}, "
        f"fitted to {st.get('calibration_images')} images; {where}"
    )
    return page(
        title,
        [
            section("Trade-off", figure("compact factor against fidelity", png), anchor="plot"),
            section("Points", table(header, rows), anchor="points"),
            section(
                "Layers",
                paragraph("Each layer's compact factor and output error at every point."),
                table(lheader, lrows),
                anchor="layers",
            ),
        ],
        subtitle=sub,
    )
