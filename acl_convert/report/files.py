"""Writing a conversion's files together: the AnaNN, the JSON report, the kernel pictures and the
HTML page, all or none.

Every file goes to a temporary name beside its final one first, and all are renamed at the end
(:func:`acl_convert.io.outputs.atomic_path`), so an error or an interrupt leaves nothing
half-written. The paths are checked beforehand by the caller (:class:`~acl_convert.io.outputs.
OutputPlan`), before any long work.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io.anann import save_anann
from ..io.outputs import atomic_path

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
    written = [Path(anann), Path(report)]
    with ExitStack() as stack:
        save_anann(
            stack.enter_context(atomic_path(anann)), conversion.tensors(), conversion.header()
        )
        stack.enter_context(atomic_path(report)).write_text(json.dumps(doc, indent=1))
        if pictures or html is not None:
            # matplotlib only when a picture is asked for.
            from .pictures import PictureOptions, html_report, layer_mosaic, to_png

            options = options or PictureOptions()
            state = conversion.source.state_dict
            for res in conversion.layers:
                if res.layer.name in pictures:
                    png = to_png(layer_mosaic(res, state, **options.mosaic))
                    path = pictures[res.layer.name]
                    stack.enter_context(atomic_path(path)).write_bytes(png)
                    written.append(Path(path))
            if html is not None:
                stack.enter_context(atomic_path(html)).write_text(
                    html_report(conversion, options=options), encoding="utf-8"
                )
                written.append(Path(html))
    return written
