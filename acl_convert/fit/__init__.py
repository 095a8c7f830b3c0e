"""Fitting pretrained kernels to analytic families (SPEC §4).

``fit_kernels`` (in :mod:`.engine`) does the work; :mod:`.dictionary` is the grid
initialisation, :mod:`.lm` the batched refinement, :mod:`.result` the result and the selection.
"""

from .engine import DEFAULT_MEMORY, fit_kernels, resolve_device
from .result import SELECT_MODES, FitResult, Selection

__all__ = [
    "fit_kernels",
    "FitResult",
    "Selection",
    "SELECT_MODES",
    "resolve_device",
    "DEFAULT_MEMORY",
]
