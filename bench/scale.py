#!/usr/bin/env python
"""A whole network at scale: ``acl-convert CKPT --layers all`` on a ResNet-50-shaped checkpoint,
against the fit of the same kernels alone.

For each threshold (default 0.3, the default, and 1.0, every kernel analytic):

- **fit alone**: ``fit_kernels`` on every kernel the command fits (all 3x3 and 7x7 convs of
  ``torchvision.models.resnet50()``, random init seeded with 0; ~1.26 M kernels), the six paper
  families, offset on, default threads, in a fresh process;
- **command**: ``acl-convert r50.pth --layers all -t T --no-html`` in a fresh process (as a user
  runs it: load, fit, choose, build, report, write);

each with its wall time, CPU time and peak RSS (``getrusage`` of the child), then the sizes of
the AnaNN and of the report against the source checkpoint, and ``export``'s row count.

With ``--calibration DIR``, also ``acl-convert r50.pth --layers all --calibration DIR`` with
``--images`` of its images (default 256: 192 fitted, 64 held out), its wall time, peak RSS and
held-out fidelity.

Usage::

    python bench/scale.py [--thresholds 0.3,1.0] [--workdir DIR] [--json OUT]
                          [--calibration DIR [--images N]]

The random-init network converts almost nothing at 0.3 (its kernels are not analytic): the 1.0
row is the one that tests file sizes. A checkpoint of your own: ``--checkpoint PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

FIT_ALONE = """
import sys, torch
from acl_convert.fit import fit_kernels
from acl_convert.io.checkpoint import load_checkpoint
from acl_convert.network.convs import conv_layers, eligible
sd = load_checkpoint(sys.argv[1]).state_dict
by_size = {}
for lay in conv_layers(sd):
    if eligible(lay):
        kernels = sd[lay.weight_key].reshape(-1, *lay.kernel_size)
        by_size.setdefault(lay.kernel_size, []).append(kernels)
n = 0
for stacks in by_size.values():
    fit = fit_kernels(torch.cat(stacks).float())
    n += len(fit)
print(n)
"""


def run(argv: list[str], cwd: Path) -> dict:
    """Run a child process under GNU time: its wall time, CPU time and peak RSS."""
    load = os.getloadavg()[0]
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats:
        timed = ["/usr/bin/time", "-f", "%e %U %S %M", "-o", stats.name, *argv]
        done = subprocess.run(timed, cwd=cwd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"failed: {' '.join(argv)}\n{done.stderr[-2000:]}")
        wall, user, system, rss_kb = stats.read().split()[-4:]
    return {
        "wall_s": float(wall),
        "cpu_s": float(user) + float(system),
        "peak_rss_mb": int(rss_kb) / 1024,
        "load_before": load,
        "stdout": done.stdout,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--thresholds", default="0.3,1.0")
    ap.add_argument("--checkpoint", type=Path, help="default: a seeded random ResNet-50")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--calibration", type=Path, help="an image folder: also run the calibrated conversion on it"
    )
    ap.add_argument("--images", type=int, default=256, help="calibration images (default 256)")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="acl-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = work / "r50.pth"
        subprocess.run(
            [PYTHON, "-c", "import torch, torchvision; torch.manual_seed(0); "
             f"torch.save(torchvision.models.resnet50().state_dict(), {str(ckpt)!r})"],
            check=True,
        )  # fmt: skip
    source = ckpt.stat().st_size
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"source {ckpt.name} {source / 1e6:.1f} MB")  # fmt: skip
    rows = []
    # Each measurement in its own process: peak RSS is per child, and the largest so far.
    fit = run([PYTHON, "-c", FIT_ALONE, str(ckpt)], work)
    kernels = int(fit["stdout"].split()[-1])
    print(f"fit alone: {kernels:,} kernels, wall {fit['wall_s']:.1f} s, "
          f"CPU {fit['cpu_s']:.1f} s, peak RSS {fit['peak_rss_mb']:.0f} MB "
          f"(load before {fit['load_before']:.1f})")  # fmt: skip
    for t in [float(x) for x in args.thresholds.split(",") if x.strip()]:
        out = work / f"t{t:g}"
        out.mkdir(exist_ok=True)
        cmd = [PYTHON, "-m", "acl_convert", str(ckpt.resolve()), "-l", "all", "-t", f"{t:g}",
               "--no-html", "-q", "-f", "-o", "net.anann.safetensors"]  # fmt: skip
        res = run(cmd, out)
        anann = (out / "net.anann.safetensors").stat().st_size
        report = (out / "net.report.json").stat().st_size
        doc = json.loads((out / "net.report.json").read_text())
        exported = run([PYTHON, "-m", "acl_convert", "export", "net.anann.safetensors", "-o",
                        "table.csv", "-f", "-q"], out)  # fmt: skip
        n_rows = sum(1 for _ in open(out / "table.csv")) - 1
        row = {
            "threshold": t,
            "converted": doc["totals"]["converted"],
            "kernels": doc["totals"]["kernels"],
            "compact_factor": doc["totals"]["compact_factor"],
            "command_wall_s": res["wall_s"],
            "command_cpu_s": res["cpu_s"],
            "command_over_fit": res["wall_s"] / fit["wall_s"],
            "command_cpu_over_fit": res["cpu_s"] / fit["cpu_s"],
            "anann_mb": anann / 1e6,
            "anann_over_source": anann / source,
            "report_mb": report / 1e6,
            "report_over_source": report / source,
            "export_rows": n_rows,
            "export_wall_s": exported["wall_s"],
            "command_peak_rss_mb": res["peak_rss_mb"],
            "load_before": res["load_before"],
        }
        rows.append(row)
        print(f"-t {t:g}: {row['converted']:,}/{row['kernels']:,} kernels analytic, compact factor "
              f"{row['compact_factor']:.3f}; command wall {res['wall_s']:.1f} s "
              f"({row['command_over_fit']:.2f}x the fit alone), CPU {res['cpu_s']:.1f} s "
              f"({row['command_cpu_over_fit']:.2f}x), peak RSS {res['peak_rss_mb']:.0f} MB; "
              f"AnaNN {row['anann_mb']:.1f} MB "
              f"({row['anann_over_source']:.1%} of the source), report {row['report_mb']:.2f} MB "
              f"({row['report_over_source']:.2%}); export {n_rows:,} rows in "
              f"{exported['wall_s']:.1f} s (load before {res['load_before']:.1f})")  # fmt: skip
    calibrated = None
    if args.calibration is not None:
        calibrated = _calibrated(ckpt, args.calibration, args.images, work)
    if args.json:
        args.json.write_text(json.dumps({"fit": {k: v for k, v in fit.items() if k != "stdout"},
                                         "kernels": kernels, "rows": rows,
                                         "calibrated": calibrated}, indent=1))  # fmt: skip
    return 0


def _calibrated(ckpt: Path, images: Path, count: int, work: Path) -> dict:
    """``acl-convert CKPT --layers all --calibration DIR`` with ``count`` images (a quarter of
    them, at most 64, held out by default): wall time, peak RSS and the held-out fidelity."""
    out = work / "calibrated"
    out.mkdir(exist_ok=True)
    cmd = [PYTHON, "-m", "acl_convert", str(ckpt.resolve()), "-l", "all", "--calibration",
           str(images.resolve()), "--calibration-limit", str(count), "--no-html", "-q", "-f",
           "-o", "net.anann.safetensors"]  # fmt: skip
    res = run(cmd, out)
    doc = json.loads((out / "net.report.json").read_text())
    fid = doc["fidelity"]
    row = {
        "images": count,
        "fitted_images": doc["settings"]["calibration_images"],
        "held_out_images": doc["settings"]["holdout_images"],
        "wall_s": res["wall_s"],
        "cpu_s": res["cpu_s"],
        "peak_rss_mb": res["peak_rss_mb"],
        "compact_factor": doc["totals"]["compact_factor"],
        "logits_rel_error": fid["logits_rel_error"],
        "top1_agreement": fid["top1_agreement"],
        "load_before": res["load_before"],
    }
    print(f"calibrated, {count} images ({row['fitted_images']} fitted, "
          f"{row['held_out_images']} held out): wall {res['wall_s'] / 60:.1f} min, CPU "
          f"{res['cpu_s'] / 60:.1f} min, peak RSS {res['peak_rss_mb']:.0f} MB; compact factor "
          f"{row['compact_factor']:.3f}, held-out logits error {row['logits_rel_error']:.3f}, "
          f"top-1 agreement {row['top1_agreement']:.1%} (load before "
          f"{res['load_before']:.1f})")  # fmt: skip
    return row


if __name__ == "__main__":
    sys.exit(main())
