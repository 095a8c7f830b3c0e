"""Figures: every function on odd, even, non-square, 1-, 3- and many-channel layers, zero
kernels, one kernel, channel choice; and that each figure holds what it claims (tile images and
their arrays, legend entries, rendered pixels)."""

from __future__ import annotations

import ast
import inspect
import io

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from acl_convert.report import figures
from acl_convert.report.figures import (
    akp_figure,
    kernel_mosaic,
    layer_summary,
    picture_path,
    save_png,
    to_png,
)

# (Co, Ci, h, w): RGB 7x7 and 3x3, depthwise, non-square, even, many input channels, one kernel.
SHAPES = [(4, 3, 7, 7), (5, 3, 3, 3), (6, 1, 3, 3), (2, 1, 3, 5), (3, 4, 4, 4), (2, 16, 3, 3),
          (1, 1, 3, 3)]  # fmt: skip
CODES = ("G", "P", "Lg", "M", "Tf")


def _layer(co, ci, h, w, *, zero=(), seed=0):
    """Random original kernels, fitted ones (plain kernels exact, others perturbed), family
    codes cycling through CODES, residuals, and kernels ``zero`` set to all zeros."""
    g = torch.Generator().manual_seed(seed)
    original = torch.randn(co, ci, h, w, generator=g)
    codes = [CODES[k % len(CODES)] for k in range(co * ci)]
    flat = original.view(-1, h, w)
    for k in zero:
        flat[k] = 0
    noise = 0.2 * torch.randn(co * ci, h, w, generator=g)
    plain = torch.tensor([c == "P" for c in codes])
    fitted = (flat + torch.where(plain[:, None, None], 0.0, noise)).view(co, ci, h, w)
    residuals = torch.where(plain, 0.0, torch.rand(co * ci, generator=g))
    return original, fitted, codes, residuals


def _images(fig: Figure, role: str | None = None) -> dict[str, np.ndarray]:
    """Tile images of a mosaic by gid (optionally only ``role``: original, fitted, diff)."""
    return {
        im.get_gid(): np.asarray(im.get_array())
        for ax in fig.axes
        for im in ax.get_images()
        if im.get_gid() and (role is None or im.get_gid().startswith(role + ":"))
    }


def _legend_texts(fig: Figure) -> list[str]:
    return [t.get_text() for leg in fig.legends for t in leg.get_texts()]


def _all_text(fig: Figure) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))


# --- kernel_mosaic ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_mosaic_tiles_and_difference(shape):
    co, ci, h, w = shape
    original, fitted, codes, residuals = _layer(*shape, zero=[0])
    fig = kernel_mosaic(original, fitted, codes, residuals, title="layer")
    rgb = ci == 3
    units = co if rgb else co * ci
    assert len(_images(fig)) == units * (5 if rgb else 3)
    diffs = _images(fig, "diff")
    assert len(diffs) == co * ci  # one difference tile per kernel, RGB or not
    for gid, array in diffs.items():
        q, p = map(int, gid.split(":")[1:])
        np.testing.assert_allclose(array, (original[q, p] - fitted[q, p]).numpy(), atol=1e-6)
    # The fitted tile is the fitted kernel (RGB: composite on the original's scale).
    for gid, array in _images(fig, "fitted").items():
        q = int(gid.split(":")[1])
        if not rgb:
            p = int(gid.split(":")[2])
            np.testing.assert_allclose(array, fitted[q, p].numpy(), atol=1e-6)
        else:
            assert array.shape == (h, w, 3) and array.min() >= 0 and array.max() <= 1
    assert any(t.startswith("zero (all-zero original): 1") for t in _legend_texts(fig))
    assert to_png(fig).startswith(b"\x89PNG")


def test_mosaic_zero_kernels_are_not_mean():
    original, fitted, _, residuals = _layer(2, 1, 3, 3, zero=[0, 1])
    fig = kernel_mosaic(original, fitted, ["M", "M"], residuals)
    assert _legend_texts(fig) == ["zero (all-zero original): 2"]
    assert "0  zero" in _all_text(fig) and "M " not in _all_text(fig)


def test_mosaic_legend_explains_every_family_with_counts():
    original, fitted, codes, residuals = _layer(4, 3, 5, 5)
    fig = kernel_mosaic(original, fitted, codes, residuals)
    counts = {c: codes.count(c) for c in set(codes)}
    texts = _legend_texts(fig)
    for code, n in counts.items():
        name = figures.kernels.get(code).name
        assert f"{code} {name}: {n}" in texts
    assert not any(t.startswith("zero") for t in texts)


def test_mosaic_channels_and_cap():
    original, fitted, codes, residuals = _layer(10, 3, 3, 3)
    fig = kernel_mosaic(original, fitted, codes, residuals, channels=[7, 2])
    assert set(_images(fig, "original")) == {"original:7", "original:2"}
    assert "showing output channels 7, 2" in _all_text(fig)
    fig = kernel_mosaic(original, fitted, codes, residuals, channels=[5])
    assert "showing output channel 5." in _all_text(fig)

    fig = kernel_mosaic(original, fitted, codes, residuals, max_tiles=4)
    assert set(_images(fig, "original")) == {f"original:{q}" for q in range(4)}
    assert "showing 4 of 10 output channels (output channels 0-3)" in _all_text(fig)

    fig = kernel_mosaic(original, fitted, codes, residuals)
    assert "showing" not in _all_text(fig)


def test_mosaic_cap_keeps_whole_channels_of_grayscale_layers():
    original, fitted, codes, residuals = _layer(5, 4, 3, 3)
    fig = kernel_mosaic(original, fitted, codes, residuals, max_tiles=6)
    assert set(_images(fig, "original")) == {f"original:0:{p}" for p in range(4)}
    assert "showing 4 of 20 kernels" in _all_text(fig)
    # Fewer tiles than one channel's kernels: the first kernels of that channel.
    fig = kernel_mosaic(original, fitted, codes, residuals, max_tiles=3, channels=[4])
    assert set(_images(fig, "original")) == {f"original:4:{p}" for p in range(3)}


def test_mosaic_rendered_pixels():
    """A centre spike fitted by nothing: the original tile's centre is white (its max), the
    fitted one's black, the difference at its most positive colour; a plain kernel's
    difference is white (no difference)."""
    original = torch.zeros(2, 1, 3, 3)
    original[:, 0, 1, 1] = 1.0
    fitted = original.clone()
    fitted[0] = 0.0
    fig = kernel_mosaic(original, fitted, ["G", "P"], torch.tensor([1.0, 0.0]))
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    height = pixels.shape[0]

    def centre(gid: str) -> np.ndarray:
        im = next(i for ax in fig.axes for i in ax.get_images() if i.get_gid() == gid)
        box = im.get_window_extent()
        return pixels[height - int(round((box.y0 + box.y1) / 2)), int(round((box.x0 + box.x1) / 2))]

    assert (centre("original:0:0") > 240).all()
    assert (centre("fitted:0:0") < 15).all()
    cmap = colormaps[figures.DIFF_CMAP]
    purple = np.array(cmap(1.0)[:3]) * 255
    assert np.abs(centre("diff:0:0") - purple).max() < 12
    white = np.array(cmap(0.5)[:3]) * 255
    assert np.abs(centre("diff:1:0") - white).max() < 12


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(fitted=torch.zeros(2, 3, 3, 3)), "same shape"),
        (dict(codes=["G"]), "codes must be"),
        (dict(residuals=torch.zeros(3)), "residuals must be"),
        (dict(channels=[4]), "channels must be"),
        (dict(channels=[]), "channels must be"),
        (dict(max_tiles=0), "max_tiles"),
    ],
)
def test_mosaic_rejects_bad_input(kwargs, message):
    original, fitted, codes, residuals = _layer(2, 2, 3, 3)
    args = dict(original=original, fitted=fitted, codes=codes, residuals=residuals)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        kernel_mosaic(args.pop("original"), args.pop("fitted"), args.pop("codes"),
                      args.pop("residuals"), **args)  # fmt: skip


def test_no_pyplot():
    """pyplot keeps global figure state; the module builds Figures directly instead."""
    imported = {
        alias.name
        for node in ast.walk(ast.parse(inspect.getsource(figures)))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    } | {
        node.module
        for node in ast.walk(ast.parse(inspect.getsource(figures)))
        if isinstance(node, ast.ImportFrom)
    }
    assert not any("pyplot" in name for name in imported if name)


# --- layer_summary ------------------------------------------------------------------------------


def _summary_inputs(n: int, n_zero: int):
    g = torch.Generator().manual_seed(1)
    best = torch.rand(n, generator=g)
    best[:n_zero] = 0
    codes = ["M"] * n_zero + ["G" if b <= 0.3 else "P" for b in best[n_zero:].tolist()]
    chosen = torch.where(torch.tensor([c == "G" for c in codes]), best, torch.zeros(n))
    zero = torch.arange(n) < n_zero
    return codes, chosen, best, zero


@pytest.mark.parametrize("n, n_zero", [(200, 20), (1, 0), (3, 3)])
def test_layer_summary(n, n_zero):
    codes, chosen, best, zero = _summary_inputs(n, n_zero)
    fig = layer_summary("conv<1>", codes, chosen, best, threshold=0.3, compact_factor=0.25,
                        output_error={"fitted": 0.05, "resolved": 0.03}, zero=zero)  # fmt: skip
    bars, _, cum = fig.axes if n > n_zero else (*fig.axes, None)
    labels = [t.get_text() for t in bars.get_yticklabels()]
    expected = (set(codes) - {"M"}) | {"zero"} if n_zero else set(codes)
    assert len(bars.patches) == len(labels) == len(expected)
    if n_zero:
        assert labels[-1] == "zero (all-zero original)" and "M mean" not in labels
        assert bars.patches[-1].get_width() == n_zero
    # The cumulative count ends at the number of non-zero kernels; the threshold is marked.
    if n == n_zero:
        assert "nothing to fit" in _all_text(fig)
    else:
        step = next(ln for ln in cum.get_lines() if ln.get_label().startswith("kernels with"))
        assert step.get_ydata()[-1] == n - n_zero
        assert any(list(line.get_xdata()) == [0.3, 0.3] for line in cum.get_lines())
    title = fig.get_suptitle()
    assert "compact factor 0.250" in title and "resolved 0.0300" in title
    assert to_png(fig).startswith(b"\x89PNG")


def test_layer_summary_without_threshold_or_error():
    codes, chosen, best, _ = _summary_inputs(50, 0)
    fig = layer_summary("c", codes, chosen, best, compact_factor=0.1)
    assert not any(
        list(line.get_xdata()) == [0.3, 0.3] for ax in fig.axes for line in ax.get_lines()
    )
    assert "output error" not in fig.get_suptitle()


def test_layer_summary_checks_lengths():
    with pytest.raises(ValueError, match="best_residual"):
        layer_summary("c", ["G", "P"], torch.zeros(2), torch.zeros(3), compact_factor=0.0)


# --- akp_figure ---------------------------------------------------------------------------------


def _akps(n: int, code: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    p = len(figures.kernels.get(code).param_names)
    return torch.rand(n, p, generator=g) * 3 + 0.5


def test_akp_figure_none_without_parameters():
    assert akp_figure("c", {}, (3, 3)) is None
    assert akp_figure("c", {"M": torch.zeros(5, 0)}, (3, 3)) is None
    assert akp_figure("c", {"G": torch.zeros(0, 4)}, (3, 3)) is None


def test_akp_figure_panels():
    akps = {"G": _akps(30, "G"), "Lg": _akps(5, "Lg"), "Lt": _akps(4, "Lt"),
            "Tf": _akps(6, "Tf"), "Ts": _akps(2, "Ts"), "M": torch.zeros(3, 0)}  # fmt: skip
    akps["G"][0, 0] = 500.0  # a ramp: drawn on the rim, not lost
    fig = akp_figure("conv", akps, (7, 7))
    polar = [ax for ax in fig.axes if ax.name == "polar"]
    assert len(polar) == 2  # Gabor orientation/wavelength and the TGD rose
    dots = [c for c in polar[0].collections]
    assert sum(len(c.get_offsets()) for c in dots) == 30
    rose = polar[1]
    assert sum(p.get_height() for p in rose.patches if p.get_height() > 0) == 8
    text = _all_text(fig)
    assert "LoG / LoT" in text and "phase psi" in text


def test_akp_figure_other_families_get_histograms():
    fig = akp_figure("conv", {"X": torch.rand(10, 2)}, (5, 5))
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles == ["X: p0", "X: p1"]


# --- files --------------------------------------------------------------------------------------


def test_save_png_atomic(tmp_path):
    original, fitted, codes, residuals = _layer(2, 1, 3, 3)
    path = tmp_path / "m.png"
    path.write_bytes(b"old")
    save_png(kernel_mosaic(original, fitted, codes, residuals), path)
    assert Image.open(io.BytesIO(path.read_bytes())).format == "PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]


def test_picture_path(tmp_path):
    base = tmp_path / "out.png"
    assert picture_path(base, "features.0", 1) == base
    assert picture_path(base, "features.0", 3) == tmp_path / "out.features.0.png"
    assert picture_path(tmp_path / "out", "conv1", 2) == tmp_path / "out.conv1.png"
    assert picture_path(tmp_path, "features.3", 2) == tmp_path / "features.3.png"
    assert picture_path(tmp_path, "features.3", 1) == tmp_path / "features.3.png"
    assert picture_path(base, "a/b:c d", 2) == tmp_path / "out.a_b_c_d.png"
    assert picture_path(tmp_path, "..", 2) == tmp_path / "layer.png"  # never a hidden/odd name
    made = picture_path(f"{tmp_path}/new/", "conv1", 2)  # a trailing slash makes a folder
    assert made == tmp_path / "new" / "conv1.png" and made.parent.is_dir()
