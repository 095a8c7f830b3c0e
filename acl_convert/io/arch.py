"""Torchvision architectures: build one by name, or recognise one from a state dict.

Knowing the architecture gives each converted convolution its real hyper-parameters (groups,
stride, padding) and lets :func:`acl_convert.load_anann` rebuild the network without help.
Models are only ever built with ``weights=None``: nothing is downloaded.

Detection compares the state dict's keys and tensor shapes with those of every torchvision
classification model, built on the ``meta`` device (no memory, no initialisation cost). To avoid
building ~80 models for every call, candidates are first filtered by parameter count against the
``num_params`` that torchvision publishes with each model's weights; only the survivors (usually
one) are built, and every result is cached for the rest of the process.
"""

from __future__ import annotations

import difflib
import functools
import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torchvision
from torch import Tensor, nn

from ..errors import UsageError

__all__ = ["list_archs", "build_model", "detect_arch", "check_fits"]

#: Buffers in torchvision models; they are not counted in the published ``num_params``.
_BUFFERS = (
    "running_mean",
    "running_var",
    "num_batches_tracked",
    "relative_position_index",
    "relative_coords_table",
)

#: Builders whose ``weights=None`` model differs from the published parameter count, so the count
#: filter cannot rule them out: GoogLeNet is built with its two auxiliary heads, which the
#: published count (of the model as returned with weights) leaves out.
_COUNT_UNRELIABLE = frozenset({"googlenet"})

Signature = frozenset[tuple[str, tuple[int, ...]]]


@functools.cache
def _archs() -> tuple[str, ...]:
    return tuple(torchvision.models.list_models(module=torchvision.models))


def list_archs() -> list[str]:
    """Names of torchvision's classification models (``torchvision.models.list_models``),
    sorted; quantized, detection and segmentation models are not included."""
    return list(_archs())


def _resolve(name: str) -> str:
    archs = _archs()
    if name in archs:
        return name
    normal = name.strip().lower().replace("-", "_")
    if normal in archs:
        return normal
    close = difflib.get_close_matches(normal, archs, n=3, cutoff=0.5)
    hint = f"closest: {', '.join(close)}; " if close else ""
    raise UsageError(
        f"unknown architecture {name!r} (torchvision has no such classification "
        f"model); {hint}give a torchvision name, or leave --arch out to detect it"
    )


def build_model(name: str, *, device: str | torch.device = "cpu") -> nn.Module:
    """A torchvision classification model with random weights (``weights=None``, 1000 classes).

    Args:
        name: a name from :func:`list_archs` (case and ``-``/``_`` are forgiven).
        device: where the parameters live; ``"meta"`` builds shapes only, instantly.

    Raises:
        UsageError: unknown name; the message lists the closest names.
    """
    name = _resolve(name)
    if torch.device(device).type == "meta":
        return _build_meta(name)
    with _quiet(), torch.device(device):
        return torchvision.models.get_model(name, weights=None)


def _build_meta(name: str) -> nn.Module:
    try:
        with _quiet(), torch.device("meta"):
            return torchvision.models.get_model(name, weights=None)
    except (NotImplementedError, RuntimeError):
        # RegNet computes its widths with tensors and reads them back (.tolist()), which meta
        # tensors cannot do; build it with ordinary tensors, moving each parameter to meta as it
        # is registered.
        with _quiet(), _parameters_on_meta():
            return torchvision.models.get_model(name, weights=None)


@contextmanager
def _quiet() -> Iterator[None]:
    # GoogLeNet and Inception warn about their weight initialisation when built without weights.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (UserWarning, FutureWarning))
        yield


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Move every parameter and buffer to ``meta`` when it is registered. Patches ``nn.Module``
    for the duration, so it is not thread-safe; it serves only builders that fail on meta."""
    register_parameter = nn.Module.register_parameter
    register_buffer = nn.Module.register_buffer

    def parameter_on_meta(module, name, param):
        register_parameter(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(
                param.to("meta"), requires_grad=param.requires_grad
            )

    def buffer_on_meta(module, name, tensor, persistent=True):
        register_buffer(module, name, tensor, persistent)
        if tensor is not None:
            module._buffers[name] = tensor.to("meta")

    nn.Module.register_parameter = parameter_on_meta
    nn.Module.register_buffer = buffer_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter
        nn.Module.register_buffer = register_buffer


def _signature(state_dict: Mapping[str, Tensor]) -> Signature:
    """Keys and shapes; ``num_batches_tracked`` is left out because checkpoints older than
    PyTorch 0.4.1 do not have it."""
    return frozenset(
        (k, tuple(v.shape)) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")
    )


@functools.cache
def _arch_signature(name: str) -> Signature:
    return _signature(_build_meta(name).state_dict())


def _param_count(signature: Signature) -> int:
    return sum(
        math.prod(shape) for key, shape in signature if key.rpartition(".")[2] not in _BUFFERS
    )


@functools.cache
def _published_counts() -> dict[str, frozenset[int]]:
    """``num_params`` of every published weight of every architecture (a model can have several:
    ViT-H/14's 518-pixel weights have a larger position embedding)."""
    counts = {}
    for name in _archs():
        try:
            weights = torchvision.models.get_model_weights(name)
        except (ValueError, KeyError):
            continue
        counts[name] = frozenset(w.meta["num_params"] for w in weights if "num_params" in w.meta)
    return counts


def detect_arch(state_dict: Mapping[str, Tensor]) -> str | None:
    """The torchvision architecture whose ``state_dict()`` has exactly these keys and shapes.

    ``num_batches_tracked`` entries are ignored on both sides. A model fine-tuned to another
    number of classes, or with renamed or missing keys, is not recognised.

    Args:
        state_dict: ``{key: tensor}`` (prefixes already stripped, see
            :func:`acl_convert.io.checkpoint.load_checkpoint`).

    Returns:
        The name (as for :func:`build_model`), or None when no architecture matches.
    """
    return _detect(_signature(state_dict))


@functools.lru_cache(maxsize=32)
def _detect(signature: Signature) -> str | None:
    count = _param_count(signature)
    counts = _published_counts()
    for name in _archs():
        plausible = name in _COUNT_UNRELIABLE or not counts.get(name) or count in counts[name]
        if plausible and _arch_signature(name) == signature:
            return name
    return None


def check_fits(model: nn.Module, state_dict: Mapping[str, Tensor], name: str) -> None:
    """Check that ``state_dict`` loads into ``model`` (keys and shapes; ``num_batches_tracked``
    may be missing).

    Raises:
        UsageError: naming the first missing, unexpected or mis-shaped key and the fix.
    """
    expected = {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    given = {
        k: tuple(v.shape) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")
    }
    fix = "pass the architecture it was trained with, or leave --arch out to detect it"
    missing = [k for k in expected if k not in given]
    if missing:
        raise UsageError(
            f"the checkpoint does not fit --arch {name}: it has no {missing[0]!r} "
            f"({len(missing)} missing keys); {fix}"
        )
    unexpected = [k for k in given if k not in expected]
    if unexpected:
        raise UsageError(
            f"the checkpoint does not fit --arch {name}: {name} has no "
            f"{unexpected[0]!r} ({len(unexpected)} unexpected keys); {fix}"
        )
    for key, shape in given.items():
        if shape != expected[key]:
            raise UsageError(
                f"the checkpoint does not fit --arch {name}: {key!r} has shape "
                f"{shape} in the checkpoint but {expected[key]} in {name}; {fix}"
            )
