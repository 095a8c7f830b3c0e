"""Plain kernel (paper Eq. 4): the ordinary kernel, its h*w values are its parameters."""

from __future__ import annotations

from .family import KernelFamily
from .registry import register


def _never_called(*_):  # KernelFamily.__call__ reshapes plain parameters itself
    raise AssertionError("plain kernels are not sampled from a formula")


PLAIN = register(
    KernelFamily(
        code="P",
        name="plain",
        params=(),
        formula=_never_called,
        colour=(255, 140, 0),
        plain=True,
        tex=r"W_{ij} = \phi_{(i-1)w + j}",
        doc="An ordinary convolution kernel: all h*w values are free parameters.",
    )
)
