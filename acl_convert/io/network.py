"""A network from a file: an AnaNN or a plain checkpoint, with its architecture."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .anann import is_anann, load_anann, read_anann
from .arch import model_for, parse_arch
from .checkpoint import check_finite, load_checkpoint

__all__ = ["load_network"]


def load_network(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
    notes: list[str] | None = None,
) -> tuple[nn.Module, str]:
    """The network stored in ``path`` with its weights, and its architecture's spec.

    Args:
        path: an AnaNN (ACLs in place, trainable) or a plain checkpoint.
        arch: the architecture (see :mod:`acl_convert.io.arch`); default: recorded in the
            AnaNN, or detected from the checkpoint.
        trust_pickle: allow a checkpoint that needs full unpickling (runs the file's code).
        trust_code: allow a user-code architecture recorded in an AnaNN to be imported.
        notes: receives sentences on what was found.
    """
    notes = [] if notes is None else notes
    path = Path(path)
    if is_anann(path):
        ana = read_anann(path)
        recorded = ana.header.arch
        spec = parse_arch(arch).spec if arch else recorded
        if not arch and recorded:
            notes.append(f"architecture recorded in the AnaNN: {recorded}")
        return load_anann(ana, arch=arch, trust_code=trust_code), spec
    ckpt = load_checkpoint(path, trust_pickle=trust_pickle)
    check_finite(ckpt.state_dict, str(path), "repair or re-download it")
    notes.extend(ckpt.notes())
    spec, model = model_for(ckpt.state_dict, arch, notes, required=True, what=str(path))
    return model, spec
