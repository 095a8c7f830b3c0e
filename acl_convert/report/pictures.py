"""The pictures of a conversion: each converted layer's figures (:mod:`.figures`) from its
:class:`~acl_convert.conversion.LayerResult`, and the HTML page (:mod:`.html`) that holds them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from matplotlib.figure import Figure
from torch import Tensor

from ..errors import UsageError, option
from .figures import akp_figure, kernel_mosaic, layer_summary, to_png, zero_kernels
from .html import render_html

if TYPE_CHECKING:
    from ..conversion import Conversion, LayerResult

__all__ = [
    "PictureOptions",
    "layer_mosaic",
    "layer_summary_figure",
    "layer_akp_figure",
    "html_report",
    "to_png",
]


@dataclass(frozen=True)
class PictureOptions:
    """What the pictures of a conversion show.

    Attributes:
        channels: the output channels a kernel picture shows (None: the first ones).
        max_tiles: at most this many kernels (RGB layers: output channels) per kernel picture.
        figure_layers: how many converted layers get figures in the HTML report, the first
            ones (-1: all); figures take about 2 s per layer and 200 kB in the page.
    """

    channels: tuple[int, ...] | None = None
    max_tiles: int = 64
    figure_layers: int = 8

    @classmethod
    def parse(cls, channels: str | None, max_tiles: int, figure_layers: int) -> PictureOptions:
        """From the command line's text values; a bad value is a :class:`UsageError`."""
        picked = None
        if channels is not None:
            try:
                picked = tuple(int(c) for c in channels.split(",") if c.strip())
            except ValueError:
                raise UsageError(
                    f"{option('mosaic_channels')} must be output channel numbers separated by "
                    f"commas, e.g. 0,5,9; got {channels!r}"
                ) from None
            if not picked or min(picked) < 0:
                raise UsageError(f"{option('mosaic_channels')} needs channel numbers >= 0")
        if max_tiles < 1:
            raise UsageError(f"{option('mosaic_tiles')} must be at least 1, got {max_tiles}")
        if figure_layers < -1:
            raise UsageError(f"{option('figure_layers')} must be -1 (all), 0 or more")
        return cls(picked, max_tiles, figure_layers)

    @property
    def mosaic(self) -> dict:
        """Keyword arguments of :func:`layer_mosaic`."""
        return {"channels": self.channels, "max_tiles": self.max_tiles}

    def layers(self, conversion: Conversion) -> list[str]:
        """The converted layers that get figures in the HTML report."""
        names = [r.layer.name for r in conversion.layers]
        return names if self.figure_layers < 0 else names[: self.figure_layers]


def _per_kernel(res: LayerResult, per_row: Tensor) -> Tensor:
    """A value per fitted row ``(rows,)`` as one per kernel: a channel-tied fit has one row per
    output channel, shared by its ``Ci/groups`` kernels."""
    return per_row.repeat_interleave(res.acl.num_kernels // len(per_row))


def _chosen_residual(res: LayerResult) -> Tensor:
    return _per_kernel(res, res.selection.residual.double())


def layer_mosaic(
    res: LayerResult,
    state_dict: dict[str, Tensor],
    *,
    channels: Sequence[int] | None = None,
    max_tiles: int = 64,
) -> Figure:
    """Original | fitted | difference of a converted layer's kernels (see
    :func:`.figures.kernel_mosaic`)."""
    original = state_dict[res.layer.weight_key].detach().float()
    with torch.no_grad():
        fitted = res.acl.synthesize().detach().float().cpu()
    return kernel_mosaic(
        original,
        fitted,
        res.acl.codes,
        _chosen_residual(res),
        title=f"{res.layer.name}   compact factor {res.compact_factor:.3f}",
        channels=channels,
        max_tiles=max_tiles,
    )


def layer_summary_figure(res: LayerResult, state_dict: dict[str, Tensor], threshold: float | None):
    """Families, residuals against the threshold, compact factor and output error of a layer
    (see :func:`.figures.layer_summary`)."""
    fit = res.fit
    best = fit.residuals.min(1).values if fit.residuals.shape[1] else fit.residuals[:, 0]
    joint = res.joint
    error = None
    if joint is not None:
        error = {"fitted": joint.relative_error(False), "resolved": joint.relative_error()}
    return layer_summary(
        res.layer.name,
        res.acl.codes,
        _chosen_residual(res),
        _per_kernel(res, best.double()),
        threshold=threshold,
        compact_factor=res.compact_factor,
        output_error=error,
        zero=zero_kernels(state_dict[res.layer.weight_key]),
    )


def layer_akp_figure(res: LayerResult) -> Figure | None:
    """Where the layer's ACKs sit in AKP space (see :func:`.figures.akp_figure`), or None."""
    acl = res.acl
    akps = {
        c: acl.kernel_akps(c).detach().cpu()
        for c in acl.codes_present()
        if c != "P" and c in acl.akp
    }
    return akp_figure(res.layer.name, akps, res.layer.kernel_size)


def html_report(
    conversion: Conversion,
    layers: Sequence[str] | None = None,
    options: PictureOptions = PictureOptions(),
) -> str:
    """The conversion as one self-contained HTML page: the summary table, fidelity, and for each
    layer of ``layers`` (default: ``options.layers``) its summary, AKP and kernel figures."""
    state = conversion.source.state_dict
    wanted = set(options.layers(conversion) if layers is None else layers)
    threshold = None if conversion.settings.budget else conversion.settings.threshold
    images = {}
    for res in conversion.layers:
        if res.layer.name not in wanted:
            continue
        figs = [
            ("families and residuals", layer_summary_figure(res, state, threshold)),
            ("analytic kernel parameters", layer_akp_figure(res)),
            ("original | fitted | difference", layer_mosaic(res, state, **options.mosaic)),
        ]
        images[res.layer.name] = [(cap, to_png(fig)) for cap, fig in figs if fig is not None]
    source = conversion.source.file or "a model in memory"
    return render_html(conversion.report, images, title=f"acl-convert: {source}")
