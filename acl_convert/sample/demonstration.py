"""``acl-convert demo``: the embedded sample converted end to end, on any machine, with nothing to
download.

The sample's tensors are converted with the default settings, like ``acl-convert CHECKPOINT
--layers features.0`` would, and everything a conversion writes goes into one folder: the AnaNN,
the JSON report, the kernel picture and the HTML report. The folder is a new one by default
(``./acl-convert-demo``, else ``-2``, ``-3``, ...), so the demo never touches what is there.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError, UserError
from ..io.outputs import os_error
from . import SAMPLE_FILE, SAMPLE_LAYER, SAMPLE_SHA256, sample_path

if TYPE_CHECKING:
    from ..conversion import Conversion
    from ..pipeline import ProgressFn

__all__ = ["demo", "DemoResult", "DEMO_FOLDER"]

#: The default folder's name, in the working directory; taken: ``-2``, ``-3``, ...
DEMO_FOLDER = "acl-convert-demo"

_STEM = SAMPLE_FILE.removesuffix(".safetensors")

#: What the demo writes: key, file name, what it is (for messages and the summary).
_FILES = (
    ("anann", f"{_STEM}.anann.safetensors", "the AnaNN: loads as a module, AKPs trainable"),
    ("report", f"{_STEM}.report.json", "each layer's numbers, every kernel's family and residuals"),
    ("mosaic", f"{_STEM}.{SAMPLE_LAYER}.png", "original | fitted | difference, per kernel"),
    ("html", f"{_STEM}.report.html", "all of it as one page: open it in a browser"),
)


@dataclass
class DemoResult:
    """What :func:`demo` did.

    Attributes:
        folder: the folder written into.
        files: the files written, by kind: ``anann``, ``report``, ``mosaic``, ``html``.
        conversion: the conversion (tensors only: the sample has no architecture).
        report: its report document (docs/report-format.md).
    """

    folder: Path
    files: dict[str, Path]
    conversion: Conversion = field(repr=False)
    report: dict[str, Any] = field(repr=False)

    def summary(self) -> str:
        """What the demo did, in a few lines, and what to try next with one's own checkpoint."""
        tot = self.report["totals"]
        layer = self.report["layers"][0]
        families = " ".join(f"{c}{n}" for c, n in layer["family_counts"].items() if c != "P")
        threshold = self.conversion.settings.threshold
        width = max(len(p.name) for p in self.files.values())
        lines = [
            f"{tot['converted']} of {tot['kernels']} kernels became analytic "
            f"({families or 'none'}), each within relative residual {threshold:g} of the original;",
            f"compact factor {tot['compact_factor']:.4f} "
            f"({tot['params_before']:,} -> {tot['params_after']:,} kernel parameters).",
            "",
            f"wrote {self.folder}{os.sep}",
        ]
        lines += [f"  {self.files[key].name:<{width}}  {what}" for key, _, what in _FILES]
        lines.append(f"look inside: acl-convert info {self.files['anann']}")
        steps = [
            ("acl-convert layers model.pth", "the convolutions it can convert"),
            ("acl-convert model.pth --layers conv1 --mosaic conv1.png", "convert one, + picture"),
            ("acl-convert model.pth --layers all --threshold 0.5", "all; more ACKs, more error"),
        ]
        width = max(len(cmd) for cmd, _ in steps)
        lines += ["", "next, with your own checkpoint (.pth/.pt/.bin state dict or .safetensors):"]
        lines += [f"  {cmd:<{width}}  # {what}" for cmd, what in steps]
        return "\n".join(lines)


def demo(
    folder: str | os.PathLike | None = None, *, progress: ProgressFn | None = None
) -> DemoResult:
    """Convert the embedded sample (SqueezeNet 1.0 conv1, see :mod:`acl_convert.sample`) with the
    default settings and write the AnaNN, the report, the kernel picture and the HTML report.

    Args:
        folder: where to write; made (with its parents) when missing. An existing folder is
            fine, but a file of the demo's already in it is an error (nothing is replaced).
            Default: a new folder in the working directory, ``acl-convert-demo``, or
            ``acl-convert-demo-2``, ``-3``, ... when that exists.
        progress: see :data:`acl_convert.pipeline.ProgressFn`.

    Returns:
        A :class:`DemoResult`; ``print(result.summary())`` says what was done and what next.

    Raises:
        UsageError: ``folder`` is a file, or holds one of the demo's files already.
        UserError: the folder cannot be made or written; the installed sample is missing or
            altered.
    """
    from ..conversion import Source
    from ..io.checkpoint import load_checkpoint
    from ..io.outputs import OutputPlan
    from ..pipeline import Job
    from ..report.files import write_conversion

    sample = sample_path()
    ckpt = load_checkpoint(sample)
    if ckpt.sha256 != SAMPLE_SHA256:
        raise UserError(
            f"the sample {sample} is not the one acl-convert shipped (sha256 "
            f"{ckpt.sha256[:16]}..., expected {SAMPLE_SHA256[:16]}...); reinstall acl-convert"
        )
    target, made = _folder(folder)
    try:
        plan = OutputPlan(inputs=[sample])
        files = {key: plan.add(target / name, f"the demo's {name}") for key, name, _ in _FILES}
        # The sample is known to hold conv1's tensors only: looking for its architecture among
        # torchvision's (and timm's) models would only take time and say so in a note.
        source = Source(ckpt.state_dict, ckpt.path.name, ckpt.sha256, ckpt.notes())
        conversion = Job.create(source, None, None, SAMPLE_LAYER, None, {}).run(progress)
        doc = conversion.report
        write_conversion(
            conversion,
            files["anann"],
            files["report"],
            pictures={SAMPLE_LAYER: files["mosaic"]},
            html=files["html"],
            doc=doc,
        )
    except BaseException:
        if made:
            _remove_if_empty(target)
        raise
    return DemoResult(target, files, conversion, doc)


def _folder(folder: str | os.PathLike | None) -> tuple[Path, bool]:
    """The folder to write into and whether it was made here."""
    if folder is None:
        for n in itertools.count(1):
            path = Path(DEMO_FOLDER if n == 1 else f"{DEMO_FOLDER}-{n}")
            try:
                path.mkdir()  # atomic: two demos at once get two folders
            except FileExistsError:
                continue
            except OSError as exc:
                raise os_error(exc, path) from None
            return path, True
    path = Path(folder)
    if path.is_dir():
        return path, False
    if path.exists() or path.is_symlink():
        raise UsageError(f"{path} is not a folder; give a folder for the demo's files")
    try:
        path.mkdir(parents=True)
    except OSError as exc:
        raise os_error(exc, path) from None
    return path, True


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:  # not empty, or gone: leave it as it is
        pass
