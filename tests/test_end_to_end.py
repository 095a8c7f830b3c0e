"""End to end on the real checkpoints, through the command line as a user runs it (issue 4):
convert, load back, AnaNN forward == baked model forward, baked state dict loads strictly into
torchvision's architecture, report compact factors == the AnaNN layers', report JSON valid
against the documented schema, export and info agree with the report."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from acl_convert import ACL, kernels, load_anann
from acl_convert.report.document import SCHEMA, decode_columns

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with the dev extra")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

CASES = {
    # name: (checkpoint fixture, architecture, selectors, converted layer names)
    "squeezenet": ("squeezenet_ckpt", "squeezenet1_0", ["features.0"], ["features.0"]),
    "mobilenet": (
        "mobilenet_ckpt",
        "mobilenet_v2",
        ["features.0.0", "features.1.conv.0.0", "features.2.conv.1.0"],
        ["features.0.0", "features.1.conv.0.0", "features.2.conv.1.0"],
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request, tmp_path_factory, invoke):
    """Run ``acl-convert CKPT --layers ...`` once per real checkpoint; every test reads it."""
    fixture, arch, selectors, names = CASES[request.param]
    ckpt: Path = request.getfixturevalue(fixture)
    out = tmp_path_factory.mktemp(request.param)
    anann = out / f"{request.param}.anann.safetensors"
    report = out / f"{request.param}.report.json"
    args = [ckpt, "--layers", ",".join(selectors), "-o", anann, "--report", report]
    (out / "mosaic").mkdir()
    args += ["--mosaic", f"{out / 'mosaic'}/"]
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    return {
        "ckpt": ckpt,
        "arch": arch,
        "names": names,
        "anann": anann,
        "report_path": report,
        "report": json.loads(report.read_text()),
        "stdout": result.stdout,
        "out": out,
    }


def test_architecture_was_detected(converted):
    assert converted["report"]["arch"] == converted["arch"]


def test_report_validates_against_the_documented_schema(converted):
    jsonschema.validate(converted["report"], SCHEMA)
    # The schema in the docs is the one in the code, so the docs cannot drift.
    doc = (REPO / "docs" / "report-format.md").read_text()
    block = doc.split("```json schema", 1)[1].split("```", 1)[0]
    assert json.loads(block) == json.loads(json.dumps(SCHEMA))


def test_anann_forward_equals_baked_forward(converted, invoke):
    ana = load_anann(converted["anann"]).eval()
    acls = {n: m for n, m in ana.named_modules() if isinstance(m, ACL)}
    assert sorted(acls) == sorted(converted["names"])

    baked_path = converted["out"] / "baked.safetensors"
    result = invoke("bake", converted["anann"], "-o", baked_path, "-q")
    assert result.exit_code == 0, result.stderr
    baked = getattr(torchvision.models, converted["arch"])(weights=None).eval()
    baked.load_state_dict(load_file(baked_path), strict=True)  # strict: loads into torchvision

    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ana(x), baked(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_baked_kernels_are_the_fitted_ones_and_others_untouched(converted):
    """Bake replaces exactly the converted weights; each ACK is within its reported residual of
    the original kernel, and plain kernels are copied bit for bit."""
    from acl_convert.io.checkpoint import load_checkpoint

    original = load_checkpoint(converted["ckpt"]).state_dict
    ana = load_anann(converted["anann"])
    for lay in converted["report"]["layers"]:
        acl = ana.get_submodule(lay["name"])
        w0 = original[lay["name"] + ".weight"].float()
        w1 = acl.weight.detach()
        k0, k1 = w0.flatten(0, 1), w1.flatten(0, 1)
        cols = decode_columns(lay["per_kernel"])
        threshold = converted["report"]["settings"]["threshold"]
        for i, (family, residual) in enumerate(zip(cols["family"], cols["residual"], strict=True)):
            if family == "P":
                assert torch.equal(k1[i], k0[i])
            else:
                norm = k0[i].norm()
                err = float((k1[i] - k0[i]).norm() / norm) if norm > 0 else float(k1[i].norm())
                # The report stores residuals in float16: 2^-11 relative.
                assert err == pytest.approx(float(residual), rel=1e-3, abs=1e-6)
                assert float(residual) <= threshold * (1 + 2**-10)


def test_report_compact_factors_agree_with_the_anann(converted):
    ana = load_anann(converted["anann"])
    rep = converted["report"]
    for lay in rep["layers"]:
        acl = ana.get_submodule(lay["name"])
        assert lay["compact_factor"] == pytest.approx(acl.compact_factor(), abs=1e-12)
        assert lay["family_counts"] == acl.family_totals()
        assert lay["pattern"] in (acl.pattern, None)  # long patterns are left out
        # Eq. 25 by hand from the counts: a plain kernel keeps its h*w values, an ACK its AKPs
        # and gain, plus an offset when enabled (Mean's gain already is its offset).
        h, w = lay["shape"][2:]
        offset = rep["settings"]["offset"]
        kept = 0
        for code, n in lay["family_counts"].items():
            if code == "P":
                kept += n * h * w
            else:
                extra = 1 if offset and code != "M" else 0
                kept += n * (kernels.get(code).num_params + 1 + extra)
        assert lay["params_after"] == kept
        assert lay["compact_factor"] == pytest.approx(1 - kept / lay["params_before"])


def test_export_reproduces_the_report_and_the_layers(converted, invoke):
    """Every export format lists each analytic kernel once with the report's family, and AKPs,
    gains and offsets that rebuild the layer's kernels to float32 rounding."""
    import pandas as pd

    results = {
        fmt: invoke("export", converted["anann"], "--format", fmt) for fmt in ("csv", "jsonl")
    }
    assert all(r.exit_code == 0 for r in results.values()), results
    table_csv = pd.read_csv(io.StringIO(results["csv"].stdout))
    table_jsonl = pd.read_json(io.StringIO(results["jsonl"].stdout), lines=True)
    full = json.loads(invoke("export", converted["anann"], "--format", "json").stdout)
    assert full["schema"] == "acl-convert/kernels" and full["version"] == 1
    table_json = pd.DataFrame(full["rows"])
    ana = load_anann(converted["anann"])
    for lay in converted["report"]["layers"]:
        cols = decode_columns(lay["per_kernel"])
        analytic = [i for i, f in enumerate(cols["family"]) if f != "P"]
        acl = ana.get_submodule(lay["name"])
        weight = acl.weight.detach().flatten(0, 1).double()
        for table in (table_csv, table_jsonl, table_json):
            rows = table[table["layer"] == lay["name"]]
            assert rows["kernel"].tolist() == analytic
            assert rows["family"].tolist() == [cols["family"][i] for i in analytic]
        h, w = lay["shape"][2:]
        for _, row in table_csv[table_csv["layer"] == lay["name"]].iterrows():
            fam = kernels.get(row["family"])
            akps = torch.tensor([[row[f"{fam.code}.{n}"] for n in fam.param_names]])
            offset = 0.0 if pd.isna(row["offset"]) else row["offset"]
            rebuilt = fam(akps.double(), h, w)[0] * row["gain"] + offset
            k = int(row["kernel"])
            scale = float(weight[k].abs().max()) + 1e-12
            # CSV keeps 17 significant digits of float32 values; the layer synthesises in
            # float64 and stores float32: a few float32 ulps of the kernel's scale.
            assert float((rebuilt - weight[k]).abs().max()) <= 1e-5 * scale


def test_terminal_table_and_mosaics(converted, invoke):
    for lay in converted["report"]["layers"]:
        assert lay["name"] in converted["stdout"]
    pngs = sorted((converted["out"] / "mosaic").glob("*.png"))
    assert len(pngs) == len(converted["report"]["layers"])
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = invoke("info", converted["anann"])
    assert result.exit_code == 0, result.stderr
    for lay in converted["report"]["layers"]:
        assert lay["name"] in result.stdout


def test_calibration_reports_fidelity_computed_independently(
    invoke, tmp_path, squeezenet_ckpt, copy_images
):
    """``--calibration``: the report's fidelity equals what we get by running torchvision's
    SqueezeNet with the original and with the baked weights on the same images, preprocessed
    by torchvision's own weights transform, on the held-out images (by default a quarter of
    the 8, spread over the sorted list)."""
    from PIL import Image

    from acl_convert.calibration.holdout import held_positions

    images = copy_images(tmp_path / "imgs", 8)
    out = tmp_path / "out"
    out.mkdir()
    report = out / "r.json"
    args = [squeezenet_ckpt, "-l", "features.0", "-t", "0.5", "--calibration", images]
    result = invoke(*args, "-o", out / "a.anann.safetensors", "--report", report)
    assert result.exit_code == 0, result.stderr
    fid = json.loads(report.read_text())["fidelity"]
    assert fid["images"] == 2 and fid["on"] == "holdout"
    assert "2 held-out calibration images" in result.stdout
    assert "fidelity" in result.stdout and "top-1 agreement" in result.stdout

    baked_path = out / "baked.safetensors"
    assert invoke("bake", out / "a.anann.safetensors", "-o", baked_path, "-q").exit_code == 0
    original = torchvision.models.squeezenet1_0(weights=None).eval()
    original.load_state_dict(torch.load(squeezenet_ckpt, weights_only=True))
    baked = torchvision.models.squeezenet1_0(weights=None).eval()
    baked.load_state_dict(load_file(baked_path))
    transform = torchvision.models.SqueezeNet1_0_Weights.DEFAULT.transforms()
    files = sorted(images.iterdir())
    x = torch.stack([transform(Image.open(files[i]).convert("RGB")) for i in held_positions(8, 2)])
    with torch.no_grad():
        zo, zb = original(x), baked(x)
        f0o = original.features[0](x)
        f0b = baked.features[0](x)
    assert fid["logits_rel_error"] == pytest.approx(float((zb - zo).norm() / zo.norm()), rel=1e-3)
    agree = float((zo.argmax(1) == zb.argmax(1)).double().mean())
    assert fid["top1_agreement"] == pytest.approx(agree)
    layer_err = float((f0b - f0o).norm() / f0o.norm())
    assert fid["layer_rel_error"]["features.0"] == pytest.approx(layer_err, rel=1e-3)
    assert 0 < layer_err < 1
