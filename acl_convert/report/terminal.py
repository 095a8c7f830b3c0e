"""The report as tables in a terminal (rich)."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .document import family_counts_shown

__all__ = ["print_report", "print_fidelity"]


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_report(report: dict[str, Any], console: Console) -> None:
    """Render the per-layer table and the model totals. Output residuals and errors get columns
    only when the conversion measured them (with calibration images)."""
    layers = report["layers"]
    by_output = any(lay.get("output_residual") for lay in layers)
    resolved = any(lay.get("output_error") for lay in layers)
    caption = "ACKs: kernels now analytic (res.: their relative residual"
    if by_output:
        caption += "; out res.: the share of their output they get wrong"
    caption += ")"
    if resolved:
        caption += "; out err: the layer's relative output error on the calibration images"
    caption += "; params: kernel parameters before -> after"
    table = Table(
        title="acl-convert: converted layers",
        title_justify="left",
        caption=caption,
        caption_justify="left",
        box=box.SIMPLE_HEAD,
    )
    cols = ["layer", "kernels", "ACKs", "families", "compact", "res. med", "res. p90"]
    cols += ["out res. med"] * by_output + ["out err"] * resolved + ["params"]
    for col in cols:
        just = "left" if col in ("layer", "families") else "right"
        table.add_column(col, justify=just, no_wrap=col in ("layer", "params"))
    for lay in layers:
        fams = " ".join(f"{c}{n}" for c, n in family_counts_shown(lay).items())
        row = [
            Text(lay["name"]),
            str(lay["kernels"]),
            str(lay["converted"]),
            fams,
            f"{lay['compact_factor']:.4f}",
            _fmt(lay["residual"]["median"]),
            _fmt(lay["residual"]["p90"]),
        ]
        if by_output:
            out = lay.get("output_residual")
            row.append(_fmt(None if out is None else out["median"]))
        if resolved:
            err = lay.get("output_error")
            row.append(_fmt(None if err is None else err["resolved"]))
        table.add_row(*row, f"{lay['params_before']:,}->{lay['params_after']:,}")
    tot = report["totals"]
    table.add_section()
    blanks = [""] * (2 + by_output + resolved)
    table.add_row(
        "total",
        str(tot["kernels"]),
        str(tot["converted"]),
        "",
        f"{tot['compact_factor']:.4f}",
        *blanks,
        f"{tot['params_before']:,}->{tot['params_after']:,}",
        style="bold",
    )
    console.print(table)
    fid = report.get("fidelity")
    if fid:
        print_fidelity(fid, console)


def fidelity_images(fid: dict[str, Any]) -> str:
    """Which images a fidelity was measured on, in words."""
    if fid.get("on") == "holdout":
        return f"{fid['images']} held-out calibration images (not fitted to)"
    return f"{fid['images']} calibration images (the ones fitted to: optimistic)"


def print_fidelity(fid: dict[str, Any], console: Console) -> None:
    table = Table(title=f"fidelity on {fidelity_images(fid)}", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("logits relative error", f"{fid['logits_rel_error']:.4f}")
    table.add_row("top-1 agreement", f"{100 * fid['top1_agreement']:.1f} %")
    for name, err in fid["layer_rel_error"].items():
        table.add_row(Text(f"{name} output relative error"), f"{err:.4f}")
    console.print(table)
