"""acl-convert: turn pretrained CNN convolutions into Analytic Convolutional Layers (ACLs).

Public names (SPEC §5): :mod:`acl_convert.kernels`, :mod:`acl_convert.pattern`,
:mod:`acl_convert.fit`, :class:`ACL`, :func:`load_anann`.
"""

__version__ = "0.1.0"

from . import kernels, pattern  # noqa: E402

__all__ = ["__version__", "kernels", "pattern"]
