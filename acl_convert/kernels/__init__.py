"""Kernel families of the Analytic Convolutional Layer, as data in one registry.

>>> import torch
>>> from acl_convert import kernels
>>> gabor = kernels.get("G")            # or kernels.get("gabor")
>>> gabor.param_names
('lambda', 'theta', 'psi', 'sigma')
>>> gabor(torch.tensor([[4.0, 0.3, 0.0, 1.5]]), 7, 7).shape
torch.Size([1, 7, 7])

Each family module registers itself on import. ``PAPER_FAMILIES`` fixes the order in which
the fitter, the report and the CLI list the paper's analytic families. ``EXTENDED_FAMILIES`` are
registered too but beyond the paper: they are fitted only when named (``--families``).
"""

# Registration side effect; the paper's families first, so they keep their registry order.
from . import gabor, log, lot, mean, plain, tgd  # noqa: F401  # isort: skip
from . import gabor_ext, gaussderiv  # noqa: F401  # isort: skip
from .family import KernelFamily, Param, grid
from .registry import codes, colour, families, get, register

#: The analytic families of the paper, in the order the fitter tries them by default.
PAPER_FAMILIES = ("G", "Lg", "Tf", "Ts", "Lt", "M")
#: Opt-in families beyond the paper (docs/kernels.md, "Extended families"); never a default.
EXTENDED_FAMILIES = ("Ge", "Dx", "Dxx")

__all__ = [
    "KernelFamily",
    "Param",
    "grid",
    "get",
    "register",
    "families",
    "codes",
    "colour",
    "PAPER_FAMILIES",
    "EXTENDED_FAMILIES",
]
