#!/usr/bin/env python
"""How far SqueezeNet's conv1 can be compressed before its function changes (issue 14's first
target: compact factor >= 0.85 with >= 96 % top-1 agreement and no top-1 loss), and what was
tried to get there. Every conversion is the library's calibrated default (fit by output error,
compensated targets, channel sweeps, joint re-solve) on ``features.0`` alone, budget
``target_compact``, calibrated on the first 256 images of the calibration half (64 of them held
out, as the command does); every figure is measured on the 500 evaluation images.

Parts (``--part``, comma-separated):

``frontier``
    compact factor -> logits error / agreement / top-1, paper families and paper + extended
    (``Ge``, ``Dx``, ``Dxx``): where the target's fidelity is reached at all.
``scaled``
    the converted conv1 blended back towards the original, ``W + a (W_conv - W)``: which
    logits error the target's agreement needs (no compression; a ruler).
``reconstruct``
    ``--reconstruct N``: Adam on every AKP of the layer on its exact output error.
``block``
    the same gradient steps on conv1's parameters, but on the error after the ReLU
    (``features[:2]``) or of the logits (BRECQ-style block / network reconstruction), on the
    256 calibration images.
``downstream``
    re-solving the *plain* convs after conv1 (same shapes, same parameter count) to reproduce
    the original's outputs from the converted network's inputs, with the conversion's validated
    compensation: the next conv only, then every plain conv in network order.
``channels``
    each output channel's errors weighed by what it costs the logits: the damage of replacing
    that channel alone (64 calibration images) over its output error, applied exactly by
    rescaling conv1's channel q by ``s_q`` and the next conv's input channel q by ``1 / s_q``
    (ReLU and max-pool commute with a positive scale), so the budget spends parameters where
    the logits need them.
``downstream-network``
    the ``downstream`` re-solve of every plain conv after a whole-network conversion (every
    3x3/7x7 conv, model budget 0.4, paper families), where every converted layer already
    compensates the layers before it.

Split: ``bench/conversion_sweep.py``'s (sample images sorted by name; odd positions calibrate,
even positions evaluate). Usage::

    python bench/conv1_limits.py [--part frontier,scaled,reconstruct,block,downstream,channels]
        [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from conversion_sweep import MODELS, load_split  # noqa: E402

from acl_convert import convert_model  # noqa: E402
from acl_convert.calibration.compensate import compensated  # noqa: E402
from acl_convert.calibration.moments import Calibration, execution_order  # noqa: E402
from acl_convert.fit.reconstruct import DampedAdam  # noqa: E402
from acl_convert.io.arch import build_model  # noqa: E402
from acl_convert.io.checkpoint import load_checkpoint  # noqa: E402
from acl_convert.nn.acl import ACL  # noqa: E402

EXTENDED = "G,Lg,Tf,Ts,Lt,M,Ge,Dx,Dxx"
PARTS = (
    "frontier",
    "scaled",
    "reconstruct",
    "block",
    "downstream",
    "channels",
    "downstream-network",
)


class Bench:
    """The original network, the calibration batches and the evaluation set, loaded once."""

    def __init__(self) -> None:
        path, arch, _ = MODELS["squeezenet"]
        self.original = build_model(arch)
        self.original.load_state_dict(load_checkpoint(path).state_dict, strict=True)
        self.original.eval().requires_grad_(False)
        self.eval, train = load_split(None, arch)
        calib = train["x"][:256]
        self.calib = list(calib.split(16))  # as the command reads a folder: batches of 16
        self.fitted = torch.cat(self.calib[:12])  # 192 images: what a conversion may fit to
        self.reference = self.logits(self.original)

    @torch.no_grad()
    def logits(self, model) -> torch.Tensor:
        x = self.eval["x"]
        return torch.cat([model.eval()(x[i : i + 100]) for i in range(0, len(x), 100)])

    def score(self, model) -> dict:
        out, ref, y = self.logits(model), self.reference, self.eval["y"]
        return {
            "logits_err": round(float((out - ref).norm() / ref.norm()), 4),
            "agreement": round(100 * float((out.argmax(1) == ref.argmax(1)).float().mean()), 1),
            "top1": round(100 * float((out.argmax(1) == y).float().mean()), 1),
            "top1_original": round(100 * float((ref.argmax(1) == y).float().mean()), 1),
        }

    def convert(self, target: float, families: str | None = EXTENDED, model=None, **settings):
        kw = {"families": families} if families else {}
        return convert_model(
            model if model is not None else self.original,
            "features.0",
            calibration=self.calib,
            target_compact=target,
            **kw,
            **settings,
        )


def log(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def part_frontier(b: Bench) -> list[dict]:
    rows = []
    for families in (EXTENDED, None):
        for target in (0.3, 0.5, 0.6, 0.7, 0.8, 0.85):
            t = time.perf_counter()
            conv = b.convert(target, families)
            rows.append(
                log(
                    {
                        "families": families or "paper",
                        "target": target,
                        "compact": round(conv.compact_factor, 4),
                        "convert_s": round(time.perf_counter() - t, 1),
                        **b.score(conv.model),
                    }
                )
            )
    return rows


def part_scaled(b: Bench) -> list[dict]:
    conv = b.convert(0.85).layers[0].acl.to_conv2d()
    w0, b0 = b.original.features[0].weight, b.original.features[0].bias
    rows = []
    for a in (1.0, 0.75, 0.5, 0.35, 0.25):
        m = copy.deepcopy(b.original)
        with torch.no_grad():
            m.features[0].weight.copy_(w0 + a * (conv.weight - w0))
            m.features[0].bias.copy_(b0 + a * (conv.bias - b0))
        rows.append(log({"blend": a, **b.score(m)}))
    return rows


def part_reconstruct(b: Bench) -> list[dict]:
    rows = []
    for steps in (0, 300, 1000):
        t = time.perf_counter()
        conv = b.convert(0.85, reconstruct=steps)
        rows.append(
            log(
                {
                    "reconstruct": steps,
                    "convert_s": round(time.perf_counter() - t, 1),
                    **b.score(conv.model),
                }
            )
        )
    return rows


def _train_conv1(model, head, images, target, steps: int, lr: float, seed: int = 0) -> None:
    """Adam (cosine-decayed, with the fine-tune's AKP damping and angle holds) on conv1's
    AKPs, gains, offsets and bias, minimising ``|head(model, x) - target|^2 / |target|^2`` over
    random batches of 32 calibration images."""
    model.requires_grad_(False)
    acl = model.features[0].train()
    rates = dict.fromkeys(("akp", "plain", "rest"), lr)
    gen = torch.Generator().manual_seed(seed)
    with DampedAdam(model, {"features.0": acl}, rates) as optimizer:
        for step in range(steps):
            idx = torch.randint(0, len(images), (32,), generator=gen)
            ref = target[idx]
            loss = (head(model, images[idx]) - ref).square().sum() / ref.square().sum()
            optimizer.step(loss, step / steps)
    model.eval()


def part_block(b: Bench) -> list[dict]:
    images = torch.cat(b.calib)
    heads = {
        "after ReLU": (lambda m, x: m.features[:2](x), 300, 1e-2),
        "logits": (lambda m, x: m(x), 150, 1e-3),
    }
    rows = []
    for name, (head, steps, lr) in heads.items():
        model = b.convert(0.85).model
        with torch.no_grad():
            target = torch.cat(
                [head(b.original, images[i : i + 32]) for i in range(0, len(images), 32)]
            )
        t = time.perf_counter()
        _train_conv1(model, head, images, target, steps, lr)
        rows.append(
            log(
                {
                    "objective": name,
                    "steps": steps,
                    "lr": lr,
                    "train_s": round(time.perf_counter() - t, 1),
                    **b.score(model),
                }
            )
        )
    return rows


def _resolve_plain(b: Bench, model, scope: str) -> dict:
    """Re-solve the plain convs of ``model`` (the next one, or every one) in network order."""
    calibration = Calibration(b.calib[:12])
    plain = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d) and not isinstance(m, ACL)
    ]
    order = execution_order(model, plain, b.calib[0][:1])
    order = order[:1] if scope == "next conv" else order
    t = time.perf_counter()
    for name in order:
        conv = model.get_submodule(name)
        mom = calibration.moments(model, name, None, reference=b.original)
        weight, bias = compensated(conv.weight.detach(), conv.bias.detach(), mom)
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
    return {"re-solved": scope, "convs": len(order), "s": round(time.perf_counter() - t, 1)}


def part_downstream(b: Bench) -> list[dict]:
    rows = []
    for scope in ("next conv", "every plain conv"):
        model = b.convert(0.85).model.eval()
        rows.append(log({**_resolve_plain(b, model, scope), **b.score(model)}))
    return rows


def part_downstream_network(b: Bench) -> list[dict]:
    model = convert_model(
        b.original, "all", calibration=b.calib, target_compact=0.4, budget_scope="model"
    ).model.eval()
    rows = [log({"re-solved": "none", "network": "all 3x3/7x7 at 0.4", **b.score(model)})]
    rows.append(log({**_resolve_plain(b, model, "every plain conv"), **b.score(model)}))
    return rows


def part_channels(b: Bench) -> list[dict]:
    conv = b.convert(0.85).layers[0].acl.to_conv2d()
    first = b.original.features[0]
    x = b.fitted[::3]  # 64 calibration images
    with torch.no_grad():
        before = b.original(x)
        y_orig = F.conv2d(x, first.weight, first.bias, stride=first.stride)
        y_conv = F.conv2d(x, conv.weight, conv.bias, stride=first.stride)
        damage, error = [], []
        for q in range(first.out_channels):
            m = copy.deepcopy(b.original)
            m.features[0].weight[q] = conv.weight[q]
            m.features[0].bias[q] = conv.bias[q]
            damage.append(float((m(x) - before).square().sum()))
            error.append(float((y_conv[:, q] - y_orig[:, q]).square().sum()))
    cost = torch.tensor(damage) / torch.tensor(error).clamp_min(1e-30)
    rows = [
        log(
            {
                "cost_per_error": {
                    "min": float(cost.min()),
                    "median": float(cost.median()),
                    "max": float(cost.max()),
                }
            }
        )
    ]
    for power in (0.5, 1.0):
        s = (cost / cost.mean()) ** (power / 2)
        scaled = copy.deepcopy(b.original)
        with torch.no_grad():
            scaled.features[0].weight.mul_(s[:, None, None, None])
            scaled.features[0].bias.mul_(s)
            scaled.features[3].squeeze.weight.div_(s[None, :, None, None])
        assert b.score(scaled)["logits_err"] < 1e-5  # the same function
        conv = b.convert(0.85, model=scaled)
        rows.append(
            log(
                {
                    "weights": f"cost^{power}",
                    "compact": round(conv.compact_factor, 4),
                    **b.score(conv.model),
                }
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default=",".join(PARTS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    parts = args.part.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    torch.manual_seed(0)
    b = Bench()
    out = {"original": b.score(b.original)}
    for part in parts:
        print(f"== {part}", flush=True)
        out[part] = globals()[f"part_{part.replace('-', '_')}"](b)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
