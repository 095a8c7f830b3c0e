"""The AnaNN checkpoint: a safetensors file plus a JSON header describing the conversion.

Tensors: every tensor of the source state dict, except that each converted convolution's
``<layer>.weight`` is replaced by its ACL's state-dict entries: ``<layer>.akp.<code>``
(unconstrained AKPs, see :meth:`KernelFamily.from_unconstrained`), ``<layer>.gain.<code>``,
``<layer>.offset.<code>``, ``<layer>.index_<code>`` (which kernels belong to the family),
``<layer>.akp_row_<code>`` (only for a family whose kernels share AKP rows: each kernel's row) and
``<layer>.plain``; ``<layer>.bias`` is kept. So the file *is* the state dict of the AnaNN
module, and ``load_state_dict(strict=True)`` checks it completely.

Header (safetensors metadata, one JSON string under ``acl_convert``), modelled on torchvision's
weights metadata: format name and version, tool and torch versions, the source file and its
sha256, the architecture when known, the settings, and per converted layer its conv
hyper-parameters, family counts, pattern and compact factor. See ``docs/anann-format.md``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from ..errors import UserError
from ..nn.acl import ACL
from .outputs import write_atomic

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "AnaNNFile",
    "save_anann",
    "read_anann",
    "load_anann",
    "build_layer",
    "bake_state_dict",
    "is_anann",
    "set_submodule",
]

FORMAT = "acl-convert/anann"
FORMAT_VERSION = 1
_HEADER_KEY = "acl_convert"
_INDEX = re.compile(r"^index_(.+)$")
_ROWS = re.compile(r"^akp_row_(.+)$")
# The state-dict keys of an ACL (see layer.py), relative to the layer.
_ACL_KEY = re.compile(r"^((akp|gain|offset)\.[^.]+|(index|akp_row)_[^.]+|plain|bias)$")


@dataclass
class AnaNNFile:
    """An AnaNN checkpoint read from disk: its tensors and its header."""

    tensors: dict[str, Tensor]
    header: dict[str, Any]

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        """Converted layers: name -> recorded hyper-parameters and statistics."""
        return self.header["layers"]

    def layer_tensors(self, name: str) -> dict[str, Tensor]:
        """The ACL state dict of layer ``name`` (keys without the layer prefix)."""
        prefix = name + "."
        return {
            k[len(prefix) :]: v
            for k, v in self.tensors.items()
            if k.startswith(prefix) and _ACL_KEY.match(k[len(prefix) :])
        }


def save_anann(path: str | Path, tensors: Mapping[str, Tensor], header: Mapping[str, Any]) -> Path:
    """Write an AnaNN checkpoint atomically. ``header`` gets ``format``/``format_version``."""
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **header}
    # safetensors refuses shared or non-contiguous storage; a state dict often has both.
    data = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    meta = {_HEADER_KEY: json.dumps(full), "format": FORMAT}
    return write_atomic(
        path, lambda tmp: safetensors.torch.save_file(data, str(tmp), metadata=meta)
    )


def is_anann(path: str | Path) -> bool:
    """True when ``path`` is a safetensors file with an acl-convert header."""
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # not safetensors at all: simply not an AnaNN
        return False


def read_anann(path: str | Path) -> AnaNNFile:
    """Read tensors and header; a file that is not an AnaNN is a :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; check the path")
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise UserError(
            f"{path} is not a readable AnaNN checkpoint ({type(exc).__name__}); "
            "convert a checkpoint with `acl-convert CHECKPOINT --layers ...` first"
        ) from None
    if meta.get("format") != FORMAT or _HEADER_KEY not in meta:
        raise UserError(
            f"{path} is a safetensors file but not an AnaNN (no acl-convert header); "
            "convert it with `acl-convert CHECKPOINT --layers ...` first"
        )
    header = json.loads(meta[_HEADER_KEY])
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(
            f"{path} uses AnaNN format version {header['format_version']}, newer than "
            f"this acl-convert understands ({FORMAT_VERSION}); upgrade acl-convert"
        )
    return AnaNNFile(tensors=tensors, header=header)


def codes_from_indices(layer_tensors: Mapping[str, Tensor], num_kernels: int) -> list[str]:
    """Rebuild the per-kernel family codes from a layer's ``index_<code>`` buffers."""
    codes = [""] * num_kernels
    for key, idx in layer_tensors.items():
        m = _INDEX.match(key)
        if m:
            for k in idx.tolist():
                codes[k] = m.group(1)
    if "" in codes:
        raise UserError(
            f"AnaNN layer is incomplete: {codes.count('')} of {num_kernels} kernels "
            "have no family; the file is corrupt, convert again"
        )
    return codes


def build_layer(
    record: Mapping[str, Any], layer_tensors: Mapping[str, Tensor], conv: nn.Conv2d | None = None
) -> ACL:
    """An :class:`ACL` shaped like the recorded layer (hyper-parameters from ``conv`` when given,
    else from the record), not yet loaded with values. Families with ``akp_row_<code>`` tensors
    get their shared AKP rows back."""
    co, cig, h, w = record["shape"]
    codes = codes_from_indices(layer_tensors, co * cig)
    akp_rows = {m.group(1): t for k, t in layer_tensors.items() if (m := _ROWS.match(k))}
    if conv is not None:
        if tuple(conv.weight.shape) != (co, cig, h, w):
            raise UserError(
                f"layer {record['name']}: the model's conv has weight shape "
                f"{tuple(conv.weight.shape)} but the AnaNN was converted from {(co, cig, h, w)}; "
                "pass the architecture the checkpoint was trained with"
            )
        args = dict(
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )
        in_channels = conv.in_channels
    else:
        groups = record.get("groups") or 1
        args = dict(
            stride=record.get("stride") or 1,
            padding=_padding(record.get("padding")),
            dilation=record.get("dilation") or 1,
            groups=groups,
            bias="bias" in layer_tensors,
            padding_mode=record.get("padding_mode") or "zeros",
        )
        in_channels = cig * groups
    try:
        return ACL(
            in_channels,
            co,
            (h, w),
            **args,
            assignment=codes,
            gain=bool(record.get("gain")),
            offset=bool(record.get("offset")),
            akp_rows=akp_rows,
            device="meta",
        )
    except ValueError as exc:  # only a damaged file has rows the layer cannot take
        raise UserError(
            f"AnaNN layer {record.get('name', '?')} is corrupt ({exc}); convert again"
        ) from None


def _padding(value):
    if value is None:
        return 0
    return value if isinstance(value, str) else tuple(value)


def load_anann(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load an AnaNN checkpoint as an ``nn.Module`` with :class:`ACL` layers in place.

    Args:
        path: the ``.anann.safetensors`` file.
        model: the network to patch (its converted convs are replaced by ACLs, then every tensor
            is loaded strictly). When None, the architecture recorded in the file is built from
            torchvision; a file converted without a known architecture needs ``model``.

    Returns:
        The model, with trainable AKPs, gains, offsets and plain kernels.
    """
    ana = read_anann(path)
    if model is None:
        arch = ana.header.get("arch")
        if not arch:
            raise UserError(
                f"{path} was converted without a known architecture; pass the "
                "network it belongs to: load_anann(path, model=...)"
            )
        from .arch import build_model  # torchvision model building only when needed

        model = build_model(arch)
    for name, record in ana.layers.items():
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            raise UserError(
                f"the model has no module {name!r}, which the AnaNN converted; pass "
                "the architecture the checkpoint was made for"
            ) from None
        if not isinstance(conv, (nn.Conv2d, ACL)):
            raise UserError(
                f"module {name!r} of the model is a {type(conv).__name__}, not a "
                "Conv2d; pass the architecture the checkpoint was made for"
            )
        layer = build_layer(
            record, ana.layer_tensors(name), conv if isinstance(conv, nn.Conv2d) else None
        )
        device = next(iter(conv.parameters())).device
        layer = layer.to_empty(device=device)
        set_submodule(model, name, layer)
    try:
        model.load_state_dict(ana.tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise UserError(
            f"{path} does not fit the given model: {detail}; "
            "pass the architecture the checkpoint was made for"
        ) from None
    return model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at the dotted ``name`` of ``model`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def bake_state_dict(ana: AnaNNFile) -> dict[str, Tensor]:
    """A plain state dict: every converted layer's ACL tensors replaced by its synthesised
    ``weight``. It loads strictly into the original architecture."""
    out = dict(ana.tensors)
    for name, record in ana.layers.items():
        tensors = ana.layer_tensors(name)
        layer = build_layer(record, tensors).to_empty(device="cpu")
        layer.load_state_dict(tensors, strict=True)
        for key in tensors:
            if key != "bias":
                del out[f"{name}.{key}"]
        with torch.no_grad():
            out[f"{name}.weight"] = layer.synthesize().detach().clone()
    return out
