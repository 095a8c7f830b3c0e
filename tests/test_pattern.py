"""Tests of arrangement patterns (paper Eqs. 9-10) and the compact factor (paper Eq. 25).

Expected values are worked by hand. For a (3x64) layer of 7x7 kernels there are 192 kernels and
192 * 49 = 9408 weights. AKPs per kernel (SPEC §2): G 4, Lg 1, Lt 1, Tf 3, Ts 2, M 0, P 49.
"""

from __future__ import annotations

import re

import pytest

from acl_convert import kernels
from acl_convert import pattern as pat

PAPER_EXAMPLE = "G30Lg15Lt15Tf36P96"
PAPER_ITEMS = [("G", 30), ("Lg", 15), ("Lt", 15), ("Tf", 36), ("P", 96)]
PAPER_RATIOS = "G0.1562Lg0.0781Lt0.0781Tf0.1875P0.5"


# --- compact factor: paper Tables 1-3 ----------------------------------------------------------

# (experiment, pattern, compact factor as printed in the paper). Rows whose printed value is
# wrong are in test_paper_errata_are_corrected instead.
#
# Worked by hand for exp3, G30Lg15Lt15Tf36P96:
#   30*4 + 15*1 + 15*1 + 36*3 + 96*49 = 120 + 15 + 15 + 108 + 4704 = 4962 parameters,
#   1 - 4962/9408 = 0.47258... -> 0.4726.
PAPER_ROWS = [
    # Table 1
    ("exp1", "P192", 0.0),  # 192*49 = 9408 -> 0
    ("exp2", "G30Lg15Lt15Tf30Ts6P96", 0.4732),  # 120+15+15+90+12+4704 = 4956
    ("exp3", "G30Lg15Lt15Tf36P96", 0.4726),  # 4962
    ("exp4", "G72Lg30Lt15Tf27P48", 0.706),  # 288+30+15+81+2352 = 2766 -> 0.70599
    ("exp5", "G60Lg24Lt27Tf45Ts36", 0.9471),  # 240+24+27+135+72 = 498
    ("exp6", "G120Lg30Lt15Tf27", 0.9356),  # 480+30+15+81 = 606
    ("exp7", "M192", 1.0),  # Mean has no AKPs
    # Table 2: the order of the runs does not change the count
    ("exp7 (T2)", "Lg15G30Lt15Tf36P96", 0.4726),
    ("exp8", "Lg15G30P96Lt15Tf36", 0.4726),
    # Table 3
    ("exp9", "M30Lg15Lt15Tf36P96", 0.4853),  # 15+15+108+4704 = 4842 -> 0.48533
    ("exp12", "G30Lg15Lt15M36P96", 0.4841),  # 120+15+15+4704 = 4854 -> 0.48406
    ("exp14", "M96P96", 0.5),  # 4704
    ("exp15", "M192", 1.0),
    ("exp16", "G192", 0.9184),  # 768 -> 0.91837
    ("exp17", "Lg192", 0.9796),  # 192 -> 0.97959
    ("exp18", "Lt192", 0.9796),
    ("exp19", "Tf192", 0.9388),  # 576 -> 0.93878
]


@pytest.mark.parametrize(("exp", "text", "expected"), PAPER_ROWS, ids=[r[0] for r in PAPER_ROWS])
@pytest.mark.parametrize("prefix", ["", "(3x64)"])
def test_paper_tables(exp, text, expected, prefix):
    cf = pat.compact_factor(prefix + text, 7, 7)
    assert round(cf, 4) == pytest.approx(expected, abs=5e-5)


def test_paper_errata_are_corrected():
    # SPEC §2 "Paper errata": Table 3 prints two compact factors that Eq. 25 does not give.
    # exp11 G30Lg15M15Tf36P96: 120+15+108+4704 = 4947, 1 - 4947/9408 = 0.47417 (paper: 0.4347).
    assert round(pat.compact_factor("G30Lg15M15Tf36P96", 7, 7), 4) == pytest.approx(
        0.4742, abs=5e-5
    )
    # exp13 G30Lg15Lt15Tf36M96: 120+15+15+108 = 258, 1 - 258/9408 = 0.97258 (paper: 0.0274,
    # which is 258/9408 itself, i.e. one minus the right value).
    assert round(pat.compact_factor("G30Lg15Lt15Tf36M96", 7, 7), 4) == pytest.approx(
        0.9726, abs=5e-5
    )
    # exp10 G30M15Lt15Tf36P96 has the same parameter count as exp11 (Lg and Lt both have one
    # AKP): 4947 -> 0.47417, which rounds to 0.4742; the paper prints 0.4743, off by one in the
    # last digit. Not listed in SPEC §2, so checked here with the rounding slack made explicit.
    cf10 = pat.compact_factor("G30M15Lt15Tf36P96", 7, 7)
    assert cf10 == pytest.approx(1 - 4947 / 9408, abs=1e-12)
    assert round(cf10, 4) == pytest.approx(0.4742, abs=5e-5)
    assert abs(cf10 - 0.4743) < 1.5e-4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("G30Lg15Lt15Tf36P96", 0.4726),
        ("G72Lg30Lt15Tf27P48", 0.706),
        ("G192", 0.9184),
        ("M192", 1.0),
    ],
)
def test_spec_section3_values(text, expected):
    assert round(pat.compact_factor("(3x64)" + text, 7, 7), 4) == pytest.approx(expected, abs=5e-5)


def test_compact_factor_exact_value():
    assert pat.compact_factor(PAPER_EXAMPLE, 7, 7) == pytest.approx(1 - 4962 / 9408, abs=1e-12)
    assert pat.compact_factor_counts(PAPER_ITEMS, 7, 7) == pytest.approx(1 - 4962 / 9408, abs=1e-12)


def test_compact_factor_other_kernel_sizes():
    # 3x3, 2 Gabor + 1 plain: (2*4 + 9) / (3*9) = 17/27.
    assert pat.compact_factor("G2P1", 3, 3) == pytest.approx(1 - 17 / 27)
    # non-square 3x5: one Lg (1) and one P (15): 16 / 30.
    assert pat.compact_factor("Lg1P1", 3, 5) == pytest.approx(1 - 16 / 30)


def test_compact_factor_ratio_form_with_prefix_equals_counts_form():
    ratio = pat.compact_factor("(3x64)" + PAPER_RATIOS, 7, 7)
    counts = pat.compact_factor("(3x64)" + PAPER_EXAMPLE, 7, 7)
    assert ratio == counts == pytest.approx(1 - 4962 / 9408, abs=1e-12)


def test_compact_factor_ratio_form_without_prefix_uses_ratios():
    # G0.25P0.75, 7x7: 1 - (0.25*4 + 0.75*49) / 49 = 1 - 37.75/49.
    assert pat.compact_factor("G0.25P0.75", 7, 7) == pytest.approx(1 - 37.75 / 49)
    # Unnormalised but within tolerance: 0.1562+0.0781+0.0781+0.1875+0.5 = 0.9999.
    used = 0.1562 * 4 + 0.0781 + 0.0781 + 0.1875 * 3 + 0.5 * 49
    assert pat.compact_factor(PAPER_RATIOS, 7, 7) == pytest.approx(1 - used / 0.9999 / 49)


# --- gain and offset ---------------------------------------------------------------------------


def test_gain_and_offset_counting():
    assert pat.compact_factor("G192", 7, 7, True) == pytest.approx(1 - 192 * 5 / 9408)
    assert pat.compact_factor("G192", 7, 7, gain=True, offset=True) == pytest.approx(
        1 - 192 * 6 / 9408
    )
    assert pat.compact_factor("G192", 7, 7, offset=True) == pytest.approx(1 - 192 * 5 / 9408)
    # A Mean kernel with a gain and an offset is one constant: one parameter (SPEC §4).
    assert pat.compact_factor("M192", 7, 7, gain=True, offset=True) == pytest.approx(1 - 192 / 9408)
    # Plain kernels never get a gain or an offset: 96*1 (Mean) + 96*49 = 4800.
    assert pat.compact_factor("M96P96", 7, 7, gain=True, offset=True) == pytest.approx(
        1 - (96 + 4704) / 9408
    )
    assert pat.compact_factor_counts([("Lg", 2), ("P", 1)], 3, 3, gain=True, offset=True) == (
        pytest.approx(1 - (2 * 3 + 9) / 27)
    )


@pytest.mark.parametrize(
    ("code", "gain", "offset", "expected"),
    [
        ("P", False, False, 49),
        ("P", True, True, 49),
        ("M", False, False, 0),
        ("M", True, False, 1),
        ("M", False, True, 1),
        ("M", True, True, 1),
        ("G", False, False, 4),
        ("G", True, False, 5),
        ("G", True, True, 6),
        ("Lg", False, False, 1),
        ("Lt", True, True, 3),
        ("Tf", False, True, 4),
        ("Ts", True, False, 3),
    ],
)
def test_params_per_kernel(code, gain, offset, expected):
    assert pat.params_per_kernel(code, 7, 7, gain=gain, offset=offset) == expected


def test_params_per_kernel_plain_uses_kernel_size():
    assert pat.params_per_kernel("P", 3, 5) == 15


# --- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "(3x64)G30Lg15Lt15Tf36P96",
        "(3X64)G30Lg15Lt15Tf36P96",
        "(3×64)G30Lg15Lt15Tf36P96",
        "G30Lg15Lt15Tf36P96",
        "  ( 3 × 64 ) G30 Lg 15\tLt15 Tf 36 P96\n",
    ],
)
def test_parse_counts_forms(text):
    assert pat.parse(text) == PAPER_ITEMS
    assert all(type(n) is int for _, n in pat.parse(text))


def test_parse_ratio_form():
    items = pat.parse(PAPER_RATIOS)
    assert items == [("G", 0.1562), ("Lg", 0.0781), ("Lt", 0.0781), ("Tf", 0.1875), ("P", 0.5)]
    assert all(type(n) is float for _, n in items)
    assert pat.parse("(3x64) " + PAPER_RATIOS) == items


def test_parse_keeps_repeated_codes_in_order():
    assert pat.parse("G10P5G10") == [("G", 10), ("P", 5), ("G", 10)]


def test_parse_decimal_point_decides_the_form():
    assert pat.parse("P1.0") == [("P", 1.0)]
    assert pat.parse("P1.") == [("P", 1.0)]
    assert pat.parse("G.5P.5") == [("G", 0.5), ("P", 0.5)]
    assert pat.parse("P1") == [("P", 1)]


def test_parse_full():
    p = pat.parse_full("(3×64)" + PAPER_EXAMPLE)
    assert p.items == tuple(PAPER_ITEMS)
    assert (p.in_channels, p.out_channels, p.is_ratio, p.total) == (3, 64, False, 192)

    p = pat.parse_full("G10P5G10")
    assert (p.in_channels, p.out_channels, p.is_ratio, p.total) == (None, None, False, 25)

    p = pat.parse_full(PAPER_RATIOS)
    assert (p.in_channels, p.out_channels, p.is_ratio, p.total) == (None, None, True, None)

    p = pat.parse_full("(3x64)" + PAPER_RATIOS)
    assert (p.is_ratio, p.total) == (True, 192)

    with pytest.raises(AttributeError):
        p.items = ()  # frozen


def test_ratios_sum_tolerance():
    pat.parse("G0.5P0.5009")  # 1.0009: within 1e-3
    pat.parse("G0.5P0.4991")  # 0.9991
    with pytest.raises(ValueError, match=r"sum to 1\.002"):
        pat.parse("G0.5P0.502")
    with pytest.raises(ValueError, match=r"sum to 0\.9\b"):
        pat.parse("G0.5P0.4")


def test_tokenizer_comes_from_the_registry():
    # Every registered code parses, including codes sharing a first letter (Lg/Lt, Tf/Ts).
    codes = kernels.codes()
    text = "".join(f"{c}{i + 1}" for i, c in enumerate(codes))
    assert pat.parse(text) == [(c, i + 1) for i, c in enumerate(codes)]
    # A name is not a code.
    with pytest.raises(ValueError, match="'gabor'"):
        pat.parse("gabor30")


# --- malformed input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("G30Xq3", r"unknown kernel code 'Xq' at position 3 in 'G30Xq3'; expected one of G, Lg"),
        ("L5", r"unknown kernel code 'L'"),
        ("Gx30", r"unknown kernel code 'Gx'"),
        ("G30 & P5", r"unknown kernel code '&' at position 4"),
        ("", r"empty pattern ''"),
        ("   ", r"empty pattern"),
        ("(3x64)", r"empty pattern '\(3x64\)'"),
        ("G", r"missing number after kernel code 'G'"),
        ("G30P", r"missing number after kernel code 'P' at position 3"),
        ("GLg15", r"missing number after kernel code 'G' .*found 'Lg'"),
        ("G-5P10", r"negative count or ratio 'G-5'"),
        ("G0P10", r"zero-length run 'G0'"),
        ("G0.0P1.0", r"zero-length run 'G0.0'"),
        ("G0.5P5", r"mixes counts and ratios \('P5' is a count, 'G0.5' is a ratio\)"),
        ("G0.5P0.4", r"ratios in 'G0.5P0.4' sum to 0.9"),
        ("(3x64)G30P100", r"sum to 130, but the prefix '\(3x64\)' needs 3\*64 = 192"),
        ("(3*64)G192", r"bad channel prefix '\(3\*64\)'"),
        ("(3x)G192", r"bad channel prefix '\(3x\)'"),
        ("(0x64)G192", r"bad channel prefix '\(0x64\)'"),
        ("(3x64G192", r"bad channel prefix '\(3x64G192'"),
        ("G30(3x64)", r"misplaced channel prefix '\(3x64\)' at position 3"),
    ],
)
def test_malformed_patterns(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        pat.parse(text)


def test_parse_rejects_non_strings():
    with pytest.raises(TypeError):
        pat.parse(None)


# --- ratios to counts ----------------------------------------------------------------------------


def test_to_counts_paper_ratios():
    # 192 * (0.1562, 0.0781, 0.0781, 0.1875, 0.5) / 0.9999 =
    # (30.005, 14.997, 14.997, 36.004, 96.010): floors 30+14+14+36+96 = 190, the two missing
    # units go to the largest remainders, Lg and Lt (0.997 each).
    assert pat.to_counts(PAPER_RATIOS, 192) == PAPER_ITEMS
    assert pat.to_counts("(3x64)" + PAPER_RATIOS, 192) == PAPER_ITEMS


def test_to_counts_largest_remainder():
    # 10 * (0.33, 0.33, 0.34) = (3.3, 3.3, 3.4): floors 9, one unit to the largest remainder.
    assert pat.to_counts("G0.33Lg0.33P0.34", 10) == [("G", 3), ("Lg", 3), ("P", 4)]
    # 10 * (0.34, 0.33, 0.33) = (3.4, 3.3, 3.3): the unit goes to the first run.
    assert pat.to_counts("G0.34Lg0.33P0.33", 10) == [("G", 4), ("Lg", 3), ("P", 3)]
    # Ties go to the earlier run: 3 * (0.5, 0.5) = (1.5, 1.5).
    assert pat.to_counts("G0.5P0.5", 3) == [("G", 2), ("P", 1)]
    # 7 * (0.2, 0.3, 0.5) = (1.4, 2.1, 3.5): floors 6, the unit goes to P (0.5 > 0.4 > 0.1).
    assert pat.to_counts("G0.2Lg0.3P0.5", 7) == [("G", 1), ("Lg", 2), ("P", 4)]
    # Hamilton, not rounding each: 5 * (0.3, 0.3, 0.4) = (1.5, 1.5, 2.0) -> 2, 1, 2
    # (rounding each half up would give 2+2+2 = 6).
    assert pat.to_counts("G0.3Lg0.3P0.4", 5) == [("G", 2), ("Lg", 1), ("P", 2)]


def test_to_counts_drops_empty_runs():
    # 2 * (0.25, 0.25, 0.5) = (0.5, 0.5, 1): G gets the tied unit, Lg gets nothing.
    assert pat.to_counts("G0.25Lg0.25P0.5", 2) == [("G", 1), ("P", 1)]


def test_to_counts_accepts_items():
    assert pat.to_counts([("G", 0.25), ("P", 0.75)], 8) == [("G", 2), ("P", 6)]
    assert pat.to_counts([("G", 2), ("P", 6)], 8) == [("G", 2), ("P", 6)]


def test_to_counts_errors():
    with pytest.raises(ValueError, match=r"sum\w* to 40.*41"):
        pat.to_counts("G30P10", 41)
    with pytest.raises(ValueError, match=r"192.*100"):
        pat.to_counts("(3x64)G0.5P0.5", 100)
    with pytest.raises(ValueError, match="mix"):
        pat.to_counts([("G", 1), ("P", 0.5)], 2)
    with pytest.raises(ValueError, match="'Xq'"):
        pat.to_counts([("Xq", 2)], 2)
    with pytest.raises(ValueError, match="total"):
        pat.to_counts("G1", 0)


# --- expand / run_length / totals ----------------------------------------------------------------


def test_expand():
    assert pat.expand("G2Lg1P3", 6) == ["G", "G", "Lg", "P", "P", "P"]
    assert pat.expand("G0.5P0.5", 4) == ["G", "G", "P", "P"]
    codes = pat.expand("(3x64)" + PAPER_EXAMPLE, 192)
    assert len(codes) == 192
    assert codes[29] == "G" and codes[30] == "Lg" and codes[95] == "Tf" and codes[96] == "P"
    assert codes[60:96] == ["Tf"] * 36


def test_run_length():
    assert pat.run_length([]) == []
    assert pat.run_length(["G", "G", "P", "G"]) == [("G", 2), ("P", 1), ("G", 1)]
    assert pat.run_length(["M"]) == [("M", 1)]


def test_expand_run_length_round_trip():
    for text in ["G10P5G10", PAPER_EXAMPLE, "Lg15G30P96Lt15Tf36", "M1"]:
        items = pat.parse(text)
        total = sum(n for _, n in items)
        assert pat.run_length(pat.expand(text, total)) == items
    mosaic = ["P", "G", "G", "Ts", "P", "P", "M", "G"]
    assert pat.expand(pat.run_length(mosaic), len(mosaic)) == mosaic


def test_totals():
    assert pat.totals(["G", "P", "G", "Lg"]) == {"G": 2, "P": 1, "Lg": 1}
    assert list(pat.totals(["P", "G", "P"])) == ["P", "G"]  # first-appearance order
    assert pat.totals([("G", 10), ("P", 5), ("G", 10)]) == {"G": 20, "P": 5}
    assert pat.totals("G10P5G10") == {"G": 20, "P": 5}
    assert pat.totals(pat.expand("G10P5G10", 25)) == {"G": 20, "P": 5}
    with pytest.raises(ValueError, match="ratio"):
        pat.totals("G0.5P0.5")


# --- printing ------------------------------------------------------------------------------------


def test_format_counts():
    assert pat.format_counts(PAPER_ITEMS) == PAPER_EXAMPLE
    assert pat.format_counts(PAPER_ITEMS, 3, 64) == "(3x64)" + PAPER_EXAMPLE
    assert pat.format_counts([("G", 10), ("P", 5), ("G", 10)]) == "G10P5G10"
    with pytest.raises(ValueError, match="both"):
        pat.format_counts(PAPER_ITEMS, 3)
    with pytest.raises(ValueError, match=r"192.*\(3x65\)|\(3x65\).*195"):
        pat.format_counts(PAPER_ITEMS, 3, 65)


def test_format_ratios():
    # 30/192 = 0.15625 (printed 0.1562 like the paper), 15/192 = 0.078125, 36/192 = 0.1875.
    assert pat.format_ratios(PAPER_ITEMS) == PAPER_RATIOS
    assert pat.format_ratios([("G", 1), ("P", 3)]) == "G0.25P0.75"
    assert pat.format_ratios([("P", 4)]) == "P1.0"  # keeps the decimal point: still a ratio
    assert pat.format_ratios([("G", 1), ("P", 2)], digits=2) == "G0.33P0.67"
    assert pat.format_ratios(PAPER_ITEMS, in_channels=3, out_channels=64) == "(3x64)" + PAPER_RATIOS


def test_format_parse_round_trip():
    for items in [PAPER_ITEMS, [("G", 10), ("P", 5), ("G", 10)], [("M", 1)]]:
        assert pat.parse(pat.format_counts(items)) == items
        total = sum(n for _, n in items)
        assert pat.to_counts(pat.format_ratios(items), total) == items
    text = "(3x64)" + PAPER_EXAMPLE
    p = pat.parse_full(text)
    assert pat.format_counts(p.items, p.in_channels, p.out_channels) == text


def test_ratio_text_round_trip():
    assert pat.format_ratios(pat.parse(PAPER_RATIOS)) == PAPER_RATIOS


def test_error_mentions_known_codes():
    with pytest.raises(ValueError) as err:
        pat.parse("Q1")
    for code in kernels.codes():
        assert re.search(rf"\b{code}\b", str(err.value))
