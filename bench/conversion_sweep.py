#!/usr/bin/env python
"""What conversion costs and saves: compact factor against top-1 and agreement, before and after
a short distillation fine-tune (issue 5, result 1).

For each model (SqueezeNet 1.0's first conv; every 3x3 conv of MobileNetV2, depthwise included),
each threshold and offset on/off: convert with ``acl_convert.pipeline``, evaluate the AnaNN on the
evaluation half of ``../shared/data/imagenet/sample-images-1000`` (top-1, top-5, top-1 agreement
with the original, logits relative error), fine-tune it by distillation from the original on the
other half (disjoint: images with even index evaluate, odd index train), and evaluate again. The
original model's numbers on the evaluation half are the reference line.

Usage::

    python bench/conversion_sweep.py [--models squeezenet,mobilenet] [--images N]
        [--thresholds 0.2,0.3,0.5,1.0] [--epochs 1] [--json OUT] [--plot OUT.png]

``--images N`` uses the first N images of each half (default: all 500). Threshold 1.0 converts
every kernel (a relative residual never exceeds 1).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from acl_convert.io.arch import build_model  # noqa: E402
from acl_convert.io.checkpoint import load_checkpoint  # noqa: E402
from acl_convert.io.images import load_image, preprocessing  # noqa: E402
from acl_convert.network.convs import conv_layers, select_layers  # noqa: E402
from acl_convert.pipeline import convert_model  # noqa: E402
from acl_convert.train.evaluate import evaluate  # noqa: E402
from acl_convert.train.finetune import FinetuneConfig, finetune  # noqa: E402

DATA = REPO.parent / "shared" / "data"
IMAGES = DATA / "imagenet" / "sample-images-1000"
MODELS = {
    "squeezenet": (
        DATA / "weights" / "squeezenet1_0_deepcompression_tvnorm.pth",
        "squeezenet1_0",
        ["features.0"],
    ),
    "mobilenet": (
        DATA / "weights" / "mobilenet_v2_qnnpack_dequant_bnfolded.pth",
        "mobilenet_v2",
        ["all"],
    ),
}
console = Console(width=None if sys.stdout.isatty() else 140)


def load_split(n: int | None, arch: str) -> tuple[dict, dict]:
    """Preprocessed images and labels of the evaluation (even) and training (odd) halves."""
    with open(IMAGES / "labels.csv") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: r["file"])
    transform = preprocessing(arch)
    halves = {}
    for name, part in (("eval", rows[0::2]), ("train", rows[1::2])):
        part = part[:n] if n else part
        x = torch.stack([load_image(IMAGES / r["file"], transform) for r in part])
        y = torch.tensor([int(r["index"]) for r in part])
        halves[name] = {"x": x, "y": y}
    return halves["eval"], halves["train"]


def batches(split: dict, size: int = 50):
    for i in range(0, len(split["y"]), size):
        yield split["x"][i : i + size], split["y"][i : i + size]


def compact_factor(conversion) -> float:
    before = sum(r.params_before for r in conversion.layers)
    after = sum(r.params_after for r in conversion.layers)
    return 1 - after / before


def sweep_model(key: str, args: argparse.Namespace) -> dict:
    path, arch, selectors = MODELS[key]
    ckpt = load_checkpoint(path)
    original = build_model(arch)
    original.load_state_dict(ckpt.state_dict, strict=True)
    original.eval().requires_grad_(False)
    chosen = select_layers(selectors, conv_layers(ckpt.state_dict, original), ckpt.state_dict)
    t0 = time.perf_counter()
    ev, tr = load_split(args.images, arch)
    console.print(
        f"[bold]{key}[/]: {len(chosen)} layer(s), {sum(c.num_kernels for c in chosen):,} "
        f"kernels; {len(ev['y'])} evaluation + {len(tr['y'])} fine-tuning images "
        f"(loaded in {time.perf_counter() - t0:.0f} s)"
    )
    reference = evaluate(original, batches(ev))
    rows = []
    for offset in (True, False):
        for tau in args.thresholds:
            t0 = time.perf_counter()
            names = [c.name for c in chosen]
            conv = convert_model(original, names, arch=arch, offset=offset, threshold=tau)
            student = conv.model
            before = evaluate(student, batches(ev), reference=original)
            with tempfile.TemporaryDirectory() as tmp:
                config = FinetuneConfig(
                    objective="logits",
                    train=("akp", "plain"),
                    epochs=args.epochs,
                    batch_size=32,
                )
                losses = finetune(
                    student,
                    list(range(len(tr["y"]))),
                    lambda idx: (tr["x"][list(idx)], None),
                    config,
                    output=Path(tmp) / "ft.anann.safetensors",
                    header=conv.header(),
                    teacher=original,
                )
            after = evaluate(student, batches(ev), reference=original)
            row = {
                "offset": offset,
                "threshold": tau,
                "converted": sum(int((r.selection.choice >= 0).sum()) for r in conv.layers),
                "kernels": sum(len(r.selection.codes) for r in conv.layers),
                "compact_factor": compact_factor(conv),
                "before": before,
                "after": after,
                "finetune_losses": losses,
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            console.print(
                f"  offset {'on ' if offset else 'off'} tau {tau:<4} converted "
                f"{row['converted']:>6}/{row['kernels']}  cf {row['compact_factor']:.3f}  "
                f"top-1 {100 * before['top1']:.1f} -> {100 * after['top1']:.1f} "
                f"(original {100 * reference['top1']:.1f})  agreement "
                f"{100 * before['agreement']:.1f} -> {100 * after['agreement']:.1f} %  "
                f"[{row['seconds']:.0f} s]"
            )
    return {
        "model": key,
        "arch": arch,
        "layers": [c.name for c in chosen],
        "eval_images": len(ev["y"]),
        "train_images": len(tr["y"]),
        "reference": reference,
        "rows": rows,
    }


def print_table(res: dict) -> None:
    ref = res["reference"]
    t = Table(
        title=f"{res['model']}: original top-1 {100 * ref['top1']:.1f} %, top-5 "
        f"{100 * ref['top5']:.1f} % on {res['eval_images']} evaluation images",
        title_justify="left",
    )
    for col in (
        "offset",
        "τ",
        "converted",
        "compact",
        "top-1 before",
        "top-1 after",
        "agree before",
        "agree after",
        "logits err before",
        "logits err after",
    ):
        t.add_column(col, justify="right")
    for r in res["rows"]:
        b, a = r["before"], r["after"]
        t.add_row(
            "on" if r["offset"] else "off",
            f"{r['threshold']}",
            f"{r['converted']}/{r['kernels']}",
            f"{r['compact_factor']:.3f}",
            f"{100 * b['top1']:.1f}",
            f"{100 * a['top1']:.1f}",
            f"{100 * b['agreement']:.1f}",
            f"{100 * a['agreement']:.1f}",
            f"{b['logits_rel_error']:.3f}",
            f"{a['logits_rel_error']:.3f}",
        )
    console.print(t)


def plot(results: list[dict], path: Path) -> None:
    """Top-1 against compact factor, one panel per model: before (hollow) and after (filled)
    fine-tuning, offset on (blue) and off (red), the original as a grey line."""
    pw, ph, margin = 460, 340, 56
    img = Image.new("RGB", (pw * len(results), ph), "white")
    draw = ImageDraw.Draw(img)
    colours = {True: (40, 90, 200), False: (200, 50, 40)}
    for k, res in enumerate(results):
        x0, y0, x1, y1 = k * pw + margin, 30, (k + 1) * pw - 16, ph - margin
        tops = [100 * r[s]["top1"] for r in res["rows"] for s in ("before", "after")]
        tops.append(100 * res["reference"]["top1"])
        lo, hi = max(0.0, min(tops) - 5), min(100.0, max(tops) + 5)

        def xy(cf, top, x0=x0, y0=y0, x1=x1, y1=y1, lo=lo, hi=hi):
            return x0 + cf * (x1 - x0), y1 - (top - lo) / (hi - lo) * (y1 - y0)

        draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        ry = xy(0, 100 * res["reference"]["top1"])[1]
        draw.line([x0, ry, x1, ry], fill=(150, 150, 150), width=2)
        draw.text((x0 + 4, ry - 12), "original", fill=(110, 110, 110))
        for r in res["rows"]:
            for stage in ("before", "after"):
                cx, cy = xy(r["compact_factor"], 100 * r[stage]["top1"])
                box = [cx - 4, cy - 4, cx + 4, cy + 4]
                colour = colours[r["offset"]]
                draw.ellipse(
                    box, outline=colour, fill=colour if stage == "after" else None, width=2
                )
        draw.text((x0, 8), f"{res['model']} ({len(res['layers'])} layer(s))", fill=(0, 0, 0))
        for frac in (0, 0.25, 0.5, 0.75, 1.0):
            draw.text((xy(frac, lo)[0] - 10, y1 + 4), f"{frac:.2f}", fill=(0, 0, 0))
        for top in (lo, (lo + hi) / 2, hi):
            draw.text((x0 - 40, xy(0, top)[1] - 6), f"{top:.0f} %", fill=(0, 0, 0))
        draw.text((x0 + 60, y1 + 22), "compact factor ->   top-1 (y)", fill=(0, 0, 0))
    draw.text(
        (8, ph - 14),
        "blue: offset on, red: offset off; hollow: converted, filled: after distillation fine-tune",
        fill=(0, 0, 0),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="squeezenet,mobilenet")
    ap.add_argument("--images", type=int, default=None, metavar="N")
    ap.add_argument("--thresholds", default="0.2,0.3,0.5,1.0")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)
    args.thresholds = [float(t) for t in args.thresholds.split(",")]
    if not IMAGES.is_dir():
        console.print(f"[red]error:[/] {IMAGES} not found (../shared/data beside the clone)")
        return 2
    torch.manual_seed(0)
    cpu = platform.processor() or platform.machine()
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}")
    t0 = time.perf_counter()
    results = [sweep_model(m, args) for m in args.models.split(",")]
    for res in results:
        print_table(res)
    console.print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.plot:
        plot(results, args.plot)
        console.print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
