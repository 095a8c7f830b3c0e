"""Render a gallery of the kernel families for the docs (docs/img/kernels.png).

    python scripts/plot_kernels.py docs/img/kernels.png

One row per family with a few AKP settings on a 15x15 grid, then one row of every family at 7x7
(odd: TGD2nd and LoT have their origin term) and one at 6x6 (even: no origin sample). Colours are
diverging, blue < 0 < red, white = 0, and every tile is scaled by its own max |value|, except that
the origin term of TGD2nd and LoT (minus the sum of all other samples) is left out of the scale and
shown saturated: it would otherwise wash out the rest of the kernel. Only torch and Pillow are
needed (matplotlib is not a dependency).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from acl_convert import kernels

TILE = 120  # px per kernel tile
PAD = 10
LABEL_W = 120
CAPTION_H = 30
FONT_SIZE = 11

#: Families whose odd-size origin sample is -sum(others) and would dominate the colour scale.
ORIGIN_TERM = {"Ts", "Lt"}

#: ASCII short names: Pillow's default font has no Greek glyphs.
SHORT = {
    "lambda": "lam",
    "theta": "th",
    "psi": "psi",
    "sigma": "sig",
    "gamma": "gam",
    "gamma1": "g1",
    "gamma2": "g2",
}

PI = math.pi
#: (code, [AKPs ...]) for the 15x15 rows: angles in rad, lengths in px.
GALLERY = [
    (
        "G",
        [
            (8.0, 0.0, 0.0, 3.0),
            (8.0, PI / 4, 0.0, 3.0),
            (5.0, PI / 2, PI / 2, 2.5),
            (12.0, 2 * PI / 3, PI, 4.0),
            (6.0, PI / 6, 0.0, 4.0),
            (10.0, 0.0, PI / 2, 1.5),
        ],
    ),
    ("Lg", [(1.0,), (1.5,), (2.0,), (2.5,), (3.0,), (4.0,)]),
    (
        "Tf",
        [
            (0.0, 3.0, 3.0),
            (PI / 4, 3.0, 3.0),
            (PI / 2, 2.0, 6.0),
            (PI, 3.0, 3.0),
            (2 * PI / 3, 6.0, 2.0),
            (0.0, 1.0, 8.0),
        ],
    ),
    (
        "Ts",
        [(0.0, 3.0), (PI / 4, 3.0), (PI / 2, 5.0), (2 * PI / 3, 8.0), (0.0, 1.5), (PI / 6, 12.0)],
    ),
    ("Lt", [(1.0,), (2.0,), (3.0,), (4.0,), (6.0,), (9.0,)]),
]
#: One instance of every family for the small-size rows.
SMALL = [
    ("G", (4.0, PI / 4, 0.0, 1.5)),
    ("Lg", (1.0,)),
    ("Tf", (PI / 6, 1.5, 2.5)),
    ("Ts", (PI / 6, 2.0)),
    ("Lt", (1.5,)),
    ("M", ()),
]


def colourise(k: torch.Tensor, skip_origin: bool = False) -> Image.Image:
    """Map a kernel ``(h, w)`` to RGB: blue (-max|k|) .. white (0) .. red (+max|k|).

    ``skip_origin``: take max|k| over all samples but the centre one (odd sizes only); the centre
    then saturates.
    """
    h, w = k.shape
    rest = k.abs().clone()
    if skip_origin and h % 2 and w % 2 and h * w > 1:
        rest[h // 2, w // 2] = 0
    scale = rest.max()
    t = (k / scale if scale > 0 else k).clamp(-1, 1)
    pos, neg = t.clamp(min=0), (-t).clamp(min=0)
    red = torch.tensor([178.0, 24.0, 43.0])
    blue = torch.tensor([33.0, 102.0, 172.0])
    white = torch.full((3,), 255.0)
    rgb = white + pos[..., None] * (red - white) + neg[..., None] * (blue - white)
    arr = rgb.round().to(torch.uint8).contiguous()
    return Image.frombytes("RGB", (w, h), bytes(arr.flatten().tolist()))


def caption(code: str, akp: tuple[float, ...]) -> list[str]:
    fam = kernels.get(code)
    parts = [
        f"{SHORT.get(n, n)}={v:.2f}".rstrip("0").rstrip(".")
        for n, v in zip(fam.param_names, akp, strict=True)
    ]
    parts = [f"{p}," for p in parts[:-1]] + parts[-1:]
    if not parts:
        return ["(no AKPs)"]
    half = (len(parts) + 1) // 2
    return [" ".join(parts[:half]), " ".join(parts[half:])]


def render(out: Path) -> None:
    font = ImageFont.load_default(size=FONT_SIZE)
    rows: list[tuple[list[str], list[tuple[str, tuple[float, ...], int]]]] = []
    for code, settings in GALLERY:
        fam = kernels.get(code)
        rows.append(([f"{code}  {fam.name}", "15x15"], [(code, a, 15) for a in settings]))
    for n, note in ((7, "odd"), (6, "even")):
        rows.append(([f"all  {n}x{n}", f"({note})"], [(c, a, n) for c, a in SMALL]))

    cols = max(len(r[1]) for r in rows)
    title_h = 52
    width = LABEL_W + cols * (TILE + PAD) + PAD
    height = title_h + len(rows) * (TILE + CAPTION_H + PAD)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    notes = [
        "acl_convert kernel families: blue < 0 < red, white = 0; each tile scaled by its own "
        "max |value|.",
        "Ts, Lt at odd sizes: the origin sample (= -sum of the others) is left out of the scale "
        "and saturates.",
        "x runs down the rows, y along the columns; theta is measured from the row axis; "
        "lengths in px, angles in rad.",
    ]
    for li, line in enumerate(notes):
        draw.text((PAD, 6 + 14 * li), line, font=font, fill="black")

    for r, (label, tiles) in enumerate(rows):
        top = title_h + r * (TILE + CAPTION_H + PAD)
        for li, line in enumerate(label):
            draw.text((PAD, top + TILE // 2 - 12 + 14 * li), line, font=font, fill="black")
        for c, (code, akp, n) in enumerate(tiles):
            fam = kernels.get(code)
            k = fam(torch.tensor(akp, dtype=torch.float64), n, n)
            cell = TILE // n
            tile = colourise(k, code in ORIGIN_TERM)
            tile = tile.resize((cell * n, cell * n), Image.Resampling.NEAREST)
            left = LABEL_W + c * (TILE + PAD)
            off = (TILE - cell * n) // 2
            img.paste(tile, (left + off, top + off))
            draw.rectangle(
                [left + off - 1, top + off - 1, left + off + cell * n, top + off + cell * n],
                outline=(160, 160, 160),
            )
            lines = caption(code, akp)
            if r >= len(GALLERY):  # mixed rows: say which family each tile is
                lines = [f"{code}: {lines[0]}", *lines[1:]]
            for li, line in enumerate(lines):
                draw.text((left, top + TILE + 2 + 13 * li), line, font=font, fill=(60, 60, 60))

    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="PNG file to write (overwritten)")
    render(parser.parse_args().out)


if __name__ == "__main__":
    main()
