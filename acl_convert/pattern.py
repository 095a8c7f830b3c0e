"""Arrangement patterns (paper §3.3, Eqs. 9-10) and the compact factor (paper Eq. 25).

An arrangement pattern says which kernel family each kernel of a layer belongs to. Kernel ``k`` is
``weight.view(-1, h, w)[k]`` (``k = q * (Ci/groups) + p`` for output ``q`` and input ``p``), and a
pattern hands out families to *consecutive* kernels, in order. Two forms exist:

* **counts** (Eq. 9): ``(3x64)G30Lg15Lt15Tf36P96`` -- 30 Gabor kernels (k = 0..29), then 15 LoG,
  15 LoT, 36 TGD1st and 96 plain kernels. The counts are integers (no decimal point) and must sum
  to ``Ci * Co`` when the prefix is given.
* **ratios** (Eq. 10): ``G0.1562Lg0.0781Lt0.0781Tf0.1875P0.5`` -- fractions of the layer's
  kernels (decimal point required), summing to 1 within :data:`RATIO_TOLERANCE`. They become
  counts for a given number of kernels by the largest-remainder rule (:func:`to_counts`).

The ``(Ci x Co)`` prefix is optional in both forms; its separator may be ``x``, ``X`` or ``×``.
Whitespace between tokens is ignored. A code is any code in the kernel registry
(:func:`acl_convert.kernels.codes`), so a newly registered family is usable in patterns at once.
A code may appear more than once (``G10P5G10``); runs are kept in order, never merged.

The compact factor (Eq. 25) is ``1 - (learnable kernel parameters) / (Co * Ci/groups * h * w)``:
an analytic kernel contributes its AKPs plus one for a gain and one for an offset where present,
a plain kernel ``h * w``; the bias is excluded (SPEC §3). Kernels sharing one row of AKPs
(channel-tied ACKs, :func:`compact_factor_tied`) count those AKPs once.

>>> parse("(3x64)G30Lg15Lt15Tf36P96")
[('G', 30), ('Lg', 15), ('Lt', 15), ('Tf', 36), ('P', 96)]
>>> to_counts("G0.1562Lg0.0781Lt0.0781Tf0.1875P0.5", 192)
[('G', 30), ('Lg', 15), ('Lt', 15), ('Tf', 36), ('P', 96)]
>>> round(compact_factor("G30Lg15Lt15Tf36P96", 7, 7), 4)
0.4726
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

from . import kernels

__all__ = [
    "RATIO_TOLERANCE",
    "Pattern",
    "parse",
    "parse_full",
    "to_counts",
    "expand",
    "run_length",
    "totals",
    "format_counts",
    "format_ratios",
    "params_per_kernel",
    "compact_factor_counts",
    "parameter_count_tied",
    "compact_factor_tied",
    "compact_factor",
]

#: How far the ratios of a ratio-form pattern may sum from 1. The paper prints ratios rounded to
#: four digits (``G0.1562Lg0.0781Lt0.0781Tf0.1875P0.5`` sums to 0.9999), so exact equality would
#: reject its own examples.
RATIO_TOLERANCE = 1e-3

Number = int | float
Item = tuple[str, Number]

_PREFIX = re.compile(r"\(\s*(\d+)\s*[xX×]\s*(\d+)\s*\)")
# A count has no decimal point, a ratio has one; the form is read from the text, not the value,
# so ``G1.0`` is a ratio and ``G1`` a count.
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_WS = re.compile(r"\s*")


@dataclass(frozen=True)
class Pattern:
    """A parsed arrangement pattern.

    Attributes:
        items: ``(code, n)`` runs in kernel order; ``n`` is an ``int`` count (counts form) or a
            ``float`` ratio (ratio form).
        in_channels: ``Ci`` of the ``(Ci x Co)`` prefix (input channels per group), or ``None``.
        out_channels: ``Co`` of the prefix, or ``None``.
        is_ratio: True for the ratio form (Eq. 10), False for the counts form (Eq. 9).
    """

    items: tuple[Item, ...]
    in_channels: int | None = None
    out_channels: int | None = None
    is_ratio: bool = False

    @property
    def total(self) -> int | None:
        """Number of kernels the pattern describes: ``Ci * Co`` if the prefix is given, else the
        sum of the counts (counts form), else ``None`` (a ratio form fits any layer)."""
        if self.in_channels is not None and self.out_channels is not None:
            return self.in_channels * self.out_channels
        if not self.is_ratio:
            return sum(int(n) for _, n in self.items)
        return None


# --- parsing -------------------------------------------------------------------------------


def _known_codes() -> list[str]:
    # Read the registry on every call: families registered after this module was imported must
    # work too. Longest first, so that ``Lg`` is not read as a code ``L`` followed by junk.
    return sorted(kernels.codes(), key=lambda c: (-len(c), c))


def _expected_codes() -> str:
    return ", ".join(kernels.codes())


def _fragment(text: str, pos: int) -> str:
    """The offending token at ``pos``: a run of letters, or else one character."""
    m = re.compile(r"[A-Za-z]+").match(text, pos)
    return m.group(0) if m else text[pos]


def _match_code(text: str, pos: int, codes: list[str]) -> str | None:
    for code in codes:
        if text.startswith(code, pos):
            return code
    return None


def parse_full(text: str) -> Pattern:
    """Parse a pattern in counts (Eq. 9) or ratio (Eq. 10) form, keeping the prefix.

    Args:
        text: e.g. ``"(3x64)G30Lg15Lt15Tf36P96"`` or ``"G0.1562Lg0.0781Lt0.0781Tf0.1875P0.5"``.

    Returns:
        A :class:`Pattern`.

    Raises:
        TypeError: ``text`` is not a string.
        ValueError: the pattern is malformed; the message quotes the offending part of ``text``
            and says what was expected.
    """
    if not isinstance(text, str):
        raise TypeError(f"a pattern must be a str, got {type(text).__name__}")
    codes = _known_codes()
    ci, co, pos = _parse_prefix(text)
    items: list[Item] = []
    tokens: list[str] = []  # each item as written, for error messages
    while True:
        pos = _WS.match(text, pos).end()
        if pos >= len(text):
            break
        code, value, end = _parse_item(text, pos, codes)
        items.append((code, value))
        tokens.append(text[pos:end])
        pos = end

    if not items:
        raise ValueError(
            f"empty pattern {text!r}; expected kernel codes with counts or ratios, "
            "e.g. 'G30Lg15Lt15Tf36P96' or 'G0.25P0.75'"
        )

    kinds = [isinstance(v, float) for _, v in items]
    if any(kinds) and not all(kinds):
        first_ratio = tokens[kinds.index(True)]
        first_count = tokens[kinds.index(False)]
        raise ValueError(
            f"pattern {text!r} mixes counts and ratios ({first_count!r} is a count, "
            f"{first_ratio!r} is a ratio); expected all counts (no decimal point) or all ratios"
        )
    is_ratio = all(kinds)

    if is_ratio:
        _check_ratio_sum([v for _, v in items], text)
    elif ci is not None:
        s = sum(int(v) for _, v in items)
        if s != ci * co:
            raise ValueError(
                f"counts in {text!r} sum to {s}, but the prefix {_prefix_text(ci, co)!r} needs "
                f"{ci}*{co} = {ci * co} kernels"
            )
    return Pattern(tuple(items), ci, co, is_ratio)


def _parse_prefix(text: str) -> tuple[int | None, int | None, int]:
    """``Ci`` and ``Co`` of the ``(Ci x Co)`` prefix of ``text`` (None, None without one) and
    the position after it."""
    pos = _WS.match(text, 0).end()
    if not text.startswith("(", pos):
        return None, None, pos
    m = _PREFIX.match(text, pos)
    if m is None:
        close = text.find(")", pos)
        bad = text[pos : close + 1] if close >= 0 else text[pos:]
        raise ValueError(
            f"bad channel prefix {bad!r} at position {pos} in {text!r}; "
            "expected '(Ci x Co)' with two positive integers, e.g. '(3x64)'"
        )
    ci, co = int(m.group(1)), int(m.group(2))
    if ci < 1 or co < 1:
        raise ValueError(
            f"bad channel prefix {m.group(0)!r} in {text!r}; channel numbers must be >= 1"
        )
    return ci, co, m.end()


def _parse_item(text: str, pos: int, codes: list[str]) -> tuple[str, Number, int]:
    """The item (code, then count or ratio) at ``pos`` in ``text``: its code, its number and the
    position after it. ``codes`` are the known codes, longest first."""
    code = _match_code(text, pos, codes)
    if code is None and text.startswith("(", pos):
        raise ValueError(
            f"misplaced channel prefix {text[pos:]!r} at position {pos} in {text!r}; "
            "expected the '(Ci x Co)' prefix only at the start of the pattern"
        )
    if code is None:
        raise ValueError(
            f"unknown kernel code {_fragment(text, pos)!r} at position {pos} in {text!r}; "
            f"expected one of {_expected_codes()}"
        )
    after = pos + len(code)
    if after < len(text) and text[after].isalpha() and _match_code(text, after, codes) is None:
        # ``Gx30``: the letters run on past a valid code into something unknown, so the whole
        # run, not the code, is what the user mistyped.
        raise ValueError(
            f"unknown kernel code {_fragment(text, pos)!r} at position {pos} in {text!r}; "
            f"expected one of {_expected_codes()}"
        )
    npos = _WS.match(text, after).end()
    if text.startswith("-", npos):
        m = _NUMBER.match(text, npos + 1)
        bad = text[pos : m.end()] if m else text[pos : npos + 1]
        raise ValueError(
            f"negative count or ratio {bad!r} at position {pos} in {text!r}; "
            "expected a positive number after the code"
        )
    m = _NUMBER.match(text, npos)
    if m is None:
        found = repr(_fragment(text, npos)) if npos < len(text) else "the end of the pattern"
        raise ValueError(
            f"missing number after kernel code {code!r} at position {pos} in {text!r} "
            f"(found {found}); expected a count like '{code}30' or a ratio like '{code}0.25'"
        )
    num_text = m.group(0)
    value: Number = float(num_text) if "." in num_text else int(num_text)
    if value == 0:
        raise ValueError(
            f"zero-length run {text[pos : m.end()]!r} at position {pos} in {text!r}; "
            "expected a positive count or ratio (leave the code out instead)"
        )
    return code, value, m.end()


def _prefix_text(ci: int, co: int) -> str:
    return f"({ci}x{co})"


def _check_ratio_sum(ratios: Sequence[float], where: str) -> None:
    s = math.fsum(ratios)
    if abs(s - 1.0) > RATIO_TOLERANCE:
        raise ValueError(
            f"ratios in {where!r} sum to {s:.6g}; expected 1 (within {RATIO_TOLERANCE:g})"
        )


def parse(text: str) -> list[Item]:
    """Parse a pattern (counts or ratio form) into its ``(code, n)`` runs, prefix dropped.

    ``n`` is an ``int`` in the counts form and a ``float`` in the ratio form. See
    :func:`parse_full` for the checks made and the errors raised.

    >>> parse("(3 × 64) G30 P162")
    [('G', 30), ('P', 162)]
    >>> parse("G0.25P0.75")
    [('G', 0.25), ('P', 0.75)]
    """
    return list(parse_full(text).items)


# --- counts ------------------------------------------------------------------------------


def _as_items(pattern: str | Pattern | Iterable[Item]) -> tuple[list[Item], bool, int | None]:
    """Normalise any pattern argument to ``(items, is_ratio, total from prefix or None)``."""
    if isinstance(pattern, str):
        pattern = parse_full(pattern)
    if isinstance(pattern, Pattern):
        prefix_total = pattern.total if pattern.in_channels is not None else None
        return list(pattern.items), pattern.is_ratio, prefix_total
    items: list[Item] = []
    for item in pattern:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise ValueError(f"pattern item {item!r} is not a (code, number) pair")
        code, n = item
        if not isinstance(code, str) or code not in kernels.codes():
            raise ValueError(
                f"unknown kernel code {code!r} in item {tuple(item)!r}; "
                f"expected one of {_expected_codes()}"
            )
        if isinstance(n, bool) or not isinstance(n, numbers.Real):
            raise ValueError(f"pattern item {tuple(item)!r}: the count or ratio must be a number")
        n = int(n) if isinstance(n, numbers.Integral) else float(n)
        if n < 0 or (isinstance(n, float) and not math.isfinite(n)):
            raise ValueError(f"pattern item {(code, n)!r}: expected a non-negative number")
        items.append((code, n))
    if not items:
        raise ValueError("empty pattern: expected at least one (code, number) item")
    kinds = [isinstance(n, float) for _, n in items]
    if any(kinds) and not all(kinds):
        raise ValueError(
            f"pattern items {items!r} mix int counts and float ratios; expected one form"
        )
    is_ratio = all(kinds)
    if is_ratio:
        _check_ratio_sum([n for _, n in items], str(items))
    return items, is_ratio, None


def _check_total(total: int) -> None:
    if isinstance(total, bool) or not isinstance(total, numbers.Integral) or total < 1:
        raise ValueError(f"total number of kernels must be an integer >= 1, got {total!r}")


def to_counts(pattern: str | Pattern | Iterable[Item], total: int) -> list[tuple[str, int]]:
    """Turn a pattern into integer counts for a layer of ``total`` kernels (``Co * Ci/groups``).

    Counts form: returned as is after checking that they sum to ``total``. Ratio form: each run
    gets ``floor(r_i / sum(r) * total)`` kernels, and the units still missing go one each to the
    runs with the largest fractional remainders (largest-remainder / Hamilton rule; ties go to
    the earlier run). Runs that end up with zero kernels are dropped, so the result is always a
    valid counts-form pattern.

    Args:
        pattern: pattern text, a :class:`Pattern`, or ``(code, n)`` items.
        total: number of kernels of the layer.

    Returns:
        ``(code, count)`` runs in order, counts summing to ``total``.

    Raises:
        ValueError: the counts do not sum to ``total``, or a prefix disagrees with ``total``.
    """
    _check_total(total)
    total = int(total)
    items, is_ratio, prefix_total = _as_items(pattern)
    if prefix_total is not None and prefix_total != total:
        raise ValueError(
            f"pattern {pattern!r} has a prefix for {prefix_total} kernels, "
            f"but the layer has {total}"
        )
    if not is_ratio:
        s = sum(int(n) for _, n in items)
        if s != total:
            raise ValueError(
                f"pattern {_show(pattern)} has counts summing to {s}, "
                f"but the layer has {total} kernels"
            )
        return [(c, int(n)) for c, n in items if n > 0]

    # Exact arithmetic on the ratios as written (str(float) gives back the decimal text), so
    # remainders that are equal on paper tie exactly instead of by floating-point noise.
    ratios = [Fraction(str(n)) for _, n in items]
    norm = sum(ratios)
    quotas = [r / norm * total for r in ratios]
    counts = [math.floor(q) for q in quotas]
    missing = total - sum(counts)
    # sorted() is stable, so among equal remainders the earlier run comes first.
    order = sorted(range(len(items)), key=lambda i: quotas[i] - counts[i], reverse=True)
    for i in order[:missing]:
        counts[i] += 1
    return [(code, n) for (code, _), n in zip(items, counts, strict=True) if n > 0]


def _show(pattern: object) -> str:
    return repr(pattern) if isinstance(pattern, str) else repr(list(pattern))


def expand(pattern: str | Pattern | Iterable[Item], total: int) -> list[str]:
    """Per-kernel family codes, length ``total``: kernel ``k`` gets the code of the run it falls
    in (runs are consecutive, in order). See :func:`to_counts` for how ratios are resolved.

    >>> expand("G2P1", 3)
    ['G', 'G', 'P']
    """
    return [code for code, n in to_counts(pattern, total) for _ in range(n)]


def run_length(codes: Sequence[str]) -> list[tuple[str, int]]:
    """Run-length encode a per-kernel mosaic: ``['G', 'G', 'P', 'G'] -> [('G', 2), ('P', 1),
    ('G', 1)]``. The inverse of :func:`expand` for counts-form items."""
    if isinstance(codes, str):
        raise TypeError("run_length expects a sequence of codes, not one string")
    runs: list[tuple[str, int]] = []
    for code in codes:
        if runs and runs[-1][0] == code:
            runs[-1] = (code, runs[-1][1] + 1)
        else:
            runs.append((code, 1))
    return runs


def totals(codes_or_items: str | Iterable[str] | Iterable[tuple[str, int]]) -> dict[str, int]:
    """Number of kernels per family, in order of first appearance.

    Args:
        codes_or_items: a per-kernel code list (``['G', 'G', 'P']``), counts-form ``(code, n)``
            items, or counts-form pattern text.

    >>> totals("G10P5G10")
    {'G': 20, 'P': 5}
    """
    if isinstance(codes_or_items, str):
        pat = parse_full(codes_or_items)
        if pat.is_ratio:
            raise ValueError(
                f"totals() needs counts; {codes_or_items!r} is in ratio form, "
                "resolve it with to_counts(pattern, total) first"
            )
        codes_or_items = pat.items
    out: dict[str, int] = {}
    for entry in codes_or_items:
        if isinstance(entry, str):
            code, n = entry, 1
        else:
            code, n = entry
            if isinstance(n, bool) or not isinstance(n, numbers.Integral):
                raise ValueError(
                    f"totals() needs integer counts, got {tuple(entry)!r}; "
                    "resolve ratios with to_counts(pattern, total) first"
                )
        out[code] = out.get(code, 0) + int(n)
    return out


# --- printing ----------------------------------------------------------------------------


def _prefix(in_channels: int | None, out_channels: int | None) -> str:
    if in_channels is None and out_channels is None:
        return ""
    if in_channels is None or out_channels is None:
        raise ValueError(
            f"give both in_channels and out_channels for a prefix, or neither "
            f"(got in_channels={in_channels!r}, out_channels={out_channels!r})"
        )
    for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return _prefix_text(int(in_channels), int(out_channels))


def format_counts(
    items: Iterable[tuple[str, int]],
    in_channels: int | None = None,
    out_channels: int | None = None,
) -> str:
    """Print counts-form items as Eq. 9, e.g. ``(3x64)G30Lg15Lt15Tf36P96``.

    The ``(Ci x Co)`` prefix is printed only when both channel numbers are given (then the counts
    must sum to ``Ci * Co``). Zero-count runs print as nothing. ``parse(format_counts(items))``
    gives the items back.
    """
    items, is_ratio, _ = _as_items(items)
    if is_ratio:
        raise ValueError(f"format_counts() needs integer counts, got ratios {items!r}")
    prefix = _prefix(in_channels, out_channels)
    if prefix:
        s = sum(int(n) for _, n in items)
        if s != in_channels * out_channels:
            raise ValueError(
                f"counts sum to {s}, but {prefix} needs {in_channels * out_channels} kernels"
            )
    body = "".join(f"{code}{int(n)}" for code, n in items if n > 0)
    if not body:
        raise ValueError("cannot print a pattern with no kernels")
    return prefix + body


def _format_ratio(r: float, digits: int) -> str:
    # Never print a run as zero (it would not parse back) and always keep the decimal point
    # (without it the number would read as a count).
    d = digits
    text = f"{r:.{d}f}"
    while float(text) == 0 and r > 0 and d < 17:
        d += 1
        text = f"{r:.{d}f}"
    text = text.rstrip("0")
    return text + "0" if text.endswith(".") else text


def format_ratios(
    items: Iterable[Item],
    digits: int = 4,
    *,
    in_channels: int | None = None,
    out_channels: int | None = None,
) -> str:
    """Print items as Eq. 10, e.g. ``G0.1562Lg0.0781Lt0.0781Tf0.1875P0.5``.

    Ratios are ``n_i / sum(n)``, rounded to ``digits`` decimals with trailing zeros stripped
    (``P0.5``); a run too small to show at ``digits`` gets more digits rather than printing as 0.
    Counts or ratios may be given; ratios are printed as given, not renormalised, so that
    ``format_ratios(parse(text)) == text`` for text already at ``digits`` decimals. With many
    runs and few digits the printed ratios may no longer sum to 1 within
    :data:`RATIO_TOLERANCE`.
    """
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be an integer >= 1, got {digits!r}")
    items, is_ratio, _ = _as_items(items)
    items = [(c, n) for c, n in items if n > 0]
    # Ratios passed in were already checked to sum to 1 within the tolerance; renormalising them
    # would turn the paper's P0.5 (of a 0.9999 total) into P0.5001.
    s = 1.0 if is_ratio else math.fsum(n for _, n in items)
    if not items:
        raise ValueError("cannot print a pattern with no kernels")
    prefix = _prefix(in_channels, out_channels)
    return prefix + "".join(f"{code}{_format_ratio(n / s, digits)}" for code, n in items)


# --- compact factor ----------------------------------------------------------------------


def _check_hw(h: int, w: int) -> None:
    for name, v in (("h", h), ("w", w)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"kernel {name} must be an integer >= 1, got {v!r}")


def params_per_kernel(code: str, h: int, w: int, gain: bool = False, offset: bool = False) -> int:
    """Learnable parameters of one ``h x w`` kernel of family ``code`` (for Eq. 25).

    Plain: ``h * w`` (gain and offset never apply). A family without AKPs (Mean): 1 if it has a
    gain or an offset, else 0 -- ``g * const + b`` is still one constant, so it is one
    parameter (SPEC §4). Any other analytic family: its AKPs, plus 1 for a gain and 1 for an
    offset where present.
    """
    _check_hw(h, w)
    fam = kernels.get(code)
    if fam.plain:
        return h * w
    return fam.param_count(h, w) + int(bool(gain)) + int(fam.carries_offset(offset, bool(gain)))


def compact_factor_counts(
    items: Iterable[tuple[str, int]],
    h: int,
    w: int,
    gain: bool = False,
    offset: bool = False,
) -> float:
    """Eq. 25 from ``(code, count)`` items: ``1 - sum(count * params_per_kernel) /
    (sum(count) * h * w)``. Bias is excluded. Codes may repeat.

    >>> round(compact_factor_counts([("G", 192)], 7, 7), 4)
    0.9184
    """
    _check_hw(h, w)
    items, is_ratio, _ = _as_items(items)
    if is_ratio:
        raise ValueError(
            f"compact_factor_counts() needs integer counts, got ratios {items!r}; "
            "use compact_factor() for ratio-form patterns"
        )
    n_kernels = sum(int(n) for _, n in items)
    if n_kernels == 0:
        raise ValueError("compact factor of a layer with no kernels is undefined")
    used = sum(int(n) * params_per_kernel(c, h, w, gain, offset) for c, n in items)
    return 1.0 - used / (n_kernels * h * w)


def compact_factor_tied(
    items: Iterable[tuple[str, int, int]],
    h: int,
    w: int,
    gain: bool = False,
    offset: bool = False,
) -> float:
    """Eq. 25 when kernels may share AKPs: ``(code, kernels, rows)`` items, where the ``kernels``
    ACKs of family ``code`` use ``rows`` distinct rows of AKPs (``rows == kernels`` untied;
    one row per tied output channel). A row's AKPs count once, a gain and an offset count per
    kernel where present; Mean and Plain kernels count as in :func:`params_per_kernel`. With
    every ``rows == kernels`` this is :func:`compact_factor_counts`.

    >>> # (3x64) 7x7 layer, every output channel one Gabor row, gain + offset per kernel:
    >>> round(compact_factor_tied([("G", 192, 64)], 7, 7, gain=True, offset=True), 4)
    0.932
    """
    items = [(c, int(n), int(r)) for c, n, r in items]
    n_kernels = sum(n for _, n, _ in items)
    if n_kernels == 0:
        raise ValueError("compact factor of a layer with no kernels is undefined")
    return 1.0 - parameter_count_tied(items, h, w, gain, offset) / (n_kernels * h * w)


def parameter_count_tied(
    items: Iterable[tuple[str, int, int]],
    h: int,
    w: int,
    gain: bool = False,
    offset: bool = False,
) -> int:
    """The learnable kernel parameters (Eq. 25's numerator) of ``(code, kernels, rows)`` items,
    counted as in :func:`compact_factor_tied`."""
    _check_hw(h, w)
    used = 0
    for code, n, rows in items:
        fam = kernels.get(code)
        shared = 0 if fam.plain else fam.param_count(h, w)
        if n < 0 or not (min(n, 1) <= rows <= n) or (fam.plain and rows != n):
            raise ValueError(
                f"family {code!r}: {rows} AKP rows for {n} kernels; need 1 <= rows <= kernels "
                "(rows == kernels for plain)"
            )
        used += n * params_per_kernel(code, h, w, gain, offset) - (n - rows) * shared
    return used


def compact_factor(
    pattern_text: str | Pattern,
    h: int,
    w: int,
    gain: bool = False,
    *,
    offset: bool = False,
) -> float:
    """Eq. 25 for a layer described by a pattern, with ``h x w`` kernels.

    Counts form: directly. Ratio form with a ``(Ci x Co)`` prefix: the ratios are first turned
    into counts for ``Ci * Co`` kernels (:func:`to_counts`), so the value is that of the layer
    actually built. Ratio form without a prefix: from the ratios themselves (normalised by
    their sum), i.e. the limit of a very wide layer.

    >>> round(compact_factor("(3x64)G0.1562Lg0.0781Lt0.0781Tf0.1875P0.5", 7, 7), 4)
    0.4726
    """
    _check_hw(h, w)
    pat = pattern_text if isinstance(pattern_text, Pattern) else parse_full(pattern_text)
    if not pat.is_ratio:
        return compact_factor_counts(pat.items, h, w, gain, offset)
    if pat.in_channels is not None:
        return compact_factor_counts(to_counts(pat, pat.total), h, w, gain, offset)
    norm = math.fsum(r for _, r in pat.items)
    used = math.fsum(r * params_per_kernel(c, h, w, gain, offset) for c, r in pat.items)
    return 1.0 - used / (norm * h * w)
