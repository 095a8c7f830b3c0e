"""Labelled image folders for evaluation: which image has which class index.

Three layouts are recognised, tried in this order:

1. **labels CSV**: a CSV with (at least) the columns ``file,index`` names every image of the
   folder (``file`` relative to it) and its class index. Given with ``labels=``, or found as
   ``labels.csv`` inside the folder.
2. **class subfolders** (torchvision's ``ImageFolder``): one subfolder per class, the images
   under it. The class index is the subfolder's position among the sorted subfolder names,
   except when every subfolder is named by an ImageNet wnid (``n01440764``) and a classes TSV is
   at hand: then the index comes from the TSV, so a folder holding only some classes still gets
   the model's indices.
3. **wnid file names**: images directly in the folder whose names start with their wnid
   (``n01440764_tench.JPEG``), mapped to indices by a classes TSV.

A classes TSV has the header ``index<TAB>wnid<TAB>torchvision_name``; it is given with
``classes=`` or found as ``imagenet_classes.tsv`` in the folder or its parent.

Every problem with the folder or its labels is a :class:`~acl_convert.errors.UserError` whose one
line names the file and the fix.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UsageError, UserError
from .images import list_images, load_image

__all__ = [
    "LABELS_NAME",
    "CLASSES_NAME",
    "Sample",
    "LabelledImages",
    "labelled_images",
    "read_classes",
]

LABELS_NAME = "labels.csv"
CLASSES_NAME = "imagenet_classes.tsv"
_WNID = re.compile(r"n\d{8}")
_HOW = (
    "give --labels CSV (columns file,index), put the images in one subfolder per class, or name "
    "them <wnid>_*.JPEG with --classes TSV"
)


@dataclass(frozen=True)
class Sample:
    """One image file and its class index (0-based)."""

    path: Path
    label: int


@dataclass(frozen=True)
class LabelledImages:
    """The images of a folder with their labels, in sorted path order.

    Attributes:
        folder: the folder given.
        samples: ``(path, label)`` per image.
        num_classes: how many classes the labels are drawn from: the rows of the classes TSV,
            the number of class subfolders, or (labels CSV) the largest index plus one.
        layout: how the labels were found, in words, for messages.
    """

    folder: Path
    samples: list[Sample]
    num_classes: int
    layout: str

    def __len__(self) -> int:
        return len(self.samples)

    def head(self, limit: int | None) -> LabelledImages:
        """The first ``limit`` samples (all when ``limit`` is None)."""
        if limit is None:
            return self
        return LabelledImages(self.folder, self.samples[:limit], self.num_classes, self.layout)

    def check_labels(self, num_outputs: int) -> None:
        """Every label must be a class the model can predict, ``0 .. num_outputs - 1``."""
        for s in self.samples:
            if not 0 <= s.label < num_outputs:
                raise UserError(
                    f"{s.path} has label {s.label} ({self.layout}), outside the model's "
                    f"{num_outputs} classes 0..{num_outputs - 1}; fix the labels or evaluate a "
                    "model with that many outputs"
                )

    def batches(self, transform: Callable, batch_size: int = 32) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(images (B, 3, H, W) float, labels (B,) int64)`` in sample order; ``H, W``
        are what ``transform`` makes (224 for torchvision's ImageNet recipes)."""
        for start in range(0, len(self.samples), batch_size):
            chunk = self.samples[start : start + batch_size]
            images = torch.stack([load_image(s.path, transform) for s in chunk])
            yield images, torch.tensor([s.label for s in chunk], dtype=torch.int64)


def labelled_images(
    folder: str | Path, *, labels: str | Path | None = None, classes: str | Path | None = None
) -> LabelledImages:
    """Find the images under ``folder`` and their labels (layout detected, see the module).

    Args:
        folder: the folder of images.
        labels: a labels CSV (``file,index``); default ``folder/labels.csv`` when present.
        classes: a classes TSV (``index, wnid, torchvision_name``); default
            ``imagenet_classes.tsv`` in ``folder`` or its parent when present.

    Raises:
        UsageError: both ``labels`` and ``classes`` given.
        UserError: missing or empty folder, bad CSV or TSV, images without a label.
    """
    if labels is not None and classes is not None:
        raise UsageError(
            "--labels and --classes do not go together (the labels CSV already holds class "
            "indices); give one of them"
        )
    folder = Path(folder)
    files = list_images(folder)
    if labels is None and (folder / LABELS_NAME).is_file():
        labels = folder / LABELS_NAME
    if labels is not None:
        return _from_csv(folder, files, Path(labels))
    classes = Path(classes) if classes is not None else _find_classes(folder)
    if any(p.parent != folder for p in files):
        return _from_subfolders(folder, files, classes)
    return _from_wnid_names(folder, files, classes)


def read_classes(path: str | Path) -> dict[str, int]:
    """``{wnid: index}`` from a classes TSV with (at least) the columns ``index`` and ``wnid``."""
    path = Path(path)
    rows = _read_table(path, ("index", "wnid"), "\t", "index<TAB>wnid<TAB>torchvision_name")
    classes: dict[str, int] = {}
    for line, row in rows:
        wnid = (row["wnid"] or "").strip()
        if wnid in classes:
            raise UserError(f"{path} line {line}: wnid {wnid} is listed twice; keep one row")
        classes[wnid] = _index(row["index"], path, line)
    return classes


def _from_csv(folder: Path, files: list[Path], labels: Path) -> LabelledImages:
    rows = _read_table(labels, ("file", "index"), ",", "file,index")
    by_path: dict[Path, int] = {}
    missing: list[str] = []
    for line, row in rows:
        name = (row["file"] or "").strip()
        path = folder / name
        if path in by_path:
            raise UserError(f"{labels} line {line}: {name} is listed twice; keep one row")
        by_path[path] = _index(row["index"], labels, line)
        if not path.is_file():
            missing.append(name)
    if missing:
        raise UserError(
            f"{labels} names {len(missing)} file(s) not in {folder} (first: {missing[0]}); "
            "remove those rows or restore the images"
        )
    unlisted = [p for p in files if p not in by_path]
    if unlisted:
        raise UserError(
            f"{len(unlisted)} image(s) in {folder} have no row in {labels} (first: "
            f"{unlisted[0].relative_to(folder)}); add rows for them or move them out"
        )
    samples = [Sample(p, by_path[p]) for p in sorted(by_path)]
    return LabelledImages(
        folder, samples, max(s.label for s in samples) + 1, f"labels from {labels.name}"
    )


def _from_subfolders(folder: Path, files: list[Path], classes: Path | None) -> LabelledImages:
    # As torchvision's ImageFolder: every subfolder is a class, an empty one too, so the sorted
    # indices are the ones a model trained with ImageFolder on the full folder learnt.
    class_dirs = sorted(d.name for d in folder.iterdir() if d.is_dir())
    loose = [p for p in files if p.parent == folder]
    if loose:
        raise UserError(
            f"{loose[0]} lies directly in {folder}, which has one subfolder per class, so its "
            f"class is unknown; move it into its class folder or {_HOW}"
        )
    if classes is not None and all(_WNID.fullmatch(d) for d in class_dirs):
        index = read_classes(classes)
        unknown = [d for d in class_dirs if d not in index]
        if unknown:
            raise UserError(
                f"class folder {unknown[0]} of {folder} is not a wnid of {classes}; rename it "
                "or give the right --classes TSV"
            )
        layout, num_classes = f"wnid subfolders with {classes.name}", len(index)
    else:
        index = {d: i for i, d in enumerate(class_dirs)}
        layout, num_classes = "class subfolders in sorted order", len(class_dirs)
    samples = [Sample(p, index[p.relative_to(folder).parts[0]]) for p in files]
    return LabelledImages(folder, samples, num_classes, layout)


def _from_wnid_names(folder: Path, files: list[Path], classes: Path | None) -> LabelledImages:
    tried = f"no {LABELS_NAME}, no class subfolders, images named <wnid>_*"
    if classes is None:
        raise UserError(
            f"cannot tell the classes of the images in {folder} ({tried} need a classes TSV "
            f"and no {CLASSES_NAME} is in the folder or its parent); {_HOW}"
        )
    index = read_classes(classes)
    samples = []
    for p in files:
        wnid = _WNID.match(p.name)
        if wnid is None or wnid.group() not in index:
            raise UserError(
                f"cannot tell the class of {p} ({tried}): its name does not start with a wnid of "
                f"{classes}; {_HOW}"
            )
        samples.append(Sample(p, index[wnid.group()]))
    return LabelledImages(folder, samples, len(index), f"wnid file names with {classes.name}")


def _find_classes(folder: Path) -> Path | None:
    for candidate in (folder / CLASSES_NAME, folder.parent / CLASSES_NAME):
        if candidate.is_file():
            return candidate
    return None


def _read_table(
    path: Path, columns: tuple[str, ...], delimiter: str, expected: str
) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV/TSV with a header, with their line numbers; the ``columns`` must be there."""
    if not path.exists():
        raise UserError(f"{path} does not exist; check the path")
    if not path.is_file():
        raise UserError(f"{path} is not a file; give the {expected} table itself")
    try:
        # utf-8-sig: spreadsheets often start a CSV with a byte-order mark.
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = header
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(
            f"cannot read {path} ({type(exc).__name__}); give a readable text file"
        ) from None
    absent = [c for c in columns if c not in header]
    if absent:
        raise UserError(
            f"{path} has no column {', '.join(absent)} (header: {','.join(header) or 'empty'}); "
            f"its first line must name the columns {expected}"
        )
    if not rows:
        raise UserError(f"{path} has a header but no rows; add one row per image or class")
    return rows


def _index(text: str | None, path: Path, line: int) -> int:
    text = (text or "").strip()
    try:
        value = int(text)
    except ValueError:
        raise UserError(
            f"{path} line {line}: index {text!r} is not a whole number; give class indices "
            "0, 1, 2, ..."
        ) from None
    if value < 0:
        raise UserError(f"{path} line {line}: index {value} is negative; class indices start at 0")
    return value
