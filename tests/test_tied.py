"""Channel-tied ACKs in the ACL (paper Fig. 3: an RGB triple as one pattern in three strengths).

A tied output channel has one family and one AKP row shared by its ``Ci/groups`` kernels, each
with its own gain and offset. Every test compares a tied layer with what it must equal: the
untied layer whose rows are the shared AKPs repeated per kernel, ``F.conv2d`` with the
synthesised weight, Eq. 25 counted by hand, or the file read back.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from acl_convert import kernels, load_anann, pattern
from acl_convert.io.anann import bake_state_dict, read_anann, save_anann
from acl_convert.io.header import AnaNNHeader, LayerRecord
from acl_convert.nn.acl import ACL, channel_rows
from acl_convert.report import kernel_table
from acl_convert.report.figures import kernel_mosaic
from acl_convert.train.finetune import FinetuneConfig, _akp_damping, finetune

FAMILIES = ("G", "Lg", "Tf", "Ts", "Lt", "M")

#: Conv hyper-parameters the tied layer must honour like nn.Conv2d.
VARIANTS = [
    dict(),
    dict(stride=2, padding=2),
    dict(groups=2, padding=1, dilation=2),
    dict(padding=1, padding_mode="circular"),
]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tied_layer(
    code: str,
    *,
    ci: int = 6,
    co: int = 4,
    k: int = 5,
    offset: bool = True,
    tied: tuple[int, ...] = (0, 2),
    seed: int = 0,
    dtype=torch.float32,
    **conv,
) -> ACL:
    """``co`` output channels: those in ``tied`` tied in family ``code``, channel 1 untied in
    ``code``, the last one plain; random AKPs, mixed-sign gains, offsets."""
    groups = conv.get("groups", 1)
    cig = ci // groups
    fam = kernels.get(code)
    codes = [code] * (cig * (co - 1)) + ["P"] * cig
    rows = channel_rows(codes, cig, tied)
    n = codes.count(code)
    n_rows = int(rows[code].max()) + 1 if code in rows else n
    g = gen(seed)
    akps = (
        {code: fam.sample(n_rows, k, k, generator=g, dtype=torch.float64)} if fam.num_params else {}
    )
    gains = {code: torch.randn(n, generator=g, dtype=torch.float64)}
    offsets = {code: 0.1 * torch.randn(n, generator=g, dtype=torch.float64)} if offset else None
    return ACL.from_values(
        ci,
        co,
        k,
        codes,
        akps,
        gains=gains,
        offsets=offsets,
        plain=torch.randn(cig, k, k, generator=g, dtype=torch.float64),
        bias=torch.randn(co, generator=g, dtype=torch.float64),
        akp_rows=rows,
        dtype=dtype,
        **conv,
    )


def untied_twin(layer: ACL) -> ACL:
    """The same layer with every kernel its own AKP row (the shared rows repeated)."""
    codes = layer.codes
    h, w = layer.kernel_size
    akps, gains, offsets = {}, {}, {}
    for code in layer.codes_present():
        if code == "P":
            continue
        if code in layer.akp:
            akps[code] = layer.kernel_akps(code).detach()
        if code in layer.gain:
            gains[code] = layer.gain[code].detach()
        if code in layer.offset:
            offsets[code] = layer.offset[code].detach()
    return ACL.from_values(
        layer.in_channels,
        layer.out_channels,
        (h, w),
        codes,
        akps,
        gains=gains or None,
        offsets=offsets or None,
        plain=None if layer.plain is None else layer.plain.detach(),
        bias=None if layer.bias is None else layer.bias.detach(),
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        padding_mode=layer.padding_mode,
        dtype=layer.plain.dtype,
    )


EPS32 = torch.finfo(torch.float32).eps


def round_trip_tolerance(layer: ACL) -> torch.Tensor:
    """How far, per weight element, :func:`untied_twin`'s float32 weight may lie from the layer's.

    The twin gets the AKPs in paper units, so a positive AKP ``a = exp(u)`` goes through
    exp -> log -> exp in float32 (angles pass unchanged). Each op is within one ulp (eps), and the
    log's result ``u`` is rounded relative to ``|u|``, so the twin's ``u`` is off by at most
    ``(3 + |u|) eps`` (an absolute error in ``u`` is the relative error of ``a``). First order in
    that, the weight moves by ``sum |dW/du| (3 + |u|) eps`` (derivatives by central differences
    in float64), and the float32 weight adds one rounding of its own (eps |W|)."""
    layer64 = copy.deepcopy(layer).double()
    weight = layer64.synthesize().detach()
    tol = EPS32 * weight.abs()
    step = 1e-6  # central differences in float64: error ~1e-12 relative, sizes ~1e-6 ulps
    with torch.no_grad():
        for code, u in layer64.akp.items():
            fam = kernels.get(code)
            for k, p in enumerate(fam.params):
                if p.kind != "positive":
                    continue
                for row in range(u.shape[0]):
                    u0 = float(u[row, k])
                    u[row, k] = u0 + step
                    up = layer64.synthesize()
                    u[row, k] = u0 - step
                    down = layer64.synthesize()
                    u[row, k] = u0
                    tol += (up - down).abs() / (2 * step) * (3 + abs(u0)) * EPS32
    return tol.float()


def reference_conv(layer: ACL, x: torch.Tensor) -> torch.Tensor:
    """``F.conv2d`` with the synthesised weight, padding done as nn.Conv2d does it."""
    weight = layer.synthesize().detach()
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        return F.conv2d(x, weight, layer.bias, layer.stride, 0, layer.dilation, layer.groups)
    return F.conv2d(
        x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups
    )


# --- structure ---------------------------------------------------------------------------------


def test_channel_rows_numbers_rows_in_kernel_order():
    codes = ["G"] * 6 + ["Lg"] * 3 + ["G"] * 3
    rows = channel_rows(codes, 3, [0, 3])
    assert list(rows) == ["G"]
    # Channel 0 -> row 0; channel 1's kernels untied -> rows 1..3; channel 3 -> row 4.
    assert rows["G"].tolist() == [0, 0, 0, 1, 2, 3, 4, 4, 4]
    assert channel_rows(codes, 3, []) == {}


@pytest.mark.parametrize(
    "codes,tied,needle",
    [
        (["G", "Lg", "G", "G"], [0], "one analytic family"),
        (["P", "P", "G", "G"], [0], "one analytic family"),
        (["G", "G", "G", "G"], [2], "outside"),
        (["G", "G", "G"], [0], "whole output channels"),
    ],
)
def test_channel_rows_refuses_what_cannot_be_tied(codes, tied, needle):
    with pytest.raises(ValueError, match=needle):
        channel_rows(codes, 2, tied)


@pytest.mark.parametrize(
    "rows,needle",
    [
        ({"G": [0, 0, 2, 2]}, "used by no kernel"),
        ({"G": [0, 0, 1]}, "one row per kernel"),
        ({"G": [0.0, 0.0, 1.0, 1.0]}, "integer"),
        ({"G": [-1, 0, 0, 0]}, "negative"),
        ({"P": [0, 0]}, "plain"),
        ({"Lg": [0, 0]}, "no kernel of family"),
    ],
)
def test_bad_akp_rows_are_refused(rows, needle):
    with pytest.raises(ValueError, match=needle):
        ACL(2, 3, 3, assignment=["G"] * 4 + ["P"] * 2, gain=True, akp_rows=rows)


def test_untied_layers_keep_their_tensors():
    """No row buffer for untied layers (nor for the identity), so existing files are unchanged."""
    plain = ACL(3, 4, 5, assignment="G6Lg6", gain=True, offset=True, generator=gen(0))
    identity = ACL(
        3,
        4,
        5,
        assignment="G6Lg6",
        gain=True,
        offset=True,
        generator=gen(0),
        akp_rows={"G": list(range(6))},
    )
    assert set(plain.state_dict()) == set(identity.state_dict())
    assert not any(k.startswith("akp_row_") for k in plain.state_dict())
    assert not plain.is_tied() and not identity.is_tied()
    assert torch.equal(plain.akp_rows("G"), torch.arange(6))
    assert torch.equal(plain.kernel_akps("G"), plain.akps("G"))


def test_tied_layer_holds_one_row_per_channel():
    layer = tied_layer("G", tied=(0, 2))  # 6 in, 4 out: G channels 0 (tied), 1, 2 (tied); P 3
    assert layer.is_tied() and layer.is_tied("G") and not layer.is_tied("P")
    assert layer.family_totals() == {"G": 18, "P": 6}
    assert layer.num_rows("G") == 1 + 6 + 1
    assert tuple(layer.akp["G"].shape) == (8, 4)
    assert tuple(layer.akps("G").shape) == (8, 4)
    assert tuple(layer.kernel_akps("G").shape) == (18, 4)
    assert tuple(layer.gain["G"].shape) == (18,) and tuple(layer.offset["G"].shape) == (18,)
    assert layer.tied_kernels("G").tolist() == [True] * 6 + [False] * 6 + [True] * 6
    per_kernel = layer.kernel_akps("G")
    assert torch.equal(per_kernel[:6], per_kernel[:1].expand(6, -1))
    assert "tied=G2" in repr(layer)


# --- forward, weight, gradients ---------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={v[k]}" for k in v))
@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("code", FAMILIES)
def test_tied_forward_equals_untied_and_conv2d(code, offset, variant):
    layer = tied_layer(code, offset=offset, seed=FAMILIES.index(code), **variant)
    twin = untied_twin(layer)
    assert not twin.is_tied()
    x = torch.randn(2, 6, 11, 12, generator=gen(1))
    # Equal up to the float32 exp/log round trip of the twin's AKPs (bound derived in
    # round_trip_tolerance; measured at most a fifth of it).
    diff = (layer.synthesize() - twin.synthesize()).abs().detach()
    assert bool((diff <= round_trip_tolerance(layer)).all()), float(diff.max())
    torch.testing.assert_close(layer(x), twin(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), reference_conv(layer, x), rtol=1e-6, atol=1e-6)
    conv = layer.to_conv2d()
    torch.testing.assert_close(conv(x), layer(x), rtol=1e-6, atol=1e-6)
    # The tied channels' kernels really are one shape in different strengths (plus offsets).
    cig = layer.in_channels // layer.groups
    weight = layer.synthesize().detach().double()
    if kernels.get(code).num_params:
        base = kernels.get(code)(layer.akps(code).detach().double()[0], 5, 5)
        g = layer.gain[code].detach().double()[:cig]
        b = layer.offset[code].detach().double()[:cig] if code in layer.offset else 0 * g
        want = g[:, None, None] * base + b[:, None, None]
        torch.testing.assert_close(weight[0], want, rtol=1e-6, atol=1e-6)


def test_eval_cache_and_dtype_follow_the_tied_layer():
    layer = tied_layer("Tf").eval()
    x = torch.randn(1, 6, 9, 9, generator=gen(2))
    with torch.no_grad():
        first = layer(x)
        assert layer._cached_weight is not None
        again = layer(x)
    assert torch.equal(first, again)
    double = layer.double()
    assert double.synthesize().dtype == torch.float64
    assert double.akp_rows("Tf").dtype == torch.long


@pytest.mark.parametrize("code", ["G", "Tf", "Lt"])
def test_gradients_reach_the_shared_row_as_the_sum_over_its_kernels(code):
    layer = tied_layer(code, dtype=torch.float64, seed=3)
    twin = untied_twin(layer)
    x = torch.randn(2, 6, 9, 9, generator=gen(4), dtype=torch.float64)
    r = torch.randn(2, 4, 5, 5, generator=gen(5), dtype=torch.float64)
    (layer(x) * r).sum().backward()
    (twin(x) * r).sum().backward()
    rows = layer.akp_rows(code)
    summed = torch.zeros_like(layer.akp[code]).index_add(0, rows, twin.akp[code].grad)
    torch.testing.assert_close(layer.akp[code].grad, summed, rtol=1e-10, atol=1e-12)
    assert layer.akp[code].grad[0].abs().sum() > 0
    for group in ("gain", "offset"):
        got = getattr(layer, group)[code].grad
        torch.testing.assert_close(got, getattr(twin, group)[code].grad, rtol=1e-10, atol=1e-12)


def test_gradcheck_through_a_shared_row():
    layer = tied_layer("G", ci=2, co=3, k=3, tied=(0,), dtype=torch.float64, seed=6)
    x = torch.randn(1, 2, 5, 5, generator=gen(7), dtype=torch.float64)
    names = ["akp.G", "gain.G", "offset.G"]
    params = dict(layer.named_parameters())

    def f(*values):
        out = torch.func.functional_call(layer, dict(zip(names, values, strict=True)), (x,))
        return out.sum(dim=(0, 2, 3))

    assert torch.autograd.gradcheck(f, tuple(params[n].detach().requires_grad_() for n in names))


# --- compact factor -----------------------------------------------------------------------------


def test_compact_factor_of_64_tied_gabor_channels():
    """(3x64) 7x7 layer, every output channel one Gabor row (4 AKPs) with gain + offset per
    kernel: Eq. 25 counts 4 + 3 * 2 per channel."""
    codes = ["G"] * 192
    rows = channel_rows(codes, 3, range(64))
    akps = {"G": kernels.get("G").sample(64, 7, 7, generator=gen(0))}
    layer = ACL.from_values(
        3,
        64,
        7,
        codes,
        akps,
        gains={"G": torch.ones(192)},
        offsets={"G": torch.zeros(192)},
        akp_rows=rows,
    )
    want = 1 - 64 * (4 + 3 * 2) / (64 * 3 * 49)
    assert layer.compact_factor() == pytest.approx(want, abs=1e-12)
    assert pattern.compact_factor_tied([("G", 192, 64)], 7, 7, gain=True, offset=True) == (
        pytest.approx(want, abs=1e-12)
    )
    # The same layer untied: 6 parameters per kernel.
    untied = ACL(3, 64, 7, assignment="G192", gain=True, offset=True)
    assert untied.compact_factor() == pytest.approx(1 - 192 * 6 / (192 * 49), abs=1e-12)


def test_compact_factor_of_a_mixed_layer_by_hand():
    """(3x4) 5x5: channel 0 tied Gabor (4 + 3*(g+b)), channel 1 untied Gabor (3*(4+2)),
    channel 2 tied Mean (3 gains: Mean has no AKPs and no offset next to a gain), channel 3
    plain (3*25)."""
    codes = ["G"] * 6 + ["M"] * 3 + ["P"] * 3
    rows = channel_rows(codes, 3, [0, 2])
    layer = ACL.from_values(
        3,
        4,
        5,
        codes,
        {"G": kernels.get("G").sample(4, 5, 5, generator=gen(1))},
        gains={"G": torch.ones(6), "M": torch.ones(3)},
        offsets={"G": torch.zeros(6)},
        plain=torch.zeros(3, 5, 5),
        akp_rows=rows,
    )
    used = (4 + 3 * 2) + 3 * (4 + 2) + 3 * 1 + 3 * 25
    assert layer.compact_factor() == pytest.approx(1 - used / (12 * 25), abs=1e-12)


def test_compact_factor_tied_reduces_to_counts_when_untied():
    items = pattern.parse("G30Lg15Lt15Tf36M10P86")
    for gain, offset in [(False, False), (True, False), (True, True)]:
        tied = pattern.compact_factor_tied([(c, n, n) for c, n in items], 7, 7, gain, offset)
        assert tied == pattern.compact_factor_counts(items, 7, 7, gain, offset)
    with pytest.raises(ValueError, match="rows"):
        pattern.compact_factor_tied([("G", 3, 4)], 7, 7)
    with pytest.raises(ValueError, match="plain"):
        pattern.compact_factor_tied([("P", 3, 1)], 7, 7)


# --- canonical form -----------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["G", "Tf", "Ts"])
def test_canonicalize_folds_a_shared_row_once_and_keeps_the_weight(code):
    """Mixed-sign gains in a row, angles far outside their canonical range: the fold (Gabor:
    negative gain -> psi + pi; TGD1st: theta + pi flips the sign) is taken by the row's largest
    gain and applied to every gain of the row alike."""
    layer = tied_layer(code, dtype=torch.float64, seed=8)
    fam = kernels.get(code)
    with torch.no_grad():
        akps = layer.akps(code).clone()
        theta = fam.param_names.index("theta")
        akps[:, theta] += torch.tensor([3.0, -7.5, 11.0, 4.2, -2.0, 20.0, -0.5, 9.9])
        if code == "G":
            akps[:, fam.param_names.index("psi")] += 5.0
        layer.akp[code].copy_(fam.to_unconstrained(akps))
        # Row 0 (channel 0's six kernels): the largest |gain| is negative, the others mixed.
        layer.gain[code][:6] = torch.tensor([0.5, -2.0, -0.25, 1.5, -1.0, 0.1]).double()
    before = layer.synthesize().detach().clone()
    gains_before = layer.gain[code].detach().clone()
    layer.canonicalize_()
    torch.testing.assert_close(layer.synthesize(), before, rtol=1e-10, atol=1e-12)
    theta_after = layer.akps(code)[:, theta]
    assert bool(((theta_after >= 0) & (theta_after < math.pi)).all())
    # Every gain of a row changed sign together (or not at all), never one alone.
    ratio = layer.gain[code].detach() / gains_before
    rows = layer.akp_rows(code)
    assert bool((ratio.abs() == 1).all())
    for r in range(layer.num_rows(code)):
        assert len(set(ratio[rows == r].tolist())) == 1
    if code == "G":  # Gabor absorbs a sign: the representative (largest |g|) ends positive
        assert layer.gain[code][1] > 0
        psi = layer.akps(code)[:, fam.param_names.index("psi")]
        assert bool(((psi > -math.pi) & (psi <= math.pi)).all())


def test_canonicalize_leaves_an_all_zero_row_alone():
    layer = tied_layer("G", dtype=torch.float64)
    with torch.no_grad():
        layer.gain["G"][:6] = 0.0
    before = layer.synthesize().detach().clone()
    layer.canonicalize_()
    torch.testing.assert_close(layer.synthesize(), before, rtol=1e-10, atol=1e-12)
    assert bool(torch.isfinite(layer.gain["G"]).all())


# --- AnaNN files --------------------------------------------------------------------------------


def small_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def tied_rgb_layer(seed: int = 0) -> ACL:
    """A (3x4) 5x5 RGB layer as the converter would build it for ``small_net``: channel 0 a tied
    Gabor, 1 a tied TGD1st, 2 untied Gabor + Mean, 3 plain."""
    codes = ["G"] * 3 + ["Tf"] * 3 + ["G", "G", "M"] + ["P"] * 3
    rows = channel_rows(codes, 3, [0, 1])
    g = gen(seed)
    akps = {
        "G": torch.tensor([[4.0, 0.3, 0.2, 1.5], [3.0, 1.2, -1.0, 1.2], [5.0, 2.0, 0.7, 2.0]]),
        "Tf": torch.tensor([[0.41, 1.6, 2.3]]),
    }
    gains = {
        "G": torch.tensor([0.3, -0.5, 0.2, 0.4, -0.3]),
        "Tf": torch.tensor([0.2, 0.35, -0.1]),
        "M": torch.tensor([0.05]),
    }
    offsets = {"G": 0.01 * torch.randn(5, generator=g), "Tf": 0.01 * torch.randn(3, generator=g)}
    return ACL.from_values(
        3,
        4,
        5,
        codes,
        akps,
        gains=gains,
        offsets=offsets,
        plain=0.1 * torch.randn(3, 5, 5, generator=g),
        bias=0.1 * torch.randn(4, generator=g),
        akp_rows=rows,
        padding=2,
    )


def record(name: str, layer: ACL) -> LayerRecord:
    """The header entry :meth:`LayerResult.record` writes for a converted layer."""
    return LayerRecord(
        name=name,
        shape=(layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size),
        groups=layer.groups,
        stride=tuple(layer.stride),
        padding=tuple(layer.padding),
        dilation=tuple(layer.dilation),
        padding_mode=layer.padding_mode,
        bias=layer.bias is not None,
        gain=layer.gain_enabled,
        offset=layer.offset_enabled,
        family_counts=layer.family_totals(),
        pattern=layer.pattern,
        compact_factor=layer.compact_factor(),
    )


def write_anann(path, net: nn.Module, name: str, layer: ACL) -> AnaNNHeader:
    """An AnaNN of ``net`` with conv ``name`` replaced by ``layer``, as Conversion.save writes."""
    tensors = {k: v for k, v in net.state_dict().items() if k != f"{name}.weight"}
    tensors.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
    header = AnaNNHeader(
        source_file="net.pth",
        source_sha256="0" * 64,
        arch=None,
        settings={},
        layers={name: record(name, layer)},
    )
    save_anann(path, tensors, header)
    return header


def test_anann_round_trip_keeps_the_tied_layer(tmp_path):
    net, layer = small_net(), tied_rgb_layer()
    path = tmp_path / "tied.anann.safetensors"
    write_anann(path, net, "0", layer)
    stored = read_anann(path).tensors
    assert stored["0.akp_row_G"].tolist() == [0, 0, 0, 1, 2]
    assert stored["0.akp_row_Tf"].tolist() == [0, 0, 0]
    assert "0.akp_row_M" not in stored  # one Mean kernel: nothing shared, nothing stored
    assert tuple(stored["0.akp.G"].shape) == (3, 4)

    model = load_anann(path, model=small_net(1))
    acl = model[0]
    assert isinstance(acl, ACL) and acl.is_tied("G") and acl.is_tied("Tf")
    want = layer.state_dict()
    got = acl.state_dict()
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert acl.compact_factor() == layer.compact_factor()
    x = torch.randn(2, 3, 12, 12, generator=gen(3))
    reference = small_net(0)
    reference[0] = layer
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=0, atol=0)


def test_bake_equals_synthesize_and_loads_into_the_plain_net(tmp_path):
    net, layer = small_net(), tied_rgb_layer()
    path = tmp_path / "tied.anann.safetensors"
    write_anann(path, net, "0", layer)
    baked = bake_state_dict(read_anann(path))
    assert not any(k.startswith("0.akp") or k.startswith("0.index") for k in baked)
    torch.testing.assert_close(baked["0.weight"], layer.synthesize().detach(), rtol=0, atol=0)
    plain = small_net(2)
    plain.load_state_dict(baked, strict=True)
    x = torch.randn(2, 3, 12, 12, generator=gen(4))
    reference = small_net(0)
    reference[0] = layer
    with torch.no_grad():
        torch.testing.assert_close(plain(x), reference.eval()(x), rtol=1e-6, atol=1e-6)


def test_export_gives_each_tied_kernel_its_rows_akps(tmp_path):
    net, layer = small_net(), tied_rgb_layer()
    path = tmp_path / "tied.anann.safetensors"
    write_anann(path, net, "0", layer)
    out = io.StringIO()
    kernel_table.write(read_anann(path), out, "jsonl", plain=True)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    canonical = tied_rgb_layer().canonicalize_()
    akp = [c for c in rows[0] if c.startswith("G.")]
    for k in range(3):  # channel 0: the tied Gabor row
        assert rows[k]["family"] == "G" and rows[k]["tied"]
        assert [rows[k][c] for c in akp] == [rows[0][c] for c in akp]
        assert rows[k]["gain"] == pytest.approx(float(canonical.gain["G"][k].detach()))
    assert [r["tied"] for r in rows[3:6]] == [True] * 3 and rows[3]["family"] == "Tf"
    assert not any(r["tied"] for r in rows[6:])
    assert [rows[6].get(c) for c in akp] != [rows[7].get(c) for c in akp]
    out = io.StringIO()
    kernel_table.write(read_anann(path), out, "csv", plain=True)
    lines = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [line["tied"] for line in lines] == ["1"] * 6 + ["0"] * 6
    assert lines[1]["G.lambda"] == lines[0]["G.lambda"] != ""


def test_mosaic_draws_a_tied_layer():
    layer = tied_rgb_layer()
    w = layer.synthesize().detach()
    fig = kernel_mosaic(w, w, layer.codes, torch.zeros(len(layer.codes)))
    assert fig.get_size_inches().min() > 0


def test_corrupt_row_buffer_is_a_user_error(tmp_path):
    from acl_convert.errors import UserError

    net, layer = small_net(), tied_rgb_layer()
    path = tmp_path / "tied.anann.safetensors"
    header = write_anann(path, net, "0", layer)
    tensors = dict(read_anann(path).tensors)
    tensors["0.akp_row_G"] = torch.tensor([0, 0, 0, 1, 3])  # row 2 unused, row 3 too many
    save_anann(path, tensors, header)
    with pytest.raises(UserError, match="corrupt"):
        load_anann(path, model=small_net())


# --- fine-tuning --------------------------------------------------------------------------------


def test_damping_is_per_row_and_matches_the_per_kernel_rule_for_single_kernels():
    layer = tied_rgb_layer()
    [(param, scale)] = [(p, s) for p, s in _akp_damping({"0": layer}) if p is layer.akp["G"]]
    assert tuple(scale.shape) == (3, 4)
    assert bool(((scale > 0) & (scale <= 1)).all())
    twin = untied_twin(layer)
    [(_, twin_scale)] = [(p, s) for p, s in _akp_damping({"0": twin}) if p is twin.akp["G"]]
    # Rows 1 and 2 hold one kernel each (kernels 3 and 4 of the family): the untied rule.
    torch.testing.assert_close(scale[1:], twin_scale[3:], rtol=1e-5, atol=0)
    # The shared row moves three kernels at once: never more freely than the freest of them.
    assert bool((scale[0] <= twin_scale[:3].max(0).values + 1e-6).all())


def test_finetune_moves_the_shared_akps_and_keeps_the_ties(tmp_path):
    net, layer = small_net(), tied_rgb_layer()
    path = tmp_path / "tied.anann.safetensors"
    header = write_anann(path, net, "0", layer)
    student = load_anann(path, model=small_net())
    teacher = small_net()
    with torch.no_grad():  # the original network: the tied layer's weight, somewhat off
        teacher[0].weight.copy_(
            layer.synthesize() + 0.05 * torch.randn(4, 3, 5, 5, generator=gen(5))
        )
        teacher[0].bias.copy_(layer.bias)
    images = torch.randn(8, 3, 12, 12, generator=gen(6))
    before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    config = FinetuneConfig(
        objective="layers",
        train=("akp",),
        lr={"akp": 3e-2, "plain": 1e-3, "rest": 1e-4},
        epochs=2,
        batch_size=4,
    )
    out = tmp_path / "ft.anann.safetensors"
    losses = finetune(
        student,
        list(range(8)),
        lambda items: (images[list(items)], None),
        config,
        output=out,
        header=read_anann(path).header,
        teacher=teacher,
    )
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    acl = student[0]
    assert acl.is_tied("G") and acl.num_rows("G") == 3
    assert not torch.equal(acl.akp["G"].detach(), before["0.akp.G"])
    # TGD1st's angle is held (its kernel jumps), its widths move.
    assert torch.equal(acl.akp["Tf"].detach()[:, 0], before["0.akp.Tf"][:, 0])
    assert not torch.equal(acl.akp["Tf"].detach()[:, 1:], before["0.akp.Tf"][:, 1:])
    assert torch.equal(acl.akp_rows("G"), before["0.akp_row_G"])
    # The saved AnaNN loads back tied, canonical, with the fine-tuned weight.
    again = load_anann(out, model=small_net())
    assert again[0].is_tied("G")
    assert header.layers["0"].pattern == again[0].pattern
    with torch.no_grad():
        torch.testing.assert_close(again[0].synthesize(), acl.synthesize(), rtol=1e-5, atol=1e-6)
