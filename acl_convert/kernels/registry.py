"""The one registry of kernel families, looked up by code (``G``) or name (``gabor``)."""

from __future__ import annotations

import zlib

from .family import KernelFamily

__all__ = ["register", "get", "families", "codes", "colour"]

_BY_CODE: dict[str, KernelFamily] = {}
_BY_NAME: dict[str, KernelFamily] = {}


def register(family: KernelFamily) -> KernelFamily:
    """Add a family; codes and names must be new (case-insensitively for names)."""
    if not isinstance(family, KernelFamily):
        raise TypeError(f"register() expects a KernelFamily, got {type(family).__name__}")
    if family.code in _BY_CODE:
        raise ValueError(f"a kernel family with code {family.code!r} is already registered")
    if family.name.lower() in _BY_NAME:
        raise ValueError(f"a kernel family named {family.name!r} is already registered")
    _BY_CODE[family.code] = family
    _BY_NAME[family.name.lower()] = family
    return family


def get(code_or_name: str) -> KernelFamily:
    """Look a family up by its code (case-sensitive: ``Lg`` vs ``Lt``) or name (any case)."""
    if isinstance(code_or_name, KernelFamily):
        return code_or_name
    if not isinstance(code_or_name, str):
        raise TypeError(f"family code or name must be a str, got {type(code_or_name).__name__}")
    fam = _BY_CODE.get(code_or_name) or _BY_NAME.get(code_or_name.lower())
    if fam is None:
        known = ", ".join(f"{f.code} ({f.name})" for f in _BY_CODE.values())
        raise KeyError(f"unknown kernel family {code_or_name!r}; known: {known}")
    return fam


def families() -> list[KernelFamily]:
    """All registered families, in registration order."""
    return list(_BY_CODE.values())


def codes() -> list[str]:
    """All registered codes, in registration order."""
    return list(_BY_CODE)


# A code the registry does not know (a file from a newer version) gets one of these, chosen by a
# stable hash of the code (not ``hash()``, which changes between runs), so the same code has the
# same colour in every picture.
_SPARE_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 150, 160),  # teal
    (140, 85, 40),  # brown
    (150, 150, 0),  # olive
    (110, 20, 50),  # maroon
    (100, 190, 240),  # sky blue
    (0, 0, 0),  # black
)


def colour(code: str) -> tuple[int, int, int]:
    """The RGB colour of family ``code`` in pictures (:attr:`KernelFamily.colour`); a code the
    registry does not know gets a fixed spare colour, so it never stops a picture."""
    fam = _BY_CODE.get(code)
    if fam is not None:
        return fam.colour
    return _SPARE_COLOURS[zlib.crc32(str(code).encode()) % len(_SPARE_COLOURS)]
