"""Figures of a converted layer, drawn with matplotlib (paper Figs. 1, 3 and 4a).

- :func:`kernel_mosaic`: per output channel, the original kernels, the fitted ones and their
  difference side by side, each kernel labelled with its family and residual.
- :func:`layer_summary`: how many kernels each family took, and how many kernels would convert
  at other thresholds (the distribution of every kernel's best residual).
- :func:`akp_figure`: where the analytic kernels sit in parameter space: Gabor orientation vs
  wavelength, LoG/LoT scales, TGD orientations (the paper's interpretability view).

Every function takes plain tensors and returns a :class:`matplotlib.figure.Figure` bound to the
Agg canvas; pyplot is never imported, so no global figure state is created or leaked and the
caller's backend is left alone. :func:`to_png` and :func:`save_png` turn a figure into a file.

All-zero kernels (pruned ones, common in compressed checkpoints) are their own category
``zero`` in every figure, whatever family the fit gave them: the fit matches them exactly with
any family at gain 0 (Mean by the tie rule), and counting them as Mean ACKs would hide the
pruning and inflate the Mean count.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FormatStrFormatter, MaxNLocator, NullFormatter
from torch import Tensor

from .. import kernels
from ..io.outputs import write_atomic

__all__ = [
    "ZERO",
    "picture_path",
    "DIFF_CMAP",
    "zero_kernels",
    "kernel_mosaic",
    "layer_summary",
    "akp_figure",
    "to_png",
    "save_png",
]

#: Category of an all-zero original kernel, shown apart from the families.
ZERO = "zero"
#: Colour of the ``zero`` category: a light grey, apart from Mean's charcoal and every family.
_ZERO_COLOUR = (175, 175, 175)
#: The difference ``original - fitted`` is drawn with this diverging colour map: white is no
#: difference, purple positive (the fit is too low), green negative (too high). Purple-green
#: rather than the usual red-blue, whose ends are the Gabor and TGD1st frame colours.
DIFF_CMAP = "PRGn"

_DPI = 110
_INK = "#1a1a1a"
_MUTED = "#666666"


def zero_kernels(weight: Tensor) -> Tensor:
    """``(Co*Ci,)`` bool: which kernels of ``weight (Co, Ci, h, w)`` are all zero, in weight
    order (kernel ``k = q*Ci + p``)."""
    return weight.detach().flatten(0, 1).flatten(1).eq(0).all(1).cpu()


def _rgb(code: str) -> tuple[float, float, float]:
    r, g, b = _ZERO_COLOUR if code == ZERO else kernels.colour(code)
    return r / 255, g / 255, b / 255


def _family_name(code: str) -> str:
    if code == ZERO:
        return "zero (all-zero original)"
    try:
        return f"{code} {kernels.get(code).name}"
    except KeyError:
        return code


def _is_plain(code: str) -> bool:
    try:
        return kernels.get(code).plain
    except KeyError:
        return False


def _categories(codes: Sequence[str], zero: Tensor | None) -> list[str]:
    """Each kernel's category: its family code, or :data:`ZERO` where ``zero`` marks it."""
    cats = [str(c) for c in codes]
    if zero is not None:
        for k in torch.nonzero(zero).flatten().tolist():
            cats[k] = ZERO
    return cats


def _counts(cats: Sequence[str]) -> list[tuple[str, int]]:
    """``(category, kernels)`` in one fixed order for every figure: the paper's families, other
    registered ones, unknown codes as they come, then plain, then zero."""
    counts: dict[str, int] = {}
    for c in cats:
        counts[c] = counts.get(c, 0) + 1
    order = [*kernels.PAPER_FAMILIES, *kernels.codes(), *counts]
    order = [c for c in dict.fromkeys(order) if c in counts and c != ZERO and not _is_plain(c)]
    order += [c for c in counts if _is_plain(c)] + [c for c in counts if c == ZERO]
    return [(c, counts[c]) for c in order]


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


# --- checks -------------------------------------------------------------------------------------


def _check_weights(original: Tensor, fitted: Tensor) -> None:
    for name, t in (("original", original), ("fitted", fitted)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4 or 0 in t.shape:
            raise ValueError(
                f"{name} must have shape (Co, Ci, h, w) with no empty dimension, "
                f"got {tuple(t.shape)}"
            )
    if original.shape != fitted.shape:
        raise ValueError(
            f"original and fitted must have the same shape, got {tuple(original.shape)} and "
            f"{tuple(fitted.shape)}"
        )


def _check_per_kernel(n: int, codes: Sequence[str], **tensors: Tensor | None) -> None:
    if isinstance(codes, str) or len(codes) != n:
        got = repr(codes) if isinstance(codes, str) else f"{len(codes)} codes"
        raise ValueError(
            f"codes must be a sequence of {n} family codes (one per kernel), got {got}"
        )
    for name, t in tensors.items():
        if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != (n,)):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor of shape ({n},), one per kernel, got {got}")


def _check_channels(channels: Sequence[int] | None, co: int) -> list[int]:
    if channels is None:
        return list(range(co))
    chosen = [int(q) for q in channels]
    bad = [q for q in chosen if not 0 <= q < co]
    if not chosen or bad:
        raise ValueError(
            f"channels must be output channel indices in [0, {co}), at least one; "
            f"got {list(channels)!r}"
        )
    return list(dict.fromkeys(chosen))


# --- kernel mosaic ------------------------------------------------------------------------------

# Sizes in inches. A tile is one kernel image; each weight is a square, so a 7x7 kernel is a
# 0.36 in tile (about 5.7 px a weight at 110 dpi) and a 3x3 one 0.3 in (11 px a weight).
_GAP = 0.05  # between the tiles of one unit
_UNIT_GAP = 0.16  # between units
_LABEL_H = 0.13  # text line above each unit
_TITLE_H = 0.7
_HEADER_H = 0.14  # "original / fitted / diff" above the first row
_LEGEND_H = 1.15
_MARGIN = 0.2
_MAX_WIDTH = 12.5  # of the grid
_PAD = 0.07  # room round the grid for the outer frames' line width


def _tile_inches(h: int, w: int) -> float:
    """Side of the larger kernel dimension, in inches."""
    return min(0.5, max(0.3, 0.052 * max(h, w)))


def _columns(n: int, unit_w: float, unit_h: float, ci: int, rgb: bool) -> int:
    """Units per row: a grid about twice as wide as tall and at most :data:`_MAX_WIDTH` wide;
    for multi-channel grayscale layers a multiple or divisor of ``Ci``, so each row starts a
    new output channel or a whole part of one."""
    step_w, step_h = unit_w + _UNIT_GAP, unit_h + _UNIT_GAP
    cap = max(1, math.floor((_MAX_WIDTH + _UNIT_GAP) / step_w))
    c = max(1, min(n, cap, round(math.sqrt(2 * n * step_h / step_w))))
    if not rgb and ci > 1:
        if ci <= c:
            return min(n, ci * (c // ci))
        return min((d for d in range(1, min(ci, cap) + 1) if ci % d == 0), key=lambda d: abs(d - c))
    return c


def kernel_mosaic(
    original: Tensor,
    fitted: Tensor,
    codes: Sequence[str],
    residuals: Tensor,
    *,
    title: str = "",
    channels: Sequence[int] | None = None,
    max_tiles: int = 64,
    threshold: float | None = None,
) -> Figure:
    """Original, fitted and difference of a layer's kernels, per output channel.

    Args:
        original: pretrained kernels ``(Co, Ci, h, w)`` (``Ci`` per group), any float dtype.
        fitted: the converted layer's kernels, same shape (equal to ``original`` where plain).
        codes: family code per kernel, ``Co*Ci`` of them, in weight order (kernel
            ``k = q*Ci + p`` for output ``q``, input ``p``).
        residuals: ``(Co*Ci,)`` relative residual ``|W - W_hat| / |W|`` of each kernel's fit
            (0 for plain).
        title: first title line, e.g. the layer name.
        channels: output channels to show, in this order (default: all).
        max_tiles: show at most this many units (below); the title then says ``showing N of M``.
        threshold: the residual threshold of the conversion, named in the title when given.

    Returns:
        A figure of units in a grid. ``Ci == 3``: one unit per output channel: the original and
        the fitted kernel as RGB composites (input channels 0, 1, 2 as R, G, B; both stretched
        from the original's min to max over that channel, so a colour means the same weight in
        both), then the difference ``original - fitted`` of each of the three kernels, framed
        in its family's colour and labelled with family and residual. Otherwise one unit per
        kernel: original and fitted in grayscale from the original kernel's min (black) to max
        (white), then the difference; the unit framed in its family's colour and labelled
        ``out:in family residual`` (``out family residual`` when ``Ci == 1``). Differences are
        in :data:`DIFF_CMAP`, white at 0 and full colour at +-half the original's min..max
        range (the same contrast as the kernel tiles). All-zero original kernels are the
        category ``zero``. A legend explains the frame colours (with counts over the whole
        layer) and the colour scales. Tile images carry the gid ``original:q``/``fitted:q``
        (RGB) or ``original:q:p``/``fitted:q:p``, and ``diff:q:p``.
    """
    _check_weights(original, fitted)
    co, ci, h, w = original.shape
    _check_per_kernel(co * ci, codes, residuals=residuals)
    if isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < 1:
        raise ValueError(f"max_tiles must be an integer >= 1, got {max_tiles!r}")
    chans = _check_channels(channels, co)
    orig = torch.nan_to_num(original.detach().to("cpu", torch.float64))
    fit = torch.nan_to_num(fitted.detach().to("cpu", torch.float64))
    res = residuals.detach().to("cpu", torch.float64)
    cats = _categories(codes, zero_kernels(orig))
    rgb = ci == 3

    units, total = _mosaic_units(chans, ci, rgb, max_tiles)
    grid = _layout(len(units), h, w, ci, rgb)
    fig_w = max(grid.width + 2 * _MARGIN, 7.5)
    fig_h = _TITLE_H + (0.15 if rgb else 0) + grid.height + _LEGEND_H + 2 * _MARGIN
    fig = _new_figure(fig_w, fig_h)
    detail = _mosaic_detail(original.shape, units, total, rgb, channels is not None, threshold)
    _mosaic_title(fig, title, detail, fig_w, fig_h)
    ax = _grid_axes(fig, grid, fig_w, fig_h)
    _draw_units(ax, grid, units, orig, fit, cats, res)
    _mosaic_legend(fig, cats, rgb, fig_w, fig_h)
    return fig


def _mosaic_units(
    chans: Sequence[int], ci: int, rgb: bool, max_tiles: int
) -> tuple[list[tuple[int, int | None]], int]:
    """The units shown, at most ``max_tiles``, and how many the output channels ``chans`` have:
    a unit is one output channel (RGB), ``(q, None)``, or one kernel (otherwise), ``(q, p)``."""
    if rgb:
        units = [(q, None) for q in chans]
    else:
        units = [(q, p) for q in chans for p in range(ci)]
    total = len(units)
    shown = min(total, max_tiles)
    if not rgb and ci < shown < total:
        shown -= shown % ci  # whole output channels, so no channel is shown in part
    return units[:shown], total


@dataclass(frozen=True)
class _Grid:
    """Where a mosaic's units go, in inches: ``n_tiles`` tiles of ``tw`` x ``th`` per unit
    (RGB units: two composites, then three differences), units of ``unit_w`` x ``unit_h`` (label
    line included) in ``cols`` columns, and the whole grid ``width`` x ``height`` (header line
    included)."""

    rgb: bool
    tw: float
    th: float
    n_tiles: int
    unit_w: float
    unit_h: float
    cols: int
    width: float
    height: float


def _layout(n: int, h: int, w: int, ci: int, rgb: bool) -> _Grid:
    """The grid of ``n`` units of ``h`` x ``w`` kernels with ``ci`` input channels."""
    tile = _tile_inches(h, w)
    th, tw = tile * h / max(h, w), tile * w / max(h, w)
    n_tiles = 5 if rgb else 3
    # RGB units leave a wider gap between the composites and the per-kernel differences.
    unit_w = n_tiles * tw + (n_tiles - 1) * _GAP + (2 * _GAP if rgb else 0)
    unit_h = _LABEL_H + th
    cols = _columns(n, unit_w, unit_h, ci, rgb)
    rows = math.ceil(n / cols)
    grid_w = cols * unit_w + (cols - 1) * _UNIT_GAP
    grid_h = _HEADER_H + rows * unit_h + (rows - 1) * _UNIT_GAP
    return _Grid(rgb, tw, th, n_tiles, unit_w, unit_h, cols, grid_w, grid_h)


def _mosaic_detail(
    shape: Sequence[int],
    units: Sequence[tuple[int, int | None]],
    total: int,
    rgb: bool,
    chosen: bool,
    threshold: float | None,
) -> str:
    """The lines under a mosaic's title: the layer's ``(Co, Ci, h, w)`` ``shape``, which of its
    ``total`` units are shown (``chosen``: the caller picked the channels) and how to read
    them."""
    co, ci, h, w = shape
    shown = len(units)
    what = "output channels" if rgb else "kernels"
    detail = f"{co * ci} kernel{'s' * (co * ci > 1)} {h}x{w} ({co} out x {ci} in)"
    if threshold is not None:
        detail += f", converted where residual <= {threshold:g}"
    picked = _channel_list([q for q, _ in units])
    if shown < total:
        detail += f"; showing {shown} of {total} {what} ({picked})"
    elif chosen:
        detail += f"; showing {picked}"
    else:
        detail += f"; all {what}"
    if rgb:
        detail += (
            ".\nOriginal and fitted: input channels 0, 1, 2 as R, G, B, each output channel "
            "stretched from its original's min (black) to max (white).\n"
            "Above each difference tile: its kernel's family and residual |W - fit| / |W|."
        )
    else:
        where = "output:input channel" if ci > 1 else "output channel"
        detail += f".\nAbove each kernel: {where}, family, residual |W - fit| / |W|."
    return detail


def _mosaic_title(fig: Figure, title: str, detail: str, fig_w: float, fig_h: float) -> None:
    """``title`` in bold (when given) and ``detail`` under it, at the top left."""
    if title:
        fig.text(
            _MARGIN / fig_w,
            1 - _MARGIN / fig_h,
            title,
            fontsize=11,
            weight="bold",
            va="top",
            color=_INK,
        )
    fig.text(
        _MARGIN / fig_w,
        1 - (_MARGIN + (0.25 if title else 0)) / fig_h,
        detail,
        linespacing=1.5,
        fontsize=8,
        va="top",
        color=_MUTED,
    )


def _grid_axes(fig: Figure, grid: _Grid, fig_w: float, fig_h: float):
    """One axes in inches-as-data-units for the whole grid, y pointing down, centred above the
    legend."""
    left = (fig_w - grid.width) / 2
    bottom = _MARGIN + _LEGEND_H
    ax = fig.add_axes(
        (
            (left - _PAD) / fig_w,
            (bottom - _PAD) / fig_h,
            (grid.width + 2 * _PAD) / fig_w,
            (grid.height + 2 * _PAD) / fig_h,
        )
    )
    # A little room around the grid, so the outer frames are not clipped at the axes' edge.
    ax.set_xlim(-_PAD, grid.width + _PAD)
    ax.set_ylim(grid.height + _PAD, -_PAD)
    ax.set_aspect("equal")
    ax.axis("off")
    return ax


def _draw_units(
    ax,
    grid: _Grid,
    units: Sequence[tuple[int, int | None]],
    orig: Tensor,
    fit: Tensor,
    cats: Sequence[str],
    res: Tensor,
) -> None:
    """Every unit in its place of ``grid``, the tiles' names above the first row; ``orig`` and
    ``fit`` are the layer's kernels ``(Co, Ci, h, w)``, ``cats`` and ``res`` ``(Co*Ci,)`` their
    categories and residuals."""
    rgb, tw, th = grid.rgb, grid.tw, grid.th
    ci = orig.shape[1]
    heads = ("original", "fitted", "diff R", "diff G", "diff B") if rgb else ("orig", "fit", "diff")
    for i, (q, p) in enumerate(units):
        r, c = divmod(i, grid.cols)
        x0 = c * (grid.unit_w + _UNIT_GAP)
        y0 = _HEADER_H + r * (grid.unit_h + _UNIT_GAP) + _LABEL_H
        xs = [
            x0 + j * (tw + _GAP) + (2 * _GAP if rgb and j >= 2 else 0) for j in range(grid.n_tiles)
        ]
        if r == 0:
            for x, head in zip(xs, heads, strict=True):
                ax.text(
                    x + tw / 2,
                    y0 - _LABEL_H - 0.02,
                    head,
                    fontsize=5.5,
                    ha="center",
                    va="bottom",
                    color=_MUTED,
                    style="italic",
                )
        if rgb:
            _draw_rgb_unit(ax, orig[q], fit[q], q, cats, res, xs, y0, tw, th)
        else:
            _draw_gray_unit(ax, orig[q, p], fit[q, p], q, p, ci, cats, res, xs, y0, tw, th)


def _channel_list(qs: Sequence[int]) -> str:
    """``output channels 0-63`` for a run, else the first few: ``output channels 3, 7, 9, ...
    (12)``; ``output channel 5`` for one."""
    qs = list(dict.fromkeys(qs))
    if len(qs) == 1:
        return f"output channel {qs[0]}"
    if qs == list(range(qs[0], qs[0] + len(qs))):
        return f"output channels {qs[0]}-{qs[-1]}"
    head = ", ".join(map(str, qs[:6]))
    return f"output channels {head}" + (f", ... ({len(qs)})" if len(qs) > 6 else "")


def _label(cat: str, residual: float) -> str:
    """``G 0.16``; plain and zero kernels have nothing fitted, so no residual."""
    if cat == ZERO or _is_plain(cat):
        return cat
    return f"{cat} {residual:.2f}"


def _range(orig: Tensor) -> tuple[float, float, float]:
    """``(lo, hi, half)``: the display range of an original kernel (or RGB triple) and the
    half-width of its difference scale. Kernels are stretched from their min to their max so
    that nearly constant ones still show their pattern; the difference, centred on 0, spans half
    that range, which gives it the same contrast (colour change per unit of weight) as the
    kernel tiles. A flat kernel (all zero, or constant) is centred on mid-grey instead."""
    lo, hi = float(orig.min()), float(orig.max())
    if hi > lo:
        return lo, hi, (hi - lo) / 2
    half = abs(lo) or 1.0
    return lo - half, lo + half, half


def _tile(ax, image: np.ndarray, x: float, y: float, tw: float, th: float, gid: str, **kw):
    im = ax.imshow(image, extent=(x, x + tw, y + th, y), interpolation="nearest", **kw)
    im.set_gid(gid)
    return im


def _frame_width(cat: str) -> float:
    """ACK frames are drawn bold; plain and zero kernels, which have no fit to judge, thin, so
    the analytic kernels stand out."""
    return 0.8 if cat == ZERO or _is_plain(cat) else 1.8


def _frame(ax, x: float, y: float, w: float, h: float, colour, lw: float) -> None:
    pad = 0.012
    ax.add_patch(
        Rectangle(
            (x - pad, y - pad), w + 2 * pad, h + 2 * pad, fill=False, edgecolor=colour, linewidth=lw
        )
    )


def _draw_rgb_unit(ax, orig, fit, q, cats, res, xs, y0, tw, th) -> None:
    """``orig``/``fit`` ``(3, h, w)``: two composites and three difference tiles."""
    lo, hi, half = _range(orig)

    def composite(t: Tensor) -> np.ndarray:
        return ((t - lo) / (hi - lo)).clamp(0, 1).permute(1, 2, 0).numpy()

    _tile(ax, composite(orig), xs[0], y0, tw, th, f"original:{q}")
    _tile(ax, composite(fit), xs[1], y0, tw, th, f"fitted:{q}")
    for x in xs[:2]:
        _frame(ax, x, y0, tw, th, "#d0d0d0", lw=0.6)
    ax.text(xs[0], y0 - 0.015, str(q), fontsize=6, va="bottom", color=_INK)
    for p in range(3):
        k = 3 * q + p
        x = xs[2 + p]
        _tile(
            ax,
            (orig[p] - fit[p]).numpy(),
            x,
            y0,
            tw,
            th,
            f"diff:{q}:{p}",
            cmap=DIFF_CMAP,
            vmin=-half,
            vmax=half,
        )
        _frame(ax, x, y0, tw, th, _rgb(cats[k]), _frame_width(cats[k]))
        ax.text(
            x + tw / 2,
            y0 - 0.015,
            _label(cats[k], float(res[k])),
            fontsize=5.5,
            ha="center",
            va="bottom",
            color=_INK,
        )


def _draw_gray_unit(ax, orig, fit, q, p, ci, cats, res, xs, y0, tw, th) -> None:
    """``orig``/``fit`` ``(h, w)``: original, fitted and difference of one kernel."""
    k = q * ci + p
    lo, hi, half = _range(orig)
    gid = f"{q}:{p}"
    _tile(ax, orig.numpy(), xs[0], y0, tw, th, f"original:{gid}", cmap="gray", vmin=lo, vmax=hi)
    _tile(ax, fit.numpy(), xs[1], y0, tw, th, f"fitted:{gid}", cmap="gray", vmin=lo, vmax=hi)
    _tile(
        ax,
        (orig - fit).numpy(),
        xs[2],
        y0,
        tw,
        th,
        f"diff:{gid}",
        cmap=DIFF_CMAP,
        vmin=-half,
        vmax=half,
    )
    # A hairline round each tile keeps orig | fit | diff apart where a kernel is mostly white.
    for x in xs:
        _frame(ax, x, y0, tw, th, "#d0d0d0", lw=0.5)
    _frame(
        ax,
        xs[0] - 0.02,
        y0 - 0.02,
        xs[2] + tw - xs[0] + 0.04,
        th + 0.04,
        _rgb(cats[k]),
        _frame_width(cats[k]),
    )
    where = f"{q}:{p}" if ci > 1 else f"{q}"
    ax.text(
        xs[0],
        y0 - 0.045,  # clear of the outer frame
        f"{where}  {_label(cats[k], float(res[k]))}",
        fontsize=6,
        va="bottom",
        color=_INK,
    )


def _mosaic_legend(fig: Figure, cats: Sequence[str], rgb: bool, fig_w: float, fig_h: float):
    """Frame colours with the layer's counts on the left; the colour scales on the right."""
    counts = _counts(cats)
    handles = [
        Patch(
            facecolor="white",
            edgecolor=_rgb(c),
            linewidth=_frame_width(c) * 1.2,
            label=f"{_family_name(c)}: {n}",
        )
        for c, n in counts
    ]
    frame_of = "each difference tile" if rgb else "each kernel (orig | fit | diff)"
    fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(_MARGIN / fig_w, (_MARGIN + _LEGEND_H - 0.1) / fig_h),
        ncol=2 if len(handles) > 4 else 1,
        fontsize=7,
        title=f"frame of {frame_of}: family (kernels in layer)",
        title_fontsize=7,
        frameon=False,
        alignment="left",
    )
    # Colour bars, 2.3 in wide, at the right.
    bar_w, bar_h = 2.3, 0.09
    # The outer tick labels reach past the bar's ends, hence the wider right margin.
    x = (fig_w - 2.5 * _MARGIN - bar_w) / fig_w
    cax = fig.add_axes((x, (_MARGIN + 0.25) / fig_h, bar_w / fig_w, bar_h / fig_h))
    _colour_bar(
        fig,
        cax,
        DIFF_CMAP,
        ["-range/2", "0", "+range/2"],
        "difference original - fitted, same contrast\n(purple: fit too low, green: too high)",
    )
    if not rgb:
        gax = fig.add_axes((x, (_MARGIN + 0.8) / fig_h, bar_w / fig_w, bar_h / fig_h))
        _colour_bar(
            fig,
            gax,
            "gray",
            ["min", "", "max"],
            "original, fitted: from the original kernel's min to max",
        )


def _colour_bar(fig: Figure, cax, cmap: str, ticks: Sequence[str], label: str) -> None:
    """A horizontal colour bar with three ticks (low, middle, high) named by ``ticks``."""
    bar = fig.colorbar(ScalarMappable(Normalize(-1, 1), cmap), cax=cax, orientation="horizontal")
    bar.set_ticks([-1, 0, 1], labels=ticks)
    bar.ax.tick_params(labelsize=6, length=2)
    bar.ax.set_title(label, fontsize=6.5, color=_INK, pad=2, loc="left")
    bar.outline.set_linewidth(0.5)


# --- layer summary ------------------------------------------------------------------------------


def layer_summary(
    name: str,
    codes: Sequence[str],
    chosen_residual: Tensor,
    best_residual: Tensor,
    *,
    threshold: float | None = None,
    compact_factor: float,
    output_error: float | Mapping[str, float] | None = None,
    zero: Tensor | None = None,
) -> Figure:
    """What a layer's conversion chose, and what other thresholds would choose.

    Args:
        name: the layer's name, for the title.
        codes: family code per kernel, ``N`` of them (``P`` for plain).
        chosen_residual: ``(N,)`` relative residual of each kernel's chosen family (0 for plain).
        best_residual: ``(N,)`` the lowest relative residual any family reached for each kernel.
        threshold: the residual threshold used, drawn as a line; None (e.g. budget selection)
            draws none.
        compact_factor: the layer's compact factor (Eq. 25), in the title.
        output_error: the layer's relative output error on calibration images, when measured:
            a number, or named numbers such as ``{"fitted": .., "resolved": ..}``.
        zero: ``(N,)`` bool, all-zero original kernels (see :func:`zero_kernels`): counted as
            ``zero`` and left out of the residual distribution (every family fits them exactly).

    Returns:
        A figure of two panels. Left: kernels per category (bars in family colours, ``zero``
        apart). Right: histogram of the best residual over the non-zero kernels, the kernels
        that became analytic shaded in their chosen residual, and on a second axis the number
        of kernels whose best residual is at most ``t``, for every ``t`` (how many would convert
        at threshold ``t``), with the threshold marked.
    """
    n = len(codes)
    _check_per_kernel(
        n, codes, chosen_residual=chosen_residual, best_residual=best_residual, zero=zero
    )
    cats = _categories(codes, zero)
    nonzero = torch.tensor([c != ZERO for c in cats], dtype=torch.bool)
    best = best_residual.detach().to("cpu", torch.float64)[nonzero]
    converted = torch.tensor([c != ZERO and not _is_plain(c) for c in cats], dtype=torch.bool)
    chosen = chosen_residual.detach().to("cpu", torch.float64)[converted]

    fig = _new_figure(10, 3.6)
    head = (
        f"{name}: {n} kernels, {int(converted.sum())} analytic, compact factor {compact_factor:.3f}"
    )
    if output_error is not None:
        if isinstance(output_error, Mapping):
            parts = ", ".join(f"{k} {v:.4f}" for k, v in output_error.items())
            head += f", relative output error {parts}"
        else:
            head += f", relative output error {output_error:.4f}"
    fig.suptitle(head, x=0.02, ha="left", fontsize=10, weight="bold", color=_INK)
    left = fig.add_axes((0.14, 0.15, 0.25, 0.6))
    right = fig.add_axes((0.48, 0.15, 0.44, 0.6))
    _family_bars(left, cats)
    _residual_distribution(right, best, chosen, threshold, n_zero=int((~nonzero).sum()))
    return fig


def _family_bars(ax, cats: Sequence[str]) -> None:
    counts = _counts(cats)
    total = len(cats)
    labels = [_family_name(c) for c, _ in counts]
    values = [v for _, v in counts]
    ax.barh(range(len(counts)), values, color=[_rgb(c) for c, _ in counts], height=0.7)
    ax.set_yticks(range(len(counts)), labels=labels, fontsize=7.5)
    # Top down, and room for at least four bars so that one or two are not drawn fat.
    ax.set_ylim(max(len(counts), 4) - 0.5, -0.5)
    ax.set_xlim(0, max(values) * 1.45)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v} ({100 * v / total:.0f}%)", va="center", fontsize=7, color=_INK)
    ax.set_xlabel("kernels", fontsize=8)
    ax.set_title("family of each kernel", fontsize=9, loc="left", pad=30)
    ax.tick_params(labelsize=7)
    ax.spines[["top", "right"]].set_visible(False)


def _residual_distribution(ax, best: Tensor, chosen: Tensor, threshold, n_zero: int) -> None:
    """Histogram of ``best`` ``(M,)``, ``chosen`` ``(A,)`` over it, and the cumulative count."""
    if not len(best):
        ax.text(
            0.5,
            0.5,
            f"all {n_zero} kernels are zero: nothing to fit",
            ha="center",
            va="center",
            fontsize=9,
            color=_MUTED,
            transform=ax.transAxes,
        )
        ax.set_axis_off()
        return
    top = max(1.0, float(best.max()))
    _residual_histograms(ax, best, chosen, top, n_zero)
    cum = _cumulative_count(ax, best, top)
    if threshold is not None:
        _threshold_mark(cum, best, threshold)
    handles = ax.get_legend_handles_labels()[0] + cum.get_legend_handles_labels()[0]
    ax.legend(
        handles=handles,
        fontsize=6.5,
        loc="lower left",
        bbox_to_anchor=(0, 1.0),
        ncol=2,
        frameon=False,
        borderaxespad=0.2,
    )


def _residual_histograms(ax, best: Tensor, chosen: Tensor, top: float, n_zero: int) -> None:
    """Histograms of ``best`` ``(M,)`` and, over it, ``chosen`` ``(A,)``, on ``[0, top]``."""
    bins = np.linspace(0, top, 41)
    ax.hist(best.numpy(), bins=bins, color="#c8c8c8", label="best family's residual, all kernels")
    if len(chosen):
        ax.hist(
            chosen.numpy(),
            bins=bins,
            color="#4a7fb0",
            label="chosen family's residual, analytic kernels",
        )
    ax.set_xlim(0, top)
    ax.set_xlabel("relative residual |W - fit| / |W|", fontsize=8)
    ax.set_ylabel("kernels per bin", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.spines[["top"]].set_visible(False)
    title = "how well the best family fits each kernel"
    if n_zero:
        title += f" ({n_zero} zero kernels left out)"
    ax.set_title(title, fontsize=9, loc="left", pad=30)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _cumulative_count(ax, best: Tensor, top: float):
    """On a second y axis of ``ax``, the count of kernels at or below every t: how many of
    ``best`` ``(M,)`` a threshold t would convert. Returns that axis."""
    cum = ax.twinx()
    xs = np.sort(best.numpy())
    ys = np.arange(1, len(xs) + 1)
    cum.step(
        np.r_[0, xs, top],
        np.r_[0, ys, len(xs)],
        where="post",
        color=_INK,
        linewidth=1.2,
        label="kernels with best residual <= t (right axis)",
    )
    cum.set_ylim(0, max(1, len(xs)) * 1.05)
    cum.set_ylabel("kernels with best residual <= t", fontsize=8)
    cum.tick_params(labelsize=7)
    cum.spines[["top"]].set_visible(False)
    return cum


def _threshold_mark(cum, best: Tensor, threshold: float) -> None:
    """The threshold on the cumulative axis ``cum``, with how many of ``best`` ``(M,)`` it
    converts."""
    below = int((best <= threshold).sum())
    cum.axvline(threshold, color="#c0392b", linestyle="--", linewidth=1.2)
    share = f" ({100 * below / len(best):.0f}%)" if len(best) else ""
    cum.annotate(
        f"threshold {threshold:g}:\n{below} of {len(best)}{share}",
        (threshold, below),
        xytext=(6, -4),
        textcoords="offset points",
        fontsize=7,
        color="#c0392b",
        va="top",
    )


# --- AKPs ---------------------------------------------------------------------------------------


def akp_figure(
    name: str, akps: Mapping[str, Tensor], kernel_size: tuple[int, int]
) -> Figure | None:
    """Where the analytic kernels of a layer sit in parameter space (the paper's view of what a
    layer has learnt).

    Args:
        name: the layer's name, for the title.
        akps: ``{code: (n, P)}`` AKPs of the layer's ACKs per family, in the paper's units and
            canonical ranges (``kernels.get(code).param_names``).
        kernel_size: ``(h, w)``, for reference marks.

    Returns:
        One panel per kind present, or None when no ACK has parameters to show (no ACKs, or
        only Mean). Gabor (``G``): a half-disc of orientation ``theta`` (the direction across the
        stripes, as on the kernel image) against wavelength ``lambda`` (log radius), coloured by
        envelope ``sigma``, with rings at the 2-pixel Nyquist limit and at one cycle per kernel;
        and the phase ``psi`` (even, bar-like near 0 and pi; odd, edge-like near +-pi/2). LoG
        and LoT: histograms of ``sigma``. TGD1st and TGD2nd: a rose of ``theta``. Any other
        family: a histogram per parameter.
    """
    h, w = kernel_size
    present = {
        str(c): v.detach().to("cpu", torch.float64)
        for c, v in akps.items()
        if v.ndim == 2 and v.shape[0] > 0 and v.shape[1] > 0
    }
    if not present:
        return None
    panels = []  # (kind, drawer) in a fixed order
    if "G" in present:
        panels += [
            ("polar", lambda ax: _gabor_polar(ax, present["G"], h, w)),
            ("plain", lambda ax: _gabor_phase(ax, present["G"])),
        ]
    scales = {c: present[c] for c in ("Lg", "Lt") if c in present}
    if scales:
        panels.append(("plain", lambda ax: _scales(ax, scales, h, w)))
    turns = {c: present[c] for c in ("Tf", "Ts") if c in present}
    if turns:
        panels.append(("polar", lambda ax: _orientation_rose(ax, turns)))
    for code, values in present.items():
        if code not in ("G", "Lg", "Lt", "Tf", "Ts"):
            for j, pname in enumerate(_param_names(code, values.shape[1])):
                panels.append(
                    ("plain", lambda ax, c=code, v=values[:, j], p=pname: _histogram(ax, c, p, v))
                )

    weights = [1.35 if kind == "polar" else 1.0 for kind, _ in panels]
    fig_w = 3.2 * sum(weights) + 0.4
    fig = _new_figure(fig_w, 4.0)
    counts = ", ".join(f"{_family_name(c)} {len(v)}" for c, v in present.items())
    fig.suptitle(
        f"{name}: parameters of the analytic kernels ({counts})",
        x=0.02,
        ha="left",
        fontsize=10,
        weight="bold",
        color=_INK,
    )
    x = 0.2
    for weight, (kind, draw) in zip(weights, panels, strict=True):
        panel_w = 3.2 * weight
        # Plain axes leave room on the left for their tick labels, polar ones for nothing.
        pad = 0.1 if kind == "polar" else 0.55
        rect = ((x + pad) / fig_w, 0.15, (panel_w - pad - 0.35) / fig_w, 0.66)
        draw(fig.add_axes(rect, projection="polar" if kind == "polar" else None))
        x += panel_w
    return fig


def _param_names(code: str, n: int) -> list[str]:
    try:
        names = list(kernels.get(code).param_names)
    except KeyError:
        names = []
    return names + [f"p{j}" for j in range(len(names), n)]


def _screen_angle(theta: np.ndarray) -> np.ndarray:
    """Orientations ``theta`` (radians, period pi) as angles of an upper half-disc that points
    the way the kernel image does. The kernel's row axis ``x`` runs down and ``y`` right, so the
    direction ``(cos t, sin t)`` in (row, column) is the screen angle ``t`` counter-clockwise
    from up; an orientation is the same half a turn later, so angles past pi/2 (pointing down)
    are shown half a turn on, pointing up to the right."""
    t = np.mod(theta, np.pi)
    return np.where(t > np.pi / 2, t - np.pi, t)


def _half_disc(ax) -> None:
    """A polar axes for :func:`_screen_angle`: the upper half, 0 up (a wave or difference along
    the rows: horizontal stripes or edges), 90 at both ends (vertical stripes)."""
    ax.set_theta_zero_location("N")
    ax.set_theta_direction(1)
    ax.set_thetamin(-90)
    ax.set_thetamax(90)
    ax.set_xticks(np.radians([90, 45, 0, -45, -90]))
    ax.set_xticklabels(["90", "45", "0", "135", "90"], fontsize=7)
    ax.tick_params(labelsize=6.5)


def _gabor_polar(ax, akp: Tensor, h: int, w: int) -> None:
    """Orientation against wavelength (log radius), envelope as colour. Wavelengths beyond
    ``cap`` leave less than a quarter cycle across the kernel (a ramp, not a wave); they sit on
    the rim as open circles, so a few of them cannot squash the rest into the centre."""
    size = max(h, w)
    lam, theta, sigma = akp[:, 0].numpy(), akp[:, 1].numpy(), akp[:, 3].numpy()
    cap, floor = 4.0 * size, 1.5
    _half_disc(ax)
    ax.set_rscale("log")
    ax.set_rlim(floor, cap)
    ticks = [t for t in (2, 4, 8, 16, 32, 64) if t < cap]
    ax.set_yticks(ticks, labels=[f"{t}" for t in ticks], fontsize=6)
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_rlabel_position(-90)
    norm = LogNorm(max(min(float(sigma.min()), size / 2), 0.2), 2.0 * size, clip=True)
    small = 14 if len(lam) <= 300 else 6
    inside = lam <= cap
    angle = _screen_angle(theta)
    dots = ax.scatter(
        angle[inside],
        np.clip(lam[inside], floor, None),
        c=sigma[inside],
        cmap="viridis",
        norm=norm,
        s=small,
        alpha=0.75,
        edgecolors="none",
    )
    if (~inside).any():
        ax.scatter(
            angle[~inside],
            np.full(int((~inside).sum()), cap * 0.97),
            s=small * 1.5,
            facecolors="none",
            edgecolors=_MUTED,
            linewidths=0.6,
            label=f"wavelength > {cap:g} px (a ramp): {int((~inside).sum())}",
        )
        ax.legend(fontsize=6.5, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.02))
    ring = np.linspace(-np.pi / 2, np.pi / 2, 100)
    ax.plot(ring, np.full_like(ring, size), linestyle=":", color=_MUTED, linewidth=0.8)
    ax.set_title(
        f"Gabor: orientation in deg (0 = horizontal stripes, 90 = vertical)\n"
        f"and wavelength in px (radius; dotted: {size} px, one cycle per kernel)",
        fontsize=7.5,
        loc="center",
        pad=4,
    )
    bar = ax.figure.colorbar(dots, ax=ax, shrink=0.7, pad=0.04, extend="max")
    bar.set_label("envelope sigma (px)", fontsize=7)
    bar.set_ticks([t for t in (0.25, 0.5, 1, 2, 4, 8, 16, 32) if norm.vmin <= t <= norm.vmax])
    bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    bar.ax.yaxis.set_minor_formatter(NullFormatter())
    bar.ax.tick_params(labelsize=6)


def _gabor_phase(ax, akp: Tensor) -> None:
    psi = akp[:, 2].numpy()
    ax.hist(psi, bins=np.linspace(-np.pi, np.pi, 25), color=_rgb("G"))
    ax.set_xticks(
        [-np.pi, -np.pi / 2, 0, np.pi / 2, np.pi],
        labels=["-pi\neven", "-pi/2\nodd", "0\neven", "pi/2\nodd", "pi\neven"],
    )
    ax.set_xlim(-np.pi, np.pi)
    ax.set_title("Gabor: phase psi\neven = bar-like, odd = edge-like", fontsize=8, loc="left")
    ax.set_ylabel("kernels", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.spines[["top", "right"]].set_visible(False)


def _scales(ax, scales: Mapping[str, Tensor], h: int, w: int) -> None:
    values = [v[:, 0].numpy() for v in scales.values()]
    lo = max(min(float(v.min()) for v in values) / 1.2, 1e-2)
    hi = max(max(float(v.max()) for v in values) * 1.2, lo * 10)
    bins = np.geomspace(lo, hi, 30)
    ax.hist(
        values,
        bins=bins,
        color=[_rgb(c) for c in scales],
        label=[f"{_family_name(c)} ({len(v)})" for c, v in scales.items()],
    )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.axvline(max(h, w) / 2, color=_MUTED, linestyle=":", linewidth=0.8)
    ax.text(
        max(h, w) / 2,
        0.5,
        " half the\n kernel",
        transform=ax.get_xaxis_transform(),
        fontsize=6,
        color=_MUTED,
        va="center",
    )
    ax.set_xlabel("sigma (px), log scale", fontsize=8)
    ax.set_ylabel("kernels", fontsize=8)
    ax.set_title("LoG / LoT: scale sigma", fontsize=8, loc="left")
    ax.legend(fontsize=6.5, frameon=False, loc="upper right")
    ax.tick_params(labelsize=7)
    ax.spines[["top", "right"]].set_visible(False)


def _orientation_rose(ax, turns: Mapping[str, Tensor]) -> None:
    _half_disc(ax)
    edges = np.linspace(-np.pi / 2, np.pi / 2, 13)
    width = edges[1] - edges[0]
    base = np.zeros(12)
    for code, v in turns.items():
        counts, _ = np.histogram(_screen_angle(v[:, 0].numpy()), bins=edges)
        ax.bar(
            edges[:-1],
            counts,
            width=width,
            bottom=base,
            align="edge",
            color=_rgb(code),
            edgecolor="white",
            linewidth=0.5,
            label=f"{_family_name(code)} ({len(v)})",
        )
        base = base + counts
    ax.set_title(
        "TGD: orientation in deg (0 = change along the rows)\n(kernels per 15 deg)",
        fontsize=7.5,
        pad=4,
    )
    ax.legend(fontsize=6.5, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.02))


def _histogram(ax, code: str, pname: str, values: Tensor) -> None:
    ax.hist(values.numpy(), bins=25, color=_rgb(code))
    ax.set_title(f"{_family_name(code)}: {pname}", fontsize=8, loc="left")
    ax.set_ylabel("kernels", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.spines[["top", "right"]].set_visible(False)


# --- output -------------------------------------------------------------------------------------


def to_png(fig: Figure) -> bytes:
    """The figure as PNG bytes, at the figure's dpi."""
    buf = io.BytesIO()
    # No software tag: the same figure gives the same bytes whatever matplotlib wrote it.
    fig.savefig(buf, format="png", dpi=fig.dpi, metadata={"Software": None})
    return buf.getvalue()


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    """Write the figure as a PNG to ``path`` atomically (rendered first, then a temporary file
    next to ``path`` renamed onto it). Returns the path."""
    data = to_png(fig)
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def _safe_name(layer_name: str) -> str:
    # Dots stay (``features.0`` is how PyTorch names layers); anything a file system or a shell
    # might mind becomes ``_``; a leading dot would hide the file.
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", layer_name).strip("._")
    return name[:150] or "layer"


def picture_path(base: str | os.PathLike, layer_name: str, n_layers: int) -> Path:
    """Where the picture of ``layer_name`` goes, given ``base`` (``--mosaic base``).

    ``base`` an existing folder, or a name ending in ``/`` (the folder is then made):
    ``<folder>/<layer>.png``. Otherwise one layer: ``base`` as
    given; several layers: the layer name before the suffix, ``out.png`` ->
    ``out.features.0.png`` (``.png`` added if ``base`` has no suffix). Layer names are made safe
    for file systems (characters other than letters, digits, ``. _ -`` become ``_``).
    """
    as_folder = str(base).endswith(("/", os.sep))
    base = Path(base)
    if as_folder:
        base.mkdir(parents=True, exist_ok=True)
    if os.path.isdir(base):  # False for a name too long to look up: the output plan says so
        return base / f"{_safe_name(layer_name)}.png"
    if n_layers == 1:
        return base
    return base.with_name(f"{base.stem}.{_safe_name(layer_name)}{base.suffix or '.png'}")
