"""Issue 13, classes 2, 3, 5, 6, 7 and 8: what a hostile user found around the main path, each
case checked through the command line for its one-line message and exit code, and that no user
file changed (hashes before and after) and no stray file appeared. Damaged AnaNN files (class 4)
are in ``test_damaged_anann.py``; killing commands with real signals (class 7) in
``test_faults.py``.

Many cases must be refused *before the work*: the ``no_work`` fixture makes any conversion or
fine-tuning fail the test.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import zlib
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import tiny_project
from PIL import Image

from acl_convert.io.anann import read_anann, save_anann

# --- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture
def net(work: Path) -> dict:
    """A user-shaped network (``--arch tinynet.py:make``), its checkpoint, two labelled
    images and an AnaNN of it."""
    tiny_project(work, shade=60)
    state = torch.load(work / "tiny.pth", weights_only=True)
    return {"arch": ["--arch", "tinynet.py:make"], "ckpt": work / "tiny.pth", "state": state}


@pytest.fixture
def anann(invoke, net, work) -> Path:
    out = work / "tiny.anann.safetensors"
    result = invoke(net["ckpt"], "-l", "all", *net["arch"], "-q", "-o", out, "-t", "0.6")
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture
def no_work(monkeypatch):
    """Any conversion or fine-tuning fails the test: the case must be refused before."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the work started; the case should have been refused before")

    monkeypatch.setattr("acl_convert.pipeline.Job.run", forbidden)
    monkeypatch.setattr("acl_convert.train.finetune.finetune", forbidden)


@pytest.fixture
def no_detection(monkeypatch):
    """State dicts made up here match no known architecture; looking through every
    torchvision model to find that out costs most of a minute when nothing is cached yet."""
    monkeypatch.setattr("acl_convert.io.arch.detect_arch", lambda *args, **kwargs: None)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with the sha256 of its bytes; symbolic
    links by their target."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_line_error(result, code: int, *needles: str) -> str:
    everything = result.stdout + result.stderr
    assert result.exit_code == code, everything
    assert result.exception is None or isinstance(result.exception, SystemExit), everything
    assert "Traceback" not in everything
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
    for needle in needles:
        assert needle.lower() in errors[0].lower(), (needle, errors[0])
    return errors[0]


def refused(invoke, folder: Path, args, code: int, *needles: str) -> str:
    """Run, expect a one-line error, and that no file under ``folder`` changed or appeared."""
    before = snapshot(folder)
    line = one_line_error(invoke(*args), code, *needles)
    assert snapshot(folder) == before
    return line


# --- class 2: broken models that look fine -----------------------------------------------------


def test_evaluate_refuses_nan_logits(invoke, net, work):
    """Negative running variances give NaN logits from finite tensors; evaluate used to print
    an ordinary-looking top-1."""
    state = dict(net["state"], **{"bn.running_var": -torch.ones(6)})
    torch.save(state, work / "broken.pth")
    args = ["evaluate", "broken.pth", "--data", "imgs", *net["arch"], "-q"]
    refused(invoke, work, args, 1, "broken.pth", "NaN or Inf logits")
    args = ["evaluate", "tiny.pth", "--data", "imgs", *net["arch"], "--compare", "broken.pth"]
    refused(invoke, work, args, 1, "broken.pth", "NaN or Inf logits")


def test_evaluate_refuses_a_checkpoint_with_nan_tensors(invoke, net, work):
    """--compare against a NaN reference used to report a logits error of 0.0."""
    state = dict(net["state"], **{"fc.weight": torch.full((3, 6), float("nan"))})
    torch.save(state, work / "nan.pth")
    args = ["evaluate", "tiny.pth", "--data", "imgs", *net["arch"], "--compare", "nan.pth"]
    refused(invoke, work, args, 1, "nan.pth", "fc.weight", "NaN")


def test_convert_refuses_nan_outside_the_selected_layers(invoke, net, work, no_work):
    """The AnaNN keeps every other tensor; with NaN in one no reader would accept it."""
    state = dict(net["state"], **{"fc.bias": torch.tensor([0.0, float("inf"), 0.0])})
    torch.save(state, work / "inf.pth")
    refused(
        invoke, work, ["inf.pth", "-l", "conv1", "-q", *net["arch"]], 1, "fc.bias", "NaN or Inf"
    )


def test_bake_refuses_weights_that_overflow(invoke, anann, work):
    """Finite AKPs and gains can still synthesise Inf weights; bake used to write them."""
    with safetensors.safe_open(str(anann), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for key in ("conv1.gain.G", "conv1.offset.G"):
        tensors[key] = torch.full_like(tensors[key], 3.4e38)
    safetensors.torch.save_file(tensors, str(anann), meta)
    refused(invoke, work, ["bake", anann, "-o", "baked.pth", "-q"], 1, "conv1", "NaN or Inf")


# --- class 3: data loss with --force ------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["tiny.pth", "--arch", "tinynet.py:make", "-l", "conv1", "-o", "tiny.pth"],
        ["tiny.pth", "--arch", "tinynet.py:make", "-l", "conv1", "--report", "tiny.pth"],
        ["tiny.pth", "--arch", "tinynet.py:make", "-l", "conv1", "--mosaic", "tiny.pth"],
        ["bake", "tiny.anann.safetensors", "-o", "tiny.anann.safetensors"],
        ["export", "tiny.anann.safetensors", "-o", "tiny.anann.safetensors"],
        [
            "finetune",
            "tiny.anann.safetensors",
            "--data",
            "imgs",
            "--teacher",
            "tiny.pth",
            "-o",
            "tiny.pth",
        ],
        [
            "finetune",
            "tiny.anann.safetensors",
            "--data",
            "imgs",
            "--teacher",
            "tiny.pth",
            "-o",
            "tiny.anann.safetensors",
        ],
    ],
    ids=["convert", "report", "mosaic", "bake", "export", "finetune-teacher", "finetune-self"],
)
def test_an_input_is_never_an_output(invoke, net, anann, work, no_work, args):
    args = [*args, "-f", "-q"] + (net["arch"] if args[0] == "finetune" else [])
    refused(invoke, work, args, 2, "is an input of this command")


def test_a_hard_link_to_the_input_is_the_input(invoke, net, work, no_work):
    os.link("tiny.pth", "alias.pth")
    refused(
        invoke,
        work,
        ["tiny.pth", "--arch", "tinynet.py:make", "-l", "conv1", "-o", "alias.pth", "-f"],
        2,
        "input",
    )


@pytest.mark.parametrize("command", ["convert", "bake", "export"])
def test_special_files_are_not_replaced(invoke, net, anann, work, no_work, command):
    """A device, a symbolic link and a folder: --force used to replace them by regular
    files."""
    os.symlink("tiny.pth", "link.out")
    (work / "folder.out").mkdir()
    first = {
        "convert": ["tiny.pth", "--arch", "tinynet.py:make", "-l", "conv1"],
        "bake": ["bake", anann],
        "export": ["export", anann],
    }[command]
    for target, needle in (("/dev/null", "not a regular file"), ("link.out", "symbolic link")):
        refused(invoke, work, [*first, "-o", target, "-f", "-q"], 2, needle)
    refused(invoke, work, [*first, "-o", "folder.out", "-f", "-q"], 2, "folder")
    assert os.readlink("link.out") == "tiny.pth"


@pytest.mark.parametrize("mode", [0o640, 0o600, 0o755])
def test_a_replaced_file_keeps_its_mode(invoke, net, work, mode):
    for args, out in (
        (
            ["tiny.pth", "--arch", "tinynet.py:make", "-l", "conv1", "-o", "x.anann.safetensors"],
            "x.anann.safetensors",
        ),
        (["bake", "x.anann.safetensors", "-o", "x.pth"], "x.pth"),
        (["export", "x.anann.safetensors", "-o", "x.json"], "x.json"),
    ):
        Path(out).write_text("old")
        os.chmod(out, mode)
        result = invoke(*args, "-f", "-q")
        assert result.exit_code == 0, result.stderr
        assert Path(out).read_bytes() != b"old"
        assert os.stat(out).st_mode & 0o777 == mode


def test_a_new_file_gets_the_umask_mode(invoke, net, work):
    old = os.umask(0o027)
    try:
        assert invoke("tiny.pth", "--arch", "tinynet.py:make", "-l", "conv1", "-q").exit_code == 0
    finally:
        os.umask(old)
    assert os.stat("tiny.anann.safetensors").st_mode & 0o777 == 0o640


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["-o", "same.x", "--report", "same.x"], "as the AnaNN and as the report"),
        (["-o", "same.png", "--mosaic", "same.png"], "as the AnaNN and as the picture"),
        (["--report", "./r.png", "--mosaic", "r.png"], "as the report and as the picture"),
    ],
)
def test_two_outputs_on_one_path(invoke, net, work, no_work, extra, needle):
    refused(
        invoke,
        work,
        ["tiny.pth", "--arch", "tinynet.py:make", "-l", "conv1", "-q", "-f", *extra],
        2,
        needle,
    )


def test_two_layers_whose_pictures_share_a_name(invoke, work, no_work, no_detection):
    """``a b`` and ``a_b`` both become ``m.a_b.png``; one picture used to be lost silently."""
    torch.save(
        {"a b.weight": torch.randn(2, 2, 3, 3), "a_b.weight": torch.randn(2, 2, 3, 3)}, "two.pth"
    )
    refused(invoke, work, ["two.pth", "-l", "all", "-q", "--mosaic", "m.png"], 2, "twice")


# --- class 5: crashes after the work is done ----------------------------------------------------


def test_tie_channels_with_mosaic_writes_everything(invoke, net, work):
    (work / "pics").mkdir()
    result = invoke(
        "tiny.pth",
        "--arch",
        "tinynet.py:make",
        "-l",
        "all",
        "-q",
        "--tie-channels",
        "--mosaic",
        "pics",
        "-t",
        "0.7",
    )
    assert result.exit_code == 0, result.stderr
    assert {p.name for p in (work / "pics").iterdir()} == {"conv1.png", "conv2.png"}
    assert read_anann("tiny.anann.safetensors").layers["conv1"].tied


@pytest.mark.parametrize("name", ["a[/]b", "[bold]x[/bold]", "c[v1]", "[link=http://x]y"])
def test_names_with_markup_are_printed_as_they_are(invoke, work, name, no_detection):
    """Layer and file names went through rich markup: ``a[/]b`` crashed (after the outputs
    were written), ``[v1]`` vanished."""
    file = f"m{name.replace('/', '_')}.pth"
    (work / "pics").mkdir()
    torch.save({f"{name}.weight": torch.randn(2, 2, 3, 3)}, file)
    for args in (["layers", file], ["info", file], [file, "-l", "all", "--mosaic", "pics"]):
        result = invoke(*args)
        assert result.exit_code == 0, result.stdout + result.stderr
        shown = result.stdout + result.stderr
        assert name in shown or args[0] == "info", shown
        assert file in shown or args[0] != "info", shown
    anann = file.removesuffix(".pth") + ".anann.safetensors"
    result = invoke("info", anann)
    assert result.exit_code == 0 and name in result.stdout, result.stdout


def test_file_names_with_markup_in_evaluate_and_finetune(invoke, net, anann, work):
    os.rename(anann, "n[v1]x.anann.safetensors")
    os.rename("imgs", "d[v1]")
    common = ["--data", "d[v1]", *net["arch"]]
    result = invoke("evaluate", "n[v1]x.anann.safetensors", *common, "-q")
    assert result.exit_code == 0, result.stderr
    assert "n[v1]x.anann.safetensors" in result.stdout and "d[v1]" in result.stdout
    result = invoke(
        "finetune",
        "n[v1]x.anann.safetensors",
        *common,
        "--teacher",
        "tiny.pth",
        "-o",
        "f[bold]t.anann.safetensors",
    )
    assert result.exit_code == 0, result.stderr
    shown = "".join(result.stdout.split())  # the title wraps at the table's width
    assert "n[v1]x.anann.safetensors" in shown and "f[bold]t.anann" in result.stderr


def test_an_output_name_too_long_is_refused_before_the_work(invoke, net, work, no_work):
    refused(
        invoke,
        work,
        [
            "tiny.pth",
            "--arch",
            "tinynet.py:make",
            "-l",
            "conv1",
            "-o",
            "x" * 250 + ".anann.safetensors",
        ],
        2,
        "too long",
    )
    refused(
        invoke,
        work,
        ["tiny.pth", "--arch", "tinynet.py:make", "-l", "conv1", "--mosaic", "y" * 260 + ".png"],
        2,
        "too long",
    )


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("where", ["-o", "--report", "--mosaic"])
def test_an_unwritable_special_folder_is_refused_before_the_work(invoke, net, work, no_work, where):
    """Root's permission bits say /proc is writable; only trying tells."""
    refused(
        invoke,
        work,
        ["tiny.pth", "--arch", "tinynet.py:make", "-l", "conv1", where, "/proc/x.out"],
        1,
        "/proc",
    )


@pytest.mark.parametrize(
    "err, needle",
    [(errno.ENOSPC, "free some space"), (errno.EIO, "check the file"), (errno.EROFS, "read-only")],
)
def test_os_errors_while_writing_are_one_line(invoke, net, work, monkeypatch, err, needle):
    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(Path, "write_text", fail)  # the report, written after the AnaNN
    before = snapshot(work)
    one_line_error(invoke("tiny.pth", "--arch", "tinynet.py:make", "-l", "conv1", "-q"), 1, needle)
    assert snapshot(work) == before  # the AnaNN already written to its temporary name too


def test_os_errors_anywhere_are_one_line(invoke, net, work, monkeypatch):
    """Not only writes: an OSError from any step is one line (the CLI's one catch)."""

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", "imgs/im0.png")

    monkeypatch.setattr("acl_convert.io.labelled.labelled_images", fail)
    args = ["evaluate", "tiny.pth", "--data", "imgs", *net["arch"], "-q"]
    refused(invoke, work, args, 1, "imgs/im0.png", "Input/output error")


# --- class 6: edge inputs -----------------------------------------------------------------------


def test_zero_size_convolutions(invoke, net, work, no_detection):
    state = dict(
        net["state"], **{"conv1.weight": torch.zeros(0, 3, 3, 3), "conv1.bias": torch.zeros(0)}
    )
    torch.save(state, "zero.pth")
    result = invoke("zero.pth", "-l", "all")
    assert result.exit_code == 0, result.stderr
    assert "skipped 1 of 2" in result.stderr
    assert list(read_anann("zero.anann.safetensors").layers) == ["conv2"]
    refused(invoke, work, ["zero.pth", "-l", "conv1", "-f"], 2, "conv1", "no kernels")


def bomb_png(path: Path, side: int = 20000) -> None:
    """A PNG whose header claims ``side`` x ``side`` pixels (PIL refuses it on opening)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def test_decompression_bomb_images(invoke, net, work):
    bomb_png(work / "imgs" / "im0.png")
    refused(
        invoke,
        work,
        ["evaluate", "tiny.pth", "--data", "imgs", *net["arch"], "-q"],
        1,
        "im0.png",
        "decompression bomb",
    )
    refused(
        invoke,
        work,
        [
            "tiny.pth",
            "--arch",
            "tinynet.py:make",
            "-l",
            "conv1",
            "--calibration",
            "imgs",
        ],
        1,
        "im0.png",
        "decompression bomb",
    )


@pytest.mark.parametrize("dtype, needle", [(torch.complex64, "complex64"), (torch.int8, "int8")])
def test_weights_that_are_not_real_floats(invoke, net, work, no_work, dtype, needle):
    weight = net["state"]["conv1.weight"]
    weight = weight.to(dtype) if dtype.is_complex else (weight * 50).to(dtype)
    torch.save(dict(net["state"], **{"conv1.weight": weight}), "odd.pth")
    refused(invoke, work, ["odd.pth", "-l", "conv1", "-q", *net["arch"]], 1, needle)


@pytest.mark.parametrize(
    "option, value, needle",
    [
        ("--calibration-limit", "0", "--calibration-limit must be an integer >= 1"),
        ("--calibration-limit", "-3", "--calibration-limit must be an integer >= 1"),
        ("--families", ",", "names no family"),
        ("--families", " , ,", "names no family"),
        ("--sweeps", "-1", "--sweeps must be an integer >= 0"),
        ("--threshold", "-0.1", "--threshold must be a number >= 0"),
        ("--threshold", "nan", "--threshold must be a number >= 0"),
    ],
)
def test_bad_option_values_are_refused_up_front(
    invoke, net, work, no_work, option, value, needle, monkeypatch
):
    """Before any image is read: the calibration limit used to be checked after listing (and
    with a wrong message)."""
    monkeypatch.setattr("acl_convert.pipeline.list_images", no_work_called)
    args = [
        "tiny.pth",
        "--arch",
        "tinynet.py:make",
        "-l",
        "conv1",
        *net["arch"],
        "--calibration",
        "imgs",
        option,
        value,
    ]
    refused(invoke, work, args, 2, needle)


def no_work_called(*args, **kwargs):
    raise AssertionError("images were listed before the options were checked")


def test_threshold_of_one_or_more_is_said(invoke, net, work):
    result = invoke("tiny.pth", "--arch", "tinynet.py:make", "-l", "conv1", "--threshold", "1")
    assert result.exit_code == 0, result.stderr
    assert "every kernel becomes analytic" in result.stderr
    result = invoke(
        "tiny.pth", "--arch", "tinynet.py:make", "-l", "conv1", "--threshold", "1", "-q", "-f"
    )
    assert result.stderr == ""


def test_python_warnings_are_notes_and_quiet_silences_them(invoke, net, work, monkeypatch):
    """A warning from any library (here PIL's decompression-bomb warning, below the limit at
    which it refuses) went to stderr raw, source file and line included, even with --quiet."""
    # Opening the 32x32 images passes, centre-cropping 224x224 pixels warns.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)
    args = ["evaluate", "tiny.pth", "--data", "imgs", *net["arch"], "--json"]
    quiet = invoke(*args, "-q")
    assert quiet.exit_code == 0, quiet.stderr
    assert quiet.stderr == ""
    loud = invoke(*args)
    assert loud.exit_code == 0, loud.stderr
    assert "warning: Image size" in loud.stderr and "decompression bomb" in loud.stderr
    assert ".py:" not in loud.stderr and "warnings.warn" not in loud.stderr


# --- class 7: faults ----------------------------------------------------------------------------


def test_an_interrupted_finetune_says_what_it_wrote(invoke, net, anann, work, monkeypatch):
    """Interrupted in epoch 2: epoch 1's AnaNN and state are on disk and complete; the message
    used to say that nothing was written."""
    import acl_convert.train.finetune as ft

    real_save, saves = ft._save, []

    def save(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 1:
            monkeypatch.setattr(ft, "_loss", interrupt)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "_save", save)
    result = invoke(
        "finetune",
        anann,
        "--data",
        "imgs",
        "--teacher",
        "tiny.pth",
        *net["arch"],
        "--epochs",
        "2",
        "-o",
        "ft.anann.safetensors",
        "-q",
    )
    assert result.exit_code == 130
    assert "nothing was written" not in result.stderr
    assert "ft.anann.safetensors" in result.stderr and "ft.anann.state.pt" in result.stderr
    assert read_anann("ft.anann.safetensors").header.extra["finetune"]["epochs_done"] == 1
    assert not [p for p in os.listdir(work) if p.endswith(".tmp")]


@pytest.mark.parametrize("damage", ["other-model", "no-config", "not-a-dict", "bad-optimizer"])
def test_resume_with_a_foreign_training_state(invoke, net, anann, work, damage):
    args = [
        "finetune",
        anann,
        "--data",
        "imgs",
        "--teacher",
        "tiny.pth",
        *net["arch"],
        "-q",
        "-o",
        "ft.anann.safetensors",
    ]
    assert invoke(*args).exit_code == 0
    state = torch.load("ft.anann.state.pt", weights_only=True)
    if damage == "other-model":
        state["model"] = {"x": torch.zeros(1)}
    elif damage == "no-config":
        del state["config"]
    elif damage == "not-a-dict":
        state["losses"] = 3
    else:
        state["optimizer"] = {"state": {}, "param_groups": [{"params": [0, 1]}]}
    torch.save(state, "ft.anann.state.pt")
    refused(invoke, work, [*args, "--resume", "--epochs", "2"], 1, "cannot resume")


# --- class 8: byte-deterministic outputs --------------------------------------------------------


def test_identical_conversions_give_identical_files(invoke, net, work):
    """safetensors writes metadata keys in a random order (per map, even within one process),
    and torch.save put the temporary file's name inside a baked .pth. Four runs: a random order
    of two keys agrees four times by chance once in eight."""
    conv = ["tiny.pth", "--arch", "tinynet.py:make", "-l", "all", "-q"]
    for n in range(4):
        assert invoke(*conv, "-o", f"{n}.anann.safetensors").exit_code == 0
        assert invoke("bake", f"{n}.anann.safetensors", "-o", f"{n}.pth", "-q").exit_code == 0
        result = invoke("bake", f"{n}.anann.safetensors", "-o", f"{n}.safetensors", "-q")
        assert result.exit_code == 0
    for suffix in (".anann.safetensors", ".pth", ".safetensors", ".report.json"):
        assert len({Path(f"{n}{suffix}").read_bytes() for n in range(4)}) == 1, suffix
    assert b".tmp" not in Path("0.pth").read_bytes()


def test_saving_the_same_anann_gives_the_same_bytes(anann, work):
    ana = read_anann(anann)
    for n in range(10):
        save_anann(work / f"{n}.anann.safetensors", ana.tensors, ana.header)
    assert len({(work / f"{n}.anann.safetensors").read_bytes() for n in range(10)}) == 1
