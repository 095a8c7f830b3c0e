"""Reading a pretrained checkpoint into one flat state dict, safely.

Accepted: PyTorch files written by ``torch.save`` (zip or legacy format; ``.pth``, ``.pt``,
``.bin``, ``.ckpt``, any suffix) and ``.safetensors`` files. The format is told from the file's
first bytes, not its name. Torch files are read with ``weights_only=True``: a file that pickles
Python objects (a whole model, custom classes) is refused, because unpickling it would run code
from the file; ``trust_pickle=True`` (``--trust-pickle``) lifts that for files the user trusts.
There is no silent unsafe fallback.

The state dict is dug out of the usual wrappers (``{"state_dict": ...}``, ``{"model": ...}``,
...), and the ``module.`` (DistributedDataParallel), ``_orig_mod.`` (``torch.compile``) and
``model.`` (a Lightning module's network) prefixes are stripped when every key has them;
:meth:`Checkpoint.notes` says what was done. Every problem is a one-line :class:`UserError`
that names the file, the problem and the fix.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import UserError

__all__ = [
    "Checkpoint",
    "load_checkpoint",
    "save_state_dict",
    "safetensors_bytes",
    "check_finite",
    "sha256_file",
    "WRAPPER_KEYS",
    "PREFIXES",
]

#: Keys under which training code commonly nests the state dict, in the order they are tried:
#: the main weights before EMA copies.
WRAPPER_KEYS = (
    "state_dict",
    "model",
    "model_state_dict",
    "module",
    "net",
    "network",
    "weights",
    "ema",
    "model_ema",
    "params",
)

#: Key prefixes added by wrappers: DistributedDataParallel / DataParallel, torch.compile, and a
#: LightningModule holding the network as ``self.model``. Stripped only when every key has one.
PREFIXES = ("module.", "_orig_mod.", "model.")

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80
_FIX_CORRUPT = "re-download or re-export it"
_FIX_FORMAT = "give a PyTorch state dict (.pth, .pt, .bin) or a .safetensors file"
_TORCH_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt", ".tar", ".pkl"}
_CHECKPOINT_SUFFIXES = _TORCH_SUFFIXES | {".safetensors"}


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        path: the file read.
        state_dict: flat ``{key: tensor}`` on the CPU, wrappers and prefixes removed, in the file's
            order (safetensors files do not keep an order: their keys are sorted naturally, so
            ``features.2`` comes before ``features.10``).
        sha256: hex digest of the file's bytes (recorded in the AnaNN header).
        format: ``"torch"`` or ``"safetensors"``.
        nested_key: where the state dict was found, e.g. ``"state_dict"`` or
            ``"model/state_dict"`` for two levels; None when it was the top level.
        stripped_prefix: the prefix removed from every key (e.g. ``"module._orig_mod."``), or None.
        metadata: the safetensors header metadata; ``{}`` for torch files.
        dropped: entries that are not tensors and were left out (epoch counters, optimizer state,
            wrapper siblings such as ``"optimizer"``), with their nesting path.
    """

    path: Path
    state_dict: dict[str, Tensor]
    sha256: str
    format: str
    nested_key: str | None = None
    stripped_prefix: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    def notes(self) -> list[str]:
        """What unwrapping did, one sentence each (nothing when the file was a plain state
        dict)."""
        out = []
        if self.nested_key:
            out.append(f"{self.path.name}: took the state dict under {self.nested_key!r}")
        if self.stripped_prefix:
            out.append(f"{self.path.name}: stripped the key prefix {self.stripped_prefix!r}")
        if self.dropped:
            shown = ", ".join(self.dropped[:6]) + (", ..." if len(self.dropped) > 6 else "")
            out.append(f"{self.path.name}: left out {len(self.dropped)} other entries ({shown})")
        return out


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> Checkpoint:
    """Load a checkpoint file into a flat state dict on the CPU.

    Args:
        path: a file written by ``torch.save`` or a ``.safetensors`` file.
        trust_pickle: allow arbitrary pickled objects (``torch.load(weights_only=False)``). Only
            for files from a trusted source: unpickling can execute code. A pickled
            ``nn.Module`` then contributes its ``state_dict()``.

    Returns:
        A :class:`Checkpoint`.

    Raises:
        UserError: missing, unreadable, empty, truncated or corrupt file; not a checkpoint; a
            TorchScript archive; pickled objects without ``trust_pickle``; no tensors inside.
    """
    path = Path(path)
    head, size = _read_head(path)
    kind = _sniff(path, head, size)
    try:
        sha = sha256_file(path)
    except OSError as exc:
        raise UserError(f"{path} could not be read ({_reason(exc)}); check the file") from None
    if kind == "safetensors":
        tensors, metadata = _load_safetensors(path)
        # No order survives in a safetensors file (keys are stored sorted); natural order is the
        # closest to a module's registration order.
        state, prefix = _strip_prefixes({k: tensors[k] for k in sorted(tensors, key=_natural_key)})
        ckpt = Checkpoint(
            path, state, sha, "safetensors", stripped_prefix=prefix, metadata=metadata
        )
    else:
        obj = _load_torch(path, kind, trust_pickle)
        ckpt = _from_object(path, obj, sha)
    if not ckpt.state_dict:
        raise UserError(f"{path} does not contain any tensors; is it a checkpoint? {_FIX_FORMAT}")
    return ckpt


def save_state_dict(path: str | os.PathLike, state: dict[str, Tensor]) -> Path:
    """Write a plain state dict atomically: ``.safetensors`` by suffix, else ``torch.save``'s
    format. The same tensors always give the same bytes (keys sorted; torch's archive is
    written through a file object, so no temporary file name ends up inside it). Refuses
    NaN and Inf values."""
    from .outputs import write_atomic

    path = Path(path)
    check_finite(state, "the state dict to write", "nothing was written")
    data = {k: state[k].detach().contiguous() for k in sorted(state)}
    if path.suffix == ".safetensors":
        return write_atomic(path, lambda tmp: tmp.write_bytes(safetensors_bytes(data)))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(data, f)

    return write_atomic(path, write)


def safetensors_bytes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None):
    """A safetensors file's bytes, the same for the same tensors and metadata. (The safetensors
    library writes metadata keys in a random order per process, so its header is rewritten
    with sorted keys; tensor entries and data stay as written.)"""
    import json
    import struct

    import safetensors.torch

    raw = safetensors.torch.save(dict(tensors), metadata=dict(metadata) if metadata else None)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    if meta is not None:
        header = {"__metadata__": dict(sorted(meta.items())), **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns tensor data to 8 bytes
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def check_finite(state: Mapping[str, Tensor], what: str, fix: str) -> None:
    """Raise a one-line :class:`UserError` when a floating-point (or complex) tensor of
    ``state`` holds NaN or Inf: ``<what> has NaN or Inf values in <key> (and N more); <fix>``."""
    bad = [
        k
        for k, v in state.items()
        if isinstance(v, Tensor)
        and (v.is_floating_point() or v.is_complex())
        and not bool(torch.isfinite(v).all())
    ]
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise UserError(f"{what} has NaN or Inf values in {bad[0]}{more}; {fix}")


def _read_head(path: Path) -> tuple[bytes, int]:
    """The first bytes of the file (enough to tell its format) and its size."""
    if not path.exists():
        raise UserError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a checkpoint file; give the file inside it")
    try:
        with open(path, "rb") as f:
            head = f.read(64)
        size = path.stat().st_size
    except PermissionError:
        raise UserError(
            f"{path} is not readable (permission denied); fix its permissions "
            "(chmod u+r) or copy it somewhere readable"
        ) from None
    except OSError as exc:
        raise UserError(f"{path} could not be read ({_reason(exc)}); check the file") from None
    return head, size


def _sniff(path: Path, head: bytes, size: int) -> str:
    """``"zip"`` / ``"pickle"`` (torch formats) or ``"safetensors"``, from the magic bytes."""
    if size == 0:
        raise UserError(f"{path} is empty (0 bytes); {_FIX_CORRUPT}")
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head[0] == _PICKLE_PROTO:
        return "pickle"
    # safetensors: 8-byte little-endian header length, then the JSON header.
    if len(head) > 8 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 8 + header_len > size:
            raise UserError(
                f"{path} is truncated or corrupt (its safetensors header needs "
                f"{8 + header_len} bytes, the file has {size}); {_FIX_CORRUPT}"
            )
        return "safetensors"
    text = _as_text(head)
    if text is not None and text.startswith("version https://git-lfs"):
        raise UserError(
            f"{path} is a Git LFS pointer, not the checkpoint itself; fetch the file "
            "with `git lfs pull`"
        )
    if text is not None and text.lstrip().lower().startswith(("<!doctype html", "<html")):
        raise UserError(
            f"{path} is an HTML page, not a checkpoint (the download probably "
            "failed); download the file again"
        )
    if text is None and path.suffix.lower() in _CHECKPOINT_SUFFIXES:
        raise UserError(
            f"{path} is truncated or corrupt (not a zip, pickle or safetensors "
            f"file); {_FIX_CORRUPT}"
        )
    what = "a text file" if text is not None else "an unknown file format"
    raise UserError(f"{path} is not a checkpoint ({what}); {_FIX_FORMAT}")


def _as_text(head: bytes) -> str | None:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character may be cut at the end of the 64 bytes.
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return None
    return text if all(c.isprintable() or c.isspace() for c in text) else None


def _load_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error type for every kind of damage
        raise UserError(
            f"{path} is truncated or corrupt ({_reason(exc)}); {_FIX_CORRUPT}"
        ) from None
    return tensors, metadata


def _load_torch(path: Path, kind: str, trust_pickle: bool) -> object:
    if kind == "zip":
        _check_zip(path)
    try:
        with warnings.catch_warnings():
            # torch warns about odd pickle protocols and TorchScript dispatch; the errors below
            # say what matters.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if not trust_pickle and refused and (kind == "zip" or _legacy_pickles_intact(path)):
            raise UserError(
                f"{path} contains pickled Python objects ({refused.group(1)}), not only "
                "tensors (e.g. a whole model); loading it would execute code from the file. If "
                "you trust its source, pass --trust-pickle; otherwise re-save just the weights "
                "with torch.save(model.state_dict(), ...)"
            ) from None
        raise UserError(
            f"{path} is truncated or corrupt ({_reason(exc)}); {_FIX_CORRUPT}"
        ) from None
    except (AttributeError, ImportError) as exc:
        if not trust_pickle:
            raise UserError(
                f"{path} is truncated or corrupt ({_reason(exc)}); {_FIX_CORRUPT}"
            ) from None
        # The pickle names a class this Python cannot import.
        raise UserError(
            f"{path} pickles objects whose code is not importable here "
            f"({_reason(exc)}); run where that code is importable, or re-save the "
            "file with torch.save(model.state_dict(), ...)"
        ) from None
    except Exception as exc:
        # Damaged bytes make the unpickler fail in many ways (EOFError, struct.error, KeyError,
        # RuntimeError from the zip reader, ...): all of them mean the file is not intact.
        raise UserError(
            f"{path} is truncated or corrupt ({_reason(exc)}); {_FIX_CORRUPT}"
        ) from None


def _legacy_pickles_intact(path: Path) -> bool:
    """Whether the four pickles a legacy ``torch.save`` file starts with (magic number,
    protocol, system info, the object) parse to the end. A file cut inside a class name makes
    ``torch.load`` report an unknown class; that is damage, not a pickle to refuse. Parsing
    opcodes imports and runs nothing."""
    try:
        with open(path, "rb") as f:
            for _ in range(4):
                for _op in pickletools.genops(f):
                    pass
    except (ValueError, EOFError, UnicodeDecodeError):
        return False
    return True


def _check_zip(path: Path) -> None:
    """Validate the zip's central directory (a cut-off file loses it) and refuse TorchScript."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise UserError(
            f"{path} is truncated or corrupt (its zip directory is missing or "
            f"damaged); {_FIX_CORRUPT}"
        ) from None
    if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
        raise UserError(
            f"{path} is a TorchScript archive, not a state dict; load the model in "
            "Python and save torch.save(model.state_dict(), ...) instead"
        )


def _from_object(path: Path, obj: object, sha: str) -> Checkpoint:
    """Unwrap the loaded object into a flat tensor dict and record what was done."""
    nesting: list[str] = []
    dropped: list[str] = []
    while True:
        if isinstance(obj, nn.Module):  # reachable only with trust_pickle
            obj = obj.state_dict()
        if not isinstance(obj, Mapping):
            break
        inner_key = _wrapper_key(obj)
        if inner_key is None:
            break
        dropped += [_joined(nesting, k) for k in obj if k != inner_key]
        nesting.append(str(inner_key))
        obj = obj[inner_key]
    if isinstance(obj, Tensor):
        raise UserError(
            f"{path} holds a single tensor, not a state dict of named tensors; "
            "save model.state_dict() instead"
        )
    if not isinstance(obj, Mapping):
        raise UserError(
            f"{path} does not contain any tensors (it holds a "
            f"{type(obj).__name__}); is it a checkpoint? {_FIX_FORMAT}"
        )
    state = {}
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, Tensor):
            state[key] = value
        else:
            dropped.append(_joined(nesting, key))
    state, prefix = _strip_prefixes(state)
    return Checkpoint(
        path,
        state,
        sha,
        "torch",
        nested_key="/".join(nesting) or None,
        stripped_prefix=prefix,
        dropped=dropped,
    )


def _wrapper_key(obj: Mapping) -> str | None:
    """The first wrapper key whose value holds more tensors than this level itself does."""
    here = sum(isinstance(v, Tensor) for v in obj.values())
    for key in WRAPPER_KEYS:
        value = obj.get(key)
        if isinstance(value, (Mapping, nn.Module)) and _count_tensors(value) > here:
            return key
    return None


def _count_tensors(obj: object) -> int:
    if isinstance(obj, Tensor):
        return 1
    if isinstance(obj, nn.Module):
        return len(obj.state_dict())
    if isinstance(obj, Mapping):
        return sum(_count_tensors(v) for v in obj.values())
    return 0


def _strip_prefixes(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], str | None]:
    """Remove ``module.`` / ``_orig_mod.`` while every key has one (they may be stacked)."""
    stripped = ""
    while state:
        prefix = next(
            (p for p in PREFIXES if all(k.startswith(p) and len(k) > len(p) for k in state)), None
        )
        if prefix is None:
            break
        state = {k[len(prefix) :]: v for k, v in state.items()}
        stripped += prefix
    return state, stripped or None


def _joined(nesting: list[str], key: object) -> str:
    return "/".join([*nesting, str(key)])


def _natural_key(key: str) -> list:
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key)
    ]


def _reason(exc: BaseException) -> str:
    """The first line of an exception message, shortened: enough to recognise, one line."""
    text = str(exc).strip()
    # torch's weights-only errors open with advice that does not apply; the cause comes last.
    text = text.rpartition("WeightsUnpickler error:")[2].strip() or type(exc).__name__
    text = text.splitlines()[0]
    text = text.split(". ")[0]
    return text if len(text) <= 100 else text[:97] + "..."
