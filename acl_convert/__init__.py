"""acl-convert: turn pretrained CNN convolutions into Analytic Convolutional Layers (ACLs).

Public names (SPEC §5): :mod:`acl_convert.kernels` (kernel families), :mod:`acl_convert.pattern`
(arrangement patterns, compact factor), :mod:`acl_convert.fit` (``fit_kernels``),
:class:`ACL` (the layer) and :func:`load_anann` (AnaNN checkpoints as modules).
"""

__version__ = "0.1.0"

from . import fit, kernels, pattern  # noqa: E402
from .io.anann import load_anann  # noqa: E402
from .nn.acl import ACL  # noqa: E402

__all__ = ["__version__", "ACL", "load_anann", "fit", "kernels", "pattern"]
