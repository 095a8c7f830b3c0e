"""The AnaNN checkpoint: a safetensors file plus a JSON header describing the conversion.

Tensors: every tensor of the source state dict, except that each converted convolution's
``<layer>.weight`` is replaced by its ACL's tensors: ``<layer>.akp.<code>`` (unconstrained AKPs,
see :meth:`KernelFamily.from_unconstrained`), ``<layer>.gain.<code>``, ``<layer>.offset.<code>``,
``<layer>.akp_row_<code>`` (only for a family whose kernels share AKP rows) and ``<layer>.plain``;
``<layer>.bias`` is kept. Which kernel has which family is one ``uint8`` tensor per layer,
``<layer>.family`` (format version 2; the family codes in the layer's header record), which the
reader expands into the ACL's ``index_<code>`` buffers (version 1 files stored those directly).

Header (safetensors metadata, one JSON string under ``acl_convert``): :class:`AnaNNHeader`.

Reading never trusts the file: the header is checked field by field, then every layer's tensors
against the header's own claims (present, dtype, shape, index ranges, finite values) before
anything is built, and every problem is a one-line :class:`UserError` naming what is wrong.
See ``docs/anann-format.md``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
from torch import Tensor, nn

from .. import kernels
from ..errors import UserError, option
from ..network.surgery import set_submodule
from ..nn.acl import ACL
from .checkpoint import check_finite, safetensors_bytes
from .header import FORMAT, FORMAT_VERSION, AnaNNHeader, LayerRecord
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
]

_HEADER_KEY = "acl_convert"
# The state-dict keys of an ACL (see nn/acl.py), relative to the layer.
_ACL_KEY = re.compile(r"^((akp|gain|offset)\.[^.]+|(index|akp_row)_[^.]+|plain|bias|family)$")
_FIX = "the file is damaged; convert the checkpoint again"


@dataclass
class AnaNNFile:
    """An AnaNN checkpoint read from disk and checked: its tensors (in the AnaNN module's
    state-dict form, ``index_<code>`` buffers included, whatever the file's version) and its
    header."""

    tensors: dict[str, Tensor]
    header: AnaNNHeader

    @property
    def layers(self) -> dict[str, LayerRecord]:
        """Converted layers: name -> recorded hyper-parameters and statistics."""
        return self.header.layers

    def layer_tensors(self, name: str) -> dict[str, Tensor]:
        """The ACL state dict of layer ``name`` (keys without the layer prefix)."""
        return _layer_tensors(self.tensors, name)


def _layer_tensors(tensors: Mapping[str, Tensor], name: str) -> dict[str, Tensor]:
    prefix = name + "."
    return {
        k[len(prefix) :]: v
        for k, v in tensors.items()
        if k.startswith(prefix) and _ACL_KEY.match(k[len(prefix) :])
    }


def save_anann(path: str | Path, tensors: Mapping[str, Tensor], header: AnaNNHeader) -> Path:
    """Write an AnaNN checkpoint atomically. ``tensors`` is the AnaNN module's state dict;
    each converted layer's ``index_<code>`` buffers are stored as one ``uint8`` family map."""
    data = {}
    for name, record in header.layers.items():
        layer = _layer_tensors(tensors, name)
        codes = family_map(record)
        family = torch.zeros(record.num_kernels, dtype=torch.uint8)
        for j, code in enumerate(codes):
            if f"index_{code}" in layer:
                family[layer[f"index_{code}"].long()] = j
        data[f"{name}.family"] = family
    for key, value in tensors.items():
        layer, _, local = key.rpartition(".")
        if local.startswith("index_") and layer in header.layers:
            continue
        # safetensors refuses shared or non-contiguous storage; a state dict often has both.
        data[key] = value.detach().contiguous().clone()
    check_finite(data, "the AnaNN to write", "it was not written")
    # Whatever version the header was read from, the file is written in this one, and lists
    # what it holds.
    manifest = {k: (_dtype_name(v), tuple(v.shape)) for k, v in sorted(data.items())}
    header = dataclasses.replace(header, format_version=FORMAT_VERSION, tensors=manifest)
    # Sorted: two identical conversions write identical bytes.
    meta = {"format": FORMAT, _HEADER_KEY: header.to_json()}
    content = safetensors_bytes(dict(sorted(data.items())), meta)
    return write_atomic(path, lambda tmp: tmp.write_bytes(content))


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _check_manifest(tensors: Mapping[str, Tensor], header: AnaNNHeader) -> None:
    """The file holds exactly the tensors its header lists, each with the listed dtype and
    shape (files from before the list existed are not checked here)."""
    if header.tensors is None:
        return
    for key, (dtype, shape) in header.tensors.items():
        value = tensors.get(key)
        if value is None:
            raise UserError(f"tensor {key} is missing; {_FIX}")
        if (_dtype_name(value), tuple(value.shape)) != (dtype, shape):
            raise UserError(
                f"tensor {key} is {_dtype_name(value)} {tuple(value.shape)}, the header says "
                f"{dtype} {shape}; {_FIX}"
            )
    extra = sorted(set(tensors) - set(header.tensors))
    if extra:
        raise UserError(f"tensor {extra[0]} is not listed in the header; {_FIX}")


def family_map(record: LayerRecord) -> list[str]:
    """The family codes of a layer's ``uint8`` family map, by value: the recorded families in
    sorted order (what a version 2 file stores)."""
    return sorted(record.family_counts)


def is_anann(path: str | Path) -> bool:
    """True when ``path`` is a safetensors file marked as an AnaNN or holding an acl-convert
    header (a damaged AnaNN is still one: :func:`read_anann` says what is wrong with it)."""
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            return meta.get("format") == FORMAT or _HEADER_KEY in meta
    except Exception:  # not safetensors at all: simply not an AnaNN
        return False


def read_anann(path: str | Path) -> AnaNNFile:
    """Read and check tensors and header; a file that is not an intact AnaNN is a
    :class:`UserError` naming the problem."""
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
    try:
        header = AnaNNHeader.from_json(meta[_HEADER_KEY])
        _check_manifest(tensors, header)
        tensors = _checked_tensors(tensors, header)
    except UserError as exc:
        raise UserError(f"{path}: {exc.cli_message()}") from None
    return AnaNNFile(tensors=tensors, header=header)


def _checked_tensors(tensors: dict[str, Tensor], header: AnaNNHeader) -> dict[str, Tensor]:
    """The state dict the file stands for, after checking every converted layer's tensors
    against its record and every floating-point tensor for NaN and Inf."""
    out = dict(tensors)
    for name, record in header.layers.items():
        layer = _layer_tensors(tensors, name)
        if header.format_version >= 2:
            indices = _indices_from_map(name, record, layer)
            del out[f"{name}.family"]
            out.update({f"{name}.index_{c}": idx for c, idx in indices.items()})
        else:
            indices = _indices_v1(name, record, layer)
        _check_layer(name, record, layer, indices)
    check_finite(out, "the file", _FIX)
    _check_akp_range(header, tensors)
    return out


def _check_akp_range(header: AnaNNHeader, tensors: dict[str, Tensor]) -> None:
    """Stored AKPs are unconstrained (a positive AKP as its logarithm): finite there, they may
    still overflow in the paper's units (``exp(1000)``), which no conversion writes."""
    for name in header.layers:
        for key, value in _layer_tensors(tensors, name).items():
            if key.startswith("akp."):
                fam = kernels.get(key[len("akp.") :])
                if not bool(torch.isfinite(fam.from_unconstrained(value.double())).all()):
                    raise UserError(f"tensor {name}.{key} holds AKPs out of range; {_FIX}")


def _indices_from_map(name: str, record: LayerRecord, layer: dict) -> dict[str, Tensor]:
    codes = family_map(record)
    fam = layer.get("family")
    if fam is None:
        raise UserError(f"tensor {name}.family is missing; {_FIX}")
    if fam.dtype != torch.uint8 or tuple(fam.shape) != (record.num_kernels,):
        raise UserError(
            f"tensor {name}.family must be uint8 of shape ({record.num_kernels},), got "
            f"{fam.dtype} {tuple(fam.shape)}; {_FIX}"
        )
    if len(fam) and int(fam.max()) >= len(codes):
        raise UserError(
            f"tensor {name}.family has family number {int(fam.max())}, but the layer records "
            f"{len(codes)} families; {_FIX}"
        )
    fam = fam.long()
    return {c: (fam == j).nonzero()[:, 0] for j, c in enumerate(codes)}


def _indices_v1(name: str, record: LayerRecord, layer: dict) -> dict[str, Tensor]:
    indices = {k[len("index_") :]: v for k, v in layer.items() if k.startswith("index_")}
    seen = torch.zeros(record.num_kernels, dtype=torch.long)
    for code, idx in indices.items():
        if idx.dtype != torch.int64 or idx.ndim != 1:
            raise UserError(f"tensor {name}.index_{code} must be 1-D int64; {_FIX}")
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= record.num_kernels):
            raise UserError(f"tensor {name}.index_{code} points outside the layer; {_FIX}")
        seen.index_add_(0, idx, torch.ones_like(idx))
    if not bool((seen == 1).all()):
        raise UserError(f"the index tensors of layer {name} do not cover each kernel once; {_FIX}")
    return indices


def _check_layer(name: str, rec: LayerRecord, layer: dict, indices: dict[str, Tensor]) -> None:
    """Every tensor an ACL of this record needs is there with the right dtype and shape."""
    h, w = rec.shape[2:]
    expected: dict[str, tuple | None] = {}
    for code, idx in indices.items():
        try:
            fam = kernels.get(code)
        except KeyError:
            raise UserError(
                f"layer {name} uses family {code!r}, which this acl-convert does not know; "
                "upgrade acl-convert or convert again"
            ) from None
        if len(idx) != rec.family_counts.get(code, -1):
            raise UserError(
                f"layer {name}: family {code} has {len(idx)} kernels, the header says "
                f"{rec.family_counts.get(code, 0)}; {_FIX}"
            )
        n = len(idx)
        if fam.plain:
            expected["plain"] = (n, h, w)
            continue
        rows = layer.get(f"akp_row_{code}")
        n_rows = n
        if rows is not None:
            if rows.dtype != torch.int64 or tuple(rows.shape) != (n,):
                raise UserError(f"tensor {name}.akp_row_{code} must be int64 ({n},); {_FIX}")
            n_rows = int(rows.max()) + 1 if n else 0
            expected[f"akp_row_{code}"] = (n,)
        if fam.num_params:
            expected[f"akp.{code}"] = (n_rows, fam.num_params)
        if rec.gain:
            expected[f"gain.{code}"] = (n,)
        if fam.carries_offset(rec.offset, rec.gain):
            expected[f"offset.{code}"] = (n,)
    if rec.bias:
        expected["bias"] = (rec.shape[0],)
    for key, shape in expected.items():
        value = layer.get(key)
        if value is None:
            raise UserError(f"tensor {name}.{key} is missing; {_FIX}")
        if not key.startswith("akp_row") and not value.is_floating_point():
            raise UserError(
                f"tensor {name}.{key} must be floating point, got {value.dtype}; {_FIX}"
            )
        if tuple(value.shape) != shape:
            raise UserError(
                f"tensor {name}.{key} must have shape {shape}, got {tuple(value.shape)}; {_FIX}"
            )
    extra = sorted(set(layer) - set(expected) - {"family"} - {f"index_{c}" for c in indices})
    if extra:
        raise UserError(f"tensor {name}.{extra[0]} does not belong to the layer's record; {_FIX}")


def build_layer(
    record: LayerRecord, layer_tensors: Mapping[str, Tensor], conv: nn.Conv2d | None = None
) -> ACL:
    """An :class:`ACL` shaped like the recorded layer (hyper-parameters from ``conv`` when given,
    else from the record), not yet loaded with values. Families with ``akp_row_<code>`` tensors
    get their shared AKP rows back."""
    co, cig, h, w = record.shape
    codes = [""] * record.num_kernels
    for key, idx in layer_tensors.items():
        if key.startswith("index_"):
            for k in idx.tolist():
                codes[k] = key[len("index_") :]
    akp_rows = {
        k[len("akp_row_") :]: t for k, t in layer_tensors.items() if k.startswith("akp_row_")
    }
    if conv is not None:
        if tuple(conv.weight.shape) != (co, cig, h, w):
            raise UserError(
                f"layer {record.name}: the model's conv has weight shape "
                f"{tuple(conv.weight.shape)} but the AnaNN was converted from {(co, cig, h, w)}; "
                "give the architecture the checkpoint was trained with"
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
        groups = record.groups or 1
        args = dict(
            stride=record.stride or 1,
            padding=record.padding if record.padding is not None else 0,
            dilation=record.dilation or 1,
            groups=groups,
            bias=record.bias,
            padding_mode=record.padding_mode or "zeros",
        )
        in_channels = cig * groups
    try:
        return ACL(
            in_channels,
            co,
            (h, w),
            **args,
            assignment=codes,
            gain=record.gain,
            offset=record.offset,
            akp_rows=akp_rows,
            device="meta",
        )
    except ValueError as exc:  # only a damaged file has rows the layer cannot take
        raise UserError(f"AnaNN layer {record.name} is corrupt ({exc}); {_FIX}") from None


def load_anann(
    path: str | Path | AnaNNFile,
    model: nn.Module | None = None,
    *,
    arch: str | None = None,
    trust_code: bool = False,
) -> nn.Module:
    """Load an AnaNN checkpoint as an ``nn.Module`` with :class:`ACL` layers in place.

    Args:
        path: the ``.anann.safetensors`` file (or one already read with :func:`read_anann`).
        model: the network to patch (its converted convs are replaced by ACLs, then every tensor
            is loaded strictly).
        arch: without ``model``: the architecture to build (see :mod:`acl_convert.io.arch`);
            default: the one recorded in the file.
        trust_code: allow building a recorded architecture that is user code
            (``file.py:Factory``); importing it runs it, so a file's header alone never does.

    Returns:
        The model, with trainable AKPs, gains, offsets and plain kernels.
    """
    ana = path if isinstance(path, AnaNNFile) else read_anann(path)
    what = "the AnaNN" if isinstance(path, AnaNNFile) else str(path)
    if model is None:
        from .arch import build_recorded  # model building only when needed

        model = build_recorded(ana.header.arch, arch, trust_code=trust_code, what=what)
    for name, record in ana.layers.items():
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            raise UserError(
                f"the model has no module {name!r}, which the AnaNN converted; give "
                "the architecture the checkpoint was made for"
            ) from None
        if not isinstance(conv, (nn.Conv2d, ACL)):
            raise UserError(
                f"module {name!r} of the model is a {type(conv).__name__}, not a "
                "Conv2d; give the architecture the checkpoint was made for"
            )
        layer = build_layer(
            record, ana.layer_tensors(name), conv if isinstance(conv, nn.Conv2d) else None
        )
        device = next(iter(conv.parameters())).device
        set_submodule(model, name, layer.to_empty(device=device))
    try:
        model.load_state_dict(ana.tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise UserError(
            f"{what} does not fit the given model: {detail}; "
            f"give the architecture the checkpoint was made for ({option('arch', 'NAME')})"
        ) from None
    return model


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
            weight = layer.synthesize().detach().clone()
        if not bool(torch.isfinite(weight).all()):
            raise UserError(f"layer {name} synthesises NaN or Inf weights; {_FIX}")
        out[f"{name}.weight"] = weight
    return out
