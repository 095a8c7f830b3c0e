"""Pictures of a layer's kernels, original beside fitted, framed by family (paper Figs. 1, 4a).

One PNG per layer: two panels, ``original | fitted``, each a grid of tiles. A layer with 3 input
channels per group shows one RGB tile per output channel (its three kernels as R, G, B), as the
paper draws first layers; any other layer shows one grayscale tile per kernel. Every tile has a
frame in the colour of its family (:attr:`KernelFamily.colour`, the paper's Fig. 4a colours), the
title above names the layer and its family counts, and a legend below lists the families present.

>>> import torch
>>> W = torch.randn(4, 3, 7, 7)
>>> img = render_mosaic(W, W, ["G"] * 12, title="conv1")
>>> img.mode
'RGB'
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .. import kernels
from ..io.outputs import write_atomic

__all__ = ["family_colour", "render_mosaic", "save_mosaic", "mosaic_path"]

# A code the registry does not know (a file from a newer version) gets one of these, chosen by a
# stable hash of the code (not ``hash()``, which changes between runs), so the same code has the
# same colour in every picture.
_SPARE_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 150, 160),  # teal
    (140, 85, 40),  # brown
    (150, 150, 0),  # olive
    (110, 20, 50),  # maroon
    (100, 190, 240),  # sky blue
    (0, 0, 0),  # black
)

_BACKGROUND = (255, 255, 255)
_INK = (20, 20, 20)
_MUTED = (90, 90, 90)
_RULE = (200, 200, 200)
_MIN_TILE_PX = 32  # a 3x3 kernel becomes 33 px, a 7x7 one 35 px: each weight clearly a square
_FRAME_PX = 3
_GAP_PX = 4
_MARGIN_PX = 14
_PANEL_GAP_PX = 28


def family_colour(code: str) -> tuple[int, int, int]:
    """The frame colour of family ``code``: the family's own (:attr:`KernelFamily.colour`), else
    a fixed spare colour derived from the code, so an unknown family never stops a picture."""
    try:
        return kernels.get(code).colour
    except KeyError:
        return _SPARE_COLOURS[zlib.crc32(str(code).encode()) % len(_SPARE_COLOURS)]


def _family_label(code: str) -> str:
    try:
        return kernels.get(code).label
    except KeyError:
        return code


# --- checking and normalising -------------------------------------------------------------------


def _check(
    original: Tensor, fitted: Tensor, codes: Sequence[str], max_tiles: int, scale: int | None
) -> None:
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
            f"original and fitted must have the same shape, got "
            f"{tuple(original.shape)} and {tuple(fitted.shape)}"
        )
    n = original.shape[0] * original.shape[1]
    if isinstance(codes, str) or len(codes) != n:
        got = repr(codes) if isinstance(codes, str) else f"{len(codes)} codes"
        raise ValueError(
            f"codes must be a sequence of {n} family codes (one per kernel, "
            f"Co*Ci = {original.shape[0]}*{original.shape[1]}), got {got}"
        )
    if isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < 1:
        raise ValueError(f"max_tiles must be an integer >= 1, got {max_tiles!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int) or scale < 1):
        raise ValueError(f"scale must be an integer >= 1 or None (automatic), got {scale!r}")


def _to_bytes(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Map ``x`` linearly so that ``lo -> 0`` and ``hi -> 255`` (broadcasting), clipped; a flat
    range (``hi == lo``) maps to mid-grey rather than dividing by zero."""
    span = hi - lo
    flat = span <= 0
    v = (x - lo) / torch.where(flat, torch.ones_like(span), span) * 255
    v = torch.where(flat, torch.full_like(v, 127.5), v)
    return v.clamp(0, 255).round().to(torch.uint8)


def _rgb_tiles(original: Tensor, fitted: Tensor) -> tuple[Tensor, Tensor]:
    """``(Co, 3, h, w)`` -> two ``(Co, h, w, 3)`` uint8 stacks. Each output channel is stretched
    by the min/max of its *original* triple, and the fitted one by the same numbers, so a colour
    means the same weight in both panels."""
    lo = original.amin(dim=(1, 2, 3), keepdim=True)
    hi = original.amax(dim=(1, 2, 3), keepdim=True)
    return (
        _to_bytes(original, lo, hi).permute(0, 2, 3, 1),
        _to_bytes(fitted, lo, hi).permute(0, 2, 3, 1),
    )


def _gray_tiles(original: Tensor, fitted: Tensor) -> tuple[Tensor, Tensor]:
    """``(N, h, w)`` -> two ``(N, h, w, 3)`` uint8 stacks, symmetric about zero: mid-grey is 0,
    white and black are ``+-max|original|`` of that kernel, shared by the fitted kernel."""
    m = original.abs().amax(dim=(1, 2), keepdim=True)
    return tuple(_to_bytes(t, -m, m)[..., None].expand(-1, -1, -1, 3) for t in (original, fitted))


# --- layout -------------------------------------------------------------------------------------


def _columns(n: int, group: int) -> int:
    """Grid columns for ``n`` tiles. Grayscale tiles come in groups of ``Ci`` per output channel;
    when a row can hold whole groups it does, so each row reads as output channels. Otherwise
    a near-square grid, preferring a width that divides ``n`` so the last row is not ragged."""
    root = math.sqrt(n)
    if 1 < group <= 2 * math.ceil(root):
        return min(n, group * max(1, round(root / group)))
    lo, hi = math.ceil(root), math.ceil(1.5 * root)
    return next((c for c in range(lo, hi + 1) if n % c == 0), lo)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where everything goes, in pixels. ``tile_box`` is the outer box of a tile, frame included."""

    tile_hw: tuple[int, int]  # inner tile size (upscaled kernel)
    cols: int
    shown: int  # tiles per panel
    total: int  # tiles the layer has
    panel_x: tuple[int, int]  # left edge of the original and the fitted panel
    panel_y: int

    @property
    def cell(self) -> tuple[int, int]:
        th, tw = self.tile_hw
        return th + 2 * _FRAME_PX + _GAP_PX, tw + 2 * _FRAME_PX + _GAP_PX

    def tile_box(self, panel: int, index: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` (end exclusive) of tile ``index`` in panel 0 (original) or 1."""
        (ch, cw), (th, tw) = self.cell, self.tile_hw
        r, c = divmod(index, self.cols)
        x0, y0 = self.panel_x[panel] + c * cw, self.panel_y + r * ch
        return x0, y0, x0 + tw + 2 * _FRAME_PX, y0 + th + 2 * _FRAME_PX


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType: fixed bitmap font
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    x0, y0, x1, y1 = font.getbbox(text)
    return x1 - x0, y1 - y0


def _line_height(font) -> int:
    return _text_size(font, "Ag|")[1] + 6


# --- text ---------------------------------------------------------------------------------------


def _family_counts(codes: Sequence[str]) -> list[tuple[str, int]]:
    """``(code, kernels)`` for the families present, in a fixed order so every picture lists
    them alike: the paper's families, other registered ones, unknown codes as they appear, and
    Plain last, as the paper writes its patterns."""
    counts: dict[str, int] = {}
    for c in codes:
        counts[c] = counts.get(c, 0) + 1
    order = [
        c
        for c in (*kernels.PAPER_FAMILIES, *kernels.codes(), *counts)
        if c in counts and not _is_plain(c)
    ]
    order = list(dict.fromkeys(order)) + [c for c in counts if _is_plain(c)]
    return [(c, counts[c]) for c in order]


def _is_plain(code: str) -> bool:
    try:
        return kernels.get(code).plain
    except KeyError:
        return False


def _header_lines(
    title: str, shape: Sequence[int], codes: Sequence[str], shown: int, total: int
) -> list[str]:
    """The text above the panels: the title (if any), then kernel count and size, the family
    counts, and ``showing N of M tiles`` when the grid is capped."""
    co, ci, h, w = shape
    kind = "RGB tiles" if ci == 3 else "grayscale tiles"
    detail = f"{co * ci} kernels {h}x{w} ({co} out x {ci} in) as {kind}:  " + " · ".join(
        f"{c} {n}" for c, n in _family_counts(codes)
    )
    if shown < total:
        detail += f"   (showing {shown} of {total} tiles)"
    return ([title] if title else []) + [detail]


# --- drawing ------------------------------------------------------------------------------------


def _frame(colours: Sequence[tuple[int, int, int]], tile: Tensor) -> Tensor:
    """``tile (th, tw, 3)`` inside a frame, ``(th+2f, tw+2f, 3)``. With several colours the frame
    is cut into equal horizontal bands, top to bottom: an RGB tile whose R, G, B kernels are of
    different families shows the R kernel's family along the top edge, G's on the middle of the
    sides and B's along the bottom; a single family gives a plain frame."""
    th, tw, _ = tile.shape
    H, W = th + 2 * _FRAME_PX, tw + 2 * _FRAME_PX
    band = torch.div(torch.arange(H) * len(colours), H, rounding_mode="floor")
    palette = torch.tensor(colours, dtype=torch.uint8)
    out = palette[band][:, None, :].expand(H, W, 3).clone()
    out[_FRAME_PX : _FRAME_PX + th, _FRAME_PX : _FRAME_PX + tw] = tile
    return out


def render_mosaic(
    original: Tensor,
    fitted: Tensor,
    codes: Sequence[str],
    *,
    title: str = "",
    max_tiles: int = 256,
    scale: int | None = None,
) -> Image.Image:
    """Draw one layer's kernels, original beside fitted, framed by family.

    Args:
        original: pretrained kernels ``(Co, Ci, h, w)`` (``Ci`` per group), any float dtype.
        fitted: the converted layer's kernels, same shape (plain kernels equal to the original).
        codes: family code of each kernel, length ``Co*Ci``, in weight order (kernel
            ``k = q*Ci + p`` for output ``q``, input ``p``); unknown codes get a spare colour.
        title: first header line, e.g. the layer name.
        max_tiles: at most this many tiles per panel (the first ones); the header then says
            ``showing N of M``. Grayscale grids are cut at whole output channels where possible.
        scale: integer upscaling of each weight to a square of ``scale`` pixels; default: the
            smallest making a tile at least 32 px.

    Returns:
        An RGB image. ``Ci == 3``: one RGB tile per output channel (channels as R, G, B),
        stretched by the min/max of the original triple. Otherwise one grayscale tile per kernel,
        mid-grey = 0, white/black = +-max|original| of that kernel. Fitted tiles use the
        original's scaling, so the two panels compare value for value.
    """
    return _render(original, fitted, codes, title=title, max_tiles=max_tiles, scale=scale)[0]


def _render(
    original: Tensor,
    fitted: Tensor,
    codes: Sequence[str],
    *,
    title: str,
    max_tiles: int,
    scale: int | None,
) -> tuple[Image.Image, _Layout]:
    """:func:`render_mosaic`, also returning where the tiles went (for tests)."""
    _check(original, fitted, codes, max_tiles, scale)
    co, ci, h, w = original.shape
    orig = torch.nan_to_num(original.detach().to("cpu", torch.float32))
    fit = torch.nan_to_num(fitted.detach().to("cpu", torch.float32))
    codes = [str(c) for c in codes]
    rgb = ci == 3
    if rgb:
        total = co
        shown = min(total, max_tiles)
        tiles = _rgb_tiles(orig[:shown], fit[:shown])
        frames = [[family_colour(c) for c in codes[3 * q : 3 * q + 3]] for q in range(shown)]
    else:
        total = co * ci
        shown = min(total, max_tiles)
        if ci < shown < total:
            shown -= shown % ci
        tiles = _gray_tiles(orig.reshape(-1, h, w)[:shown], fit.reshape(-1, h, w)[:shown])
        frames = [[family_colour(c)] for c in codes[:shown]]
    s = scale or max(1, math.ceil(_MIN_TILE_PX / max(h, w)))
    tiles = [t.repeat_interleave(s, 1).repeat_interleave(s, 2) for t in tiles]

    title_font, text_font, label_font = _font(17), _font(13), _font(14)
    header = _header_lines(title, original.shape, codes, shown, total)
    # (font, colour) per header line: the title prominent, the details muted.
    header_style = ([(title_font, _INK)] if title else []) + [(text_font, _MUTED)]
    legend = [(family_colour(c), f"{_family_label(c)}: {n}") for c, n in _family_counts(codes)]

    cols = _columns(shown, 1 if rgb else ci)
    lay = _Layout((h * s, w * s), cols, shown, total, (0, 0), 0)
    panel_h = math.ceil(shown / cols) * lay.cell[0] - _GAP_PX
    panel_w = cols * lay.cell[1] - _GAP_PX
    text_w = max(_text_size(f, t)[0] for (f, _), t in zip(header_style, header, strict=True))
    width = max(2 * panel_w + _PANEL_GAP_PX, text_w) + 2 * _MARGIN_PX
    panel_x0 = (width - 2 * panel_w - _PANEL_GAP_PX) // 2
    panel_x = (panel_x0, panel_x0 + panel_w + _PANEL_GAP_PX)
    header_h = sum(_line_height(f) for f, _ in header_style)
    panel_y = _MARGIN_PX + header_h + 6 + _line_height(label_font)
    lay = dataclasses.replace(lay, panel_x=panel_x, panel_y=panel_y)

    # Legend entries flow left to right and wrap at the picture's width.
    swatch = 14
    legend_pos, x, y = [], _MARGIN_PX, panel_y + panel_h + 14
    for colour, text in legend:
        item_w = swatch + 6 + _text_size(text_font, text)[0]
        if x > _MARGIN_PX and x + item_w > width - _MARGIN_PX:
            x, y = _MARGIN_PX, y + _line_height(text_font) + 4
        legend_pos.append((x, y, colour, text))
        x += item_w + 22
    height = y + _line_height(text_font) + _MARGIN_PX

    canvas = torch.tensor(_BACKGROUND, dtype=torch.uint8).expand(height, width, 3).clone()
    for panel, stack in enumerate(tiles):
        for i in range(shown):
            x0, y0, x1, y1 = lay.tile_box(panel, i)
            canvas[y0:y1, x0:x1] = _frame(frames[i], stack[i])
    rule_x = panel_x[0] + panel_w + _PANEL_GAP_PX // 2
    canvas[panel_y : panel_y + panel_h, rule_x] = torch.tensor(_RULE, dtype=torch.uint8)
    img = Image.fromarray(canvas.numpy(), "RGB")

    draw = ImageDraw.Draw(img)
    y = _MARGIN_PX
    for (font, fill), line in zip(header_style, header, strict=True):
        draw.text((_MARGIN_PX, y), line, font=font, fill=fill)
        y += _line_height(font)
    for panel, name in enumerate(("original", "fitted")):
        lw = _text_size(label_font, name)[0]
        draw.text(
            (panel_x[panel] + (panel_w - lw) // 2, panel_y - _line_height(label_font)),
            name,
            font=label_font,
            fill=_INK,
        )
    for x, y, colour, text in legend_pos:
        draw.rectangle((x, y + 1, x + swatch - 1, y + swatch), fill=colour)
        draw.text((x + swatch + 6, y), text, font=text_font, fill=_INK)
    return img, lay


def save_mosaic(
    path: str | os.PathLike, original: Tensor, fitted: Tensor, codes: Sequence[str], **kw
) -> Path:
    """Render with :func:`render_mosaic` (``kw`` are its options) and write a PNG to ``path``
    atomically: readers never see half a picture. Returns the path."""
    img = render_mosaic(original, fitted, codes, **kw)
    return write_atomic(path, lambda tmp: img.save(tmp, format="PNG"))


def _safe_name(layer_name: str) -> str:
    # Dots stay (``features.0`` is how PyTorch names layers); anything a file system or a shell
    # might mind becomes ``_``; a leading dot would hide the file.
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", layer_name).strip("._")
    return name[:150] or "layer"


def mosaic_path(base: str | os.PathLike, layer_name: str, n_layers: int) -> Path:
    """Where the picture of ``layer_name`` goes, given ``--mosaic base``.

    ``base`` an existing folder: ``<folder>/<layer>.png``. Otherwise one layer: ``base`` as
    given; several layers: the layer name before the suffix, ``out.png`` ->
    ``out.features.0.png`` (``.png`` added if ``base`` has no suffix). Layer names are made safe
    for file systems (characters other than letters, digits, ``. _ -`` become ``_``).
    """
    base = Path(base)
    if base.is_dir():
        return base / f"{_safe_name(layer_name)}.png"
    if n_layers == 1:
        return base
    return base.with_name(f"{base.stem}.{_safe_name(layer_name)}{base.suffix or '.png'}")
