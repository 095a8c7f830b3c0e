"""The one entry point: convert the convolutions of a network into ACLs.

:func:`convert_model` converts an ``nn.Module`` in memory (torchvision, timm or the user's own);
:func:`convert_checkpoint` does the same for a checkpoint file. Both return a
:class:`~acl_convert.conversion.Conversion`. The command line's ``convert`` is a shell over
:func:`convert_checkpoint`: it only parses options, prints and writes.

Data flows one way: every kernel is fitted to every family (:mod:`acl_convert.fit`), a family
is chosen per kernel (:mod:`acl_convert.fit.select`), the choice becomes an
:class:`~acl_convert.nn.assignment.Assignment` (refined under the layer's input statistics when
there are calibration images, :mod:`acl_convert.fit.joint`), the assignment an
:class:`~acl_convert.nn.acl.ACL`, and the ACLs a model and a file.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from . import kernels
from .calibration.compensate import compensated
from .calibration.fidelity import measure_fidelity
from .calibration.holdout import split_calibration
from .calibration.moments import Calibration, LayerMoments, execution_order
from .conversion import Conversion, LayerResult, Source, state_dict_sha256
from .errors import UsageError, UserError, note, option
from .fit import FitResult, fit_kernels
from .fit.joint import refit_layer
from .fit.select import Rule, choose, meet_error_bound
from .fit.threads import compute_threads, fit_threads
from .io.arch import model_for, parse_arch, recognise
from .io.checkpoint import check_finite, load_checkpoint
from .io.images import list_images, load_batches, preprocessing
from .network.batchnorm import fold_bias, following_batchnorms
from .network.convs import ConvLayer, conv_layers, estimate_fit_seconds, select_layers
from .network.surgery import set_submodule
from .nn.acl import ACL
from .nn.assignment import Assignment
from .settings import DEFAULT_THRESHOLD, Settings, check_device

__all__ = [
    "convert_model",
    "convert_checkpoint",
    "prepare_model",
    "prepare_checkpoint",
    "Job",
    "Step",
    "Conversion",
    "LayerResult",
    "Settings",
    "DEFAULT_THRESHOLD",
    "ProgressFn",
]

#: ``progress(task, done, total)``: ``done`` more units of ``task`` (e.g. ``"7x7 gabor"``
#: kernels, ``"inputs of conv1"`` images) out of ``total`` are finished.
ProgressFn = Callable[[str, int, int], None]

Layers = str | Sequence[str]


def convert_model(
    model: nn.Module,
    layers: Layers = "all",
    *,
    calibration: Iterable | None = None,
    arch: str | None = None,
    progress: ProgressFn | None = None,
    **settings,
) -> Conversion:
    """Convert the selected convolutions of ``model`` into ACLs.

    Args:
        model: any ``nn.Module`` whose 2-D convolutions are ``nn.Conv2d``; left untouched.
        layers: module names, shell globs (``layer1.*``) or ``"all"``; a comma-separated string
            or a sequence of them.
        calibration: images the network really sees, preprocessed as it expects: an iterable of
            ``(B, C, H, W)`` tensors or of ``(images, labels)`` pairs (e.g. a ``DataLoader``),
            read once. Makes the conversion fidelity-first (docs/fidelity-first.md) and
            measures :attr:`Conversion.fidelity` on them.
        arch: the architecture's spec to record in the AnaNN header (see
            :mod:`acl_convert.io.arch`), so that :func:`acl_convert.load_anann` can rebuild the
            network; default: recognised when ``model`` is a torchvision or timm model, else
            none (then ``load_anann`` needs ``model=``).
        progress: see :data:`ProgressFn`.
        **settings: the CLI's ``convert`` options by their Python names (:class:`Settings`):
            ``threshold``, ``families``, ``offset``, ``target_compact``, ...

    Returns:
        A :class:`~acl_convert.conversion.Conversion`: ``.model`` (the converted network),
        ``.save(path)``, ``.report``, ``.compact_factor``, ``.fidelity``.
    """
    return prepare_model(model, layers, calibration=calibration, arch=arch, **settings).run(
        progress
    )


def convert_checkpoint(
    path: str | os.PathLike,
    layers: Layers = "all",
    *,
    arch: str | None = None,
    calibration: Iterable | str | os.PathLike | None = None,
    trust_pickle: bool = False,
    progress: ProgressFn | None = None,
    **settings,
) -> Conversion:
    """Convert the selected convolutions of the checkpoint at ``path`` into ACLs.

    Args:
        path: a ``.pth``/``.pt``/``.bin`` state dict (read with ``weights_only=True``) or a
            ``.safetensors`` file; wrappers (``state_dict``, ``model``, Lightning's ``model.``
            prefix, ...) are unwrapped and said so in :attr:`Conversion.notes`.
        layers: as for :func:`convert_model`.
        arch: the architecture (a torchvision name, ``timm:NAME``, ``path/file.py:Factory`` or
            ``package.module:Factory``; importing a factory runs it); default: detected from the
            state dict's keys and shapes. Unknown: the tensors alone are converted.
        calibration: a folder of images (preprocessed as the architecture expects), or batches
            as for :func:`convert_model`.
        trust_pickle: allow a checkpoint that needs full unpickling; this runs code stored in
            the file.
        progress, **settings: as for :func:`convert_model`.
    """
    job = prepare_checkpoint(
        path, layers, arch=arch, calibration=calibration, trust_pickle=trust_pickle, **settings
    )
    return job.run(progress)


def prepare_model(
    model: nn.Module,
    layers: Layers = "all",
    *,
    calibration: Iterable | None = None,
    arch: str | None = None,
    **settings,
) -> Job:
    """The checks and loading of :func:`convert_model`, without the work: a :class:`Job` whose
    ``run()`` converts (arguments as for :func:`convert_model`)."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be an nn.Module, got {type(model).__name__}")
    state = dict(model.state_dict())
    source = Source(state, None, state_dict_sha256(state))
    spec = parse_arch(arch).spec if arch is not None else recognise(model)
    return Job.create(source, copy.deepcopy(model), spec, layers, calibration, settings)


def prepare_checkpoint(
    path: str | os.PathLike,
    layers: Layers = "all",
    *,
    arch: str | None = None,
    calibration: Iterable | str | os.PathLike | None = None,
    trust_pickle: bool = False,
    **settings,
) -> Job:
    """The checks and loading of :func:`convert_checkpoint`, without the work: the checkpoint
    and calibration images are read, the architecture found, the layers selected and the
    settings checked (arguments as for :func:`convert_checkpoint`)."""
    # Every setting is checked before any file is read (with the real image count later).
    Settings.from_options(settings).resolved(int(calibration is not None))
    files = None
    if isinstance(calibration, (str, os.PathLike)):
        files = _image_files(Path(calibration), settings)  # a wrong folder is found first
    ckpt = load_checkpoint(path, trust_pickle=trust_pickle)
    source = Source(ckpt.state_dict, ckpt.path.name, ckpt.sha256, ckpt.notes())
    spec, model = model_for(ckpt.state_dict, arch, source.notes)
    if files is not None:
        if model is None:
            raise _needs_arch("calibration")
        calibration = list(load_batches(files, preprocessing(spec, model), batch_size=16))
    return Job.create(source, model, spec, layers, calibration, settings)


def _image_files(folder: Path, settings: dict) -> list[Path]:
    """The calibration images of ``folder``, at most ``calibration_limit``. They are loaded in
    batches of 16 (a first conv's input patches are ~0.6 MB per image and position)."""
    return list_images(folder, limit=settings.get("calibration_limit", Settings.calibration_limit))


def _needs_arch(what: str) -> UsageError:
    return UsageError(f"{what} needs a known architecture; give {option('arch', 'NAME')}")


#: Rough CPU seconds of one calibration image's pass up to a layer and its moments, and how much
#: slower a fit by output error is than a plain one: only for progress estimates.
_SECONDS_PER_IMAGE_PASS = 0.05
_WEIGHTED_FIT_FACTOR = 3.0


@dataclass(frozen=True)
class Step:
    """One task of a conversion's progress (see :meth:`Job.plan`)."""

    name: str
    units: int
    seconds: float


@dataclass
class Job:
    """A conversion ready to run: the network loaded, its layers chosen, the settings checked
    and every default filled in. :meth:`run` does the work.

    Attributes:
        source: the network's tensors and provenance.
        model: the pipeline's own copy of the network with its weights (None: tensors only).
        arch: the architecture's spec, or None.
        layers: the convolutions to convert, in state-dict order.
        settings: resolved settings.
        calibration: the calibration images fitted to, or None.
        notes: sentences for the user so far.
        holdout: the held-out calibration images (batches) the fidelity is measured on; empty:
            it is measured on the images fitted to.
    """

    source: Source
    model: nn.Module | None
    arch: str | None
    layers: list[ConvLayer]
    settings: Settings
    calibration: Calibration | None
    notes: list[str]
    holdout: list[Tensor] = field(default_factory=list)

    @classmethod
    def create(cls, source, model, arch, layers: Layers, calibration, options: dict) -> Job:
        settings = Settings.from_options(options)
        calib, held = None, []
        if calibration is not None:
            if model is None:
                raise _needs_arch("calibration")
            calib = Calibration(calibration, limit=settings.calibration_limit)
            calib, held = split_calibration(calib, settings.holdout)
        settings = settings.resolved(calib.images if calib else 0, sum(len(b) for b in held))
        check_device(settings.device)
        notes = list(source.notes)
        convs = conv_layers(source.state_dict, model)
        selectors = [layers] if isinstance(layers, str) else list(layers)
        chosen = select_layers(selectors, convs, source.state_dict, on_note=notes.append)
        _check_finite(source.state_dict, chosen)
        if settings.threshold >= 1 and not settings.budget:
            notes.append(
                f"threshold {settings.threshold:g} >= 1 accepts every fit (a kernel's relative "
                "residual is at most 1): every kernel becomes analytic, however poorly it fits"
            )
        return cls(source, model, arch, chosen, settings, calib, notes, held)

    def plan(self) -> list[Step]:
        """The progress tasks :meth:`run` will report, in order, each with its number of units
        and a rough estimate of its CPU seconds, so that a progress display can show one bar
        over the whole conversion. A task may be reported in several calls; a name that occurs
        twice in the plan is reported twice (a model-wide budget reads every layer's inputs
        twice)."""
        s = self.settings
        names = [kernels.get(c).name for c in s.families]
        calibrated = self.calibration is not None and (s.fit_to == "output" or s.joint)
        steps: list[Step] = []

        def fits(label: str, rows: int, kernels_n: int, size: tuple[int, int], factor: float):
            per_family = estimate_fit_seconds(kernels_n, size, 1) * factor
            steps.extend(Step(f"{label} {n}", rows, per_family) for n in names)

        if not calibrated:
            for group in _fit_groups(self.layers, s.tie_channels):
                lay = group[0]
                label = lay.name if s.tie_channels else "x".join(map(str, lay.kernel_size))
                kernels_n = sum(x.num_kernels for x in group)
                rows = sum(x.shape[0] if s.tie_channels else x.num_kernels for x in group)
                fits(label, rows, kernels_n, lay.kernel_size, 1.0)
            return steps
        images = self.calibration.images
        passes = 2 if s.budget and s.budget_scope == "model" else 1
        for lay in self.layers:
            # A pass up to the layer and the moments of its inputs: rough, per image.
            inputs = Step(f"inputs of {lay.name}", images, images * _SECONDS_PER_IMAGE_PASS)
            steps += [inputs] * passes
            rows = lay.shape[0] if s.tie_channels else lay.num_kernels
            if s.fit_to == "output":
                fits(lay.name, rows, lay.num_kernels, lay.kernel_size, _WEIGHTED_FIT_FACTOR)
            else:
                fits("x".join(map(str, lay.kernel_size)), rows, lay.num_kernels,
                     lay.kernel_size, 1.0)  # fmt: skip
        return steps

    def run(self, progress: ProgressFn | None = None, fits: dict | None = None) -> Conversion:
        """Fit, choose and build every layer; the converted model and, with calibration, its
        fidelity. ``fits``: with calibration and a model-wide budget, the per-kernel fits of
        an earlier run of this job at another budget (``{r.layer.name: r.fit for r in
        conversion.layers}``): they are made on the original network's inputs, so they are the
        same for every budget, and reusing them gives exactly what fitting again gives."""
        settings, calib, model = self.settings, self.calibration, self.model
        notes = list(self.notes)
        with fit_threads():
            if calib is not None and (settings.fit_to == "output" or settings.joint):
                results = _convert_calibrated(
                    self.source, self.layers, settings, calib, model, progress, notes, fits
                )
            else:
                results = _convert_plain(
                    self.source.state_dict, self.layers, settings, progress, notes
                )
        notes.extend(_few_converted(results, settings))
        conversion = Conversion(self.source, self.arch, settings, results, notes=notes)
        if model is not None:
            conversion.model = conversion.patched(model).eval()
        if calib is not None:
            conversion.fidelity = self.fidelity(conversion)
        return conversion

    def fidelity(self, conversion: Conversion) -> dict:
        """:func:`measure_fidelity` of ``conversion`` on the held-out images (else on the images
        fitted to); ``on`` says which (``holdout`` or ``calibration``)."""
        on = "holdout" if self.holdout else "calibration"
        batches = self.holdout or self.calibration.batches
        names = [r.layer.name for r in conversion.layers]
        return {**measure_fidelity(self.model, conversion.model, batches, names), "on": on}


def _few_converted(results: Sequence[LayerResult], settings: Settings) -> list[str]:
    """A hint when less than a tenth of the kernels became analytic under a threshold: the
    best residuals seen and what to try (a randomly initialised network fits no family)."""
    kernels_total = sum(r.acl.num_kernels for r in results)
    converted = sum(sum(c != "P" for c in r.acl.codes) for r in results)
    if settings.budget or not kernels_total or converted >= 0.1 * kernels_total:
        return []
    best = torch.cat([r.fit.residuals.min(1).values for r in results if r.fit.residuals.numel()])
    median = float(best.double().median())
    return [
        note(
            f"only {converted:,} of {kernels_total:,} kernels became analytic: the best families "
            f"fit them with a median residual of {median:.2f}, above the threshold "
            f"{settings.threshold:g}; try {option('threshold', f'{median:.2f}')}, a budget "
            f"({option('target_compact', '0.5')}), or calibration images (a trained network's "
            "kernels are far more analytic than random ones)"
        )
    ]


def _check_finite(state_dict: dict[str, Tensor], layers: Sequence[ConvLayer]) -> None:
    """Checked per layer before any fitting: the fit itself can only count bad kernels, not
    say which layer holds them."""
    for lay in layers:
        weight = state_dict[lay.weight_key]
        if weight.is_complex() or not weight.is_floating_point():
            raise UserError(
                f"layer {lay.name} has {weight.dtype} weights; analytic kernels are fitted to "
                "real floating-point weights: dequantise or convert the checkpoint first"
            )
        bad = int((~torch.isfinite(weight)).flatten(1).any(1).sum())
        if bad:
            raise UserError(
                f"layer {lay.name} has NaN or Inf weights in {bad} output channel(s); repair the "
                "checkpoint or leave the layer out of the selected layers"
            )
    # The AnaNN keeps every other tensor as it is, and no reader accepts NaN or Inf.
    check_finite(state_dict, "the network", "repair the checkpoint; the AnaNN would keep them")


def _rule(settings: Settings) -> Rule:
    return Rule(
        threshold=settings.threshold,
        mode=settings.select,
        on=settings.threshold_on,
        target_compact=settings.target_compact,
        max_output_error=settings.max_output_error,
        scope=settings.budget_scope,
    )


def _weight_bias(state_dict: dict[str, Tensor], lay: ConvLayer) -> tuple[Tensor, Tensor | None]:
    bias = state_dict.get(f"{lay.name}.bias")
    return state_dict[lay.weight_key].detach(), None if bias is None else bias.detach()


def _convert_plain(state_dict, layers, settings, progress, notes) -> list[LayerResult]:
    """Every layer fitted by plain least squares, then chosen and built."""
    fits = _fit_plain(state_dict, layers, settings, progress)
    selections = choose(fits, _rule(settings), notes)
    out = []
    for lay in layers:
        weight, bias = _weight_bias(state_dict, lay)
        fit, sel = fits[lay.name], selections[lay.name]
        assignment = fit.assignment(sel, weight, bias)
        out.append(LayerResult(lay, fit, sel, assignment, _build_acl(lay, assignment, weight)))
    return out


def _build_acl(
    lay: ConvLayer, assignment: Assignment, weight: Tensor, canonical: bool = False
) -> ACL:
    """The ACL of a converted layer, with the conv's own hyper-parameters when the network is
    known. Without it the conv's groups are unknown; ``(Co, Ci/groups)`` is all the ACL's
    tensors depend on, so it is built with ``groups=1``; loading onto a model
    (:func:`acl_convert.load_anann`) takes the real hyper-parameters from the model."""
    # AKPs need more precision than half floats give; float64 sources stay float64.
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    acl = ACL.from_assignment(assignment, dtype=dtype, **lay.conv_kwargs())
    # Refined AKPs may have left their canonical ranges; folding does not change the weight.
    return acl.canonicalize_() if canonical else acl


def _stack(weight: Tensor, tie: bool) -> Tensor:
    """A layer's kernels as fitted: ``(K, h, w)``, or ``(Co, Ci/groups, h, w)`` stacks when
    channel-tied."""
    weight = weight.detach().float()
    return weight if tie else weight.reshape(-1, *weight.shape[2:])


def _channels(lay: ConvLayer, tie: bool) -> Tensor:
    """The input channel every kernel reads (``(K,)``, or ``(Co, Ci/groups)`` for stacks)."""
    co, cig, _, _ = lay.shape
    groups = lay.groups or 1
    q = torch.arange(co)[:, None]
    chan = (q // (co // groups)) * cig + torch.arange(cig)[None, :]
    return chan if tie else chan.reshape(-1)


def _fit_groups(layers: Sequence[ConvLayer], tie: bool) -> list[list[ConvLayer]]:
    """Layers fitted in one batch: untied layers of one kernel size together (small layers
    share the per-iteration overhead), tied layers one by one."""
    by_size: dict[tuple, list[ConvLayer]] = {}
    for lay in layers:
        by_size.setdefault((lay.name,) if tie else tuple(lay.kernel_size), []).append(lay)
    return list(by_size.values())


def _fit_plain(state_dict, layers, settings, progress) -> dict[str, FitResult]:
    """Plain least-squares fits of every layer, in the batches of :func:`_fit_groups`."""
    fits: dict[str, FitResult] = {}
    for group in _fit_groups(layers, settings.tie_channels):
        h, w = group[0].kernel_size
        stacks = [_stack(state_dict[lay.weight_key], settings.tie_channels) for lay in group]
        fit = fit_kernels(
            torch.cat(stacks),
            families=settings.families,
            offset=settings.offset,
            device=settings.device,
            seed=settings.seed,
            progress=_reporter(progress, f"{h}x{w}", sum(len(x) for x in stacks)),
        )
        start = 0
        for lay, flat in zip(group, stacks, strict=True):
            fits[lay.name] = fit.rows(start, start + len(flat))
            start += len(flat)
    return fits


def _reporter(progress: ProgressFn | None, label: str, total: int):
    def report(code: str, done: int) -> None:
        if progress is not None:
            progress(f"{label} {kernels.get(code).name}", done, total)

    return report


def _fit_weighted(lay, weight, settings, moments: LayerMoments, progress) -> FitResult:
    stack = _stack(weight, settings.tie_channels)
    return fit_kernels(
        stack,
        families=settings.families,
        offset=settings.offset,
        device=settings.device,
        seed=settings.seed,
        moments=moments.blocks().float(),
        channel=_channels(lay, settings.tie_channels),
        progress=_reporter(progress, lay.name, len(stack)),
    )


def _convert_calibrated(source, layers, settings, calibration, model, progress, notes, fits=None):
    """Layer by layer in network order: collect the layer's inputs through the layers converted
    so far, fit, choose, refine under the full input moments, and put the ACL in place.
    ``fits``: with a model-wide budget, every layer's fits when already made (see
    :meth:`Job.run`)."""
    current = copy.deepcopy(model).eval()
    order = execution_order(current, [lay.name for lay in layers], calibration.batches[0][:1])
    by_name = {lay.name: lay for lay in layers}
    state = source.state_dict
    model_budget = settings.budget and settings.budget_scope == "model"
    folds = following_batchnorms(model, order) if settings.fold_bias and settings.joint else {}

    def inputs(name: str, against_original: bool = False) -> LayerMoments:
        def report(done: int) -> None:
            if progress is not None:
                progress(f"inputs of {name}", done, calibration.images)

        reference = model if against_original else None
        with compute_threads():
            return calibration.moments(current, name, report, reference=reference)

    fits = dict(fits or {})
    if model_budget and not fits:
        # One budget over all layers needs every layer's fit before any choice: the fits see
        # the original network's inputs; the refinement below still goes in network order.
        for name in order:
            weight, _ = _weight_bias(state, by_name[name])
            fits[name] = _fit_weighted(by_name[name], weight, settings, inputs(name), progress)
    if model_budget:
        selections = choose(fits, _rule(settings), notes)
    results = []
    for name in order:
        lay = by_name[name]
        mom = inputs(name, settings.compensate)
        weight, bias = _weight_bias(state, lay)
        fold_into = folds.get(name) if bias is None else None
        if fold_into is not None:
            bias = weight.new_zeros(len(weight))  # solved, then folded into the BatchNorm
        if settings.compensate:
            with compute_threads():
                weight, bias = compensated(weight, bias, mom)
        if model_budget:
            selection = selections[name]
        else:
            fits[name] = _layer_fit(lay, weight, settings, mom, progress)
            selection = choose({name: fits[name]}, _rule(settings), notes)[name]
            if settings.max_output_error is not None:
                selection = meet_error_bound(
                    fits[name], selection, _rule(settings), weight, bias, mom.full
                )
        result = _refined_layer(lay, fits[name], selection, weight, bias, mom, settings, fold_into)
        results.append(result)
        set_submodule(current, name, copy.deepcopy(result.acl).eval())
        if result.fold is not None:
            fold_bias(current, *result.fold)
    return results


def _layer_fit(lay, weight, settings, moments, progress) -> FitResult:
    if settings.fit_to == "output":
        return _fit_weighted(lay, weight, settings, moments, progress)
    return _fit_plain({lay.weight_key: weight}, [lay], settings, progress)[lay.name]


def _refined_layer(lay, fit, selection, weight, bias, moments, settings, fold_into=None):
    """The chosen fit as a :class:`LayerResult`, refined under the full input moments when
    ``joint``; with ``fold_into`` (a BatchNorm's name) the solved bias goes there."""
    assignment = fit.assignment(selection, weight, bias)
    if not settings.joint:
        return LayerResult(lay, fit, selection, assignment, _build_acl(lay, assignment, weight))
    by_output = settings.fit_to == "output" and fit.channels is None
    joint = refit_layer(
        assignment,
        weight,
        bias,
        moments.full,
        sweeps=settings.sweeps if by_output else 0,
        switch=fit.families,
        steps=settings.reconstruct if fit.channels is None else 0,
    )
    assignment = joint.assignment
    if assignment.codes != selection.codes and fit.channels is None:
        # A sweep moved kernels to other families: the selection says which, for the report.
        choice = [fit.families.index(c) if c != "P" else -1 for c in assignment.codes]
        selection = fit.selection_from(torch.tensor(choice), settings.threshold_on)
    fold = None
    if fold_into is not None:
        fold = (fold_into, assignment.bias.float())
        assignment = assignment.replace(bias=None)
    acl = _build_acl(lay, assignment, weight, canonical=True)
    return LayerResult(lay, fit, selection, assignment, acl, joint, fold)
