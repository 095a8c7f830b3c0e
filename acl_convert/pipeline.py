"""Conversion: the selected convolutions of a checkpoint become ACLs.

:func:`convert` is the one reusable function behind ``acl-convert CHECKPOINT``: fit every kernel
of every selected layer (all layers of one kernel size in one batched fit), choose a family per
kernel, and build each layer's :class:`ACL`. Writing files is left to the caller
(:func:`Conversion.save`), so the library can convert in memory.
"""

from __future__ import annotations

import copy
import math
import platform
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__, kernels, pattern
from .calibration.moments import Calibration, LayerMoments, execution_order
from .errors import UsageError, UserError
from .fit import SELECT_MODES, FitResult, Selection, budget, fit_kernels
from .fit.joint import JointSolution, output_errors, refine_channels
from .fit.joint import resolve as resolve_joint
from .fit.threads import fit_threads
from .io.anann import save_anann, set_submodule
from .io.checkpoint import Checkpoint
from .network.convs import ConvLayer
from .nn.acl import ACL

__all__ = ["Settings", "LayerResult", "Conversion", "convert", "DEFAULT_THRESHOLD"]

#: Default residual threshold. A kernel becomes analytic only when its best family reproduces it
#: to within 30 % (relative L2); looser thresholds convert more kernels and cost more accuracy
#: (see docs/results.md).
DEFAULT_THRESHOLD = 0.3


#: Largest ``Ci/groups * h * w`` whose AKPs are refitted under the full input moments (channel
#: sweeps); wider layers keep the block-diagonal fit, whose sweeps cost ``Ci/groups`` sequential
#: refits each (SqueezeNet's 64-channel 3x3 layers: ~1 min per sweep on 2 cores). The joint
#: re-solve of the linear parameters is exact for every layer.
SWEEP_LIMIT = 160

#: What a residual is measured against: the kernel itself, or its output on calibration inputs.
MEASURES = ("plain", "output")
BUDGET_SCOPES = ("layer", "model")


@dataclass(frozen=True)
class Settings:
    """Conversion settings (the CLI options of the same names).

    ``fit_to``: ``plain`` fits kernels by plain least squares; ``output`` by the expected output
    error on the calibration images (needs them). ``threshold_on``: which residual the threshold
    and the ranking of families use. ``joint``: with calibration, re-solve every converted
    layer's gains, offsets, plain kernels and bias together under the full input moments.
    ``target_compact`` / ``max_output_error``: choose kernels by budget instead of the threshold,
    per layer or over the whole model (``budget_scope``). ``tie_channels``: one family and AKP
    set per output channel (a gain and offset per input channel). ``compensate``: with
    calibration, fit each layer to reproduce the original network's output from the inputs the
    converted network gives it (see :func:`_compensated`).
    """

    families: tuple[str, ...] = kernels.PAPER_FAMILIES
    offset: bool = True
    threshold: float = DEFAULT_THRESHOLD
    select: str = "best"
    device: str = "auto"
    seed: int = 0
    fit_to: str = "plain"
    threshold_on: str = "plain"
    joint: bool = False
    target_compact: float | None = None
    max_output_error: float | None = None
    budget_scope: str = "layer"
    tie_channels: bool = False
    calibration_images: int = 0
    sweeps: int = 2
    compensate: bool = True

    @property
    def budget(self) -> bool:
        return self.target_compact is not None or self.max_output_error is not None

    def __post_init__(self) -> None:
        for name, allowed in (
            ("fit_to", MEASURES),
            ("threshold_on", MEASURES),
            ("budget_scope", BUDGET_SCOPES),
        ):
            if getattr(self, name) not in allowed:
                raise UsageError(
                    f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                    f"got {getattr(self, name)!r}"
                )
        if self.target_compact is not None and self.max_output_error is not None:
            raise UsageError("give --target-compact or --max-output-error, not both")
        if self.target_compact is not None and not 0 <= self.target_compact <= 1:
            raise UsageError(
                f"--target-compact must be a fraction in [0, 1], got {self.target_compact}"
            )
        if self.max_output_error is not None and not self.max_output_error >= 0:
            raise UsageError(f"--max-output-error must be >= 0, got {self.max_output_error}")
        needs = [
            flag
            for flag, on in (
                ("--fit-to output", self.fit_to == "output"),
                ("--threshold-on output", self.threshold_on == "output"),
                ("--max-output-error", self.max_output_error is not None),
                ("--joint", self.joint),
            )
            if on
        ]
        if needs and not self.calibration_images:
            raise UsageError(f"{', '.join(needs)} needs calibration images: pass --calibration DIR")
        if self.threshold_on == "output" and self.fit_to != "output":
            raise UsageError("--threshold-on output needs --fit-to output")
        if self.max_output_error is not None and self.fit_to != "output":
            raise UsageError("--max-output-error needs --fit-to output")
        if self.select not in SELECT_MODES:
            raise UsageError(
                f"--select must be one of {', '.join(SELECT_MODES)}, got {self.select!r}"
            )
        if not (
            isinstance(self.threshold, (int, float))
            and math.isfinite(self.threshold)
            and self.threshold >= 0
        ):
            raise UsageError(f"--threshold must be a number >= 0, got {self.threshold!r}")
        for code in self.families:
            try:
                fam = kernels.get(code)
            except KeyError as exc:
                raise UsageError(f"--families: {exc.args[0]}") from None
            if fam.plain:
                raise UsageError(
                    "--families: plain (P) is what unconverted kernels stay; "
                    "list only analytic families"
                )


@dataclass
class LayerResult:
    """One converted layer: the fit of its kernels, the choice per kernel, and its ACL."""

    layer: ConvLayer
    fit: FitResult
    selection: Selection
    acl: ACL
    joint: JointSolution | None = None

    @property
    def compact_factor(self) -> float:
        return self.acl.compact_factor()

    @property
    def params_before(self) -> int:
        co, cig, h, w = self.layer.shape
        return co * cig * h * w

    @property
    def params_after(self) -> int:
        """Learnable kernel parameters of the ACL (Eq. 25's numerator; bias excluded)."""
        return round(self.params_before * (1 - self.compact_factor))

    def record(self) -> dict[str, Any]:
        """The per-layer header entry of the AnaNN file."""
        lay = self.layer
        return {
            "name": lay.name,
            "shape": list(lay.shape),
            "groups": lay.groups,
            "stride": _listify(lay.stride),
            "padding": _listify(lay.padding),
            "dilation": _listify(lay.dilation),
            "padding_mode": lay.padding_mode,
            "bias": lay.bias,
            "gain": self.acl.gain_enabled,
            "offset": self.acl.offset_enabled,
            "family_counts": self.acl.family_totals(),
            "pattern": self.acl.pattern,
            "compact_factor": self.compact_factor,
            "tied": bool(self.fit.channels),
        }


@dataclass
class Conversion:
    """The result of :func:`convert`."""

    source: Checkpoint
    arch: str | None
    settings: Settings
    layers: list[LayerResult] = field(default_factory=list)

    def tensors(self) -> dict[str, Tensor]:
        """The AnaNN state dict: the source tensors, converted weights replaced by ACL tensors."""
        out = dict(self.source.state_dict)
        for res in self.layers:
            del out[res.layer.weight_key]
            for key, value in res.acl.state_dict().items():
                out[f"{res.layer.name}.{key}"] = value
        return out

    def header(self) -> dict[str, Any]:
        """The AnaNN metadata header (see docs/anann-format.md)."""
        return {
            "tool": "acl-convert",
            "tool_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "source": {"file": Path(self.source.path).name, "sha256": self.source.sha256},
            "arch": self.arch,
            "settings": asdict(self.settings),
            "layers": {res.layer.name: res.record() for res in self.layers},
        }

    def save(self, path: str | Path) -> Path:
        """Write the AnaNN checkpoint atomically."""
        return save_anann(path, self.tensors(), self.header())

    def patched(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` (the source architecture, loaded or not) with every converted
        conv replaced by a copy of its ACL; the layers were built with the conv's own
        hyper-parameters, so they drop in."""
        out = copy.deepcopy(model)
        for res in self.layers:
            set_submodule(out, res.layer.name, copy.deepcopy(res.acl))
        return out


def _listify(value):
    return list(value) if isinstance(value, tuple) else value


def convert(
    checkpoint: Checkpoint,
    layers: Sequence[ConvLayer],
    settings: Settings = Settings(),
    *,
    arch: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    calibration: Calibration | None = None,
    model: nn.Module | None = None,
) -> Conversion:
    """Fit and convert ``layers`` of ``checkpoint``.

    Args:
        checkpoint: the loaded source checkpoint.
        layers: the selected convolutions (see :func:`acl_convert.network.convs.select_layers`).
        settings: families, offset, threshold or budget, selection rule, device and seed.
        arch: the torchvision architecture, when known (recorded in the header).
        progress: called as ``progress(task, done, total)`` while fitting, with one task per
            kernel size and family (e.g. ``"7x7 gabor"``), and per calibrated layer.
        calibration: images to fit by output error (``settings.fit_to == "output"``) and to
            re-solve the linear parameters (``settings.joint``); needs ``model``.
        model: the source architecture (its weights are loaded from ``checkpoint``).

    Returns:
        A :class:`Conversion` holding one :class:`LayerResult` per layer, in the given order.
    """
    for lay in layers:
        # Checked per layer before any fitting: the fit itself can only count bad kernels, not
        # say which layer holds them.
        weight = checkpoint.state_dict[lay.weight_key]
        bad = int((~torch.isfinite(weight)).flatten(1).any(1).sum())
        if bad:
            raise UserError(
                f"layer {lay.name} has NaN or Inf weights in {bad} output channel(s); repair the "
                "checkpoint or leave the layer out of --layers"
            )
    if calibration is not None and (settings.fit_to == "output" or settings.joint):
        if model is None:
            raise UsageError("calibration needs a known architecture; pass --arch NAME")
        # The calibration passes too: on a busy 2-core machine a second thread made them 2.5x
        # slower (see acl_convert.fit.threads).
        with fit_threads():
            results = _convert_calibrated(
                checkpoint, layers, settings, calibration, model, progress
            )
    else:
        fits = _fit_plain(checkpoint, layers, settings, progress)
        selections = _select(fits, layers, settings)
        results = {
            lay.name: LayerResult(
                lay,
                fits[lay.name],
                selections[lay.name],
                build_acl(lay, fits[lay.name], selections[lay.name], checkpoint.state_dict),
            )
            for lay in layers
        }
    return Conversion(
        source=checkpoint,
        arch=arch,
        settings=settings,
        layers=[results[lay.name] for lay in layers],
    )


def _stack(lay: ConvLayer, state_dict: dict[str, Tensor], tie: bool) -> Tensor:
    """A layer's kernels as fitted: ``(K, h, w)``, or ``(Co, Ci/groups, h, w)`` stacks when
    channel-tied."""
    weight = state_dict[lay.weight_key].detach().float()
    return weight if tie else weight.reshape(-1, *weight.shape[2:])


def _channels(lay: ConvLayer, tie: bool) -> Tensor:
    """The input channel every kernel reads (``(K,)``, or ``(Co, Ci/groups)`` for stacks)."""
    co, cig, _, _ = lay.shape
    groups = lay.groups or 1
    q = torch.arange(co)[:, None]
    chan = (q // (co // groups)) * cig + torch.arange(cig)[None, :]
    return chan if tie else chan.reshape(-1)


def _fit_plain(checkpoint, layers, settings, progress) -> dict[str, FitResult]:
    """Plain least-squares fits of every layer; untied layers of one kernel size in one batch
    (small layers share the per-iteration overhead)."""
    by_size: dict[tuple, list[ConvLayer]] = {}
    for lay in layers:
        key = (lay.name,) if settings.tie_channels else tuple(lay.kernel_size)
        by_size.setdefault(key, []).append(lay)
    fits: dict[str, FitResult] = {}
    for group in by_size.values():
        h, w = group[0].kernel_size
        stacks = [_stack(lay, checkpoint.state_dict, settings.tie_channels) for lay in group]
        total = sum(len(x) for x in stacks)

        def report(code: str, done: int, h=h, w=w, total=total) -> None:
            if progress is not None:
                progress(f"{h}x{w} {kernels.get(code).name}", done, total)

        fit = fit_kernels(
            torch.cat(stacks),
            families=settings.families,
            offset=settings.offset,
            device=settings.device,
            seed=settings.seed,
            progress=report,
        )
        start = 0
        for lay, flat in zip(group, stacks, strict=True):
            fits[lay.name] = _slice_fit(fit, start, start + len(flat))
            start += len(flat)
    return fits


def _fit_weighted(lay, state_dict, settings, moments: LayerMoments, progress) -> FitResult:
    h, w = lay.kernel_size
    stack = _stack(lay, state_dict, settings.tie_channels)

    def report(code: str, done: int) -> None:
        if progress is not None:
            progress(f"{lay.name} {kernels.get(code).name}", done, len(stack))

    return fit_kernels(
        stack,
        families=settings.families,
        offset=settings.offset,
        device=settings.device,
        seed=settings.seed,
        moments=moments.blocks().float(),
        channel=_channels(lay, settings.tie_channels),
        progress=report,
    )


def _select(
    fits: dict[str, FitResult], layers: Sequence[ConvLayer], settings: Settings
) -> dict[str, Selection]:
    """Per layer: by threshold, or by budget (per layer, or one budget over all ``fits``)."""
    if not settings.budget:
        return {
            name: fit.select(settings.threshold, settings.select, settings.threshold_on)
            for name, fit in fits.items()
        }
    names = [lay.name for lay in layers if lay.name in fits]
    parts = [_budget_terms(fits[name]) for name in names]
    if settings.budget_scope == "layer":
        choices = [_budget_choice(err, sav, plain, settings) for err, sav, plain in parts]
    else:
        err = torch.cat([p[0] for p in parts])
        sav = torch.cat([p[1] for p in parts])
        plain = sum(p[2] for p in parts)
        allc = _budget_choice(err, sav, plain, settings)
        sizes = [len(p[0]) for p in parts]
        choices = list(torch.split(allc, sizes))
    return {
        name: fits[name].selection_from(choice, settings.threshold_on)
        for name, choice in zip(names, choices, strict=True)
    }


def _budget_terms(fit: FitResult) -> tuple[Tensor, Tensor, int]:
    """Error ``(N, F)`` each family would add, relative to the layer's output energy (squared,
    so additive over kernels and comparable across layers), its saving ``(N, F)`` in
    parameters, and the layer's plain parameter count."""
    on = "output" if fit.weighted is not None else "plain"
    res = fit.measure(on).double()
    energy = fit.energy
    total = float(energy.sum())
    err = res.square() * (energy / total if total > 0 else energy)[:, None]
    err = torch.where(fit.eligible()[None, :], err, torch.full_like(err, float("inf")))
    sav = torch.tensor([float(fit.plain_count() - fit.param_count(c)) for c in fit.families])
    # Per kernel: layers of other kernel sizes save other amounts, and a model budget mixes them.
    return err, sav[None, :].expand(len(fit), -1), fit.plain_count() * len(fit)


def _budget_choice(err: Tensor, sav: Tensor, plain: int, settings: Settings) -> Tensor:
    if settings.target_compact is not None:
        choice, met = budget.select_for_saving(err, sav, settings.target_compact * plain)
        if not met:
            # Every kernel at its cheapest family still keeps more parameters than asked.
            warnings.warn(
                f"--target-compact {settings.target_compact:g} is out of reach with families "
                f"{','.join(settings.families)}: converted as compactly as they allow",
                stacklevel=3,
            )
        return choice
    return budget.select_for_error(err, sav, settings.max_output_error**2)


def _convert_calibrated(checkpoint, layers, settings, calibration, model, progress):
    """Layer by layer in network order: collect the layer's inputs through the layers converted
    so far, fit, select, re-solve the linear parameters, and put the ACL in place."""
    model.load_state_dict(checkpoint.state_dict, strict=False)
    current = copy.deepcopy(model).eval()
    example = calibration.batches[0][:1]
    order = execution_order(current, [lay.name for lay in layers], example)
    by_name = {lay.name: lay for lay in layers}
    model_budget = settings.budget and settings.budget_scope == "model"
    fits: dict[str, FitResult] = {}

    def inputs(name: str, against_original: bool = False) -> LayerMoments:
        def report(done: int) -> None:
            if progress is not None:
                progress(f"inputs of {name}", done, calibration.images)

        reference = model if against_original else None
        return calibration.moments(current, name, report, reference=reference)

    if model_budget:
        # One budget over all layers needs every layer's fit before any choice: the fits see
        # the original network's inputs; the re-solve below still goes in network order.
        for name in order:
            mom = inputs(name)
            fits[name] = _fit_weighted(
                by_name[name], checkpoint.state_dict, settings, mom, progress
            )
        selections = _select(fits, [by_name[n] for n in order], settings)
    results: dict[str, LayerResult] = {}
    for name in order:
        lay = by_name[name]
        mom = inputs(name, settings.compensate)
        sd = checkpoint.state_dict
        if settings.compensate:
            sd = _compensated(lay, checkpoint.state_dict, mom)
        if not model_budget:
            if settings.fit_to == "output":
                fits[name] = _fit_weighted(lay, sd, settings, mom, progress)
            else:
                view = replace(checkpoint, state_dict=sd)
                fits[name] = _fit_plain(view, [lay], settings, progress)[name]
            selection = _select({name: fits[name]}, [lay], settings)[name]
            if settings.max_output_error is not None:
                selection = _meet_error_bound(lay, fits[name], selection, sd, mom, settings)
        else:
            selection = selections[name]
        fit = fits[name]
        joint = None
        if settings.joint:
            joint, selection = _joint(lay, fit, selection, sd, mom, settings)
        acl = build_acl(lay, fit, selection, sd, joint=joint)
        results[name] = LayerResult(lay, fit, selection, acl, joint)
        set_submodule(current, name, copy.deepcopy(acl).eval())
    return results


def _compensated(lay: ConvLayer, state_dict: dict[str, Tensor], mom: LayerMoments) -> dict:
    """The state dict with the layer's weight and bias replaced by what best reproduces the
    *original* network's output from the inputs the converted network gives it:
    ``argmin E[(a' . [x; 1] - a . [x_ref; 1])^2] = S^-1 C a`` (``S`` the converted inputs'
    moment, ``C`` their cross moment with the original's). Fitting to it makes a layer undo what
    earlier layers changed, instead of faithfully passing it on. Without a bias the constant
    coordinate is held at 0. The first converted layer sees the original inputs: unchanged."""
    weight = state_dict[lay.weight_key]
    bias_key = f"{lay.name}.bias"
    bias = state_dict.get(bias_key)
    co = weight.shape[0]
    d = weight[0].numel()
    a = torch.zeros(co, d + 1, dtype=torch.float64)
    a[:, :d] = weight.detach().double().reshape(co, d)
    if bias is not None:
        a[:, d] = bias.detach().double()
    keep = d + 1 if bias is not None else d
    per_group = co // mom.groups
    out = a.clone()
    for g in range(mom.groups):
        qs = slice(g * per_group, (g + 1) * per_group)
        s = mom.full[g, :keep, :keep]
        rhs = (mom.cross[g] @ a[qs].T)[:keep] - s @ a[qs, :keep].T
        # Regularised towards the original weights: directions the inputs never excite (a
        # dead channel) keep their values instead of collapsing to 0.
        ridge = 1e-8 * float(torch.diagonal(s).mean()) + 1e-300
        step = torch.linalg.solve(s + ridge * torch.eye(keep, dtype=s.dtype), rhs)
        out[qs, :keep] = a[qs, :keep] + step.T
    view = dict(state_dict)
    view[lay.weight_key] = out[:, :d].reshape(weight.shape).to(weight.dtype)
    if bias is not None:
        view[bias_key] = out[:, d].to(bias.dtype)
    return view


def _fitted_errors(lay, fit: FitResult, selection: Selection, state_dict, moments):
    """Squared output error and energy ``(Co,)`` of the layer with the per-kernel fits as
    selected (the full moments: cross-channel terms included)."""
    weight = state_dict[lay.weight_key].detach()
    approx = build_acl(lay, fit, selection, state_dict).synthesize().detach()
    return output_errors(weight, approx, moments.full, state_dict.get(f"{lay.name}.bias"))


def _fitted_error(lay, fit: FitResult, selection: Selection, state_dict, moments) -> float:
    """The layer's true relative output error with the per-kernel fits as selected."""
    err, energy = _fitted_errors(lay, fit, selection, state_dict, moments)
    return float(err.sum() / energy.sum()) ** 0.5 if float(energy.sum()) > 0 else 0.0


def _meet_error_bound(lay, fit, selection, state_dict, moments, settings) -> Selection:
    """The budget adds up per-kernel errors (each in its own channel's norm); the errors of an
    output channel's kernels also correlate across channels. Tighten the bound until the layer's
    true error, as fitted, is within ``max_output_error`` (the joint re-solve only lowers it)."""
    bound = settings.max_output_error
    for _ in range(8):
        err = _fitted_error(lay, fit, selection, state_dict, moments)
        if err <= settings.max_output_error or bound < 1e-6:
            break
        bound *= 0.9 * settings.max_output_error / err
        tighter = replace(settings, max_output_error=bound)
        selection = _select({lay.name: fit}, [lay], tighter)[lay.name]
    return selection


def _joint(
    lay, fit: FitResult, selection: Selection, state_dict, moments, settings
) -> tuple[JointSolution, Selection]:
    """The fit refined under the layer's full input moments: AKPs channel by channel (untied
    fits by output error of small layers; a kernel may switch to a family with no more
    parameters), then all linear parameters together. ``error_before`` is the error of the
    per-kernel fit as selected. Returns the solution and the selection it ends with."""
    weight = state_dict[lay.weight_key].detach()
    bias = state_dict.get(f"{lay.name}.bias")
    codes, akps, gain, offset, has_offset = _per_kernel(fit, selection)
    h, w = lay.kernel_size
    before, _ = _fitted_errors(lay, fit, selection, state_dict, moments)
    plain = None
    cig = lay.shape[1]
    small = cig * h * w <= SWEEP_LIMIT
    if settings.fit_to == "output" and fit.channels is None and settings.sweeps and small:
        codes, akps, gain, offset, plain = refine_channels(
            weight,
            codes,
            akps,
            gain,
            offset,
            has_offset,
            moments.full,
            sweeps=settings.sweeps,
            switch=fit.families,
            offset_enabled=settings.offset,
        )
        has_offset = torch.tensor(
            [c != "P" and settings.offset and kernels.get(c).num_params > 0 for c in codes]
        )
        if codes != selection.codes:
            choice = torch.tensor([fit.families.index(c) if c != "P" else -1 for c in codes])
            selection = fit.selection_from(choice, settings.threshold_on)
    sol = resolve_joint(
        weight, bias, codes, akps, gain, offset, has_offset, moments.full, plain=plain
    )
    sol.error_before = before
    return sol, selection


def _per_kernel(fit: FitResult, selection: Selection):
    """The chosen family's values per kernel: codes ``K``, AKPs ``(K, P_max)``, gain, offset and
    whether it has an offset ``(K,)`` (a tied row's values repeated for its kernels)."""
    per_row = fit.channels or 1
    rows = len(fit)
    k_total = rows * per_row
    p_max = max([fit.params[c].shape[1] for c in fit.families] + [0])
    akps = torch.zeros(k_total, p_max, dtype=torch.float64)
    gain = torch.zeros(k_total, dtype=torch.float64)
    offset = torch.zeros(k_total, dtype=torch.float64)
    has_offset = torch.zeros(k_total, dtype=torch.bool)
    codes = []
    for r, code in enumerate(selection.codes):
        codes += [code] * per_row
        if code == "P":
            continue
        sl = slice(r * per_row, (r + 1) * per_row)
        p = fit.params[code][r].double()
        akps[sl, : len(p)] = p
        gain[sl] = fit.gain[code][r].double()
        offset[sl] = fit.offset[code][r].double()
        has_offset[sl] = fit.offset_enabled and kernels.get(code).num_params > 0
    return codes, akps, gain, offset, has_offset


def _slice_fit(fit: FitResult, lo: int, hi: int) -> FitResult:
    return FitResult(
        families=fit.families,
        residuals=fit.residuals[lo:hi],
        params={c: v[lo:hi] for c, v in fit.params.items()},
        gain={c: v[lo:hi] for c, v in fit.gain.items()},
        offset={c: v[lo:hi] for c, v in fit.offset.items()},
        kernel_size=fit.kernel_size,
        offset_enabled=fit.offset_enabled,
        weighted=None if fit.weighted is None else fit.weighted[lo:hi],
        energy=None if fit.energy is None else fit.energy[lo:hi],
        channels=fit.channels,
    )


def build_acl(
    layer: ConvLayer,
    fit: FitResult,
    selection: Selection,
    state_dict: dict[str, Tensor],
    joint: JointSolution | None = None,
) -> ACL:
    """The ACL of one converted layer: fitted ACKs where selected, the original kernels elsewhere
    (with ``joint``, the re-solved gains, offsets, plain kernels and bias instead).

    A channel-tied fit (``fit.channels``) has one row per output channel; its family and AKPs
    go to all of the channel's kernels, each with its own gain and offset.

    Without a model the conv's groups are unknown; ``(Co, Ci/groups)`` is all the ACL's tensors
    depend on, so it is built with ``groups=1`` and ``in_channels = Ci/groups``; loading onto a
    model (:func:`acl_convert.load_anann`) takes the real hyper-parameters from the model.
    """
    weight = state_dict[layer.weight_key].detach()
    co, cig, h, w = weight.shape
    per_row = fit.channels or 1
    codes = [c for c in selection.codes for _ in range(per_row)]
    plain_idx = [k for k, c in enumerate(codes) if c == "P"]
    akps, gains, offsets, rows = {}, {}, {}, {}
    for code in pattern.totals(codes):
        if code == "P":
            continue
        row_idx = torch.tensor([r for r, c in enumerate(selection.codes) if c == code])
        kern_idx = torch.tensor([k for k, c in enumerate(codes) if c == code])
        akps[code] = fit.params[code][row_idx]
        if joint is not None and fit.channels is None:
            akps[code] = joint.akps[kern_idx, : akps[code].shape[1]].to(akps[code])
        # A stack's gains are (rows, T) in kernel order, so flattening lists them per kernel.
        gains[code] = fit.gain[code][row_idx].reshape(-1)
        offs = fit.offset[code][row_idx].reshape(-1)
        if joint is not None:
            gains[code] = joint.gain[kern_idx].to(gains[code])
            offs = joint.offset[kern_idx].to(offs)
        if fit.offset_enabled and kernels.get(code).num_params:
            offsets[code] = offs
        if fit.channels is not None:
            rows[code] = torch.arange(len(row_idx)).repeat_interleave(per_row)
    bias = state_dict.get(f"{layer.name}.bias")
    plain_values = weight.reshape(-1, h, w)
    if joint is not None:
        plain_values = joint.plain.to(weight.dtype)
        if joint.bias is not None:
            bias = joint.bias.to(bias.dtype)
    groups = layer.groups or 1
    conv_args = {}
    if layer.groups:
        conv_args = dict(
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            padding_mode=layer.padding_mode,
        )
    acl = ACL.from_assignment(
        cig * groups,
        co,
        (h, w),
        codes,
        akps,
        gains=gains or None,
        offsets=offsets or None,
        plain=plain_values[plain_idx] if plain_idx else None,
        bias=None if bias is None else bias.detach(),
        akp_rows=rows or None,
        groups=groups,
        # AKPs need more precision than half floats give; float64 sources stay float64.
        dtype=torch.float64 if weight.dtype == torch.float64 else torch.float32,
        **conv_args,
    )
    # Refined AKPs may have left their canonical ranges; folding does not change the weight.
    return acl.canonicalize_() if joint is not None else acl
