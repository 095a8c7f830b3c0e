"""Files proportional to what they say: an AnaNN with analytic kernels is smaller than its
source, a version-1 AnaNN (one int64 index per family) still loads, and ``export``'s per-kernel
table agrees with the report's per-kernel columns."""

from __future__ import annotations

import io
import json

import safetensors.torch
import torch
import torchvision

import acl_convert
from acl_convert.io.anann import read_anann
from acl_convert.report import kernel_table
from acl_convert.report.document import decode_columns


def resnet18_checkpoint(path):
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_anann_is_smaller_than_its_source_when_kernels_convert(tmp_path):
    src = resnet18_checkpoint(tmp_path / "r18.pth")
    conversion = acl_convert.convert_checkpoint(src, "layer4.*", threshold=1.0)
    assert conversion.compact_factor > 0.3  # 3x3 kernels with gain and offset keep 6 of 9
    out = conversion.save(tmp_path / "r18.anann.safetensors")
    # The family map costs a byte per kernel; the 3x3 kernels saved cost 12 bytes each.
    assert out.stat().st_size < src.stat().st_size
    # Every AnaNN, even one converting next to nothing, is no larger than its source's tensors
    # plus a byte per converted kernel and the header.
    few = acl_convert.convert_checkpoint(src, "conv1", threshold=0.0)
    small = few.save(tmp_path / "few.anann.safetensors")
    tensors = sum(v.numel() * v.element_size() for v in few.source.state_dict.values())
    assert small.stat().st_size < tensors + 192 + 64 * 1024


def test_version_1_files_still_load(tmp_path):
    """A version-1 file stored each family's kernel indices as int64 ``index_<code>`` tensors;
    written here by hand from a version-2 one, it loads to the same network."""
    src = resnet18_checkpoint(tmp_path / "r18.pth")
    conversion = acl_convert.convert_checkpoint(src, "conv1", threshold=1.0)
    v2 = conversion.save(tmp_path / "v2.anann.safetensors")
    with safetensors.safe_open(str(v2), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    header = json.loads(meta["acl_convert"])
    header["format_version"] = 1
    header.pop("tensors", None)  # version 1 had no tensor list
    codes = sorted(header["layers"]["conv1"]["family_counts"])
    family = tensors.pop("conv1.family").long()
    for j, code in enumerate(codes):
        tensors[f"conv1.index_{code}"] = (family == j).nonzero()[:, 0]
    v1 = tmp_path / "v1.anann.safetensors"
    meta["acl_convert"] = json.dumps(header)
    safetensors.torch.save_file(tensors, str(v1), meta)
    assert read_anann(v1).header.format_version == 1
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = acl_convert.load_anann(v1).eval()(x)
        b = acl_convert.load_anann(v2).eval()(x)
    assert torch.equal(a, b)


def test_export_table_equals_the_report(tmp_path):
    src = resnet18_checkpoint(tmp_path / "r18.pth")
    conversion = acl_convert.convert_checkpoint(src, ["conv1", "layer1.*"], threshold=0.9)
    ana = read_anann(conversion.save(tmp_path / "r.anann.safetensors"))
    out = io.StringIO()
    kernel_table.write(ana, out, "jsonl", plain=True)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    for layer in conversion.report["layers"]:
        columns = decode_columns(layer["per_kernel"])
        mine = [r for r in rows if r["layer"] == layer["name"]]
        assert [r["kernel"] for r in mine] == list(range(layer["kernels"]))
        assert [r["family"] for r in mine] == list(columns["family"])
