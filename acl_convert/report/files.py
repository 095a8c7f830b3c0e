"""Writing a conversion's files together: the AnaNN, the JSON report, the kernel pictures and the
HTML page, all or none.

Every file goes to a temporary name beside its final one first, and all are renamed together at
the end with SIGINT and SIGTERM held (:func:`acl_convert.io.outputs.atomic_paths`), so an error
or an interrupt leaves the old files or all the new ones, nothing half-written. The caller checks
the paths beforehand (:class:`~acl_convert.io.outputs.OutputPlan`), before any long work.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io.anann import save_anann
from ..io.outputs import atomic_paths

if TYPE_CHECKING:
    from ..conversion import Conversion
    from .pictures import PictureOptions

__all__ = ["write_conversion"]


def write_conversion(
    conversion: Conversion,
    anann: str | Path,
    report: str | Path,
    *,
    pictures: Mapping[str, str | Path] | None = None,
    html: str | Path | None = None,
    doc: dict[str, Any] | None = None,
    options: PictureOptions | None = None,
) -> list[Path]:
    """Write ``conversion``'s files.

    Args:
        conversion: what :func:`acl_convert.convert_checkpoint` returned.
        anann: the AnaNN checkpoint (docs/anann-format.md).
        report: the JSON report (docs/report-format.md).
        pictures: ``{layer name: PNG path}``: original | fitted | difference of those layers'
            kernels (:func:`.pictures.layer_mosaic`); none by default.
        html: the self-contained HTML report (:func:`.pictures.html_report`), or None.
        doc: the report document when the caller already built it (else built here).
        options: what the pictures show (:class:`.pictures.PictureOptions`).

    Returns:
        The paths written, in the order above.
    """
    pictures = dict(pictures or {})
    doc = conversion.report if doc is None else doc
    finals = [Path(anann), Path(report), *map(Path, pictures.values())]
    finals += [Path(html)] if html is not None else []
    with atomic_paths(finals) as tmps:
        save_anann(tmps[0], conversion.tensors(), conversion.header())
        tmps[1].write_text(json.dumps(doc, indent=1))
        if pictures or html is not None:
            # matplotlib only when a picture is asked for.
            from .pictures import PictureOptions, html_report, layer_mosaic, to_png

            options = options or PictureOptions()
            state = conversion.source.state_dict
            tmp_of = dict(zip(pictures, tmps[2:], strict=False))
            for res in conversion.layers:
                if res.layer.name in tmp_of:
                    png = to_png(layer_mosaic(res, state, **options.mosaic))
                    tmp_of[res.layer.name].write_bytes(png)
            if html is not None:
                tmps[-1].write_text(html_report(conversion, options=options), encoding="utf-8")
    return finals
