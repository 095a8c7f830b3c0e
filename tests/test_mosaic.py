"""Tests of the kernel pictures (``--mosaic``): sizes, frame colours, shared scaling, the cap,
unknown families, atomic saving and file naming.

Pixel positions come from the layout the renderer used (``mosaic._render``), so the tests do not
depend on font metrics.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from acl_convert import kernels
from acl_convert.errors import UserError
from acl_convert.report import mosaic
from acl_convert.report.mosaic import (
    family_colour,
    mosaic_path,
    render_mosaic,
    save_mosaic,
)

F = mosaic._FRAME_PX


def render(original, fitted, codes, **kw):
    kw = {"title": "", "max_tiles": 256, "scale": None, **kw}
    return mosaic._render(original, fitted, codes, **kw)


def pixel(img, x, y):
    return img.getpixel((x, y))[:3]


def panel_crop(img, lay, panel):
    x0, y0, _, _ = lay.tile_box(panel, 0)
    x1 = lay.tile_box(panel, min(lay.cols, lay.shown) - 1)[2]  # end of the first row
    y1 = lay.tile_box(panel, lay.shown - 1)[3]  # bottom of the last row
    return img.crop((x0, y0, x1, y1)).tobytes()


# --- modes and sizes ----------------------------------------------------------------------------


def test_rgb_composite_for_three_input_channels():
    W = torch.zeros(5, 3, 7, 7)
    W[0, 0] = 1.0  # output 0: only its R kernel is non-zero -> a pure red tile
    W[1, 2] = 1.0  # output 1: only B -> pure blue
    img, lay = render(W, W, ["G"] * 15)
    assert img.mode == "RGB"
    assert lay.shown == lay.total == 5  # one tile per output channel, not per kernel
    assert lay.tile_hw == (35, 35)  # 7x7 upscaled by 5: at least 32 px
    x0, y0, x1, y1 = lay.tile_box(0, 0)
    assert (x1 - x0, y1 - y0) == (35 + 2 * F, 35 + 2 * F)
    assert pixel(img, x0 + F + 10, y0 + F + 10) == (255, 0, 0)
    x0, y0, _, _ = lay.tile_box(0, 1)
    assert pixel(img, x0 + F + 10, y0 + F + 10) == (0, 0, 255)
    assert img.width >= 2 * lay.cols * (35 + 2 * F)


def test_grayscale_tiles_otherwise():
    W = torch.zeros(4, 16, 3, 3)
    W[0, 0, 0, 0], W[0, 0, 0, 1] = 2.0, -2.0  # kernel 0: +max, -max, and zeros elsewhere
    img, lay = render(W, W, ["P"] * 64, scale=10)
    assert img.mode == "RGB"
    assert lay.shown == 64 and lay.tile_hw == (30, 30)
    assert lay.cols == 16  # one output channel (16 kernels) per row
    x0, y0, _, _ = lay.tile_box(0, 0)
    assert pixel(img, x0 + F + 5, y0 + F + 5) == (255, 255, 255)  # +max|w| -> white
    assert pixel(img, x0 + F + 15, y0 + F + 5) == (0, 0, 0)  # -max|w| -> black
    assert pixel(img, x0 + F + 25, y0 + F + 25) == (128, 128, 128)  # 0 -> mid-grey
    x0, y0, _, _ = lay.tile_box(0, 1)  # an all-zero kernel: mid-grey, no division by zero
    assert pixel(img, x0 + F + 5, y0 + F + 5) == (128, 128, 128)


def test_explicit_scale_and_tiny_kernels():
    W = torch.randn(2, 1, 1, 1)
    img, lay = render(W, W, ["M", "P"], scale=3)
    assert lay.tile_hw == (3, 3)
    img, lay = render(W, W, ["M", "P"])
    assert lay.tile_hw[0] >= 21


# --- frames -------------------------------------------------------------------------------------


def test_frame_colours_are_the_family_colours():
    codes = ["G", "Lg", "Lt", "Tf", "Ts", "M", "P", "G"] * 2
    W = torch.randn(2, 8, 5, 5)
    img, lay = render(W, W * 0.5, codes)
    for panel in (0, 1):
        for i, code in enumerate(codes):
            x0, y0, x1, y1 = lay.tile_box(panel, i)
            for x, y in ((x0, y0), (x1 - 1, y1 - 1), (x0 + F - 1, (y0 + y1) // 2)):
                assert pixel(img, x, y) == family_colour(code), (panel, i, code)


def test_paper_colours():
    assert family_colour("G") == (220, 30, 30)  # red
    assert family_colour("P") == (255, 140, 0)  # orange
    table = [family_colour(c) for c in (*kernels.PAPER_FAMILIES, "P")]
    assert len(set(table)) == len(table)


def test_mixed_rgb_tile_has_a_banded_frame():
    W = torch.randn(2, 3, 7, 7)
    img, lay = render(W, W, ["G", "P", "Tf", "Lg", "Lg", "Lg"])
    x0, y0, x1, y1 = lay.tile_box(0, 0)
    assert pixel(img, x0 + 5, y0) == family_colour("G")  # top edge: the R kernel's family
    assert pixel(img, x0, (y0 + y1) // 2) == family_colour("P")  # middle of the sides: G's
    assert pixel(img, x0 + 5, y1 - 1) == family_colour("Tf")  # bottom edge: B's
    x0, y0, x1, y1 = lay.tile_box(0, 1)
    edge = [pixel(img, x0, y) for y in range(y0, y1)]
    assert set(edge) == {family_colour("Lg")}  # one family: a plain frame


def test_unknown_family_gets_a_stable_colour():
    colour = family_colour("Zz")
    assert len(colour) == 3 and all(0 <= v <= 255 for v in colour)
    assert family_colour("Zz") == colour
    W = torch.randn(3, 1, 3, 3)
    img, lay = render(W, W, ["Zz", "G", "P"])
    x0, y0, _, _ = lay.tile_box(0, 0)
    assert pixel(img, x0, y0) == colour


# --- comparing the panels -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 3, 7, 7), (4, 16, 3, 3), (10, 1, 3, 3)])
def test_identical_kernels_give_identical_panels(shape):
    W = torch.randn(*shape)
    codes = ["G", "P"] * (shape[0] * shape[1] // 2)
    img, lay = render(W, W.clone(), codes)
    assert panel_crop(img, lay, 0) == panel_crop(img, lay, 1)
    img, lay = render(W, W + 1, codes)
    assert panel_crop(img, lay, 0) != panel_crop(img, lay, 1)


def test_fitted_uses_the_original_scaling():
    W = torch.zeros(1, 1, 3, 3)
    W[0, 0, 0, 0] = 4.0
    img, lay = render(W, W / 2, ["G"], scale=10)
    x0, y0, _, _ = lay.tile_box(1, 0)
    assert pixel(img, x0 + F + 5, y0 + F + 5) == (191, 191, 191)  # 127.5 + 127.5/2, not white


# --- the cap and the header ---------------------------------------------------------------------


def test_cap_shows_the_first_tiles_and_says_so():
    W = torch.randn(300, 1, 3, 3)
    img, lay = render(W, W, ["G"] * 300, max_tiles=100)
    assert (lay.shown, lay.total) == (100, 300)
    small, _ = render(W[:100], W[:100], ["G"] * 100)
    assert img.height == small.height  # the picture is as big as 100 tiles, not 300
    lines = mosaic._header_lines("features.3", W.shape, ["G"] * 300, 100, 300)
    assert lines[0] == "features.3"
    assert "showing 100 of 300" in lines[-1] and "300 kernels 3x3" in lines[-1]
    assert "showing" not in mosaic._header_lines("x", W.shape, ["G"] * 300, 300, 300)[-1]


def test_cap_counts_rgb_tiles_and_keeps_whole_output_channels():
    W = torch.randn(10, 3, 7, 7)
    _, lay = render(W, W, ["G"] * 30, max_tiles=4)
    assert (lay.shown, lay.total) == (4, 10)
    W = torch.randn(20, 16, 3, 3)
    _, lay = render(W, W, ["G"] * 320, max_tiles=50)
    assert (lay.shown, lay.total) == (48, 320)  # three whole output channels


def test_header_counts_families_with_plain_last():
    codes = ["P", "P", "Tf", "G", "Zz", "G"]
    line = mosaic._header_lines("", (2, 3, 7, 7), codes, 2, 2)[-1]
    assert line.endswith("G 2 · Tf 1 · Zz 1 · P 2")
    assert mosaic._header_lines("", (2, 3, 7, 7), codes, 2, 2) == [line]  # no empty title line


# --- input checks -------------------------------------------------------------------------------


def test_bad_inputs_are_refused_with_the_shapes():
    W = torch.randn(2, 3, 7, 7)
    with pytest.raises(ValueError, match=r"same shape.*\(2, 3, 7, 7\).*\(2, 3, 5, 5\)"):
        render_mosaic(W, torch.randn(2, 3, 5, 5), ["G"] * 6)
    with pytest.raises(ValueError, match="sequence of 6 family codes.*got 5"):
        render_mosaic(W, W, ["G"] * 5)
    with pytest.raises(ValueError, match=r"\(Co, Ci, h, w\)"):
        render_mosaic(W[0], W[0], ["G"] * 3)
    with pytest.raises(ValueError, match="max_tiles"):
        render_mosaic(W, W, ["G"] * 6, max_tiles=0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        render_mosaic(W.numpy(), W, ["G"] * 6)


def test_non_finite_and_non_contiguous_inputs():
    W = torch.randn(3, 7, 7, 4).permute(0, 3, 1, 2)[:, :3]  # non-contiguous (3, 3, 7, 7)
    F_ = W.clone()
    F_[0, 0, 0, 0] = float("nan")
    assert render_mosaic(W, F_, ["G"] * 9).mode == "RGB"


# --- saving and naming --------------------------------------------------------------------------


def test_save_mosaic_writes_a_png_atomically(tmp_path):
    W = torch.randn(4, 3, 7, 7)
    out = save_mosaic(tmp_path / "conv1.png", W, W, ["G"] * 12, title="conv1")
    assert out == tmp_path / "conv1.png"
    assert [p.name for p in tmp_path.iterdir()] == ["conv1.png"]  # no temporary left behind
    with Image.open(out) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        img.verify()


def test_save_mosaic_leaves_nothing_on_failure(tmp_path, monkeypatch):
    def broken(self, *args, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    W = torch.randn(4, 3, 7, 7)
    with pytest.raises(UserError, match="cannot write .*conv1.png .disk full"):
        save_mosaic(tmp_path / "conv1.png", W, W, ["G"] * 12)
    assert list(tmp_path.iterdir()) == []


def test_mosaic_path(tmp_path):
    base = tmp_path / "out.png"
    assert mosaic_path(base, "features.0", 1) == base
    assert mosaic_path(base, "features.0", 3) == tmp_path / "out.features.0.png"
    assert mosaic_path(tmp_path / "out", "conv1", 2) == tmp_path / "out.conv1.png"
    assert mosaic_path(tmp_path, "features.3", 2) == tmp_path / "features.3.png"
    assert mosaic_path(tmp_path, "features.3", 1) == tmp_path / "features.3.png"
    assert mosaic_path(base, "a/b:c d", 2) == tmp_path / "out.a_b_c_d.png"
    assert mosaic_path(tmp_path, "..", 2) == tmp_path / "layer.png"  # never a hidden/odd name


def test_rgb_fitted_uses_the_original_scaling():
    W = torch.zeros(1, 3, 7, 7)
    W[0, 0] = 1.0
    img, lay = render(W, W / 2, ["G"] * 3)
    x0, y0, _, _ = lay.tile_box(1, 0)
    assert pixel(img, x0 + F + 10, y0 + F + 10) == (128, 0, 0)  # half red, not stretched to 255
