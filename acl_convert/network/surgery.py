"""Replacing a network's modules by name."""

from __future__ import annotations

from torch import nn

__all__ = ["set_submodule"]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at the dotted ``name`` of ``model`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
