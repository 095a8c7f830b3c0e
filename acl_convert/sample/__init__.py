"""The real pretrained sample that travels with the package, and the demo that converts it.

The sample (``squeezenet1_0_conv1.safetensors`` in this folder) is the first convolution of an
ImageNet-trained SqueezeNet 1.0 after Deep Compression, with torchvision's preprocessing folded
in: ``features.0.weight`` ``(96, 3, 7, 7)`` and ``features.0.bias`` ``(96,)``, float32. Its
source is songhan/SqueezeNet-Deep-Compression (BSD-2-Clause; the licence text and the
attribution are beside it, in ``LICENCE-SqueezeNet-Deep-Compression`` and ``README.md``);
``scripts/make_sample.py`` derives it. It holds conv1's tensors only, no architecture, so it
converts as tensors (like any checkpoint whose network is not recognised).

:func:`demo` (``acl-convert demo``) converts it end to end with the default settings.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ..errors import UserError

__all__ = [
    "SAMPLE_FILE",
    "SAMPLE_SHA256",
    "SAMPLE_LAYER",
    "sample_path",
    "load_sample",
    "demo",
    "DemoResult",
    "DEMO_FOLDER",
]

SAMPLE_FILE = "squeezenet1_0_conv1.safetensors"
#: sha256 of the file's bytes, as ``scripts/make_sample.py`` prints it.
SAMPLE_SHA256 = "ce6f8d40ef2541b7b39b0e21cd72e7626b9014e0d563a3c45592b3210f48b7a4"
#: The name of the sample's convolution (torchvision's name for SqueezeNet's conv1).
SAMPLE_LAYER = "features.0"


def sample_path() -> Path:
    """Where the installed sample file is (package data; a plain file in every install)."""
    path = Path(__file__).with_name(SAMPLE_FILE)
    if not path.is_file():
        raise UserError(
            f"the sample {SAMPLE_FILE} is missing from {path.parent}; the package was installed "
            "without its data: reinstall acl-convert (pip install --force-reinstall acl-convert, "
            "or pip install -e . in a clone)"
        )
    return path


def load_sample() -> dict[str, Tensor]:
    """The sample's tensors: ``{"features.0.weight": (96, 3, 7, 7), "features.0.bias": (96,)}``,
    float32 on the CPU (read without pickle: it is a safetensors file)."""
    from safetensors.torch import load_file

    return load_file(sample_path())


# After the names above: the demo reads them.
from .demonstration import DEMO_FOLDER, DemoResult, demo  # noqa: E402
