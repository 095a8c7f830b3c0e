"""Conversion settings: the options of ``acl-convert convert`` under their Python names.

``Settings(**options)`` takes what the user gave (``None``: not given); :meth:`Settings.resolved`
fills in the defaults that depend on whether calibration images are at hand and checks every
rule, so the library and the command line apply the same ones.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import kernels
from .errors import UsageError, UserError, option
from .fit import SELECT_MODES, resolve_device

__all__ = ["Settings", "check_device", "DEFAULT_THRESHOLD", "MEASURES", "BUDGET_SCOPES"]

#: Default residual threshold. A kernel becomes analytic only when its best family reproduces it
#: to within 30 % (relative L2); looser thresholds convert more kernels and cost more accuracy
#: (see docs/results.md).
DEFAULT_THRESHOLD = 0.3

#: What a residual is measured against: the kernel itself, or its output on calibration inputs.
MEASURES = ("plain", "output")
BUDGET_SCOPES = ("layer", "model")


@dataclass(frozen=True)
class Settings:
    """How to convert (the CLI's ``convert`` options of the same names).

    Attributes:
        families: analytic families to try (codes or names; a comma-separated string works).
        offset: give each ACK a learnable constant offset (SPEC §2); False: the paper's pure
            ACKs (with a gain).
        threshold: a kernel becomes analytic when its residual is at most this (default 0.3;
            not with a budget).
        select: ``best`` (lowest residual) or ``compact`` (fewest parameters under the
            threshold).
        device: ``auto`` (the GPU when there is one), ``cpu``, ``cuda``, ``cuda:N``.
        seed: seeds the fit's initialisation grid.
        fit_to: ``plain`` fits kernels by least squares; ``output`` by their output error on the
            calibration images (default with calibration).
        threshold_on: which residual the threshold and the ranking of families use
            (default: as ``fit_to``).
        joint: with calibration, refit each layer's AKPs under its full input statistics and
            re-solve its gains, offsets, plain kernels and bias together (default: on with
            calibration).
        sweeps: passes over the input channels when refitting a small layer's AKPs (0: none).
        reconstruct: with ``joint``, gradient steps on all of a layer's parameters at once on
            its exact output error under the full input moments, after the re-solve (0: none;
            :mod:`acl_convert.fit.reconstruct`).
        compensate: with calibration, fit each layer to reproduce the original network's
            output from the inputs the converted network gives it.
        target_compact: instead of a threshold, reach this compact factor (0..1) adding the
            least output error.
        max_output_error: instead of a threshold, the largest relative output error to spend,
            saving as many parameters as possible (needs calibration).
        budget_scope: ``layer`` or ``model``: where a budget applies.
        tie_channels: one family and AKP set per output channel, a gain and offset per input
            channel.
        fold_bias: with calibration and ``joint``, a conv without bias whose output goes only
            to a BatchNorm gets a bias in the joint re-solve (the mean shift of its
            approximation), folded into that BatchNorm's running mean: the AnaNN changes only
            BN buffers.
        calibration_limit: use at most this many calibration images (held-out ones included).
        holdout: of those, how many are not fitted to but measure the conversion's fidelity
            (default: a quarter, at most 64; 0: fidelity on the images fitted to, optimistic).
        calibration_images: how many calibration images the conversion fits to (set by
            :meth:`resolved`; 0 without calibration).
        holdout_images: how many measure its fidelity instead (set by :meth:`resolved`).
    """

    families: tuple[str, ...] | str = kernels.PAPER_FAMILIES
    offset: bool = True
    threshold: float | None = None
    select: str = "best"
    device: str = "auto"
    seed: int = 0
    fit_to: str | None = None
    threshold_on: str | None = None
    joint: bool | None = None
    sweeps: int = 2
    reconstruct: int = 0
    compensate: bool = True
    target_compact: float | None = None
    max_output_error: float | None = None
    budget_scope: str = "layer"
    tie_channels: bool = False
    fold_bias: bool = True
    calibration_limit: int = 256
    holdout: int | None = None
    calibration_images: int = 0
    holdout_images: int = 0

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The settings a user may give (``calibration_images`` and ``holdout_images`` are
        derived)."""
        derived = ("calibration_images", "holdout_images")
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in derived)

    @classmethod
    def from_options(cls, options: dict) -> Settings:
        """Settings from keyword options; an unknown name is a :class:`UsageError` that lists
        the known ones."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise UsageError(
                f"unknown conversion setting {unknown[0]!r}; known: {', '.join(cls.names())}"
            )
        return cls(**options)

    @property
    def budget(self) -> bool:
        return self.target_compact is not None or self.max_output_error is not None

    def resolved(self, calibration_images: int, holdout_images: int = 0) -> Settings:
        """These settings with every default filled in for a conversion that fits to
        ``calibration_images`` images (0: none) and measures on ``holdout_images`` more,
        checked. Raises :class:`UsageError`."""
        calibrated = calibration_images > 0
        if self.threshold is not None and self.budget:
            raise UsageError(
                f"give either {option('threshold')} or a budget ({option('target_compact')}, "
                f"{option('max_output_error')}), not both"
            )
        fit_to = self.fit_to or ("output" if calibrated else "plain")
        out = dataclasses.replace(
            self,
            families=_families(self.families),
            threshold=DEFAULT_THRESHOLD if self.threshold is None else self.threshold,
            fit_to=fit_to,
            threshold_on=self.threshold_on or fit_to,
            joint=calibrated if self.joint is None else bool(self.joint),
            calibration_images=calibration_images,
            holdout_images=holdout_images,
        )
        out._check()
        return out

    def _check(self) -> None:
        for name, allowed in (
            ("fit_to", MEASURES),
            ("threshold_on", MEASURES),
            ("budget_scope", BUDGET_SCOPES),
            ("select", SELECT_MODES),
        ):
            if getattr(self, name) not in allowed:
                raise UsageError(
                    f"{option(name)} must be one of {', '.join(allowed)}, "
                    f"got {getattr(self, name)!r}"
                )
        if self.target_compact is not None and self.max_output_error is not None:
            raise UsageError(
                f"give {option('target_compact')} or {option('max_output_error')}, not both"
            )
        if self.target_compact is not None and not 0 <= self.target_compact <= 1:
            raise UsageError(
                f"{option('target_compact')} must be a fraction in [0, 1], "
                f"got {self.target_compact}"
            )
        if self.max_output_error is not None and not self.max_output_error >= 0:
            raise UsageError(
                f"{option('max_output_error')} must be >= 0, got {self.max_output_error}"
            )
        _check_number("threshold", self.threshold, 0)
        for name in ("sweeps", "reconstruct"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(f"{option(name)} must be an integer >= 0, got {value!r}")
        if not isinstance(self.calibration_limit, int) or self.calibration_limit < 1:
            raise UsageError(
                f"{option('calibration_limit')} must be an integer >= 1, "
                f"got {self.calibration_limit!r}"
            )
        if self.holdout is not None and (
            isinstance(self.holdout, bool) or not isinstance(self.holdout, int) or self.holdout < 0
        ):
            raise UsageError(f"{option('holdout')} must be an integer >= 0, got {self.holdout!r}")
        needs = [
            text
            for text, on in (
                (f"{option('fit_to', 'output')}", self.fit_to == "output"),
                (f"{option('threshold_on', 'output')}", self.threshold_on == "output"),
                (option("max_output_error"), self.max_output_error is not None),
                (option("joint", True), self.joint),
                (option("holdout"), self.holdout is not None),
            )
            if on
        ]
        if needs and not self.calibration_images:
            raise UsageError(
                f"{', '.join(needs)} needs calibration images: give {option('calibration')}"
            )
        if self.threshold_on == "output" and self.fit_to != "output":
            raise UsageError(
                f"{option('threshold_on', 'output')} needs {option('fit_to', 'output')}"
            )
        if self.max_output_error is not None and self.fit_to != "output":
            raise UsageError(f"{option('max_output_error')} needs {option('fit_to', 'output')}")


def _check_number(name: str, value: object, low: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{option(name)} must be a number >= {low:g}, got {value!r}")
    if not (math.isfinite(value) and value >= low):
        raise UsageError(f"{option(name)} must be a number >= {low:g}, got {value!r}")


def _families(value: Sequence[str] | str) -> tuple[str, ...]:
    """Family codes from codes or names (a comma-separated string or a sequence)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(v).strip() for v in items if str(v).strip()]
    if not items:
        raise UsageError(f"{option('families')} names no family; give e.g. G,Lg,Tf,Ts,Lt,M")
    codes = []
    for item in items:
        try:
            fam = kernels.get(item)
        except KeyError as exc:
            raise UsageError(f"{option('families')}: {exc.args[0]}") from None
        if fam.plain:
            raise UsageError(
                f"{option('families')}: plain (P) is what unconverted kernels stay; "
                "list only analytic families"
            )
        if fam.code in codes:
            raise UsageError(f"{option('families')}: {fam.code} is listed twice")
        codes.append(fam.code)
    return tuple(codes)


def check_device(name: str) -> torch.device:
    """The torch device a ``device`` setting names (``auto``: the GPU when there is one)."""
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise UsageError(f"{option('device')} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"device {name!r} was requested but no CUDA GPU is available; use "
            f"{option('device', 'cpu')} or {option('device', 'auto')}"
        )
    try:
        return resolve_device(name)
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"{option('device')}: {exc}") from None
