"""Derive the embedded sample (acl_convert/sample/squeezenet1_0_conv1.safetensors) from the shared
real data, byte for byte the same every time, and print its size and sha256.

    python scripts/make_sample.py [--data ../shared/data] [--check]

The sample is the first convolution (``features.0``: 96x3x7x7 weights and 96 biases, float32)
of ``weights/squeezenet1_0_deepcompression_tvnorm.pth``: SqueezeNet 1.0 after Deep Compression
(songhan/SqueezeNet-Deep-Compression, BSD-2-Clause), decoded into torchvision's layout with the
Caffe preprocessing folded into conv1 so it expects torchvision's (see
../shared/data/SOURCES.md). The tensors are copied unchanged; the source file is checked against
its published sha256 first, so a different file can never become the sample.

``--check`` writes nothing: it derives the bytes again and says whether they equal the committed
file's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save

REPO = Path(__file__).resolve().parents[1]
SOURCE = "weights/squeezenet1_0_deepcompression_tvnorm.pth"
SOURCE_SHA256 = "fa6fd9f03b2516be0578a3ad59b00fa7a111249e720b86d0d95bbfd92ac6fe73"
TARGET = REPO / "acl_convert" / "sample" / "squeezenet1_0_conv1.safetensors"
LAYER = "features.0"

#: One metadata key only: safetensors writes several in hash order, which changes between runs.
METADATA = {
    "sample": json.dumps(
        {
            "what": "conv1 (features.0) of SqueezeNet 1.0 after Deep Compression, ImageNet; "
            "torchvision preprocessing folded in (RGB, mean/std)",
            "source": "https://github.com/songhan/SqueezeNet-Deep-Compression "
            "compressed_SqueezeNet.net (commit 5623e3cd)",
            "licence": "BSD-2-Clause; see LICENCE-SqueezeNet-Deep-Compression beside this file",
            "derived_from": f"{Path(SOURCE).name} sha256 {SOURCE_SHA256}",
            "derived_by": "scripts/make_sample.py",
        },
        sort_keys=True,
    )
}


def sample_bytes(data: Path) -> bytes:
    """The sample's file contents, derived from ``data`` (the shared data folder)."""
    path = data / SOURCE
    if not path.is_file():
        sys.exit(f"error: {path} not found; give the shared data folder with --data")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SOURCE_SHA256:
        sys.exit(f"error: {path} has sha256 {digest}, expected {SOURCE_SHA256}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    tensors = {
        f"{LAYER}.{part}": state[f"{LAYER}.{part}"].detach().contiguous().clone()
        for part in ("weight", "bias")
    }
    assert tensors[f"{LAYER}.weight"].shape == (96, 3, 7, 7), tensors[f"{LAYER}.weight"].shape
    assert all(t.dtype == torch.float32 for t in tensors.values())
    return save(tensors, metadata=METADATA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    blob = sample_bytes(args.data)
    digest = hashlib.sha256(blob).hexdigest()
    rel = TARGET.relative_to(REPO)
    if args.check:
        same = TARGET.is_file() and TARGET.read_bytes() == blob
        print(f"{rel}: {'identical to' if same else 'DIFFERS from'} a fresh derivation")
        print(f"derived: {len(blob):,} bytes, sha256 {digest}")
        sys.exit(0 if same else 1)
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    tmp = TARGET.with_name(f".{TARGET.name}.tmp")
    tmp.write_bytes(blob)
    tmp.replace(TARGET)
    print(f"wrote {rel}: {len(blob):,} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
