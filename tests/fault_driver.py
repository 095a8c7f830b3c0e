"""Fault injection for ``test_faults.py``: run one ``acl-convert`` command many times and
interrupt each run with SIGINT or SIGTERM at a different point.

Usage: ``python fault_driver.py PLAN.json RESULTS.json``. The plan names a folder holding the
files as the user has them (``pristine``), the command's arguments, a seed, how many runs to
make and points that must be among them (``[hook, call, signal name]``). The driver imports the
command line once, then forks one child per run (so torch is imported once; the parent runs no
torch operation before forking). Each child works in its own
copy of ``pristine`` and gets its signal either

- at a *hook*: the n-th call of one of the functions the command passes through (fitting,
  training steps, creating temporary files, serialising, writing, renaming, ...), the signal sent
  to itself as the call starts (points are drawn from the calls a first, uninterrupted run made);
- or *timed*: from the parent, at a random moment within the uninterrupted run's duration.

Results (one per run): the point, how the child ended (exit code or signal), its stderr and its
folder; ``test_faults.py`` checks them. Nothing here decides what is right.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

#: Functions a command passes through, by phase. Each is replaced in the child by a wrapper that
#: counts its calls (and sends the signal at the chosen one).
HOOKS = {
    "fit": ("acl_convert.pipeline", "fit_kernels"),
    "train-step": ("acl_convert.train.finetune", "_loss"),
    "epoch-save": ("acl_convert.train.finetune", "_save"),
    "temp-file": ("acl_convert.io.outputs", "_new_temp"),
    "serialise": ("acl_convert.io.anann", "safetensors_bytes"),
    "picture": ("acl_convert.report.pictures", "to_png"),
    "torch-save": ("torch", "save"),
    "write-bytes": ("pathlib", "Path.write_bytes"),
    "write-text": ("pathlib", "Path.write_text"),
    "chmod": ("os", "chmod"),
    "rename": ("os", "replace"),
}


def _install(counts: dict[str, int], target: tuple[str, int, int] | None) -> None:
    """Wrap every hook: count its calls; at call ``n`` of hook ``name`` send signal ``sig``."""
    import importlib

    for name, (module_name, attr) in HOOKS.items():
        owner = importlib.import_module(module_name)
        *path, leaf = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        real = getattr(owner, leaf)

        def wrapper(*args, __real=real, __name=name, **kwargs):
            counts[__name] = counts.get(__name, 0) + 1
            if target is not None and target[0] == __name and target[1] == counts[__name]:
                os.kill(os.getpid(), target[2])
            return __real(*args, **kwargs)

        setattr(owner, leaf, wrapper)


def _child(workdir: Path, args: list[str], target, counts_file: Path | None) -> None:
    """Run the command in this (forked) process; never returns."""
    os.chdir(workdir)
    out = os.open(workdir.parent / f"{workdir.name}.stdout", os.O_WRONLY | os.O_CREAT, 0o644)
    err = os.open(workdir.parent / f"{workdir.name}.stderr", os.O_WRONLY | os.O_CREAT, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    # As a user at a terminal has it: a shell without job control starts background jobs with
    # SIGINT ignored (``nohup cmd &``, CI runners), Python then installs no KeyboardInterrupt
    # handler, and every SIGINT of this test would be lost.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    counts: dict[str, int] = {}
    _install(counts, target)
    from acl_convert_cli.main import app

    code = 0
    try:
        app(args=args, prog_name="acl-convert")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    if counts_file is not None:
        counts_file.write_text(json.dumps(counts))
    os._exit(code)


def _run(root: Path, pristine: Path, label: str, args, target=None, delay=None, counts=None):
    workdir = root / label
    shutil.copytree(pristine, workdir, symlinks=True)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(workdir, args, target, counts)
    if delay is not None:
        time.sleep(delay[0])
        try:
            os.kill(pid, delay[1])
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    ended = (
        {"signal": os.WTERMSIG(status)}
        if os.WIFSIGNALED(status)
        else {"exit": os.WEXITSTATUS(status)}
    )
    return {
        "folder": str(workdir),
        "ended": ended,
        "seconds": time.monotonic() - start,
        "stderr": (root / f"{label}.stderr").read_text(errors="replace"),
    }


def main(plan_file: str, results_file: str) -> None:
    plan = json.loads(Path(plan_file).read_text())
    root, pristine, args = Path(plan["root"]), Path(plan["pristine"]), plan["args"]
    import importlib

    import acl_convert_cli.main  # noqa: F401  (imported once, before any fork)

    for module_name, _ in HOOKS.values():  # a child only wraps them
        importlib.import_module(module_name)

    rng = random.Random(plan["seed"])
    counts_file = root / "counts.json"
    clean = _run(root, pristine, "uninterrupted", args, counts=counts_file)
    calls = json.loads(counts_file.read_text())
    points = [(name, n) for name, total in sorted(calls.items()) for n in range(1, total + 1)]
    # Every hook the run passed through at one of its calls, then more calls at random; the
    # two signals alternate.
    chosen = {(name, rng.randint(1, total)) for name, total in calls.items()}
    chosen |= set(rng.sample(points, min(plan["extra_hook_points"], len(points))))
    signals = [signal.SIGINT, signal.SIGTERM]
    runs = {(name, n): signals[k % 2] for k, (name, n) in enumerate(sorted(chosen))}
    runs.update({(name, n): signal.Signals[sig] for name, n, sig in plan["required_points"]})
    results = [{"point": "none", **clean, "calls": calls}]
    for (name, n), sig in runs.items():
        label = f"hook-{name}-{n}-{signal.Signals(sig).name}"
        result = _run(root, pristine, label, args, target=(name, n, sig))
        results.append({"point": label, "hook": name, **result})
    for k in range(plan["timed_points"]):
        sig = signals[k % 2]
        delay = rng.uniform(0, clean["seconds"])
        label = f"timed-{k}-{delay:.2f}s-{signal.Signals(sig).name}"
        results.append({"point": label, **_run(root, pristine, label, args, delay=(delay, sig))})
    Path(results_file).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
