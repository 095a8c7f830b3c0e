"""The AnaNN header as typed objects that check themselves (docs/anann-format.md).

A header read from a file is untrusted: :meth:`AnaNNHeader.from_json` checks every field's type
and range before anything is built from it, and raises a one-line :class:`UserError` naming the
field. Writing goes through :meth:`AnaNNHeader.to_json`, so what is written is what is read.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import __version__
from ..errors import UserError

__all__ = ["FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "LayerRecord", "AnaNNHeader"]

FORMAT = "acl-convert/anann"
#: Version 2 stores each layer's family map as one uint8 tensor instead of an int64 index per
#: family (docs/anann-format.md); version 1 files are still read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: Deeper JSON than this is not a header (and would exhaust Python's recursion on parsing).
_MAX_DEPTH = 32


class _Reader:
    """Typed access to one JSON object; every failure names the field's path."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise _bad(where, "must be an object", data)
        self.data, self.where = data, where

    def _get(self, key: str, optional: bool) -> object:
        if key not in self.data:
            if optional:
                return None
            raise UserError(f"AnaNN header: field {self.where}.{key} is missing; {_FIX}")
        return self.data[key]

    def str(self, key: str, optional: bool = False) -> str | None:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise _bad(f"{self.where}.{key}", "must be a string", value)
        return value

    def bool(self, key: str) -> bool:
        value = self._get(key, False)
        if not isinstance(value, bool):
            raise _bad(f"{self.where}.{key}", "must be true or false", value)
        return value

    def int(self, key: str, low: int = 0, optional: bool = False) -> int | None:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise _bad(f"{self.where}.{key}", f"must be an integer >= {low}", value)
        return value

    def number(self, key: str) -> float:
        value = self._get(key, False)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise _bad(f"{self.where}.{key}", "must be a number", value)
        return float(value)

    def ints(self, key: str, n: int, low: int, optional: bool = False) -> tuple[int, ...] | None:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        ok = isinstance(value, list) and len(value) == n
        ok = ok and all(not isinstance(v, bool) and isinstance(v, int) and v >= low for v in value)
        if not ok:
            raise _bad(f"{self.where}.{key}", f"must be a list of {n} integers >= {low}", value)
        return tuple(value)

    def obj(self, key: str, optional: bool = False) -> _Reader | None:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        return _Reader(value, f"{self.where}.{key}")


_FIX = "the file is damaged or was not written by acl-convert; convert the checkpoint again"


def _bad(where: str, what: str, value: object) -> UserError:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return UserError(f"AnaNN header: field {where} {what}, got {shown}; {_FIX}")


@dataclass(frozen=True)
class LayerRecord:
    """One converted layer: its conv hyper-parameters and what the conversion made of it.

    ``groups``, ``stride``, ``padding``, ``dilation`` and ``padding_mode`` are None when the
    conversion worked on tensors only (no architecture); ``padding`` is a pair or a string
    (``same``/``valid``)."""

    name: str
    shape: tuple[int, int, int, int]
    groups: int | None
    stride: tuple[int, int] | None
    padding: tuple[int, int] | str | None
    dilation: tuple[int, int] | None
    padding_mode: str | None
    bias: bool
    gain: bool
    offset: bool
    family_counts: dict[str, int]
    pattern: str
    compact_factor: float
    tied: bool = False

    @property
    def num_kernels(self) -> int:
        return self.shape[0] * self.shape[1]

    def to_json(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "shape": list(self.shape),
            "groups": self.groups,
            "stride": None if self.stride is None else list(self.stride),
            "padding": self.padding if not isinstance(self.padding, tuple) else list(self.padding),
            "dilation": None if self.dilation is None else list(self.dilation),
            "padding_mode": self.padding_mode,
            "bias": self.bias,
            "gain": self.gain,
            "offset": self.offset,
            "family_counts": dict(self.family_counts),
            "pattern": self.pattern,
            "compact_factor": self.compact_factor,
            "tied": self.tied,
        }
        return out

    @classmethod
    def from_json(cls, name: str, data: object) -> LayerRecord:
        r = _Reader(data, f"layers[{name!r}]")
        shape = r.ints("shape", 4, 1)
        padding = r.data.get("padding")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise _bad(f"{r.where}.padding", "must be 'same', 'valid' or two integers", padding)
        else:
            padding = r.ints("padding", 2, 0, optional=True)
        counts_r = r.obj("family_counts")
        counts = {}
        for code, n in counts_r.data.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise _bad(f"{counts_r.where}[{code!r}]", "must be an integer >= 0", n)
            counts[code] = n
        if sum(counts.values()) != shape[0] * shape[1]:
            raise _bad(
                f"{r.where}.family_counts",
                f"must add up to the layer's {shape[0] * shape[1]} kernels",
                counts,
            )
        return cls(
            name=name,
            shape=shape,
            groups=r.int("groups", 1, optional=True),
            stride=r.ints("stride", 2, 1, optional=True),
            padding=padding,
            dilation=r.ints("dilation", 2, 1, optional=True),
            padding_mode=_padding_mode(r),
            bias=r.bool("bias"),
            gain=r.bool("gain"),
            offset=r.bool("offset"),
            family_counts=counts,
            pattern=r.str("pattern"),
            compact_factor=r.number("compact_factor"),
            tied=bool(r.data.get("tied", False)),
        )


def _padding_mode(r: _Reader) -> str | None:
    mode = r.str("padding_mode", optional=True)
    if mode is not None and mode not in ("zeros", "reflect", "replicate", "circular"):
        raise _bad(f"{r.where}.padding_mode", "must be a torch padding mode", mode)
    return mode


@dataclass(frozen=True)
class AnaNNHeader:
    """Everything an AnaNN file says about itself, besides its tensors.

    Attributes:
        format_version: the file format's version (:data:`FORMAT_VERSION` when written).
        tool_version, torch_version, python_version: of the machine that converted.
        source_file, source_sha256: the source checkpoint's name and the sha256 of its bytes
            (for a model converted in memory: None and the sha256 of its tensors).
        arch: the architecture (a torchvision name, ``timm:NAME`` or a factory, see
            :mod:`acl_convert.io.arch`), or None when unknown.
        settings: the conversion settings, as used.
        layers: per converted layer, in network order.
        extra: other recorded sections by name (e.g. ``finetune``), kept as they are.
        tensors: every tensor the file holds, name -> (dtype name, shape), filled in when the
            file is written (:func:`acl_convert.io.anann.save_anann`); the reader refuses a
            file whose tensors differ. None for files written before the field existed.
    """

    source_file: str | None
    source_sha256: str | None
    arch: str | None
    settings: dict[str, Any]
    layers: dict[str, LayerRecord]
    format_version: int = FORMAT_VERSION
    tool_version: str = __version__
    torch_version: str = field(default_factory=lambda: torch.__version__)
    python_version: str = field(default_factory=platform.python_version)
    extra: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, tuple[str, tuple[int, ...]]] | None = None

    def to_json(self) -> str:
        doc = {
            "format": FORMAT,
            "format_version": self.format_version,
            "tool": "acl-convert",
            "tool_version": self.tool_version,
            "torch_version": self.torch_version,
            "python_version": self.python_version,
            "source": {"file": self.source_file, "sha256": self.source_sha256},
            "arch": self.arch,
            "settings": self.settings,
            "layers": {name: rec.to_json() for name, rec in self.layers.items()},
            **self.extra,
        }
        if self.tensors is not None:
            doc["tensors"] = {
                k: {"dtype": dtype, "shape": list(shape)}
                for k, (dtype, shape) in self.tensors.items()
            }
        # Sorted keys: two identical conversions write identical bytes.
        return json.dumps(doc, sort_keys=True)

    def with_extra(self, key: str, value: Any) -> AnaNNHeader:
        """A copy with one more recorded section (e.g. ``finetune``)."""
        return dataclasses.replace(self, extra={**self.extra, key: value})

    @classmethod
    def from_json(cls, text: str) -> AnaNNHeader:
        """Parse and check a header; every problem is a one-line :class:`UserError`."""
        try:
            data = json.loads(text)
        except RecursionError:
            raise UserError(f"AnaNN header: nested too deeply to be a header; {_FIX}") from None
        except ValueError as exc:
            raise UserError(f"AnaNN header is not valid JSON ({exc.msg}); {_FIX}") from None
        _check_depth(data)
        r = _Reader(data, "header")
        if r.data.get("format") != FORMAT:
            raise _bad("header.format", f"must be {FORMAT!r}", r.data.get("format"))
        version = r.int("format_version", 1)
        if version not in READABLE_VERSIONS:
            raise UserError(
                f"the AnaNN uses format version {version}, which this acl-convert "
                f"({__version__}) cannot read (it reads {', '.join(map(str, READABLE_VERSIONS))}); "
                "upgrade acl-convert"
            )
        source = r.obj("source")
        layers = r.obj("layers")
        known = {"format", "format_version", "tool", "tool_version", "torch_version"}
        known |= {"python_version", "source", "arch", "settings", "layers", "tensors"}
        return cls(
            source_file=source.str("file", optional=True),
            source_sha256=source.str("sha256", optional=True),
            arch=r.str("arch", optional=True),
            settings=r.obj("settings").data,
            layers={name: LayerRecord.from_json(name, rec) for name, rec in layers.data.items()},
            format_version=version,
            tool_version=r.str("tool_version"),
            torch_version=r.str("torch_version", optional=True) or "?",
            python_version=r.str("python_version", optional=True) or "?",
            extra={k: v for k, v in r.data.items() if k not in known},
            tensors=_manifest(r.obj("tensors", optional=True)),
        )

    def layer(self, name: str) -> LayerRecord:
        return self.layers[name]

    def __getitem__(self, key: str) -> Any:
        """Dict-style access to the JSON fields (``header["arch"]``), as older code read it."""
        return json.loads(self.to_json())[key]


def _manifest(r: _Reader | None) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    if r is None:
        return None
    out = {}
    for key in r.data:
        entry = r.obj(key)
        shape = entry.data.get("shape")
        if not isinstance(shape, list):
            raise _bad(f"{entry.where}.shape", "must be a list of integers >= 0", shape)
        out[key] = (entry.str("dtype"), entry.ints("shape", len(shape), 0))
    return out


def _check_depth(data: object, depth: int = 0) -> None:
    if depth > _MAX_DEPTH:
        raise UserError(f"AnaNN header: nested too deeply to be a header; {_FIX}")
    if isinstance(data, dict):
        for value in data.values():
            _check_depth(value, depth + 1)
    elif isinstance(data, list):
        for value in data:
            _check_depth(value, depth + 1)


def settings_dict(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as JSON values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
