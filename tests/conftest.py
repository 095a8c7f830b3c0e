"""Shared fixtures: the real data in ``../shared/data`` (read only, never written), the real
sample that comes with the package (SqueezeNet's conv1, on every machine), and a way to run the
command line in-process with stdout and stderr kept apart."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
WEIGHTS = DATA / "weights"
IMAGES = DATA / "imagenet" / "sample-images-1000"
SQUEEZENET = WEIGHTS / "squeezenet1_0_deepcompression_tvnorm.pth"
MOBILENET = WEIGHTS / "mobilenet_v2_qnnpack_dequant_bnfolded.pth"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data {path.name} not found in {path.parent} (../shared/data absent)")
    return path


@pytest.fixture(scope="session")
def squeezenet_ckpt() -> Path:
    """The real SqueezeNet 1.0 state dict (first conv ``features.0``: 96x3x7x7)."""
    return _need(SQUEEZENET)


@pytest.fixture(scope="session")
def sample_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SqueezeNet 1.0 conv1 (``features.0``: 96x3x7x7 weights and bias) from the sample
    embedded in the package, saved as a torch state dict in a tmp folder: the same kernels as
    :func:`squeezenet_ckpt`'s first layer, with no other layer and no ``../shared`` needed."""
    import torch

    from acl_convert.sample import load_sample

    path = tmp_path_factory.mktemp("sample") / "squeezenet1_0_conv1.pth"
    torch.save(load_sample(), path)
    return path


@pytest.fixture(scope="session")
def mobilenet_ckpt() -> Path:
    """The real MobileNetV2 state dict (first conv ``features.0.0``: 32x3x3x3, then depthwise)."""
    return _need(MOBILENET)


@pytest.fixture(scope="session")
def copy_images() -> Callable[[Path, int], Path]:
    """``copy_images(folder, n)``: copy the first ``n`` real sample images into ``folder``
    (which must be under a tmp path) and return it."""

    def copy(folder: Path, n: int) -> Path:
        _need(IMAGES)
        files = sorted(IMAGES.glob("*.JPEG"))[:n]
        if len(files) < n:
            pytest.skip(f"fewer than {n} sample images in {IMAGES}")
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, folder / f.name)
        return folder

    return copy


@pytest.fixture(scope="session")
def invoke():
    """``invoke(*args)``: run ``acl-convert ARGS`` in-process; the result has ``exit_code``,
    ``stdout`` and ``stderr`` separately (typer >= 0.20 never mixes them)."""
    from acl_convert_cli.main import app
    from typer.testing import CliRunner

    runner = CliRunner()

    def run(*args: str | Path, **kwargs):
        return runner.invoke(app, [str(a) for a in args], **kwargs)

    return run


def listing(folder: Path) -> set[str]:
    """Every file and folder under ``folder`` (hidden ones too), relative to it."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture(scope="session")
def files_in() -> Callable[[Path], set[str]]:
    """``files_in(folder)``: the set of paths under ``folder``, hidden temporary files included."""
    return listing
