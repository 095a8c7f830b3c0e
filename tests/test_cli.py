"""Acceptance tests of the ``acl-convert`` command line: invocation forms, output discipline and
every bad input of the issue, each checked for its one-line message, its exit code (2 usage,
1 everything else), the absence of a traceback and that nothing was written.

Runs in-process (``typer.testing.CliRunner``) in ``tmp_path``; the real end-to-end conversions
are in ``test_end_to_end.py``. Made-up checkpoints are tiny or random torchvision state dicts
written to ``tmp_path``; the real checkpoints are only read (or copied, cut short, into tmp).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision
from torch import nn

import acl_convert
from acl_convert.errors import UserError
from acl_convert.io import checkpoint as checkpoint_module
from acl_convert.io import outputs as files_module

TINY_STEM = "tiny"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def tiny_state() -> dict[str, torch.Tensor]:
    """A small CNN no torchvision model matches: a 3x3 conv, a 1x1 conv, a BN and a Linear."""
    g = torch.Generator().manual_seed(0)
    return {
        "conv1.weight": torch.randn(4, 3, 3, 3, generator=g),
        "conv1.bias": torch.randn(4, generator=g),
        "proj.weight": torch.randn(8, 4, 1, 1, generator=g),
        "bn.weight": torch.ones(8),
        "bn.bias": torch.zeros(8),
        "fc.weight": torch.randn(2, 8, generator=g),
        "fc.bias": torch.zeros(2),
    }


@pytest.fixture
def tiny(work: Path) -> Path:
    path = work / f"{TINY_STEM}.pth"
    torch.save(tiny_state(), path)
    return path


@pytest.fixture(scope="session")
def random_mobilenet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """A torchvision-shaped MobileNetV2 state dict with random weights (architecture detected)."""
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(weights=None).state_dict()


def assert_error(result, code: int, *needles: str) -> str:
    """One ``error:`` line naming the problem and the fix, exit ``code``, no traceback, empty
    stdout. Returns the error line."""
    everything = result.stdout + result.stderr
    assert result.exit_code == code, everything
    assert "Traceback" not in everything
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0] == lines[-1], "the error must be the last thing said"
    for needle in needles:
        assert needle.lower() in errors[0].lower(), (needle, errors[0])
    return errors[0]


def assert_quiet_error(result, code: int, *needles: str) -> str:
    """As :func:`assert_error`, and with ``--quiet`` stderr is that one line alone."""
    line = assert_error(result, code, *needles)
    assert result.stderr.strip() == line
    return line


# --- invocation ---------------------------------------------------------------------------------


def test_version(invoke):
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"acl-convert {acl_convert.__version__}"


@pytest.mark.parametrize(
    "command", [None, "convert", "layers", "bake", "export", "info", "evaluate", "finetune"]
)
def test_help(invoke, command):
    result = invoke(*([command] if command else []), "--help")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "Usage" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_no_arguments_prints_help(invoke):
    result = invoke()
    assert result.exit_code in (0, 2)  # click's no_args_is_help exits 2 from click 8.2 on
    assert "Usage" in result.stdout + result.stderr


def test_implied_and_explicit_convert_agree(invoke, tiny, work, files_in):
    """``acl-convert CKPT --layers X`` is ``acl-convert convert CKPT --layers X``, and the
    fit is deterministic, so both write the same report."""
    implied = invoke(tiny, "--layers", "conv1", "-q")
    assert implied.exit_code == 0, implied.stderr
    assert files_in(work) == {
        "tiny.pth",
        "tiny.anann.safetensors",
        "tiny.report.json",
        "tiny.report.html",
    }
    first = json.loads((work / "tiny.report.json").read_text())

    explicit = invoke("convert", tiny, "--layers", "conv1", "-q", "--force")
    assert explicit.exit_code == 0, explicit.stderr
    second = json.loads((work / "tiny.report.json").read_text())
    assert first == second
    assert implied.stdout == explicit.stdout


def test_options_before_the_checkpoint(invoke, tiny, work):
    result = invoke("--layers", "conv1", "-q", tiny)
    assert result.exit_code == 0, result.stderr
    assert (work / "tiny.anann.safetensors").is_file()


def test_layers_weight_suffix_and_commas(invoke, tiny, work):
    result = invoke(tiny, "--layers", "conv1.weight,conv1", "-q")
    assert result.exit_code == 0, result.stderr
    doc = json.loads((work / "tiny.report.json").read_text())
    assert [lay["name"] for lay in doc["layers"]] == ["conv1"]


def test_quiet_is_silent_but_for_errors(invoke, tiny, work):
    result = invoke(tiny, "--layers", "conv1", "--quiet")
    assert result.exit_code == 0
    assert result.stderr == "" and result.stdout == ""
    assert (work / "tiny.report.json").is_file()


def test_without_quiet_progress_and_notes_go_to_stderr_only(invoke, tiny):
    result = invoke(tiny, "--layers", "conv1")
    assert result.exit_code == 0
    assert "fitted" in result.stderr and "writing tiny.anann.safetensors" in result.stderr
    assert "architecture not recognised" in result.stderr
    assert "wrote tiny.anann.safetensors" in result.stderr
    for noise in ("fitted", "architecture", "wrote", "━"):
        assert noise not in result.stdout
    assert "acl-convert: converted layers" in result.stdout


def test_explicit_output_names(invoke, tiny, work, files_in):
    (work / "out").mkdir()
    result = invoke(
        tiny, "--layers", "conv1", "-q", "-o", "out/net.anann.safetensors", "--report", "r.json"
    )
    assert result.exit_code == 0, result.stderr
    assert files_in(work) == {
        "tiny.pth",
        "out",
        "out/net.anann.safetensors",
        "out/net.report.html",
        "r.json",
    }


def test_report_name_follows_output(invoke, tiny, work, files_in):
    result = invoke(tiny, "--layers", "conv1", "-q", "-o", "other.anann.safetensors")
    assert result.exit_code == 0, result.stderr
    assert files_in(work) == {
        "tiny.pth",
        "other.anann.safetensors",
        "other.report.json",
        "other.report.html",
    }


def test_force_overwrites(invoke, tiny, work):
    (work / "tiny.anann.safetensors").write_text("old")
    (work / "tiny.report.json").write_text("old")
    result = invoke(tiny, "--layers", "conv1", "-q", "--force")
    assert result.exit_code == 0, result.stderr
    assert json.loads((work / "tiny.report.json").read_text())["format"] == "acl-convert/report"
    assert acl_convert.io.anann.is_anann(work / "tiny.anann.safetensors")


def test_trust_pickle_allows_a_pickled_model(invoke, work):
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3)), work / "whole.pth")
    result = invoke(work / "whole.pth", "--layers", "0", "-q", "--trust-pickle")
    assert result.exit_code == 0, result.stderr
    assert (work / "whole.anann.safetensors").is_file()


def test_layers_command_on_an_unknown_architecture(invoke, tiny):
    result = invoke("layers", tiny, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["arch"] is None
    rows = {r["name"]: r for r in doc["layers"]}
    assert rows["conv1"]["kernels"] == 12 and rows["conv1"]["eligible"]
    assert rows["proj"]["kernels"] == 32 and not rows["proj"]["eligible"]


def test_layers_command_on_real_squeezenet(invoke, squeezenet_ckpt):
    result = invoke("layers", squeezenet_ckpt, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["arch"] == "squeezenet1_0"
    rows = {r["name"]: r for r in doc["layers"]}
    first = rows["features.0"]
    assert first["kernels"] == 288
    assert first["shape"] == [96, 3, 7, 7]
    assert first["groups"] == 1 and first["eligible"]
    assert not rows["features.3.squeeze"]["eligible"]  # a 1x1 convolution

    table = invoke("layers", squeezenet_ckpt, "-q")
    assert table.exit_code == 0
    line = next(s for s in table.stdout.splitlines() if "features.0 " in s)
    assert "288" in line and "96×3×7×7" in line


def test_layers_command_on_real_mobilenet_shows_depthwise(invoke, mobilenet_ckpt):
    result = invoke("layers", mobilenet_ckpt, "--json")
    assert result.exit_code == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)["layers"]}
    assert rows["features.0.0"]["shape"] == [32, 3, 3, 3]
    assert rows["features.1.conv.0.0"]["groups"] == 32
    assert rows["features.1.conv.0.0"]["kernels"] == 32


def test_debug_lets_the_exception_through(invoke, work):
    result = invoke(work / "missing.pth", "--layers", "conv1", "--debug")
    assert result.exit_code == 1
    assert isinstance(result.exception, UserError)
    assert "no such file" in str(result.exception)


def test_interrupt_leaves_nothing(invoke, tiny, work, files_in, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("acl_convert.pipeline.fit_kernels", interrupted)
    before = files_in(work)
    result = invoke(tiny, "--layers", "conv1", "-q")
    assert result.exit_code == 130
    assert "nothing was written" in result.stderr
    assert files_in(work) == before


def test_failure_while_writing_leaves_no_partial_files(invoke, tiny, work, files_in, monkeypatch):
    """The AnaNN and the report are already in their temporary files when the mosaic fails;
    all of them must go."""

    def broken(*args, **kwargs):
        raise UserError("disk full while drawing; free some space")

    monkeypatch.setattr("acl_convert.report.pictures.kernel_mosaic", broken)
    before = files_in(work)
    result = invoke(tiny, "--layers", "conv1", "-q", "--mosaic", "m.png")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == ["error: disk full while drawing; free some space"]
    assert files_in(work) == before


# --- bad input: each case of the issue, message + exit code + nothing written -----------------


def test_missing_checkpoint(invoke, work, files_in):
    result = invoke(work / "nope.pth", "--layers", "conv1", "-q")
    assert_quiet_error(result, 1, "nope.pth", "no such file", "check the path")
    assert files_in(work) == set()


def test_brackets_in_names_are_printed_literally(invoke, work, files_in):
    """Terminal markup must not swallow ``[...]`` in a user's file name."""
    result = invoke(work / "run[bold]1.pth", "--layers", "conv1", "-q")
    assert_quiet_error(result, 1, "run[bold]1.pth", "no such file")


def test_help_shows_defaults_in_brackets(invoke):
    result = invoke("convert", "--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())  # help wraps at 80 columns
    assert "[default: 0.3]" in text
    assert "[default: ./<stem>.anann.safetensors]" in text


def test_help_is_readable_at_80_columns(invoke):
    """Option names in one column, descriptions beside them in most of the width."""
    result = invoke("convert", "--help", env={"COLUMNS": "80"})
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    described = [line for line in lines if line.startswith("  -") and len(line.split("  ")) > 1]
    widths = [len(line.rstrip()) - line.rstrip().rfind("  ") for line in described]
    assert sum(w > 30 for w in widths) > len(widths) / 2  # descriptions get room


def test_checkpoint_is_a_folder(invoke, work, files_in):
    (work / "weights").mkdir()
    result = invoke(work / "weights", "--layers", "conv1", "-q")
    assert_quiet_error(result, 1, "is a folder", "give the file inside it")
    assert files_in(work) == {"weights"}


@pytest.mark.skipif(IS_ROOT, reason="root reads files whatever their mode; see the next test")
def test_unreadable_checkpoint_by_mode(invoke, tiny, work, files_in):
    tiny.chmod(0)
    try:
        before = files_in(work)
        result = invoke(tiny, "--layers", "conv1", "-q")
        assert_quiet_error(result, 1, "not readable", "permission denied", "chmod")
        assert files_in(work) == before
    finally:
        tiny.chmod(0o644)


def test_unreadable_checkpoint(invoke, tiny, work, files_in, monkeypatch):
    """Permission denied on open, simulated for the checkpoint module only: under root (as in
    CI containers) a mode of 000 does not stop reading."""
    real_open = open

    def deny(file, *args, **kwargs):
        if Path(file).name == tiny.name:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "open", deny, raising=False)
    before = files_in(work)
    result = invoke(tiny, "--layers", "conv1", "-q")
    assert_quiet_error(result, 1, "not readable", "permission denied", "chmod")
    assert files_in(work) == before


@pytest.mark.parametrize(
    ("name", "content", "needles"),
    [
        ("notes.pth", b"these are my notes, not weights\n", ("not a checkpoint", "text file")),
        ("page.pth", b"<!DOCTYPE html><html><body>404</body></html>", ("html page", "download")),
        ("model.pth", b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n", ("lfs",)),
        ("image.png", bytes(range(256)) * 4, ("not a checkpoint", "unknown file format")),
        ("empty.pth", b"", ("empty", "re-download")),
    ],
)
def test_not_a_checkpoint(invoke, work, files_in, name, content, needles):
    (work / name).write_bytes(content)
    result = invoke(work / name, "--layers", "conv1", "-q")
    line = assert_quiet_error(result, 1, name, *needles)
    if "not a checkpoint (" in line and "html" not in line.lower():
        assert "state dict" in line  # the fix: what to give instead
    assert files_in(work) == {name}


def _truncated_torch(work: Path) -> Path:
    torch.save(tiny_state(), work / "whole.pth")
    data = (work / "whole.pth").read_bytes()
    (work / "whole.pth").unlink()
    (work / "cut.pth").write_bytes(data[: len(data) // 2])
    return work / "cut.pth"


def _truncated_legacy(work: Path) -> Path:
    torch.save(tiny_state(), work / "whole.pth", _use_new_zipfile_serialization=False)
    data = (work / "whole.pth").read_bytes()
    (work / "whole.pth").unlink()
    (work / "cut.pth").write_bytes(data[: len(data) // 2])
    return work / "cut.pth"


def _truncated_safetensors(work: Path) -> Path:
    safetensors.torch.save_file(tiny_state(), str(work / "whole.safetensors"))
    data = (work / "whole.safetensors").read_bytes()
    (work / "whole.safetensors").unlink()
    (work / "cut.safetensors").write_bytes(data[: len(data) - 100])
    return work / "cut.safetensors"


def _garbage(work: Path) -> Path:
    g = torch.Generator().manual_seed(1)
    (work / "cut.pth").write_bytes(bytes(torch.randint(0, 256, (4096,), generator=g).tolist()))
    return work / "cut.pth"


@pytest.mark.parametrize(
    "make", [_truncated_torch, _truncated_legacy, _truncated_safetensors, _garbage]
)
def test_truncated_or_corrupt(invoke, work, files_in, make):
    path = make(work)
    before = files_in(work)
    result = invoke(path, "--layers", "conv1", "-q")
    assert_quiet_error(result, 1, path.name, "truncated or corrupt", "re-download")
    assert files_in(work) == before


def test_truncated_real_checkpoint(invoke, work, files_in, sample_ckpt):
    data = sample_ckpt.read_bytes()
    cut = work / sample_ckpt.name
    cut.write_bytes(data[: len(data) // 2])
    result = invoke(cut, "--layers", "features.0", "-q")
    assert_quiet_error(result, 1, "truncated or corrupt", "re-download")
    assert files_in(work) == {cut.name}


def test_refused_pickle(invoke, work, files_in):
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3)), work / "whole.pth")
    result = invoke(work / "whole.pth", "--layers", "0", "-q")
    assert_quiet_error(result, 1, "pickled python objects", "--trust-pickle", "state_dict()")
    assert files_in(work) == {"whole.pth"}


def test_unknown_architecture(invoke, tiny, work, files_in):
    result = invoke(tiny, "--layers", "conv1", "--arch", "resnet5O", "-q")
    assert_quiet_error(result, 2, "unknown architecture", "resnet5O", "closest: resnet50")
    assert files_in(work) == {"tiny.pth"}


def test_architecture_that_does_not_fit(invoke, tiny, work, files_in):
    result = invoke(tiny, "--layers", "conv1", "--arch", "resnet18", "-q")
    assert_quiet_error(result, 2, "does not fit --arch resnet18", "leave --arch out")
    assert files_in(work) == {"tiny.pth"}


def test_selector_matching_nothing(invoke, tiny, work, files_in):
    result = invoke(tiny, "--layers", "conv9", "-q")
    assert_quiet_error(result, 2, "'conv9'", "matches no convolution", "closest: conv1")
    assert files_in(work) == {"tiny.pth"}


def test_glob_matching_nothing(invoke, tiny, work, files_in):
    result = invoke(tiny, "--layers", "layer1.*", "-q")
    assert_quiet_error(result, 2, "matches no convolution", "closest")
    assert files_in(work) == {"tiny.pth"}


def test_selector_matching_nothing_in_real_squeezenet(invoke, work, files_in, sample_ckpt):
    """The issue's own example, ``--layers conv1``, on a network that names it ``features.0``."""
    result = invoke(sample_ckpt, "--layers", "conv1", "-q")
    assert_quiet_error(result, 2, "'conv1'", "matches no convolution", "closest: features.0")
    assert files_in(work) == set()


@pytest.mark.parametrize(
    ("layer", "needles"),
    [
        ("fc", ("fc is not a 2-D convolution", "select a convolution")),
        ("bn", ("bn is not a 2-D convolution", "select a convolution")),
    ],
)
def test_selected_layer_is_not_a_convolution(invoke, tiny, work, files_in, layer, needles):
    result = invoke(tiny, "--layers", layer, "-q")
    assert_quiet_error(result, 2, *needles)
    assert files_in(work) == {"tiny.pth"}


def test_selected_block_is_not_a_convolution(invoke, work, files_in, mobilenet_ckpt):
    result = invoke(mobilenet_ckpt, "--layers", "features.1", "-q")
    assert_quiet_error(result, 2, "block of layers", "'features.1.*'")
    assert files_in(work) == set()


def test_selected_1x1_convolution(invoke, tiny, work, files_in):
    result = invoke(tiny, "--layers", "proj", "-q")
    assert_quiet_error(result, 2, "proj is a 1x1 convolution", "select another layer")
    assert files_in(work) == {"tiny.pth"}


def test_glob_matching_only_1x1(invoke, work, files_in, squeezenet_ckpt):
    result = invoke(squeezenet_ckpt, "--layers", "*.squeeze", "-q")
    assert_quiet_error(result, 2, "matches only 1x1", "2x2 or larger")
    assert files_in(work) == set()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights(invoke, work, files_in, random_mobilenet, bad):
    state = {k: v.clone() for k, v in random_mobilenet.items()}
    state["features.0.0.weight"][5, 1, 2, 0] = bad
    torch.save(state, work / "broken.pth")
    result = invoke(work / "broken.pth", "--layers", "features.0.0", "-q")
    assert_quiet_error(result, 1, "features.0.0", "nan or inf")
    assert files_in(work) == {"broken.pth"}


@pytest.mark.parametrize("existing", ["tiny.anann.safetensors", "tiny.report.json"])
def test_existing_output_without_force(invoke, tiny, work, files_in, existing):
    (work / existing).write_text("keep me")
    result = invoke(tiny, "--layers", "conv1", "-q")
    assert_quiet_error(result, 2, existing, "already exists", "--force")
    assert files_in(work) == {"tiny.pth", existing}
    assert (work / existing).read_text() == "keep me"


def test_existing_mosaic_without_force(invoke, tiny, work, files_in):
    (work / "m.png").write_text("keep me")
    result = invoke(tiny, "--layers", "conv1", "-q", "--mosaic", "m.png")
    assert_quiet_error(result, 2, "m.png", "already exists", "--force")
    assert files_in(work) == {"tiny.pth", "m.png"}


def test_output_is_a_folder(invoke, tiny, work, files_in):
    (work / "outdir").mkdir()
    result = invoke(tiny, "--layers", "conv1", "-q", "-o", "outdir", "--force")
    assert_quiet_error(result, 2, "outdir is a folder", "give a file name")
    assert files_in(work) == {"tiny.pth", "outdir"}


@pytest.mark.skipif(IS_ROOT, reason="root may write into a folder of mode 0500")
def test_unwritable_output_folder_by_mode(invoke, tiny, work, files_in):
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = invoke(tiny, "--layers", "conv1", "-q", "-o", locked / "net.anann.safetensors")
        assert_quiet_error(result, 1, "not writable", "choose another output")
        assert files_in(work) == {"tiny.pth", "locked"}
    finally:
        locked.chmod(0o700)


def test_unwritable_output_folder(invoke, tiny, work, files_in, monkeypatch):
    """An output folder the user may not write to. Under root (CI containers) a mode of 0500
    does not stop writing, so the folder refuses the trial file the planner creates; the mode
    test above covers real permissions for other users."""
    locked = work / "locked"
    locked.mkdir()
    real_mkstemp = files_module.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == locked.resolve():
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(files_module.tempfile, "mkstemp", mkstemp)
    result = invoke(tiny, "--layers", "conv1", "-q", "-o", locked / "net.anann.safetensors")
    assert_quiet_error(result, 1, "locked", "not writable", "choose another output")
    assert files_in(work) == {"tiny.pth", "locked"}


@pytest.mark.parametrize("parent", ["missing", "afile"])
def test_output_folder_does_not_exist(invoke, tiny, work, files_in, parent):
    """Holds for root too: a folder that does not exist (or is a file) cannot be written into."""
    if parent == "afile":
        (work / "afile").write_text("x")
    before = files_in(work)
    result = invoke(tiny, "--layers", "conv1", "-q", "-o", f"{parent}/net.anann.safetensors")
    assert_quiet_error(result, 1, parent, "does not exist", "choose another output")
    assert files_in(work) == before


def test_report_folder_does_not_exist(invoke, tiny, work, files_in):
    result = invoke(tiny, "--layers", "conv1", "-q", "--report", "nowhere/r.json")
    assert_quiet_error(result, 1, "nowhere", "does not exist")
    assert files_in(work) == {"tiny.pth"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_gpu(invoke, tiny, work, files_in, device):
    result = invoke(tiny, "--layers", "conv1", "-q", "--device", device)
    assert_quiet_error(result, 1, "no cuda gpu", "--device cpu")
    assert files_in(work) == {"tiny.pth"}


def test_malformed_device(invoke, tiny, work, files_in):
    result = invoke(tiny, "--layers", "conv1", "-q", "--device", "tpu")
    assert_quiet_error(result, 2, "--device", "auto")
    assert files_in(work) == {"tiny.pth"}


@pytest.mark.parametrize(
    ("option", "value", "needles"),
    [
        ("--select", "smallest", ("--select must be one of", "best", "compact")),
        ("--threshold", "-0.5", ("--threshold must be a number >= 0",)),
        ("--threshold", "nan", ("--threshold must be a number >= 0",)),
        ("--families", "G,X", ("--families",)),
        ("--families", "G,P", ("--families", "only analytic families")),
    ],
)
def test_bad_option_values(invoke, tiny, work, files_in, option, value, needles):
    result = invoke(tiny, "--layers", "conv1", "-q", option, value)
    assert_quiet_error(result, 2, *needles)
    assert files_in(work) == {"tiny.pth"}


def test_missing_layers_option(invoke, tiny, work, files_in):
    result = invoke(tiny)
    assert result.exit_code == 2
    assert "--layers" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert files_in(work) == {"tiny.pth"}


def test_calibration_folder_missing(invoke, tiny, work, files_in):
    result = invoke(tiny, "--layers", "conv1", "-q", "--calibration", "imgs")
    assert_quiet_error(result, 1, "imgs", "does not exist", "check the path")
    assert files_in(work) == {"tiny.pth"}


def test_calibration_folder_empty(invoke, tiny, work, files_in):
    (work / "imgs").mkdir()
    result = invoke(tiny, "--layers", "conv1", "-q", "--calibration", "imgs")
    assert_quiet_error(result, 1, "imgs", "contains no images", "folder of images")
    assert files_in(work) == {"tiny.pth", "imgs"}


def test_calibration_folder_without_images(invoke, tiny, work, files_in):
    (work / "imgs").mkdir()
    (work / "imgs" / "labels.csv").write_text("a,b\n")
    (work / "imgs" / "README.md").write_text("images go here\n")
    before = files_in(work)
    result = invoke(tiny, "--layers", "conv1", "-q", "--calibration", "imgs")
    assert_quiet_error(result, 1, "contains no images", "folder of images")
    assert files_in(work) == before


def test_calibration_is_a_file(invoke, tiny, work, files_in):
    result = invoke(tiny, "--layers", "conv1", "-q", "--calibration", tiny)
    assert_quiet_error(result, 1, "is not a folder", "folder of images")
    assert files_in(work) == {"tiny.pth"}


def test_calibration_needs_an_architecture(invoke, tiny, work, files_in, copy_images):
    copy_images(work / "imgs", 2)
    before = files_in(work)
    result = invoke(tiny, "--layers", "conv1", "-q", "--calibration", "imgs")
    assert_quiet_error(result, 2, "needs a known architecture", "--arch")
    assert files_in(work) == before


def test_unreadable_calibration_image(invoke, work, files_in, random_mobilenet, copy_images):
    """The images are read after the fit: a broken one must still leave nothing behind."""
    torch.save(random_mobilenet, work / "mnet.pth")
    copy_images(work / "imgs", 2)
    (work / "imgs" / "zz_broken.jpg").write_text("not a picture")
    before = files_in(work)
    result = invoke(
        work / "mnet.pth", "--layers", "features.1.conv.0.0", "-q", "--calibration", "imgs"
    )
    assert_quiet_error(result, 1, "zz_broken.jpg", "cannot read image", "remove or replace it")
    assert files_in(work) == before


# --- the other subcommands' bad input -----------------------------------------------------------


def test_bake_export_info_missing_file(invoke, work, files_in):
    for args in (
        ("bake", "gone.anann.safetensors", "-o", "x.pth"),
        ("export", "gone.anann.safetensors"),
        ("info", "gone.pth"),
    ):
        result = invoke(*args)
        assert_quiet_error(result, 1, "gone.", "no such file", "check the path")
    assert files_in(work) == set()


def test_bake_and_export_refuse_a_plain_checkpoint(invoke, tiny, work, files_in):
    result = invoke("bake", tiny, "-o", "baked.pth")
    assert_quiet_error(result, 1, "not a readable anann", "acl-convert checkpoint --layers")
    safetensors.torch.save_file(tiny_state(), str(work / "plain.safetensors"))
    result = invoke("export", work / "plain.safetensors")
    assert_quiet_error(result, 1, "not an anann", "acl-convert checkpoint --layers")
    assert files_in(work) == {"tiny.pth", "plain.safetensors"}


def test_bake_existing_output_and_bad_export_format(invoke, tiny, work, files_in):
    assert invoke(tiny, "--layers", "conv1", "-q").exit_code == 0
    (work / "baked.pth").write_text("keep me")
    before = files_in(work)
    result = invoke("bake", "tiny.anann.safetensors", "-o", "baked.pth")
    assert_quiet_error(result, 2, "baked.pth", "already exists", "--force")
    result = invoke("export", "tiny.anann.safetensors", "--format", "xml")
    assert_quiet_error(result, 2, "--format must be one of json, jsonl, csv", "xml")
    result = invoke("export", "tiny.anann.safetensors", "-o", "baked.pth")
    assert_quiet_error(result, 2, "already exists", "--force")
    assert files_in(work) == before
    assert (work / "baked.pth").read_text() == "keep me"


def test_info_on_a_non_checkpoint(invoke, work):
    (work / "notes.txt").write_text("hello\n")
    result = invoke("info", work / "notes.txt")
    assert_quiet_error(result, 1, "not a checkpoint", "state dict")
