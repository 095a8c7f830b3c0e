"""Which convolutions of a checkpoint to convert: listing them and resolving ``--layers``.

A convolution is found by its 4-D ``<module>.weight`` tensor of shape ``(Co, Ci/groups, h, w)``;
with a model (the architecture is known) only modules that are ``nn.Conv2d`` count, and their
hyper-parameters come along. Only kernels of at least 2x2 can be fitted: a 1x1 kernel is a single
number, there is no function of x and y to recover from it; a convolution with no kernels at all
(a zero-size weight) has nothing to fit either.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import NoReturn

from torch import Tensor, nn

from ..errors import UsageError, UserError

__all__ = [
    "ConvLayer",
    "conv_layers",
    "eligible",
    "select_layers",
    "estimate_fit_seconds",
    "listing",
    "SECONDS_PER_KERNEL_FAMILY_PIXEL",
]

_log = logging.getLogger(__name__)

_SEE = "see `acl-convert layers CHECKPOINT`"
_NOTHING_TO_FIT = "with nothing to fit (kernels smaller than 2x2, or none)"
_GLOB_CHARS = "*?["

#: CPU fitting cost, in seconds per kernel, per family and per kernel pixel (h*w). Measured with
#: ``acl_convert.fit.fit_kernels(device="cpu")`` with the six paper families on a 2-core AMD EPYC
#: VM that other jobs kept busy (bench/fit_speed.py, docs/performance.md): the ResNet-50-shaped
#: job, 1.26 M randomly initialised 3x3 kernels, took 85 s with 1.3 of the 2 cores taken by
#: others (1.25e-6 s/kernel/family/pixel) and 56 s of CPU, ~30 s on two free cores (0.45e-6);
#: the real MobileNetV2 3x3 kernels, one chunk per family and so one thread, 2.0e-6, the real
#: SqueezeNet 7x7 ones 1.2e-6. A figure in between is used: estimates are good to about a
#: factor of 2, and a GPU is one to two orders of magnitude faster.
SECONDS_PER_KERNEL_FAMILY_PIXEL = 1.0e-6


@dataclass(frozen=True)
class ConvLayer:
    """One 2-D convolution of a checkpoint.

    Attributes:
        name: module name, e.g. ``"layer1.0.conv1"`` (no ``.weight``).
        weight_key: its state-dict key, ``name + ".weight"``.
        shape: weight shape ``(Co, Ci/groups, h, w)``.
        groups, in_channels, stride, padding, dilation, padding_mode, bias: the ``nn.Conv2d``
            hyper-parameters (``bias`` is True when the conv has one); None when no model is
            known, since a state dict alone cannot tell them.
    """

    name: str
    weight_key: str
    shape: tuple[int, int, int, int]
    groups: int | None = None
    in_channels: int | None = None
    stride: tuple[int, int] | None = None
    padding: tuple[int, int] | str | None = None
    dilation: tuple[int, int] | None = None
    padding_mode: str | None = None
    bias: bool | None = None

    @property
    def kernel_size(self) -> tuple[int, int]:
        """``(h, w)``."""
        return self.shape[2], self.shape[3]

    def conv_kwargs(self) -> dict:
        """``stride``, ``padding``, ``dilation``, ``groups``, ``padding_mode`` as ``nn.Conv2d``
        takes them; empty when the conv's hyper-parameters are unknown (no model)."""
        if self.groups is None:
            return {}
        return dict(
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            padding_mode=self.padding_mode,
        )

    @property
    def num_kernels(self) -> int:
        """``Co * Ci/groups``: the number of h x w kernels, each fitted on its own."""
        return self.shape[0] * self.shape[1]


def conv_layers(
    state_dict: Mapping[str, Tensor], model: nn.Module | None = None
) -> list[ConvLayer]:
    """Every 2-D convolution in ``state_dict``, eligible or not, in state-dict order.

    Args:
        state_dict: ``{key: tensor}``.
        model: the architecture, when known: then only ``nn.Conv2d`` modules count (a 4-D weight
            of another module is not a convolution) and their hyper-parameters are filled in.
            Without it every 4-D ``*.weight`` is taken as a convolution.
    """
    modules = dict(model.named_modules()) if model is not None else None
    layers = []
    for key, tensor in state_dict.items():
        if not key.endswith(".weight") or tensor.ndim != 4:
            continue
        name = key[: -len(".weight")]
        shape = tuple(int(s) for s in tensor.shape)
        if modules is None:
            layers.append(ConvLayer(name, key, shape))
            continue
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d):
            continue
        layers.append(
            ConvLayer(
                name,
                key,
                shape,
                groups=conv.groups,
                in_channels=conv.in_channels,
                stride=tuple(conv.stride),
                dilation=tuple(conv.dilation),
                padding=conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
                padding_mode=conv.padding_mode,
                bias=conv.bias is not None,
            )
        )
    return layers


def eligible(layer: ConvLayer) -> bool:
    """True when the layer has kernels and they are at least 2x2, i.e. there is a spatial
    pattern to fit."""
    h, w = layer.kernel_size
    return h >= 2 and w >= 2 and layer.num_kernels > 0


def select_layers(
    selectors: Sequence[str],
    layers: list[ConvLayer],
    state_dict: Mapping[str, Tensor] | Iterable[str],
    *,
    on_note: Callable[[str], None] | None = None,
) -> list[ConvLayer]:
    """Resolve ``--layers`` selectors to convolutions.

    Each selector (a comma-separated list counts as several) is one of:

    - ``all``: every eligible convolution;
    - an exact module name, with or without ``.weight`` (``conv1``, ``features.0.weight``);
    - a shell glob over module names (``layer1.*``, ``*.conv2``); ``*`` also crosses dots.
      A glob takes the eligible convolutions among its matches; the 1x1 ones it skips are
      reported through ``on_note`` (and logged at INFO level).

    Args:
        selectors: as given on the command line.
        layers: from :func:`conv_layers`.
        state_dict: the checkpoint's state dict (its shapes make better messages) or just its
            keys; used to tell a non-convolution module from a missing name.
        on_note: receives one-line notes about skipped layers.

    Returns:
        The selected layers, each once, in state-dict order.

    Raises:
        UsageError: a selector matches nothing (the message lists the closest eligible names),
            names a 1x1 or non-convolution layer, or a glob matches only 1x1 convolutions.
        UserError: the checkpoint has no convolution of 2x2 or larger at all.
    """
    items = [part.strip() for sel in selectors for part in sel.split(",") if part.strip()]
    if not items:
        raise UsageError(
            f"--layers needs a layer name, a glob such as 'layer1.*', or 'all' ({_SEE})"
        )
    if isinstance(state_dict, Mapping):
        shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    else:
        shapes = dict.fromkeys(state_dict)

    def note(text: str) -> None:
        _log.info(text)
        if on_note is not None:
            on_note(text)

    chosen: set[str] = set()
    for sel in items:
        chosen.update(layer.name for layer in _select_one(sel, layers, shapes, note))
    return [layer for layer in layers if layer.name in chosen]


def _select_one(
    sel: str,
    layers: list[ConvLayer],
    shapes: Mapping[str, tuple | None],
    note: Callable[[str], None],
) -> list[ConvLayer]:
    good = [layer for layer in layers if eligible(layer)]
    if sel == "all":
        if not good:
            _raise_nothing_eligible(layers)
        if len(good) < len(layers):
            note(
                f"--layers all: skipped {len(layers) - len(good)} of {len(layers)} "
                f"convolutions {_NOTHING_TO_FIT}"
            )
        return good
    name = sel[: -len(".weight")] if sel.endswith(".weight") else sel
    if any(c in name for c in _GLOB_CHARS):
        matched = [layer for layer in layers if fnmatchcase(layer.name, name)]
        if not matched:
            _raise_no_match(sel, name, good, layers)
        picked = [layer for layer in matched if eligible(layer)]
        if not picked:
            sizes = sorted({"x".join(map(str, layer.kernel_size)) for layer in matched})
            raise UsageError(
                f"--layers {sel!r} matches only {'/'.join(sizes)} convolutions "
                f"({len(matched)}), which have nothing to fit; select layers with "
                f"kernels of 2x2 or larger ({_SEE})"
            )
        if len(picked) < len(matched):
            note(
                f"--layers {sel!r}: skipped {len(matched) - len(picked)} of {len(matched)} "
                f"matching convolutions {_NOTHING_TO_FIT}"
            )
        return picked
    by_name = {layer.name: layer for layer in layers}
    if name in by_name:
        layer = by_name[name]
        if eligible(layer):
            return [layer]
        h, w = layer.kernel_size
        if layer.num_kernels == 0 or h == 0 or w == 0:
            raise UsageError(
                f"layer {name} has no kernels (its weight has shape {layer.shape}); there is "
                f"nothing to fit; select another layer ({_SEE})"
            )
        if (h, w) == (1, 1):
            raise UsageError(
                f"layer {name} is a 1x1 convolution; there is nothing to fit in a "
                f"1x1 kernel; select another layer ({_SEE})"
            )
        raise UsageError(
            f"layer {name} is a {h}x{w} convolution; analytic kernels need at "
            f"least 2x2; select another layer ({_SEE})"
        )
    for key in (f"{name}.weight", name):
        if key in shapes:
            shape = shapes[key]
            what = f" (its weight has shape {shape})" if shape is not None else ""
            raise UsageError(
                f"{name} is not a 2-D convolution{what}; select a convolution ({_SEE})"
            )
    if name and any(k.startswith(name + ".") for k in shapes):
        raise UsageError(
            f"{name} is a block of layers, not one convolution; select the "
            f"convolutions inside it with '{name}.*'"
        )
    _raise_no_match(sel, name, good, layers)


def _raise_no_match(
    sel: str, name: str, good: list[ConvLayer], layers: list[ConvLayer]
) -> NoReturn:
    if not good:
        _raise_nothing_eligible(layers)
    names = [layer.name for layer in good]
    # Glob characters only hurt the similarity ratio.
    plain = name.translate(str.maketrans("", "", "*?[]"))
    closest = difflib.get_close_matches(plain, names, n=3, cutoff=0.4) or names[:3]
    raise UsageError(
        f"--layers {sel!r} matches no convolution; closest: {', '.join(closest)} ({_SEE})"
    )


def _raise_nothing_eligible(layers: list[ConvLayer]) -> NoReturn:
    # Not a usage error: no selector could help, the checkpoint itself has nothing to convert.
    if not layers:
        raise UserError(
            "the checkpoint has no 2-D convolution (no 4-D '*.weight' tensor); "
            "there is nothing to convert; give a CNN checkpoint"
        )
    raise UserError(
        f"the checkpoint has no convolution with kernels of 2x2 or larger "
        f"({len(layers)} found, all smaller); there is nothing to convert; give a "
        "checkpoint with 2x2 or larger kernels"
    )


def listing(layers: Sequence[ConvLayer]) -> list[dict]:
    """One JSON-ready row per convolution: name, shape, groups, kernels, whether it can be
    converted and a CPU fit-time estimate (``acl-convert layers``)."""
    return [
        {
            "name": lay.name,
            "shape": list(lay.shape),
            "groups": lay.groups,
            "kernels": lay.num_kernels,
            "eligible": eligible(lay),
            "fit_seconds_estimate": estimate_fit_seconds(lay.num_kernels, lay.kernel_size)
            if eligible(lay)
            else None,
        }
        for lay in layers
    ]


def estimate_fit_seconds(
    num_kernels: int, kernel_size: tuple[int, int], n_families: int = 6
) -> float:
    """A rough CPU time to fit ``num_kernels`` kernels of ``kernel_size`` to ``n_families``.

    Linear in kernels, families and pixels, with :data:`SECONDS_PER_KERNEL_FAMILY_PIXEL`
    measured on a 2-thread CPU; expect a factor of 2 either way, and far less on a GPU. Meant for
    the ``acl-convert layers`` listing, to warn before a long run.
    """
    h, w = kernel_size
    return SECONDS_PER_KERNEL_FAMILY_PIXEL * num_kernels * n_families * h * w
