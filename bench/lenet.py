#!/usr/bin/env python
"""LeNet vs AnaNN-LeNet trained from scratch (paper §4.2, Fig. 5a), on MNIST and Fashion-MNIST.

Two models, same recipe, same seed:

``plain``
    LeNet-5 style: conv 1->6 5x5 (padding 2, so 28x28 inputs keep their size), ReLU, max-pool 2,
    conv 6->16 5x5, ReLU, max-pool 2, fc 400->120, ReLU, fc 120->84, ReLU, fc 84->10.
``acl``
    The same network with BOTH convs replaced by :class:`acl_convert.ACL` layers built with
    ``ACL.from_pattern(in, out, 5, "G0.1562Lg0.0781Lt0.0781Tf0.1875P0.5", padding=...)`` (the
    paper's ratio form, exp3). No gains and no offsets (the constructor's defaults, ``gain=False``,
    ``offset=False``): the paper's ACKs trained from scratch have neither. The 6 kernels of conv1
    resolve to ``G1Lg1Tf1P3`` (largest-remainder rounding leaves no LoT kernel there) and the 96 of
    conv2 to ``G15Lg8Lt7Tf18P48``.

Conv parameters are counted per conv module, biases excluded: ``weight`` for ``nn.Conv2d``; AKPs +
plain kernels (+ gains/offsets if any) for an ACL. Each ACL's ``compact_factor()`` (paper Eq. 25)
is printed too.

Recipe (both models): Adam lr 1e-3, batch 128, cross-entropy, ``--epochs`` epochs (default 5), no
augmentation, no weight decay, inputs scaled to [0, 1] then standardised with the training split's
mean and std. ``--seed`` seeds the initialisation (the ACL's own ``generator=`` too) and the
shuffling, identically for both models. Test accuracy is measured after every epoch.

Data:

``mnist``
    Only the 10k MNIST *test* images are available offline (``shared/data/mnist/``,
    ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``). They are split with a fixed
    permutation, ``numpy.random.default_rng(0).permutation(10000)`` (independent of ``--seed``):
    its first 8,000 indices train, the last 2,000 test. (A random split, not "first 8,000": the
    first 5,000 t10k images are the cleaner NIST-SD3 half and the last 5,000 the harder SD1 half.)
``fashion``
    Fashion-MNIST, full 60k/10k split, from Debian's package. One-time setup (as root)::

        apt-get install -y dataset-fashion-mnist

    which puts the four idx files in ``/usr/share/datasets/fashion-mnist/``.

Usage::

    python bench/lenet.py [--datasets mnist,fashion] [--epochs 5] [--seed 0] [--json OUT]
                          [--plot OUT.png] [--mnist-dir DIR] [--fashion-dir DIR] [--threads N]

``--threads`` defaults to 1: LeNet's ops are tiny, and on a shared 2-core VM two intra-op threads
made a training step 3-5x slower than one whenever another process was using a core.

Prints a table (dataset, model, conv params, compact factor, test accuracy, train time), writes
everything (per-epoch accuracy, loss, timings, machine) to ``--json`` and draws test accuracy per
epoch for both models per dataset into ``--plot`` (PIL only).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

from acl_convert import ACL  # noqa: E402

PATTERN = "G0.1562Lg0.0781Lt0.0781Tf0.1875P0.5"
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_APT = "apt-get install -y dataset-fashion-mnist"
MNIST_TRAIN = 8000  # of the 10k t10k images; the other 2,000 test
SPLIT_SEED = 0
LR = 1e-3
BATCH = 128
EVAL_BATCH = 1000
MODELS = ("plain", "acl")
TITLES = {"mnist": "MNIST (8k/2k split of t10k)", "fashion": "Fashion-MNIST (60k/10k)"}


class DataError(RuntimeError):
    pass


# --- data ------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped idx file (ubyte data only): magic 0x00 0x00 0x08 ndim, big-endian uint32
    dims, then the bytes."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: {data.size} bytes of data for dims {dims}")
    return data.reshape(dims)


def _pair(directory: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(directory / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(directory / f"{prefix}-labels-idx1-ubyte.gz")
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise DataError(f"{directory}/{prefix}: images {images.shape} vs labels {labels.shape}")
    return images, labels


def load_mnist(directory: Path) -> dict[str, np.ndarray]:
    names = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise DataError(f"MNIST test files missing in {directory}: {', '.join(missing)}")
    images, labels = _pair(directory, "t10k")
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    tr, te = perm[:MNIST_TRAIN], perm[MNIST_TRAIN:]
    return {
        "x_train": images[tr],
        "y_train": labels[tr],
        "x_test": images[te],
        "y_test": labels[te],
    }


def load_fashion(directory: Path) -> dict[str, np.ndarray]:
    names = [f"{p}-{k}-ubyte.gz" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    if not all((directory / n).is_file() for n in names):
        raise DataError(f"Fashion-MNIST not found in {directory}; install it with: {FASHION_APT}")
    x_train, y_train = _pair(directory, "train")
    x_test, y_test = _pair(directory, "t10k")
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def to_tensors(raw: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """uint8 -> float in [0, 1], standardised with the training split's mean and std."""
    x_train = torch.from_numpy(raw["x_train"].astype(np.float32) / 255.0)
    mean, std = x_train.mean().item(), x_train.std().item()
    out = {"mean": mean, "std": std}
    for split in ("train", "test"):
        x = torch.from_numpy(raw[f"x_{split}"].astype(np.float32) / 255.0)
        out[f"x_{split}"] = ((x - mean) / std).unsqueeze(1).contiguous()
        out[f"y_{split}"] = torch.from_numpy(raw[f"y_{split}"].astype(np.int64))
    return out


# --- models ----------------------------------------------------------------------------------


class LeNet(nn.Module):
    """LeNet-5 style for 28x28 inputs; ``acl=True`` makes both convs ACLs (AnaNN-LeNet)."""

    def __init__(self, acl: bool = False, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if acl:
            self.conv1 = ACL.from_pattern(1, 6, 5, PATTERN, padding=2, generator=generator)
            self.conv2 = ACL.from_pattern(6, 16, 5, PATTERN, generator=generator)
        else:
            self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
            self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 6 x 14 x 14
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 16 x 5 x 5
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)

    def convs(self) -> dict[str, nn.Module]:
        return {"conv1": self.conv1, "conv2": self.conv2}


def conv_params(module: nn.Module) -> int:
    """Learnable kernel parameters of one conv module, bias excluded."""
    return sum(p.numel() for n, p in module.named_parameters() if n != "bias")


def dense_params(module: nn.Module) -> int:
    """What a plain conv of the same shape would hold (Co * Ci/groups * h * w)."""
    h, w = module.kernel_size
    return module.out_channels * (module.in_channels // module.groups) * h * w


def build(model: str, seed: int) -> LeNet:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    return LeNet(acl=model == "acl", generator=gen)


# --- training --------------------------------------------------------------------------------


@torch.no_grad()
def accuracy(net: nn.Module, x: Tensor, y: Tensor) -> float:
    net.eval()
    correct = 0
    for i in range(0, len(y), EVAL_BATCH):
        correct += (net(x[i : i + EVAL_BATCH]).argmax(1) == y[i : i + EVAL_BATCH]).sum().item()
    return correct / len(y)


def train(model: str, data: dict[str, Tensor], epochs: int, seed: int) -> dict:
    net = build(model, seed)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    shuffle = torch.Generator().manual_seed(seed)
    x, y = data["x_train"], data["y_train"]
    n = len(y)
    result = {
        "model": model,
        "layers": {},
        "test_acc": [],
        "train_loss": [],
        "train_acc": [],
        "epoch_train_s": [],
        "epoch_eval_s": [],
    }
    for name, conv in net.convs().items():
        result["layers"][name] = {
            "repr": f"{type(conv).__name__}({conv.extra_repr()})",
            "conv_params": conv_params(conv),
            "dense_params": dense_params(conv),
            "compact_factor": conv.compact_factor() if isinstance(conv, ACL) else 0.0,
            "pattern": conv.pattern if isinstance(conv, ACL) else None,
            "family_totals": conv.family_totals() if isinstance(conv, ACL) else None,
        }
    result["conv_params"] = sum(v["conv_params"] for v in result["layers"].values())
    result["dense_conv_params"] = sum(v["dense_params"] for v in result["layers"].values())
    result["compact_factor"] = 1.0 - result["conv_params"] / result["dense_conv_params"]
    result["total_params"] = sum(p.numel() for p in net.parameters())

    for epoch in range(epochs):
        net.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=shuffle)
        loss_sum, correct = 0.0, 0
        for i in range(0, n, BATCH):
            idx = perm[i : i + BATCH]
            xb, yb = x[idx], y[idx]
            logits = net(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
        t1 = time.perf_counter()
        acc = accuracy(net, data["x_test"], data["y_test"])
        t2 = time.perf_counter()
        result["train_loss"].append(loss_sum / n)
        result["train_acc"].append(correct / n)
        result["test_acc"].append(acc)
        result["epoch_train_s"].append(t1 - t0)
        result["epoch_eval_s"].append(t2 - t1)
        print(
            f"  {model:5s} epoch {epoch + 1}/{epochs}: loss {loss_sum / n:.4f}, "
            f"train acc {100 * correct / n:.2f}%, test acc {100 * acc:.2f}%, "
            f"{t1 - t0:.1f} s train",
            flush=True,
        )
    result["final_test_acc"] = result["test_acc"][-1]
    result["train_s"] = sum(result["epoch_train_s"])
    return result


# --- machine ---------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --- output ----------------------------------------------------------------------------------


def print_table(runs: dict[str, dict[str, dict]]) -> None:
    rows = []
    for ds, models in runs.items():
        for model, r in models.items():
            per_layer = " + ".join(str(v["conv_params"]) for v in r["layers"].values())
            cfs = ", ".join(f"{v['compact_factor']:.4f}" for v in r["layers"].values())
            rows.append(
                (
                    ds,
                    "LeNet" if model == "plain" else "AnaNN-LeNet",
                    f"{r['conv_params']:,} ({per_layer})",
                    f"{r['compact_factor']:.4f} ({cfs})",
                    f"{100 * r['final_test_acc']:.2f}%",
                    f"{r['train_s']:.1f} s",
                )
            )
    header = (
        "dataset",
        "model",
        "conv params (conv1 + conv2)",
        "compact factor (conv1, conv2)",
        "test acc",
        "train time",
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is a dependency of the package, but keep the bench standalone
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
        for row in (header, *rows):
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
        return
    table = Table(title="LeNet vs AnaNN-LeNet, trained from scratch")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=140).print(table)


def plot(runs: dict[str, dict[str, dict]], path: Path) -> None:
    """Test accuracy per epoch, one panel per dataset, both models (PIL only)."""
    from PIL import Image, ImageDraw, ImageFont

    def font(size: int):
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1
            return ImageFont.load_default()

    f_small, f_mid, f_big = font(13), font(15), font(18)
    colors = {"plain": (31, 119, 180), "acl": (214, 39, 40)}
    labels = {"plain": "LeNet (nn.Conv2d)", "acl": "AnaNN-LeNet (ACL)"}
    pw, ph = 520, 380
    ml, mr, mt, mb = 70, 20, 50, 55
    img = Image.new("RGB", (pw * len(runs), ph), "white")
    d = ImageDraw.Draw(img)
    for p, (ds, models) in enumerate(runs.items()):
        ox = p * pw
        x0, x1, y0, y1 = ox + ml, ox + pw - mr, mt, ph - mb
        epochs = max(len(r["test_acc"]) for r in models.values())
        accs = [100 * a for r in models.values() for a in r["test_acc"]]
        lo, hi = min(accs), max(accs)
        step = next((s for s in (0.5, 1.0, 2.0) if hi - lo <= 6 * s), 5.0)
        lo = np.floor(lo / step) * step - (step if lo % step == 0 else 0)
        hi = np.ceil(hi / step) * step
        if hi - lo < step:
            hi = lo + step

        def sx(e, x0=x0, x1=x1, epochs=epochs):
            return x0 + (x1 - x0) * (e - 1) / max(epochs - 1, 1)

        def sy(a, y0=y0, y1=y1, lo=lo, hi=hi):
            return y1 - (y1 - y0) * (a - lo) / (hi - lo)

        # grid, ticks and labels
        t = lo
        while t <= hi + 1e-9:
            y = sy(t)
            d.line([(x0, y), (x1, y)], fill=(225, 225, 225))
            d.text((x0 - 8, y), f"{t:g}", fill="black", font=f_small, anchor="rm")
            t += step
        for e in range(1, epochs + 1):
            x = sx(e)
            d.line([(x, y0), (x, y1)], fill=(240, 240, 240))
            d.text((x, y1 + 8), str(e), fill="black", font=f_small, anchor="mt")
        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text(((x0 + x1) / 2, y1 + 30), "epoch", fill="black", font=f_mid, anchor="mt")
        title = TITLES.get(ds, ds)
        d.text(((x0 + x1) / 2, 18), title, fill="black", font=f_big, anchor="mm")
        # curves
        for model, r in models.items():
            pts = [(sx(e + 1), sy(100 * a)) for e, a in enumerate(r["test_acc"])]
            if len(pts) > 1:
                d.line(pts, fill=colors[model], width=3)
            for x, y in pts:
                d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colors[model])
        # legend
        lx, ly = x1 - 220, y1 - 50
        d.rectangle([lx - 8, ly - 8, x1 - 8, y1 - 8], fill="white", outline=(180, 180, 180))
        for k, model in enumerate(models):
            yy = ly + 18 * k + 2
            d.line([(lx, yy), (lx + 24, yy)], fill=colors[model], width=3)
            acc = 100 * models[model]["final_test_acc"]
            d.text(
                (lx + 30, yy),
                f"{labels[model]} {acc:.2f}%",
                fill="black",
                font=f_small,
                anchor="lm",
            )
        # y label, rotated
        lab = Image.new("RGB", (140, 20), "white")
        ImageDraw.Draw(lab).text(
            (70, 10), "test accuracy (%)", fill="black", font=f_mid, anchor="mm"
        )
        img.paste(lab.rotate(90, expand=True), (ox + 6, int((y0 + y1) / 2 - 70)))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="mnist,fashion", help="comma list of mnist, fashion")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write all results here")
    ap.add_argument("--plot", type=Path, help="write a PNG of test accuracy per epoch here")
    ap.add_argument("--mnist-dir", type=Path, default=MNIST_DIR)
    ap.add_argument("--fashion-dir", type=Path, default=FASHION_DIR)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1; 0: torch's)"
    )
    args = ap.parse_args(argv)
    datasets = [s.strip() for s in args.datasets.split(",") if s.strip()]
    unknown = sorted(set(datasets) - {"mnist", "fashion"})
    if unknown or not datasets:
        ap.error(f"--datasets: unknown {unknown or 'empty list'}; use mnist, fashion")
    if args.epochs < 1:
        ap.error("--epochs must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    loaders = {
        "mnist": lambda: load_mnist(args.mnist_dir),
        "fashion": lambda: load_fashion(args.fashion_dir),
    }
    try:  # load everything first, so a missing dataset fails before any training
        raw = {ds: loaders[ds]() for ds in datasets}
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    info = machine()
    print(
        f"{info['cpu']} ({info['cpu_count']} cores, torch {info['torch']}, "
        f"{info['torch_threads']} threads), epochs {args.epochs}, seed {args.seed}",
        flush=True,
    )
    wall0, cpu0, load0 = time.perf_counter(), cpu_seconds(), os.getloadavg()
    runs: dict[str, dict[str, dict]] = {}
    splits = {}
    for ds in datasets:
        data = to_tensors(raw[ds])
        splits[ds] = {
            "train": len(data["y_train"]),
            "test": len(data["y_test"]),
            "mean": data["mean"],
            "std": data["std"],
        }
        print(f"{ds}: {splits[ds]['train']} train / {splits[ds]['test']} test images", flush=True)
        runs[ds] = {m: train(m, data, args.epochs, args.seed) for m in MODELS}
    wall = time.perf_counter() - wall0
    cpu = cpu_seconds() - cpu0
    load1 = os.getloadavg()

    print_table(runs)
    for ds, models in runs.items():
        for m, r in models.items():
            for name, v in r["layers"].items():
                print(f"  {ds} {m} {name}: {v['repr']} -> {v['conv_params']} params")
    print(
        f"total wall time {wall:.1f} s (process CPU {cpu:.1f} s; "
        f"load average at start {load0[0]:.2f}, at end {load1[0]:.2f})"
    )

    if args.json:
        out = {
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "config": {
                "epochs": args.epochs,
                "seed": args.seed,
                "lr": LR,
                "batch": BATCH,
                "optimizer": "Adam",
                "pattern": PATTERN,
                "gain": False,
                "offset": False,
                "mnist_split": f"default_rng({SPLIT_SEED}).permutation(10000): first "
                f"{MNIST_TRAIN} train, rest test",
            },
            "splits": splits,
            "machine": info,
            "wall_s": wall,
            "process_cpu_s": cpu,
            "loadavg_start": load0,
            "loadavg_end": load1,
            "runs": runs,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(runs, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
