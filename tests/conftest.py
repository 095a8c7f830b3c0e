"""Shared fixtures: the real data in ``../shared/data`` (read only, never written), the real
sample that comes with the package (SqueezeNet's conv1, on every machine), a way to run the
command line in-process with stdout and stderr kept apart, and a user-shaped project (a network
in the user's own file, its checkpoint and two labelled images)."""

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


#: A user's own network, as a file for ``--arch tinynet.py:make``: a strided 3x3 stem, a grouped
#: bias-less conv and a BatchNorm.
TINYNET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        return self.fc(self.bn(self.conv2(x)).mean((2, 3)))


def make():
    torch.manual_seed(0)
    return Net()
"""


def tiny_project(folder: Path, shade: int, labels: bool = True) -> str:
    """Write :data:`TINYNET` as ``tinynet.py``, its seeded weights as ``tiny.pth`` and two 32x32
    images ``imgs/im0.png``, ``imgs/im1.png`` (red ``0`` and ``shade``; with ``labels``, a
    ``labels.csv`` giving classes 0 and 2) into ``folder``. Returns the ``--arch`` spec."""
    import torch
    from PIL import Image

    from acl_convert.io.arch import build_model

    (folder / "tinynet.py").write_text(TINYNET)
    arch = f"{folder / 'tinynet.py'}:make"
    torch.save(build_model(arch).state_dict(), folder / "tiny.pth")
    images = folder / "imgs"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (shade * i, 90, 200)).save(images / f"im{i}.png")
    if labels:
        (images / "labels.csv").write_text("file,index\nim0.png,0\nim1.png,2\n")
    return arch


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path`` as the working directory, so default outputs land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
