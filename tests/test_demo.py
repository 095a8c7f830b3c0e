"""The embedded real sample and ``acl-convert demo`` (issue 16): the sample is the published file
(sha256, no pickle, shape, dtype, licence beside it), derived as documented from the shared data;
the demo converts it on any machine into a new folder, never replacing anything, and writes an
AnaNN whose kernels are the sample's to the reported residuals."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import acl_convert
from acl_convert.errors import UsageError, UserError
from acl_convert.io.anann import bake_state_dict, read_anann
from acl_convert.report.document import decode_columns
from acl_convert.sample import DEMO_FOLDER, SAMPLE_SHA256, load_sample, sample_path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
STEM = "squeezenet1_0_conv1"
FILES = {
    f"{STEM}.anann.safetensors",
    f"{STEM}.report.json",
    f"{STEM}.features.0.png",
    f"{STEM}.report.html",
}
#: The upstream LICENCE of songhan/SqueezeNet-Deep-Compression, as a git blob id.
LICENCE_BLOB = "f1a0450493587fcdfb07b8fc5d7a8d4d671636ed"


# --- the sample --------------------------------------------------------------------------------


def test_sample_is_the_published_file():
    data = sample_path().read_bytes()
    assert len(data) == 57_552
    assert hashlib.sha256(data).hexdigest() == SAMPLE_SHA256
    assert SAMPLE_SHA256 == "ce6f8d40ef2541b7b39b0e21cd72e7626b9014e0d563a3c45592b3210f48b7a4"


def test_sample_tensors_load_without_pickle(sample_ckpt):
    state = load_sample()  # safetensors: no pickle at all
    assert sorted(state) == ["features.0.bias", "features.0.weight"]
    assert state["features.0.weight"].shape == (96, 3, 7, 7)
    assert state["features.0.bias"].shape == (96,)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state.values())
    # Real, trained kernels: mostly nonzero (Deep Compression pruned conv1 by 1.5 %).
    assert 0.97 < float((state["features.0.weight"] != 0).float().mean()) < 1
    # The test fixture's torch copy loads with weights_only=True and holds the same tensors.
    copy = torch.load(sample_ckpt, weights_only=True)
    assert all(torch.equal(copy[k], state[k]) for k in state)


def test_sample_carries_its_source_and_licence():
    with safetensors.safe_open(str(sample_path()), "pt") as f:
        meta = json.loads(f.metadata()["sample"])
    assert "songhan/SqueezeNet-Deep-Compression" in meta["source"]
    assert "BSD-2-Clause" in meta["licence"]
    assert meta["derived_by"] == "scripts/make_sample.py"
    licence = (sample_path().parent / "LICENCE-SqueezeNet-Deep-Compression").read_bytes()
    blob = hashlib.sha1(b"blob %d\0" % len(licence) + licence).hexdigest()
    assert blob == LICENCE_BLOB  # byte for byte the upstream file
    readme = (sample_path().parent / "README.md").read_text()
    assert SAMPLE_SHA256 in readme and "BSD 2-Clause" in readme


def test_package_data_is_declared():
    """The wheel and editable installs carry the sample: pyproject names it as package data."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib comes with Python 3.11")
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "acl_convert.sample" in conf["packages"]
    globs = conf["package-data"]["acl_convert.sample"]
    assert {"*.safetensors", "LICENCE-*"} <= set(globs)


def test_sample_is_derived_as_documented():
    """scripts/make_sample.py derives the committed bytes again from ../shared/data."""
    source = SHARED / "weights" / "squeezenet1_0_deepcompression_tvnorm.pth"
    if not source.is_file():
        pytest.skip(f"{source.name} not found in {source.parent} (../shared/data absent)")
    spec = importlib.util.spec_from_file_location("make_sample", REPO / "scripts/make_sample.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.sample_bytes(SHARED) == sample_path().read_bytes()
    full = torch.load(source, weights_only=True)
    for key, value in load_sample().items():
        assert torch.equal(full[key], value)


# --- the demo ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, invoke):
    """``acl-convert demo`` once, in a working directory where ``acl-convert-demo`` is taken."""
    work = tmp_path_factory.mktemp("demo")
    taken = work / DEMO_FOLDER
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        result = invoke("demo")
    assert result.exit_code == 0, result.stderr
    folder = work / f"{DEMO_FOLDER}-2"
    return {"work": work, "folder": folder, "result": result}


def test_demo_writes_into_a_new_folder_and_touches_nothing(demo_run, files_in):
    work, folder = demo_run["work"], demo_run["folder"]
    assert files_in(work) == {DEMO_FOLDER, f"{DEMO_FOLDER}/keep.txt", folder.name} | {
        f"{folder.name}/{name}" for name in FILES
    }
    assert (work / DEMO_FOLDER / "keep.txt").read_text() == "mine"


def test_demo_prints_what_it_did_and_what_next(demo_run):
    out = demo_run["result"].stdout
    for needle in (
        "SqueezeNet 1.0",
        "features.0",
        "288",
        "compact factor",
        f"wrote {DEMO_FOLDER}-2{os.sep}",
        *FILES,
        "your own checkpoint",
        "acl-convert layers model.pth",
        f"acl-convert info {DEMO_FOLDER}-2{os.sep}{STEM}.anann.safetensors",
    ):
        assert needle in out, needle
    assert "Traceback" not in demo_run["result"].stderr


def test_demo_report_is_the_real_conv1_largely_gabor(demo_run):
    """The paper's observation on real first layers: SqueezeNet's 7x7 RGB kernels are largely
    Gabor-like. At the default tau = 0.3 a good share of them convert, mostly to Gabor."""
    doc = json.loads((demo_run["folder"] / f"{STEM}.report.json").read_text())
    assert doc["source"]["sha256"] == SAMPLE_SHA256 and doc["arch"] is None
    assert doc["settings"]["threshold"] == 0.3
    (lay,) = doc["layers"]
    assert lay["name"] == "features.0" and lay["kernels"] == 288
    assert lay["converted"] >= 40
    assert lay["family_counts"].get("G", 0) >= lay["converted"] // 2
    assert 0 < lay["compact_factor"] < 1


def test_demo_anann_is_the_sample_to_the_fitted_residuals(demo_run):
    """The AnaNN is valid (read and checked), and baked back its kernels are the sample's: each
    analytic one within its reported residual, each plain one bit for bit, the bias unchanged."""
    folder = demo_run["folder"]
    doc = json.loads((folder / f"{STEM}.report.json").read_text())
    baked = bake_state_dict(read_anann(folder / f"{STEM}.anann.safetensors"))
    original = load_sample()
    assert sorted(baked) == sorted(original)
    assert torch.equal(baked["features.0.bias"], original["features.0.bias"])
    k0 = original["features.0.weight"].flatten(0, 1)
    k1 = baked["features.0.weight"].flatten(0, 1)
    cols = decode_columns(doc["layers"][0]["per_kernel"])
    assert len(cols["family"]) == 288
    for i, (family, residual) in enumerate(zip(cols["family"], cols["residual"], strict=True)):
        if family == "P":
            assert torch.equal(k1[i], k0[i])
        else:
            err = float((k1[i] - k0[i]).norm() / k0[i].norm())
            # The report keeps residuals as float16: 2^-11 relative.
            assert err == pytest.approx(float(residual), rel=1e-3, abs=1e-6)
            assert float(residual) <= 0.3 * (1 + 2**-10)


def test_demo_anann_loads_as_a_module(demo_run):
    net = nn.Sequential()
    net.features = nn.Sequential(nn.Conv2d(3, 96, 7, stride=2))
    model = acl_convert.load_anann(demo_run["folder"] / f"{STEM}.anann.safetensors", net).eval()
    assert isinstance(model.features[0], acl_convert.ACL)
    baked = bake_state_dict(read_anann(demo_run["folder"] / f"{STEM}.anann.safetensors"))
    x = torch.randn(2, 3, 31, 31, generator=torch.Generator().manual_seed(0))
    expected = nn.functional.conv2d(
        x, baked["features.0.weight"], baked["features.0.bias"], stride=2
    )
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_demo_pictures(demo_run):
    folder = demo_run["folder"]
    assert (folder / f"{STEM}.features.0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (folder / f"{STEM}.report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "features.0" in page
    assert page.count("data:image/png;base64,") >= 2


def test_demo_from_python_into_a_named_folder(tmp_path):
    target = tmp_path / "a" / "b"
    result = acl_convert.demo(target)
    assert result.folder == target
    assert {p.name for p in target.iterdir()} == FILES
    assert set(result.files) == {"anann", "report", "mosaic", "html"}
    assert 0 < result.conversion.compact_factor < 1
    assert result.conversion.layers[0].layer.name == "features.0"
    assert "your own checkpoint" in result.summary()
    # Again into the same folder: every file is there already; nothing is replaced.
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(UsageError, match="already exists"):
        acl_convert.demo(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_demo_into_an_existing_folder_with_one_file_taken(invoke, tmp_path, files_in):
    (tmp_path / f"{STEM}.report.html").write_text("mine")
    result = invoke("demo", tmp_path, "-q")
    assert result.exit_code == 2
    assert "already exists" in result.stderr and "Traceback" not in result.stderr
    assert files_in(tmp_path) == {f"{STEM}.report.html"}
    assert (tmp_path / f"{STEM}.report.html").read_text() == "mine"


def test_demo_folder_that_is_a_file(invoke, tmp_path, files_in):
    (tmp_path / "f").write_text("mine")
    result = invoke("demo", tmp_path / "f", "-q")
    assert result.exit_code == 2
    assert "not a folder" in result.stderr
    assert files_in(tmp_path) == {"f"}


def test_interrupted_demo_leaves_no_folder(invoke, tmp_path, monkeypatch, files_in):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("acl_convert.pipeline.fit_kernels", interrupted)
    monkeypatch.chdir(tmp_path)
    result = invoke("demo", "-q")
    assert result.exit_code == 130
    assert files_in(tmp_path) == set()


def test_demo_refuses_an_altered_sample(tmp_path, monkeypatch):
    altered = tmp_path / "squeezenet1_0_conv1.safetensors"
    state = load_sample()
    state["features.0.bias"] = state["features.0.bias"] + 1
    safetensors.torch.save_file(state, str(altered))
    monkeypatch.setattr("acl_convert.sample.demonstration.sample_path", lambda: altered)
    with pytest.raises(UserError, match="reinstall"):
        acl_convert.demo(tmp_path / "out")
    assert not (tmp_path / "out").exists()
