#!/usr/bin/env python
"""The honest comparison (issue 14): acl-convert against what a compression user would pick
instead, at the same parameter count on the same layers and images, before and after the same
distillation budget.

Baselines, each given exactly the parameters acl-convert's conversion keeps in each layer
(``LayerResult.params_after``; biases are not counted by any method and all keep theirs):

``svd``
    Data-aware low-rank factorisation (the activation-aware variant, as ASVD/SVD-LLM): the
    conv's ``(Co, D)`` weight ``W`` is replaced by the rank-``r`` ``W'`` minimising the output
    error ``E|(W - W') x|^2 = |(W - W') L|_F^2`` (``S = L L^T`` the layer's input patch moment
    on the calibration images): ``W' = SVD_r(W L) L^-1``, a ``h x w`` conv to ``r`` channels
    then a ``1 x 1`` conv, ``r (D + Co)`` parameters.
``tucker2``
    Tucker-2 decomposition of the weight over its output and input channel modes
    (:func:`tensorly.decomposition.partial_tucker`, Kim et al. 2016): ``1 x 1``, ``h x w`` core,
    ``1 x 1`` convs, ``Ci R_in + R_out R_in h w + Co R_out`` parameters, ``R_in / R_out`` as
    ``Ci / Co``.
``prune``
    Magnitude pruning of the layer's weights to the count
    (:func:`torch.nn.utils.prune.l1_unstructured`).

A rank counts in steps of ``D + Co`` parameters, so the low-rank methods take the largest rank
within the count and spend the rest on a sparse correction (the residual's entries of largest
whitened size for ``svd``, of largest size for ``tucker2``): every method holds exactly the
count. Every method then gets its biases corrected for the mean shift its approximation adds on
the calibration images (``b' = b + (W - W') E[x]``), as acl-convert's joint re-solve does.

Distillation: the same loop for every method (KL to the original network's logits, Adam, batch
32, the calibration half's images, relative learning rates as :mod:`acl_convert.train.finetune`
sets them; for acl-convert its AKP damping too), stopped after the same process CPU time.

**Split:** the 1000 sample images sorted by file name; odd positions calibrate (the first
``--calibration-limit``, as ``acl-convert --calibration`` would read a folder of them) and
fine-tune, even positions evaluate.

Usage::

    python bench/baselines.py --net squeezenet --target 0.5 --distill-cpu-minutes 5 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from acl_convert import convert_model  # noqa: E402
from acl_convert.calibration.moments import Calibration  # noqa: E402
from acl_convert.io.arch import model_for  # noqa: E402
from acl_convert.io.checkpoint import load_checkpoint  # noqa: E402
from acl_convert.io.images import load_image, preprocessing  # noqa: E402
from acl_convert.network.surgery import set_submodule  # noqa: E402
from acl_convert.train.evaluate import evaluate  # noqa: E402

DATA = REPO.parent / "shared" / "data"
IMAGES = DATA / "imagenet" / "sample-images-1000"
NETS = {
    "squeezenet": DATA / "weights" / "squeezenet1_0_deepcompression_tvnorm.pth",
    "mobilenet": DATA / "weights" / "mobilenet_v2_qnnpack_dequant_bnfolded.pth",
}
METHODS = ("acl", "svd", "tucker2", "prune")


# --- one compressed conv ------------------------------------------------------------------------


class ComputedConv(nn.Module):
    """A conv whose weight is computed from trainable factors plus a masked sparse correction
    (the parameters a baseline keeps); it computes what its factorised form computes (a
    ``h x w`` conv then ``1 x 1`` convs equal one conv with the product weight)."""

    def __init__(self, conv: nn.Conv2d, factors: dict[str, Tensor], compose, delta: Tensor, mask):
        super().__init__()
        self.conv_args = dict(
            stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups
        )
        self.factors = nn.ParameterDict({k: nn.Parameter(v.float()) for k, v in factors.items()})
        self.compose = compose
        self.delta = nn.Parameter(delta.float())
        self.register_buffer("mask", mask.float())
        # A conv without bias gets one for the mean-shift correction, as acl-convert folds its
        # solved bias into the following BatchNorm (neither is counted).
        bias = (
            conv.bias.detach().clone() if conv.bias is not None else torch.zeros(conv.out_channels)
        )
        self.bias = nn.Parameter(bias)
        self.shape = tuple(conv.weight.shape)

    @property
    def weight(self) -> Tensor:
        dense = self.compose(self.factors).reshape(self.shape) if len(self.factors) else 0
        return dense + self.delta * self.mask

    def parameter_count(self) -> int:
        """Kernel parameters kept: the factors' values and the correction's unmasked ones."""
        return sum(p.numel() for p in self.factors.values()) + int(self.mask.sum())

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, **self.conv_args)


def _svd_compose(f):
    return f["b"] @ f["a"]


def _tucker_compose(f):
    return torch.einsum("oi,ij...,pj->op...", f["u_out"], f["core"], f["u_in"])


def low_rank(conv: nn.Conv2d, budget: int, moment: Tensor) -> ComputedConv:
    """The activation-aware rank-``r`` factorisation within ``budget`` parameters, the rest a
    sparse correction (see the module docstring). ``moment``: ``(D, D)`` input patch moment."""
    w = conv.weight.detach().double().reshape(conv.out_channels, -1)
    co, d = w.shape
    rank = min(budget // (d + co), co, d)
    s = moment.double() + 1e-8 * float(moment.diagonal().mean()) * torch.eye(d, dtype=torch.float64)
    chol = torch.linalg.cholesky(s)
    u, sv, vh = torch.linalg.svd(w @ chol, full_matrices=False)
    b = u[:, :rank] * sv[:rank]
    a = torch.linalg.solve_triangular(chol, vh[:rank], upper=False, left=False)
    approx = b @ a
    importance = (w - approx).abs() * s.diagonal().sqrt()[None, :]
    return _with_correction(conv, {"a": a, "b": b}, _svd_compose, approx, importance, budget)


def tucker2(conv: nn.Conv2d, budget: int) -> ComputedConv:
    """Tucker-2 within ``budget`` parameters, the rest a sparse correction."""
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    tl.set_backend("pytorch")
    w = conv.weight.detach().double()
    co, ci, h, ww = w.shape
    best = None
    for r_out in range(1, co + 1):
        r_in = max(1, min(ci, round(r_out * ci / co)))
        count = ci * r_in + r_out * r_in * h * ww + co * r_out
        if count <= budget:
            best = (r_out, r_in)
    if best is None:
        return _with_correction(conv, {}, _tucker_compose, torch.zeros_like(w), w.abs(), budget)
    (core, (u_out, u_in)), _ = partial_tucker(w, rank=list(best), modes=[0, 1], random_state=0)
    factors = {"u_out": u_out, "core": core, "u_in": u_in}
    approx = _tucker_compose(factors)
    return _with_correction(conv, factors, _tucker_compose, approx, (w - approx).abs(), budget)


def _with_correction(conv, factors, compose, approx, importance, budget) -> ComputedConv:
    """Spend what the factors leave of ``budget`` on the residual entries of largest
    ``importance``."""
    used = sum(f.numel() for f in factors.values())
    w = conv.weight.detach().double()
    residual = (w.reshape(approx.shape) - approx).reshape(w.shape)
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[importance.reshape(-1).topk(budget - used).indices] = True
    return ComputedConv(conv, factors, compose, residual, mask.view(w.shape))


def pruned(conv: nn.Conv2d, budget: int) -> ComputedConv:
    """``conv`` with all but its ``budget`` largest weights set to zero
    (:func:`torch.nn.utils.prune.l1_unstructured`, then made permanent)."""
    from torch.nn.utils import prune

    work = copy.deepcopy(conv)
    prune.l1_unstructured(work, "weight", amount=work.weight.numel() - budget)
    mask = work.weight_mask.detach().clone()
    prune.remove(work, "weight")
    return ComputedConv(conv, {}, None, conv.weight.detach().double(), mask)


@torch.no_grad()
def correct_bias(layer: ComputedConv, conv: nn.Conv2d, means: Tensor) -> None:
    """``b' = b + (W - W') E[x]`` per output channel (``means``: ``(G, D)`` mean input patch
    of each conv group), so the approximation adds no mean shift to the layer's output."""
    co = conv.out_channels
    diff = (conv.weight.detach().double() - layer.weight.double()).reshape(co, -1)
    mean = means.double().repeat_interleave(co // len(means), 0)  # (Co, D)
    layer.bias.add_((diff * mean).sum(1).float())


def build(method: str, conv: nn.Conv2d, budget: int, moments) -> ComputedConv:
    """The baseline ``method`` of ``conv`` holding exactly ``budget`` kernel parameters, its
    bias corrected; ``moments``: the layer's :class:`LayerMoments` on the calibration images.
    Low-rank methods need an ungrouped conv (a depthwise kernel is its own channel: there is no
    channel mode to factorise)."""
    if not 0 <= budget <= conv.weight.numel():
        raise ValueError(f"budget {budget} is not within 0..{conv.weight.numel()} weights")
    if method != "prune" and conv.groups != 1:
        raise ValueError(f"{method} factorises channel modes; a grouped conv has none to share")
    if method == "svd":
        layer = low_rank(conv, budget, moments.full[0, :-1, :-1])
    elif method == "tucker2":
        layer = tucker2(conv, budget)
    else:
        layer = pruned(conv, budget)
    correct_bias(layer, conv, moments.full[:, :-1, -1])
    return layer


# --- the experiment -----------------------------------------------------------------------------


def load_halves(arch_model, spec, calib_limit: int):
    with open(IMAGES / "labels.csv") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: r["file"])
    transform = preprocessing(spec, arch_model)

    def load(part):
        x = torch.stack([load_image(IMAGES / r["file"], transform) for r in part])
        return x, torch.tensor([int(r["index"]) for r in part])

    return load(rows[1::2][:calib_limit]), load(rows[1::2]), load(rows[0::2])


def distill(
    student: nn.Module, teacher: nn.Module, params, x: Tensor, cpu_seconds: float, damping=()
):
    """Adam on ``params`` (optimiser groups) to the teacher's logits, batches of 32 from ``x``
    in a fixed shuffled order, until ``cpu_seconds`` of process CPU time are spent."""
    opt = torch.optim.Adam(params)
    gen = torch.Generator().manual_seed(0)
    start, steps = time.process_time(), 0
    student.eval()
    while time.process_time() - start < cpu_seconds:
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 32):
            xb = x[order[i : i + 32]]
            with torch.no_grad():
                target = F.log_softmax(teacher(xb), 1)
            loss = F.kl_div(
                F.log_softmax(student(xb), 1), target, log_target=True, reduction="batchmean"
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            before = [p.detach().clone() for p, _ in damping]
            opt.step()
            with torch.no_grad():
                for (p, scale), old in zip(damping, before, strict=True):
                    p.copy_(old + (p - old) * scale)
            steps += 1
            if time.process_time() - start >= cpu_seconds:
                break
    return steps


def relative_groups(layers: dict[str, ComputedConv], lr: float) -> list[dict]:
    groups = []
    for layer in layers.values():
        for p in list(layer.factors.values()) + [layer.delta]:
            rms = float(p.detach().square().mean().sqrt()) or 1.0
            groups.append({"params": [p], "lr": lr * rms})
    return groups


def measure(model, original, ev) -> dict:
    r = evaluate(
        model,
        [(ev[0][i : i + 50], ev[1][i : i + 50]) for i in range(0, len(ev[1]), 50)],
        reference=original,
    )
    return {
        "top1": r["top1"],
        "agreement": r["agreement"],
        "logits_rel_error": r["logits_rel_error"],
        "reference_top1": r["reference"]["top1"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--net", choices=list(NETS), default="squeezenet")
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--families", default="G,Lg,Tf,Ts,Lt,M")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--layers", default="all", help="layers to compress (default: every non-1x1)")
    ap.add_argument("--calibration-limit", type=int, default=256)
    ap.add_argument("--eval-limit", type=int, default=None, help="first N evaluation images")
    ap.add_argument("--distill-cpu-minutes", type=float, default=5.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    path, layers = NETS[args.net], args.layers
    ckpt = load_checkpoint(path)
    spec, original = model_for(ckpt.state_dict, None, [])
    original.eval().requires_grad_(False)
    calib, tune, ev = load_halves(original, spec, args.calibration_limit)
    ev = (ev[0][: args.eval_limit], ev[1][: args.eval_limit])
    t0 = time.time()
    conv = convert_model(
        original,
        layers,
        calibration=[calib[0]],
        arch=spec,
        target_compact=args.target,
        budget_scope="model",
        families=args.families,
    )
    convert_s = time.time() - t0
    budgets = {r.layer.name: r.params_after for r in conv.layers}
    print(
        f"acl-convert: compact factor {conv.compact_factor:.4f} in {convert_s:.0f} s; "
        f"{sum(budgets.values()):,} kernel parameters kept",
        flush=True,
    )
    fit_batches = [calib[0][i : i + 16] for i in range(0, len(calib[0]), 16)]
    out = {
        "net": args.net,
        "target": args.target,
        "compact_factor": conv.compact_factor,
        "params_kept": sum(budgets.values()),
        "convert_seconds": convert_s,
        "distill_cpu_seconds": 60 * args.distill_cpu_minutes,
        "methods": {},
    }
    moments = None
    for method in args.methods.split(","):
        t1 = time.time()
        if method == "acl":
            student = copy.deepcopy(conv.model)
            from acl_convert.train.finetune import (
                FinetuneConfig,
                _akp_damping,
                acl_layers,
                param_groups,
            )

            params = param_groups(student, FinetuneConfig(train=("akp", "plain")))
            damping = _akp_damping(acl_layers(student))
            count = sum(budgets.values())
        else:
            if moments is None:
                cal = Calibration(fit_batches)
                moments = {n: cal.moments(original, n) for n in budgets}
            student = copy.deepcopy(original)
            built = {}
            for name, budget in budgets.items():
                layer = build(method, original.get_submodule(name), budget, moments[name])
                assert layer.parameter_count() == budget, (method, name)
                set_submodule(student, name, layer)
                built[name] = layer
            for p in student.parameters():
                p.requires_grad_(False)
            for layer in built.values():
                for p in list(layer.factors.values()) + [layer.delta]:
                    p.requires_grad_(True)
            params, damping = relative_groups(built, 1e-3), ()
            count = sum(layer.parameter_count() for layer in built.values())
        before = measure(student, original, ev)
        steps = distill(student, original, params, tune[0], 60 * args.distill_cpu_minutes, damping)
        after = measure(student, original, ev)
        out["methods"][method] = {
            "params": count,
            "before": before,
            "after": after,
            "distill_steps": steps,
            "seconds": time.time() - t1,
        }
        print(
            f"{method:8s} params {count:,}  before: top-1 {100 * before['top1']:.1f} agree "
            f"{100 * before['agreement']:.1f} logits err {before['logits_rel_error']:.3f}  |  "
            f"after {steps} steps: top-1 {100 * after['top1']:.1f} agree "
            f"{100 * after['agreement']:.1f} logits err {after['logits_rel_error']:.3f}  "
            f"(original top-1 {100 * before['reference_top1']:.1f})",
            flush=True,
        )
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
