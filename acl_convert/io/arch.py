"""Architectures: build a network from a name, or recognise one from a state dict.

Knowing the architecture gives each converted convolution its real hyper-parameters (groups,
stride, padding), lets calibration and evaluation run the network, and lets
:func:`acl_convert.load_anann` rebuild it. An architecture is named by a string, the same one the
AnaNN header records:

- a torchvision classification model name (``resnet50``);
- ``timm:NAME``, a timm model (timm is an optional extra: ``pip install acl-convert[timm]``);
- ``path/to/file.py:Factory`` or ``package.module:Factory``: the user's own code, a callable
  returning the ``nn.Module``. Importing it runs it: only for code the user trusts, so a
  factory recorded in a file is never imported without the user's say-so.

Models are only ever built with random weights: nothing is downloaded.

Detection compares the state dict's keys and tensor shapes with those of candidate models built
on the ``meta`` device (no memory, no initialisation cost): every torchvision classification
model (first filtered by the parameter count torchvision publishes with each model's weights),
then, when timm is installed, the timm models whose module layout matches (see
:func:`_timm_candidates`). Results are cached for the rest of the process.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import math
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from ..errors import UsageError, UserError, note, option

__all__ = [
    "Architecture",
    "parse_arch",
    "list_archs",
    "build_model",
    "build_recorded",
    "detect_arch",
    "check_fits",
    "model_for",
    "recognise",
]

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
        f"model); {hint}give a torchvision name, timm:NAME or path/to/file.py:Factory"
    )


@dataclass(frozen=True)
class Architecture:
    """A way to build a network with random weights.

    Attributes:
        spec: the string that names it, as recorded in an AnaNN header (a torchvision name,
            ``timm:NAME``, ``/absolute/path/file.py:Factory`` or ``package.module:Factory``).
        kind: ``torchvision``, ``timm`` or ``factory``.
        name: the model name (torchvision, timm) or the factory's ``file:callable``.
    """

    spec: str
    kind: str
    name: str

    @property
    def user_code(self) -> bool:
        """Whether building it imports the user's code."""
        return self.kind == "factory"

    def build(self, device: str | torch.device = "cpu") -> nn.Module:
        """A new instance with random weights (``device="meta"``: shapes only)."""
        if self.kind == "torchvision":
            if torch.device(device).type == "meta":
                return _build_meta(self.name)
            with _quiet(), torch.device(device):
                return torchvision.models.get_model(self.name, weights=None)
        if self.kind == "timm":
            return _build_timm(self.name, device)
        return _build_factory(self.name, device)

    def preprocessing(self, model: nn.Module | None = None):
        """The eval transform images need for this network (see :mod:`acl_convert.io.images`)."""
        from .images import imagenet_transform, timm_transform, torchvision_transform

        if self.kind == "torchvision":
            return torchvision_transform(self.name)
        if self.kind == "timm":
            return timm_transform(model if model is not None else self.build("meta"))
        return imagenet_transform()


def parse_arch(spec: str) -> Architecture:
    """The :class:`Architecture` a string names (see the module docstring).

    Raises:
        UsageError: an unknown torchvision or timm name (listing the closest), timm not
            installed, or a factory whose file does not exist.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"an architecture must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec.startswith("timm:"):
        return Architecture(f"timm:{_resolve_timm(spec[5:])}", "timm", _resolve_timm(spec[5:]))
    if ":" in spec:
        where, _, factory = spec.rpartition(":")
        if not factory.isidentifier() or not where:
            raise UsageError(
                f"architecture {spec!r}: a factory is given as path/to/file.py:Factory or "
                "package.module:Factory"
            )
        if where.endswith(".py") or "/" in where or "\\" in where:
            path = Path(where).expanduser()
            if not path.is_file():
                raise UsageError(f"architecture {spec!r}: no such file {where}; check the path")
            where = str(path.resolve())
        return Architecture(f"{where}:{factory}", "factory", f"{where}:{factory}")
    name = _resolve(spec)
    return Architecture(name, "torchvision", name)


def build_model(spec: str, *, device: str | torch.device = "cpu") -> nn.Module:
    """The network ``spec`` names (:func:`parse_arch`), with random weights (``weights=None``).

    Args:
        spec: a torchvision name (case and ``-``/``_`` forgiven), ``timm:NAME`` or a factory.
        device: where the parameters live; ``"meta"`` builds shapes only, instantly.

    Raises:
        UsageError: unknown name; the message lists the closest names.
    """
    return parse_arch(spec).build(device)


def build_recorded(
    recorded: str | None, given: str | None, *, trust_code: bool, what: str
) -> nn.Module:
    """The network of an AnaNN: ``given`` when the user names one, else the one ``recorded`` in
    its header. A recorded factory runs the user's code, so it is only built with
    ``trust_code`` (naming it again with ``given`` is trusting it too)."""
    spec = given or recorded
    if not spec:
        raise UsageError(
            f"{what} records no architecture (it was converted from tensors alone); pass the "
            f"network it belongs to ({option('arch', 'NAME')}, or load_anann(path, model=...))"
        )
    arch = parse_arch(spec)
    if arch.user_code and not given and not trust_code:
        raise UsageError(
            f"{what} records the architecture {arch.spec}, which is user code: importing it "
            f"runs it; name it again ({option('arch', arch.spec)}) or pass "
            f"{option('trust_code', True)} if you trust that file"
        )
    return arch.build()


def _build_timm(name: str, device) -> nn.Module:
    timm = _timm()
    with _quiet(), torch.device(device):
        return timm.create_model(name, pretrained=False)


def _build_factory(target: str, device) -> nn.Module:
    where, _, factory = target.rpartition(":")
    try:
        if where.endswith(".py") or os.sep in where:
            module_name = f"_acl_convert_user_{abs(hash(where)):x}"
            spec = importlib.util.spec_from_file_location(module_name, where)
            if spec is None or spec.loader is None:
                raise UsageError(f"architecture {target}: {where} is not a Python file")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"architecture {target}: importing {where} failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); fix that code"
        ) from None
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise UsageError(f"architecture {target}: {where} has no callable {factory!r}")
    with torch.device(device):
        try:
            model = fn()
        except Exception as exc:
            raise UserError(
                f"architecture {target}: {factory}() failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); fix that code"
            ) from None
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"architecture {target}: {factory}() returned a {type(model).__name__}, not an "
            "nn.Module; give a callable that returns the network"
        )
    return model


def _timm():
    try:
        import timm
    except ImportError:
        raise UsageError(
            "timm architectures need timm, an optional extra: pip install 'acl-convert[timm]'"
        ) from None
    return timm


@functools.cache
def _timm_names() -> tuple[str, ...]:
    return tuple(_timm().list_models())


def _resolve_timm(name: str) -> str:
    names = _timm_names()
    if name in names:
        return name
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"closest: {', '.join(close)}; " if close else ""
    raise UsageError(f"unknown timm model {name!r}; {hint}see timm.list_models()")


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


def detect_arch(state_dict: Mapping[str, Tensor], *, timm_search: bool = True) -> str | None:
    """The architecture whose ``state_dict()`` has exactly these keys and shapes: a torchvision
    name, or ``timm:NAME`` when timm is installed and exactly one timm model matches.

    ``num_batches_tracked`` entries are ignored on both sides. A model fine-tuned to another
    number of classes, or with renamed or missing keys, is not recognised.

    Args:
        state_dict: ``{key: tensor}`` (prefixes already stripped, see
            :func:`acl_convert.io.checkpoint.load_checkpoint`).
        timm_search: also search timm's models (seconds to a minute: each candidate is built on
            the meta device) when torchvision has no match.

    Returns:
        The architecture's spec (as for :func:`build_model`), or None when none matches, or
        several timm models match equally.
    """
    signature = _signature(state_dict)
    found = _detect(signature)
    if found is None and timm_search and importlib.util.find_spec("timm") is not None:
        matches = _detect_timm(signature)
        found = f"timm:{matches[0]}" if len(matches) == 1 else None
    return found


@functools.lru_cache(maxsize=32)
def _detect(signature: Signature) -> str | None:
    count = _param_count(signature)
    counts = _published_counts()
    for name in _archs():
        plausible = name in _COUNT_UNRELIABLE or not counts.get(name) or count in counts[name]
        if plausible and _arch_signature(name) == signature:
            return name
    return None


@functools.lru_cache(maxsize=8)
def _detect_timm(signature: Signature) -> tuple[str, ...]:
    """timm models whose state dict has exactly ``signature``. Candidates come from the timm
    modules (``timm.list_modules()``: resnet, efficientnet, ...) whose first model has the same
    top-level module names as the checkpoint; only those are built."""
    timm = _timm()
    top = frozenset(k.split(".", 1)[0] for k, _ in signature)
    matches = []
    for module in _timm_modules_like(top):
        for name in timm.list_models(module=module):
            try:
                if _timm_signature(name) == signature:
                    matches.append(name)
            except Exception:  # a model that cannot be built on meta is not a candidate
                continue
    return tuple(matches)


def _timm_modules_like(top: frozenset[str]) -> list[str]:
    return [m for m, names in _timm_module_tops().items() if names == top]


@functools.cache
def _timm_module_tops() -> dict[str, frozenset[str]]:
    timm = _timm()
    tops = {}
    for module in timm.list_modules():
        names = timm.list_models(module=module)
        if not names:
            continue
        try:
            keys = _timm_signature(names[0])
        except Exception:
            continue
        tops[module] = frozenset(k.split(".", 1)[0] for k, _ in keys)
    return tops


@functools.cache
def _timm_signature(name: str) -> Signature:
    return _signature(_build_timm(name, "meta").state_dict())


def recognise(model: nn.Module) -> str | None:
    """The spec of a model built by torchvision or timm (its class's module says which, and
    its state dict's layout which one), or None for any other network."""
    module = type(model).__module__
    if module.startswith("timm."):
        name = getattr(model, "pretrained_cfg", {}).get("architecture")
        return f"timm:{name}" if name else None
    if module.startswith("torchvision.models"):
        return detect_arch(model.state_dict(), timm_search=False)
    return None


def model_for(
    state_dict: Mapping[str, Tensor],
    arch: str | None,
    notes: list[str],
    *,
    required: bool = False,
    what: str = "the checkpoint",
) -> tuple[str | None, nn.Module | None]:
    """The architecture of a state dict (``arch`` when given, else detected) and a model of it
    with those weights, in eval mode; ``(None, None)`` when unknown (with ``required``, an
    error). Appends a sentence to ``notes`` saying what was found."""
    if arch:
        parsed = parse_arch(arch)
        model = parsed.build()
        check_fits(model, state_dict, parsed.spec)
    else:
        spec = detect_arch(state_dict)
        if spec is None:
            if required:
                raise UsageError(
                    f"the architecture of {what} is not recognised among torchvision's (or "
                    f"timm's) models; pass {option('arch', 'NAME')}"
                )
            notes.append(
                note(
                    "architecture not recognised among torchvision's (or timm's) models; "
                    f"converting the tensors only (give {option('arch', 'NAME')} to calibrate, "
                    "evaluate or load it as a network)"
                )
            )
            return None, None
        notes.append(f"architecture detected: {spec}")
        parsed = parse_arch(spec)
        model = parsed.build()
    # check_fits / detect_arch matched every key and shape already; strict=False only forgives
    # the num_batches_tracked counters that checkpoints older than PyTorch 0.4.1 lack.
    model.load_state_dict(state_dict, strict=False)
    return parsed.spec, model.eval()


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
    fix = f"give the architecture it was trained with, or leave {option('arch')} out to detect it"
    missing = [k for k in expected if k not in given]
    if missing:
        raise UsageError(
            f"the checkpoint does not fit {option('arch', name)}: it has no {missing[0]!r} "
            f"({len(missing)} missing keys); {fix}"
        )
    unexpected = [k for k in given if k not in expected]
    if unexpected:
        raise UsageError(
            f"the checkpoint does not fit {option('arch', name)}: {name} has no "
            f"{unexpected[0]!r} ({len(unexpected)} unexpected keys); {fix}"
        )
    for key, shape in given.items():
        if shape != expected[key]:
            raise UsageError(
                f"the checkpoint does not fit {option('arch', name)}: {key!r} has shape "
                f"{shape} in the checkpoint but {expected[key]} in {name}; {fix}"
            )
