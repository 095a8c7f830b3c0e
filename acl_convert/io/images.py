"""Folders of images for calibration and evaluation, preprocessed as the architecture expects."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UserError

__all__ = [
    "IMAGE_SUFFIXES",
    "list_images",
    "preprocessing",
    "imagenet_transform",
    "load_image",
    "load_batches",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


def list_images(folder: str | Path, *, limit: int | None = None) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted by path; at most ``limit``."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"image folder {folder} does not exist; check the path")
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; give a folder of images")
    files = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not files:
        raise UserError(
            f"image folder {folder} contains no images ({', '.join(IMAGE_SUFFIXES)}); "
            "point it at a folder of images"
        )
    return files[:limit] if limit else files


def preprocessing(arch: str | None, model=None) -> Callable:
    """The eval transform for the architecture ``arch`` names (see
    :func:`acl_convert.io.arch.parse_arch`; ``model``, when at hand, saves building a timm
    model again), or the standard ImageNet one when it is unknown."""
    if not arch:
        return imagenet_transform()
    from .arch import parse_arch

    return parse_arch(arch).preprocessing(model)


def torchvision_transform(name: str) -> Callable:
    """The eval transform of a torchvision model's default weights (only the recipe is read,
    nothing is downloaded), or the ImageNet one when it has no published weights."""
    import torchvision

    try:
        return torchvision.models.get_model_weights(name).DEFAULT.transforms()
    except (ValueError, AttributeError, KeyError):
        return imagenet_transform()


def timm_transform(model) -> Callable:
    """The eval transform timm's data config gives ``model`` (its pretrained config's input
    size, crop and normalisation)."""
    import timm.data

    config = timm.data.resolve_data_config({}, model=model)
    return timm.data.create_transform(**config)


def imagenet_transform() -> Callable:
    """Resize 256, centre crop 224, ImageNet mean and std: what most ImageNet CNNs expect (the
    default for an architecture of the user's own)."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(256),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )


def load_image(path: Path, transform: Callable) -> Tensor:
    """One image through ``transform``. An unreadable, damaged or oversized image (more pixels
    than PIL's ``Image.MAX_IMAGE_PIXELS`` guard allows: a decompression bomb) is a
    :class:`UserError` naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return transform(img.convert("RGB"))
    except Image.DecompressionBombError:
        raise UserError(
            f"image {path} has more pixels than is safe to decode (over "
            f"{2 * Image.MAX_IMAGE_PIXELS:,}; a decompression bomb?); remove or shrink it"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(
            f"cannot read image {path} ({type(exc).__name__}); remove or replace it"
        ) from None


def load_batches(files: list[Path], transform: Callable, batch_size: int = 32) -> Iterator[Tensor]:
    """Yield preprocessed batches ``(B, 3, H, W)`` in file order."""
    for start in range(0, len(files), batch_size):
        yield torch.stack([load_image(p, transform) for p in files[start : start + batch_size]])
