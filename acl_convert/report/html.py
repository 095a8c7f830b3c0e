"""A conversion report as one self-contained HTML page.

The page needs nothing but a browser: the style is inline, every picture is a PNG embedded as a
``data:`` URI, and there is no script, font or link to fetch, so it can be mailed, archived or
opened from a CI artifact as it is. Every piece of text that comes from the data (layer names,
file names, numbers) is HTML-escaped.

The page is built from small parts that other pages reuse: :func:`page` (the skeleton),
:func:`section`, :func:`table` and :func:`figure`; :func:`render_html` is the conversion report
(docs/report-format.md) made of them.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from typing import Any

from .document import family_counts_shown

__all__ = ["render_html", "page", "section", "paragraph", "table", "figure", "Cell"]

#: A table cell: text (escaped), a number (formatted), or None (shown as "-").
Cell = str | int | float | None

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       color: #1a1a1a; background: #fff; margin: 1.5rem auto; max-width: 1400px;
       padding: 0 1.5rem; line-height: 1.4; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.2rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
p.meta { color: #555; font-size: 0.9rem; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.88rem; margin: 0.6rem 0 1rem; }
caption { text-align: left; color: #555; font-size: 0.85rem; padding-bottom: 0.3rem; }
th, td { padding: 0.25rem 0.5rem; border-bottom: 1px solid #e4e4e4; text-align: left;
         vertical-align: top; }
th { background: #f4f4f4; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.total td { font-weight: 600; border-top: 2px solid #bbb; }
div.scroll { overflow-x: auto; }
figure { margin: 1rem 0 1.6rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.88rem; margin-top: 0.3rem; }
"""


def _text(value: Cell) -> str:
    """A cell's value as escaped text: floats to 4 significant digits, ints with thousands
    separators, None as "-"."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def page(title: str, sections: Sequence[str], *, subtitle: str = "") -> str:
    """The whole HTML document: ``title`` (escaped) as heading, an optional ``subtitle`` line
    (escaped), then ``sections``, HTML fragments made with :func:`section` and friends."""
    sub = f'<p class="meta">{html.escape(subtitle)}</p>\n' if subtitle else ""
    body = "\n".join(sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{sub}{body}\n</body>\n</html>\n"
    )


def section(heading: str, *parts: str, anchor: str | None = None) -> str:
    """A ``<section>`` with an escaped ``heading`` and ``parts`` (HTML fragments). ``anchor``
    becomes its id (escaped), for links from a table."""
    ident = f' id="{html.escape(anchor)}"' if anchor else ""
    return (
        f"<section{ident}>\n<h2>{html.escape(heading)}</h2>\n" + "\n".join(parts) + "\n</section>"
    )


def paragraph(text: str, *, css: str = "") -> str:
    """An escaped paragraph."""
    cls = f' class="{html.escape(css)}"' if css else ""
    return f"<p{cls}>{html.escape(text)}</p>"


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    *,
    caption: str = "",
    total: Sequence[Cell] | None = None,
    links: Sequence[str | None] | None = None,
) -> str:
    """An HTML table. Every cell is escaped; number cells are right-aligned. ``total`` is an
    emphasised last row; ``links[i]`` (an anchor id in this page, or None) turns the first cell
    of row ``i`` into a link to it."""
    numeric = [
        all(isinstance(r[j], (int, float)) or r[j] is None for r in rows) and bool(rows)
        for j in range(len(header))
    ]

    def cells(row: Sequence[Cell], tag: str) -> str:
        return "".join(
            f'<{tag} class="num">{_text(v)}</{tag}>'
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            else f"<{tag}>{_text(v)}</{tag}>"
            for v in row
        )

    head = "".join(
        f'<th class="num">{html.escape(h)}</th>' if num else f"<th>{html.escape(h)}</th>"
        for h, num in zip(header, numeric, strict=True)
    )
    body = []
    for i, row in enumerate(rows):
        tds = cells(row, "td")
        anchor = links[i] if links is not None else None
        if anchor:
            first = f'<td><a href="#{html.escape(anchor)}">{_text(row[0])}</a></td>'
            tds = first + cells(row[1:], "td")
        body.append(f"<tr>{tds}</tr>")
    if total is not None:
        body.append(f'<tr class="total">{cells(total, "td")}</tr>')
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return (
        f'<div class="scroll"><table>{cap}\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
        + "\n".join(body)
        + "\n</tbody>\n</table></div>"
    )


def figure(caption: str, png: bytes) -> str:
    """A PNG embedded as a ``data:`` URI, with ``caption`` (escaped) as caption and alt text."""
    if not isinstance(png, (bytes, bytearray)) or not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"figure {caption!r}: expected PNG bytes")
    data = base64.b64encode(png).decode("ascii")
    alt = html.escape(caption)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
        f"<figcaption>{alt}</figcaption></figure>"
    )


# --- the conversion report ----------------------------------------------------------------------


def _quantile(entry: Mapping[str, Any] | None, key: str) -> float | None:
    return None if not entry else entry.get(key)


def _families(layer: Mapping[str, Any]) -> str:
    # A no-break space inside "G 69", so a long list wraps between families only.
    counts = family_counts_shown(dict(layer))
    return " ".join(f"{code}\u00a0{n}" for code, n in counts.items())


def _quantiles(entry: Mapping[str, Any] | None) -> str:
    """``median / p90 / max`` in one cell that does not wrap, "-" where absent."""
    return "\u00a0/\u00a0".join(
        "-" if v is None else f"{v:.3f}"
        for v in (_quantile(entry, k) for k in ("median", "p90", "max"))
    )


def _output_error(err: Any) -> str | None:
    """The layer's relative output error, ``fitted -> resolved`` as the report stores it."""
    if err is None:
        return None
    if isinstance(err, Mapping):
        if {"fitted", "resolved"} <= set(err):
            return f"{err['fitted']:.4f} -> {err['resolved']:.4f}"
        return ", ".join(f"{k} {v:.4g}" for k, v in err.items())
    return f"{float(err):.4f}"


def _summary(report: Mapping[str, Any], anchors: Mapping[str, str]) -> str:
    layers = report["layers"]
    has_error = any(lay.get("output_error") is not None for lay in layers)
    header = ["layer", "shape", "kernels", "ACKs", "families", "compact factor",
              "residual med / p90 / max", "best residual med / p90 / max"]  # fmt: skip
    header += ["output error"] * has_error + ["params before", "params after"]
    rows = []
    for lay in layers:
        row: list[Cell] = [
            lay["name"],
            "x".join(str(s) for s in lay["shape"]),
            lay["kernels"],
            lay["converted"],
            _families(lay),
            lay["compact_factor"],
            _quantiles(lay.get("residual")),
            _quantiles(lay.get("best_residual")),
        ]
        if has_error:
            row.append(_output_error(lay.get("output_error")))
        rows.append([*row, lay["params_before"], lay["params_after"]])
    tot = report["totals"]
    total: list[Cell] = ["total", "", tot["kernels"], tot["converted"], "",
                         tot["compact_factor"], *[""] * (2 + has_error),
                         tot["params_before"], tot["params_after"]]  # fmt: skip
    caption = (
        "ACKs: kernels now analytic. Residual: quantiles of the relative residual "
        "|W - fit| / |W| over the ACKs; best residual: of the best family's residual over all "
        "kernels. "
        "Compact factor: 1 - params after / params before."
    )
    if has_error:
        caption += " Output error: the layer's relative output error on the calibration images."
    links = [anchors.get(lay["name"]) for lay in layers]
    return section(
        "Layers", table(header, rows, caption=caption, total=total, links=links), anchor="layers"
    )


def _fidelity(fid: Mapping[str, Any]) -> str:
    rows: list[list[Cell]] = [
        [
            "held-out images" if fid.get("on") == "holdout" else "calibration images (fitted to)",
            fid.get("images"),
        ],
        ["logits relative error", fid.get("logits_rel_error")],
        ["top-1 agreement", fid.get("top1_agreement")],
    ]
    layer_rows = [[name, err] for name, err in (fid.get("layer_rel_error") or {}).items()]
    parts = [table(["measure", "value"], rows, caption="The converted model against the original")]
    if layer_rows:
        parts.append(
            table(
                ["layer", "output relative error"],
                layer_rows,
                caption="Each converted layer's output inside the converted network",
            )
        )
    return section("Fidelity", *parts, anchor="fidelity")


def _settings_line(report: Mapping[str, Any]) -> str:
    src = report.get("source") or {}
    st = report.get("settings") or {}
    parts = [
        f"source {src.get('file', '?')}",
        f"sha256 {str(src.get('sha256', ''))[:12]}",
        f"arch {report.get('arch') or 'unknown'}",
        f"families {' '.join(st.get('families', []))}",
        f"threshold {st.get('threshold')}",
        f"selection {st.get('select')}",
        f"acl-convert {report.get('tool_version', '?')}",
    ]
    return ", ".join(parts)


def render_html(
    report: Mapping[str, Any],
    images: Mapping[str, Sequence[tuple[str, bytes]]],
    *,
    title: str,
) -> str:
    """The conversion report as one self-contained HTML page.

    Args:
        report: the report document (docs/report-format.md): ``layers``, ``totals``, and
            ``fidelity`` (null without calibration); ``source``, ``settings``, ``arch`` and
            ``tool_version`` go in the line under the title when present.
        images: per layer name, ``(caption, PNG bytes)`` pairs, shown in order in that layer's
            section; names that are no report layer get sections of their own at the end.
        title: the page title.

    Returns:
        The HTML text: the summary table (one row per layer, with totals; layer names link to
        their sections), the fidelity tables when the report has them, then one section per
        layer with its numbers and figures.
    """
    layers = report["layers"]
    anchors = {lay["name"]: f"layer-{i}" for i, lay in enumerate(layers)}
    parts = [_summary(report, anchors)]
    if report.get("fidelity"):
        parts.append(_fidelity(report["fidelity"]))
    for lay in layers:
        res = lay.get("residual") or {}
        stats = (
            f"{lay['kernels']:,} kernels of shape {'x'.join(map(str, lay['shape']))}, "
            f"{lay['converted']:,} analytic ({_families(lay)}), "
            f"compact factor {lay['compact_factor']:.4f}, "
            f"residual median {_text(_quantile(res, 'median'))}"
        )
        err = _output_error(lay.get("output_error"))
        if err is not None:
            stats += f", output error {err}"
        figs = [figure(cap, png) for cap, png in images.get(lay["name"], ())]
        parts.append(
            section(lay["name"], paragraph(stats, css="meta"), *figs, anchor=anchors[lay["name"]])
        )
    for i, (name, pairs) in enumerate((k, v) for k, v in images.items() if k not in anchors):
        parts.append(section(name, *(figure(c, p) for c, p in pairs), anchor=f"extra-{i}"))
    return page(title, parts, subtitle=_settings_line(report))
