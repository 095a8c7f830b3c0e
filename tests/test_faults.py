"""Fault injection (issue 13, class 7): a conversion and a fine-tune are interrupted with SIGINT
and SIGTERM at many points, in real processes (``fault_driver.py`` forks one per run).

Each interrupted run must leave

- the user's input files as they were, and no temporary file anywhere;
- each output either as it was before (absent, or the old file) or complete (an AnaNN the
  reader accepts, a report that parses, a picture that decodes, a training state torch loads);
- a conversion's outputs all old or all new (they are renamed together);
- after SIGINT: exit code 130 and a last line that says truly what was written; after SIGTERM:
  the process ended by the signal.

The points: every function of a list of hooks (fitting, training steps, epoch saves, temporary
files, serialising, writing, chmod, renaming) at a random one of its calls, a few more random
calls, and a few kills at random moments; signals alternate. Seeded: the same points every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import acl_convert_cli
import pytest
import torch
from conftest import tiny_project
from PIL import Image

import acl_convert
from acl_convert.errors import UserError
from acl_convert.io.anann import read_anann

DRIVER = Path(__file__).with_name("fault_driver.py")

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only")


def env() -> dict[str, str]:
    """The environment of a child process that imports this very acl_convert and CLI."""
    roots = {str(Path(m.__file__).resolve().parents[1]) for m in (acl_convert, acl_convert_cli)}
    old = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*sorted(roots), *([old] if old else [])])}


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_driver(root: Path, pristine: Path, args: list[str], seed: int, required=()) -> list[dict]:
    plan = {
        "required_points": list(required),
        "root": str(root),
        "pristine": str(pristine),
        "args": args,
        "seed": seed,
        "extra_hook_points": 2,
        "timed_points": 2,
    }
    (root / "plan.json").write_text(json.dumps(plan))
    subprocess.run(
        [sys.executable, str(DRIVER), str(root / "plan.json"), str(root / "results.json")],
        env=env(),
        timeout=900,
        check=True,
    )
    return json.loads((root / "results.json").read_text())


def complete(path: Path) -> bool:
    """The output is a whole file of its kind."""
    try:
        if path.name.endswith(".anann.safetensors"):
            read_anann(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".png":
            with Image.open(path) as img:
                img.load()
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".html":
            return path.read_text(encoding="utf-8").rstrip().endswith("</html>")
        return True
    except (UserError, ValueError, OSError, RuntimeError):
        return False


def check_run(run: dict, pristine: Path, inputs: list[str], outputs: list[str]) -> list[str]:
    """The states of ``outputs`` (``old`` or ``new``), after checking the common invariant."""
    folder, where = Path(run["folder"]), run["point"]
    before, after = digest(pristine), digest(folder)
    leftovers = [name for name in after if name not in before and name not in outputs]
    assert not leftovers, (where, leftovers, run["stderr"])
    for name in inputs:
        assert after.get(name) == before[name], (where, f"input {name} changed")
    states = []
    for name in outputs:
        if after.get(name) == before.get(name):
            states.append("old")
        else:
            assert complete(folder / name), (where, f"{name} is incomplete", run["stderr"])
            states.append("new")
    ended, stderr = run["ended"], run["stderr"].strip()
    assert "Traceback" not in stderr, (where, stderr)
    if ended == {"exit": 0}:
        assert set(states) == {"new"}, (where, states)
    elif ended == {"signal": signal.SIGTERM}:
        assert where.endswith("SIGTERM"), where
    else:
        assert ended == {"exit": 130} and where.endswith("SIGINT"), (where, ended, stderr)
        if not stderr:  # Ctrl-C while typer was still parsing the arguments
            assert set(states) == {"old"}, (where, states)
            return states
        last = stderr.splitlines()[-1]
        assert last.startswith("interrupted; "), (where, stderr)
        said = last.removeprefix("interrupted; ")
        if "new" in states:
            news = [n for n, s in zip(outputs, states, strict=True) if s == "new"]
            assert said.startswith("complete before it:"), (where, last)
            assert all(name in said for name in news), (where, last, news)
        else:
            assert said == "nothing was written", (where, last)
    return states


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faults-project")
    tiny_project(folder, shade=70, labels=False)
    return folder


def test_conversion_interrupted_anywhere(project, tmp_path):
    """Outputs exist from an earlier run and are replaced (--force): after any interrupt they
    are all the old files or all complete new ones."""
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    for name in ("tinynet.py", "tiny.pth"):
        (pristine / name).write_bytes((project / name).read_bytes())
    (pristine / "net.anann.safetensors").write_bytes(b"an earlier AnaNN")
    (pristine / "net.report.json").write_text('{"earlier": true}')
    (pristine / "net.report.html").write_text("<html>an earlier page</html>")
    args = ["tiny.pth", "--arch", "tinynet.py:make", "-l", "all", "-o", "net.anann.safetensors",
            "--mosaic", "pics.png", "-t", "0.6", "-f", "-q"]  # fmt: skip
    outputs = [
        "net.anann.safetensors",
        "net.report.json",
        "pics.conv1.png",
        "pics.conv2.png",
        "net.report.html",
    ]
    runs = run_driver(tmp_path, pristine, args, seed=13)
    assert runs[0]["ended"] == {"exit": 0}, runs[0]["stderr"]
    hooks = {r["hook"] for r in runs if "hook" in r}
    assert {"fit", "temp-file", "serialise", "picture", "rename"} <= hooks
    seen = set()
    for run in runs:
        states = check_run(run, pristine, ["tinynet.py", "tiny.pth"], outputs)
        assert len(set(states)) == 1, (run["point"], states, "outputs must be renamed together")
        seen.add((states[0], next(iter(run["ended"].values()))))
    # Both outcomes were reached by interrupts: before the renames and after them.
    assert ("old", 130) in seen and ("new", 130) in seen, seen


def test_finetune_interrupted_anywhere(project, tmp_path, invoke):
    """Two epochs: an interrupt in epoch 2 leaves epoch 1's complete AnaNN and training state
    and says so."""
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    for name in ("tinynet.py", "tiny.pth"):
        (pristine / name).write_bytes((project / name).read_bytes())
    (pristine / "imgs").mkdir()
    for img in (project / "imgs").iterdir():
        (pristine / "imgs" / img.name).write_bytes(img.read_bytes())
    arch = ["--arch", str(pristine / "tinynet.py") + ":make"]
    made = pristine / "tiny.anann.safetensors"
    result = invoke(pristine / "tiny.pth", "-l", "all", *arch, "-q", "-o", made,
                    "--report", tmp_path / "r.json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    args = ["finetune", "tiny.anann.safetensors", "--data", "imgs", "--teacher", "tiny.pth",
            "--arch", "tinynet.py:make", "--epochs", "2", "--batch-size", "1", "-q",
            "-o", "ft.anann.safetensors"]  # fmt: skip
    outputs = ["ft.anann.safetensors", "ft.anann.state.pt"]
    # Two images a batch each: training steps 3 and 4 are epoch 2's.
    in_epoch_2 = [("train-step", 3, "SIGINT"), ("train-step", 4, "SIGTERM")]
    runs = run_driver(tmp_path, pristine, args, seed=7, required=in_epoch_2)
    assert runs[0]["ended"] == {"exit": 0}, runs[0]["stderr"]
    inputs = ["tinynet.py", "tiny.pth", "tiny.anann.safetensors", "imgs/im0.png"]
    between_epochs = 0
    for run in runs:
        states = check_run(run, pristine, inputs, outputs)
        if states[0] == "new":
            assert states[1] == "new", (run["point"], "an AnaNN without its training state")
        if states == ["new", "new"] and run["ended"] == {"exit": 130}:
            between_epochs += 1
    assert between_epochs, "no interrupt fell between epoch 1's save and the end"


def test_python_m_runs_the_command_line(tmp_path):
    """``python -m acl_convert`` and ``python -m acl_convert_cli.main`` are ``acl-convert``."""
    for module in ("acl_convert", "acl_convert_cli.main"):
        done = subprocess.run(
            [sys.executable, "-m", module, "info", str(tmp_path / "missing.pth")],
            env=env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 1, done.stderr
        assert done.stderr.strip().startswith("error:") and "Traceback" not in done.stderr
