"""Tests of the Analytic Convolutional Layer (``acl_convert.nn.acl.ACL``, SPEC §2, §3, §5).

The layer is a drop-in for ``nn.Conv2d``: every test that can compares it with ``nn.Conv2d`` or
``F.conv2d`` built from the same arguments, rather than with the layer's own helpers. Expected
compact factors are worked out by hand from Eq. 25 (SPEC §3); the Gabor kernel used for the
kernel-order checks is written out again here with :mod:`math`.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from acl_convert import kernels, pattern
from acl_convert.nn.acl import ACL

#: Every family, Mean and Plain included; cycling through it interleaves families kernel by kernel.
ALL = ("G", "Lg", "Tf", "Ts", "Lt", "M", "P")
#: Families with AKPs.
ANALYTIC = ("G", "Lg", "Tf", "Ts", "Lt")
PADDING_MODES = ("zeros", "reflect", "circular", "replicate")
GAIN_OFFSET = [(False, False), (True, False), (False, True), (True, True)]

#: Generic AKPs in the paper's units. For 3x3..7x7 kernels no sample lies on x' = 0 for these
#: thetas, so sign() and |.| of the TGD kernels are smooth around every sample (gradcheck).
GENERIC = {
    "G": (4.0, 0.3, 0.2, 1.5),
    "Lg": (1.3,),
    "Tf": (0.41, 1.6, 2.3),
    "Ts": (0.37, 1.8),
    "Lt": (1.7,),
}

PAPER_PATTERN = "G30Lg15Lt15Tf36P96"
PAPER_RATIO = "G0.1562Lg0.0781Lt0.0781Tf0.1875P0.5"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These tensors are tiny: on a busy machine, intra-op threads only add contention (a 2x4x16x17
    # convolution took 50 ms with 2 threads on a loaded 2-core box, 0.5 ms with one).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- helpers -------------------------------------------------------------------------------


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cycled(n: int, families=ALL) -> list[str]:
    """n codes cycling through ``families``: every family interleaved with the others."""
    return [families[k % len(families)] for k in range(n)]


def ref_gabor(h: int, w: int, lam: float, theta: float, psi: float, sigma: float) -> torch.Tensor:
    """SPEC §2 Gabor on the grid of Eqs. 2-3 (x down the rows, y along the columns), float64."""
    out = torch.empty(h, w, dtype=torch.float64)
    for i in range(1, h + 1):
        for j in range(1, w + 1):
            x, y = i - (h + 1) / 2, j - (w + 1) / 2
            xr = x * math.cos(theta) + y * math.sin(theta)
            yr = -x * math.sin(theta) + y * math.cos(theta)
            env = math.exp(-(xr**2 + yr**2) / (2 * sigma**2))
            out[i - 1, j - 1] = env * math.cos(2 * math.pi * xr / lam + psi)
    return out


def values_for(codes, h, w, *, gain=False, offset=False, seed=0, dtype=torch.float64):
    """Explicit AKPs (generic values, slightly jittered per kernel), gains, offsets and plain
    kernels for ``ACL.from_assignment``."""
    g = gen(seed)
    akps, gains, offsets = {}, {}, {}
    for code in dict.fromkeys(codes):
        n = codes.count(code)
        if code == "P":
            continue
        if code in GENERIC:
            base = torch.tensor(GENERIC[code], dtype=dtype)
            akps[code] = base * (1 + 0.02 * torch.rand(n, base.numel(), generator=g, dtype=dtype))
        else:
            akps[code] = torch.empty(n, 0, dtype=dtype)
        if gain:
            gains[code] = torch.rand(n, generator=g, dtype=dtype) * 2 - 1.2
        # Mean carries its constant in the gain; without a gain, in an offset (SPEC §4).
        if offset and (code in GENERIC or (code == "M" and not gain)):
            offsets[code] = torch.rand(n, generator=g, dtype=dtype) * 0.2 - 0.1
    n_plain = codes.count("P")
    plain = torch.randn(n_plain, h, w, generator=g, dtype=dtype) if n_plain else None
    return akps, (gains or None), (offsets or None), plain


def expected_kernel(code, akp, h, w, gain=None, offset=None):
    k = kernels.get(code)(akp[None], h, w)[0]
    if gain is not None:
        k = gain * k
    if offset is not None:
        k = k + offset
    return k


def manual_padding(padding, kernel_size, dilation):
    """``F.pad`` amounts ``(left, right, top, bottom)`` for a padding as nn.Conv2d takes it."""
    kh, kw = kernel_size
    dh, dw = dilation
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        out = []
        for k, d in ((kw, dw), (kh, dh)):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return (pw, pw, ph, ph)


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def kernel_params(layer: ACL) -> int:
    """Learnable parameters of the layer's kernels (everything but the bias)."""
    return sum(p.numel() for name, p in layer.named_parameters() if name != "bias")


# --- drop-in equivalence with nn.Conv2d ------------------------------------------------------

CI, CO = 4, 8


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("kernel_size", [3, (3, 5), 4, 7])
@pytest.mark.parametrize("groups", [1, 2, CI])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("padding", [0, 1, "same", "valid", (1, 2)])
@pytest.mark.parametrize("stride", [1, 2])
def test_forward_equals_conv2d(stride, padding, dilation, groups, kernel_size):
    x = torch.randn(2, CI, 16, 17, generator=gen(1))
    for (bias, padding_mode), extras in zip(
        itertools.product((True, False), PADDING_MODES),
        itertools.cycle([(False, False), (True, True), (True, False), (False, True)]),
    ):
        args = (CI, CO, kernel_size, stride, padding, dilation, groups, bias, padding_mode)
        try:
            ref = nn.Conv2d(*args)
        except Exception as err:  # e.g. padding='same' with stride 2: same error from the ACL
            with pytest.raises(type(err)) as info:
                ACL(*args, assignment=cycled(CO * CI // groups))
            assert str(info.value) == str(err)
            continue
        gain, offset = extras
        layer = ACL(
            *args, assignment=cycled(CO * CI // groups), gain=gain, offset=offset, generator=gen(2)
        )
        h, w = pair(kernel_size)
        assert layer.weight.shape == ref.weight.shape == (CO, CI // groups, h, w)

        out = layer(x)
        with torch.no_grad():
            ref.weight.copy_(layer.weight)
            if bias:
                ref.bias.copy_(layer.bias)
        expected = ref(x)
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)

        # F.conv2d with .weight, padding done by hand (independently of nn.Conv2d's helpers).
        if padding_mode == "zeros":
            manual = F.conv2d(x, layer.weight, layer.bias, stride, padding, dilation, groups)
        else:
            padded = F.pad(x, manual_padding(padding, (h, w), pair(dilation)), mode=padding_mode)
            manual = F.conv2d(padded, layer.weight, layer.bias, stride, 0, dilation, groups)
        torch.testing.assert_close(out, manual, rtol=0, atol=1e-6)

        baked = layer.to_conv2d()
        assert type(baked) is nn.Conv2d
        for attr in (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "padding_mode",
        ):
            assert getattr(baked, attr) == getattr(ref, attr), attr
        assert (baked.bias is None) == (not bias)
        torch.testing.assert_close(baked(x), out, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stride": 2, "padding": "same"},
        {"groups": 3},  # 4 input channels are not divisible by 3 groups
        {"padding": "full"},
        {"padding_mode": "mirror"},
    ],
)
def test_invalid_conv_arguments_raise_like_conv2d(kwargs):
    with pytest.raises((ValueError, RuntimeError)) as expected:
        nn.Conv2d(4, 6, 3, **kwargs)
    with pytest.raises(type(expected.value)) as got:
        ACL(4, 6, 3, assignment="P24", **kwargs)
    assert str(got.value) == str(expected.value)


def test_non_contiguous_input():
    layer = ACL(3, 4, 5, padding=2, assignment=cycled(12), generator=gen(0))
    x = torch.randn(2, 9, 3, 9, generator=gen(1)).permute(0, 2, 3, 1)  # (2, 3, 9, 9), strided
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), layer(x.contiguous()), rtol=0, atol=0)


def test_hyper_parameters_are_exposed_like_conv2d():
    layer = ACL(4, 6, (3, 5), 2, (1, 2), 2, 2, False, "reflect", assignment="P12")
    ref = nn.Conv2d(4, 6, (3, 5), 2, (1, 2), 2, 2, False, "reflect")
    for attr in (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    ):
        assert getattr(layer, attr) == getattr(ref, attr), attr
    assert layer.bias is None


# --- structure: parameters, buffers, kernel order --------------------------------------------


def test_one_tensor_per_family_and_index_buffers():
    codes = cycled(3 * 10)  # 7 families interleaved over 30 kernels
    layer = ACL(3, 10, 5, assignment=codes, gain=True, offset=True, generator=gen(0))
    counts = {c: codes.count(c) for c in ALL}

    names = {name for name, _ in layer.named_parameters()}
    expected = {f"akp.{c}" for c in ANALYTIC} | {f"gain.{c}" for c in ALL if c != "P"}
    expected |= {f"offset.{c}" for c in ANALYTIC} | {"plain", "bias"}
    assert names == expected
    for code in ANALYTIC:
        assert layer.akp[code].shape == (counts[code], kernels.get(code).num_params)
        assert layer.offset[code].shape == (counts[code],)
    for code in ALL[:-1]:
        assert layer.gain[code].shape == (counts[code],)
    assert layer.plain.shape == (counts["P"], 5, 5)

    buffers = dict(layer.named_buffers())
    seen = []
    for code in ALL:
        index = buffers[f"index_{code}"]
        assert index.dtype == torch.long
        assert index.tolist() == [k for k, c in enumerate(codes) if c == code]
        seen += index.tolist()
    assert sorted(seen) == list(range(len(codes)))
    assert layer.codes == codes
    assert layer.family_totals() == counts
    assert layer.num_kernels == 30


def test_pattern_mosaic_is_consecutive_runs():
    layer = ACL.from_pattern(3, 64, 7, PAPER_PATTERN, generator=gen(0))
    expected = ["G"] * 30 + ["Lg"] * 15 + ["Lt"] * 15 + ["Tf"] * 36 + ["P"] * 96
    assert layer.codes == expected
    assert layer.pattern == "(3x64)" + PAPER_PATTERN
    assert layer.family_totals() == {"G": 30, "Lg": 15, "Lt": 15, "Tf": 36, "P": 96}


@pytest.mark.parametrize(
    "ci,co,expected",
    [
        (1, 8, {"G": 1, "Lg": 1, "Lt": 1, "Tf": 1, "P": 4}),
        (3, 16, {"G": 7, "Lg": 4, "Lt": 4, "Tf": 9, "P": 24}),
        (3, 64, {"G": 30, "Lg": 15, "Lt": 15, "Tf": 36, "P": 96}),
    ],
)
def test_ratio_pattern_uses_largest_remainder(ci, co, expected):
    # Hand-worked: for 48 kernels the quotas are 7.498, 3.749, 3.749, 9.001, 24.002; floors give
    # 46 and the two missing kernels go to Lg and Lt (largest remainders .749).
    layer = ACL.from_pattern(ci, co, 5, PAPER_RATIO, generator=gen(0))
    assert layer.family_totals() == expected
    assert layer.family_totals() == dict(pattern.to_counts(PAPER_RATIO, ci * co))


@pytest.mark.parametrize("groups,ci,co", [(1, 3, 2), (2, 4, 6), (4, 4, 4)])
@pytest.mark.parametrize("kernel_size", [(5, 5), (4, 6)])
def test_kernel_order(groups, ci, co, kernel_size):
    """Kernel k = q * (Ci/groups) + p is weight[q, p] (SPEC §3)."""
    h, w = kernel_size
    cpg = ci // groups
    n = co * cpg
    lam, theta, psi, sigma = 3.5, 0.7, 0.4, 1.6
    for k in range(n):
        codes = ["P"] * n
        codes[k] = "G"
        plain = torch.randn(n - 1, h, w, generator=gen(k), dtype=torch.float64)
        layer = ACL.from_values(
            ci,
            co,
            kernel_size,
            codes,
            {"G": torch.tensor([[lam, theta, psi, sigma]])},
            plain=plain,
            groups=groups,
            dtype=torch.float64,
        )
        q, p = divmod(k, cpg)
        weight = layer.weight
        torch.testing.assert_close(weight[q, p], ref_gabor(h, w, lam, theta, psi, sigma))
        torch.testing.assert_close(weight.view(-1, h, w)[k], weight[q, p], rtol=0, atol=0)
        others = [j for j in range(n) if j != k]
        torch.testing.assert_close(weight.view(-1, h, w)[others], plain, rtol=0, atol=0)


# --- constructors ---------------------------------------------------------------------------


def test_from_pattern_has_no_gain_or_offset_unless_asked():
    layer = ACL.from_pattern(3, 64, 7, PAPER_PATTERN, generator=gen(0))
    assert len(layer.gain) == 0 and len(layer.offset) == 0
    assert not any(n.startswith(("gain", "offset")) for n, _ in layer.named_parameters())

    with_gain = ACL.from_pattern(3, 64, 7, PAPER_PATTERN, gain=True, generator=gen(0))
    assert set(with_gain.gain.keys()) == {"G", "Lg", "Lt", "Tf"}
    assert len(with_gain.offset) == 0
    for code in with_gain.gain:
        torch.testing.assert_close(with_gain.gain[code], torch.ones_like(with_gain.gain[code]))


def test_mean_has_one_parameter_with_gain_or_offset():
    # Without a gain, the offset is Mean's one learnable constant.
    layer = ACL(2, 4, 3, assignment=["M", "G", "P", "M"] * 2, offset=True, generator=gen(0))
    assert set(layer.offset.keys()) == {"M", "G"}
    assert len(layer.gain) == 0
    # With a gain, the gain already makes Mean any constant: no second parameter.
    layer = ACL(2, 4, 3, assignment=["M", "G", "P", "M"] * 2, gain=True, offset=True)
    assert set(layer.gain.keys()) == {"M", "G"}
    assert set(layer.offset.keys()) == {"G"}
    assert "M" not in layer.akp
    torch.testing.assert_close(layer.offset["G"], torch.zeros(2))


def test_from_pattern_initialisation():
    h = w = 7
    layer = ACL.from_pattern(16, 32, 7, "G64Lg64Tf64Ts64Lt64M32P160", generator=gen(0))
    for code in ANALYTIC:
        values = layer.akps(code)
        for k, (lo, hi) in enumerate(kernels.get(code).init_ranges(h, w)):
            assert values[:, k].min() >= lo - 1e-5 and values[:, k].max() <= hi + 1e-5, code
            assert values[:, k].std() > 0, code  # random, not one value for all
        assert torch.isfinite(layer.weight).all()
    # Plain kernels and bias: nn.Conv2d's U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1 / math.sqrt(16 * h * w)
    plain = layer.plain.detach()
    assert plain.abs().max() <= bound
    assert plain.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert layer.bias.abs().max() <= bound
    # Without a generator, the same distribution from torch's global RNG.
    unseeded = ACL.from_pattern(16, 32, 7, "P512")
    assert unseeded.plain.abs().max() <= bound
    assert unseeded.plain.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


def test_generator_makes_construction_reproducible():
    a = ACL.from_pattern(3, 16, 5, PAPER_RATIO, gain=True, generator=gen(7))
    b = ACL.from_pattern(3, 16, 5, PAPER_RATIO, gain=True, generator=gen(7))
    c = ACL.from_pattern(3, 16, 5, PAPER_RATIO, gain=True, generator=gen(8))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.weight, c.weight)


@pytest.mark.parametrize("gain,offset", GAIN_OFFSET)
def test_from_assignment_values_come_back(gain, offset):
    h, w = 5, 4
    codes = cycled(3 * 5)
    akps, gains, offsets, plain = values_for(codes, h, w, gain=gain, offset=offset)
    bias = torch.randn(5, dtype=torch.float64)
    layer = ACL.from_values(
        3,
        5,
        (h, w),
        codes,
        akps,
        gains=gains,
        offsets=offsets,
        plain=plain,
        bias=bias,
        dtype=torch.float64,
    )
    assert layer.gain_enabled == gain and layer.offset_enabled == offset
    for code in ALL[:-1]:
        torch.testing.assert_close(layer.akps(code), akps[code])
    torch.testing.assert_close(layer.bias, bias, rtol=0, atol=0)

    flat = layer.weight.view(-1, h, w)
    seen = {c: 0 for c in ALL}
    for k, code in enumerate(codes):
        i = seen[code]
        seen[code] += 1
        if code == "P":
            torch.testing.assert_close(flat[k], plain[i], rtol=0, atol=0)
            continue
        g = gains[code][i] if gain else None
        b = offsets[code][i] if offset and (code != "M" or not gain) else None
        torch.testing.assert_close(flat[k], expected_kernel(code, akps[code][i], h, w, g, b))


def test_from_assignment_gabor_in_paper_units():
    layer = ACL.from_values(
        1,
        2,
        7,
        ["G", "P"],
        {"G": torch.tensor([[5.0, 2.0, -1.0, 1.2]])},
        gains={"G": torch.tensor([-0.5])},
        offsets={"G": torch.tensor([0.25])},
        plain=torch.zeros(1, 7, 7),
        dtype=torch.float64,
    )
    torch.testing.assert_close(
        layer.akps("G"), torch.tensor([[5.0, 2.0, -1.0, 1.2]], dtype=torch.float64)
    )
    expected = -0.5 * ref_gabor(7, 7, 5.0, 2.0, -1.0, 1.2) + 0.25
    torch.testing.assert_close(layer.weight[0, 0], expected)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 6, 3),
        nn.Conv2d(4, 6, (3, 5), stride=2, padding=(1, 2), dilation=2, groups=2, bias=False),
        nn.Conv2d(4, 4, 5, padding="same", groups=4, padding_mode="reflect"),
        nn.Conv2d(2, 3, 4, padding=1, padding_mode="circular"),
    ],
    ids=["plain", "strided-grouped", "depthwise-same-reflect", "even-circular"],
)
def test_from_conv_all_plain_is_identical(conv):
    torch.manual_seed(0)
    codes = ["P"] * (conv.out_channels * conv.in_channels // conv.groups)
    layer = ACL.from_conv(conv, codes, {})
    x = torch.randn(2, conv.in_channels, 13, 14, generator=gen(3))
    assert torch.equal(layer(x), conv(x))
    assert torch.equal(layer.weight, conv.weight)
    for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size"):
        assert getattr(layer, attr) == getattr(conv, attr), attr
    assert (layer.bias is None) == (conv.bias is None)


@pytest.mark.parametrize("offset", [False, True])
def test_from_conv_mixed(offset):
    conv = nn.Conv2d(2, 7, 5, padding=2, dtype=torch.float64)
    codes = cycled(14)
    akps, gains, offsets, _ = values_for(codes, 5, 5, gain=True, offset=offset, seed=4)
    layer = ACL.from_conv(conv, codes, akps, gains=gains, offsets=offsets)
    assert layer.weight.dtype == torch.float64
    flat, conv_flat = layer.weight.view(-1, 5, 5), conv.weight.detach().view(-1, 5, 5)
    seen = {c: 0 for c in ALL}
    for k, code in enumerate(codes):
        i = seen[code]
        seen[code] += 1
        if code == "P":
            assert torch.equal(flat[k], conv_flat[k])
        else:
            b = offsets[code][i] if offset and code != "M" else None  # gains are on here
            expected = expected_kernel(code, akps[code][i], 5, 5, gains[code][i], b)
            torch.testing.assert_close(flat[k], expected)
    assert torch.equal(layer.bias, conv.bias)
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64, generator=gen(0))
    ref = F.conv2d(x, layer.weight, conv.bias, padding=2)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)


def test_from_conv_does_not_alias_the_conv():
    conv = nn.Conv2d(1, 2, 3)
    layer = ACL.from_conv(conv, ["P", "P"], {})
    before = conv.weight.detach().clone()
    with torch.no_grad():
        layer.plain.add_(1.0)
        layer.bias.add_(1.0)
    assert torch.equal(conv.weight, before)


# --- dtype and device -------------------------------------------------------------------------


def test_float64():
    layer = ACL.from_pattern(
        3, 8, 5, "G4Lg4Tf4Ts4Lt4M2P2", gain=True, offset=True, dtype=torch.float64, generator=gen(0)
    )
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert layer.weight.dtype == torch.float64
    assert layer.akps("G").dtype == torch.float64
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    assert layer(x).dtype == torch.float64
    assert layer.to_conv2d().weight.dtype == torch.float64


def test_float64_mean_only_layer():
    layer = ACL(2, 3, 3, assignment="M6", bias=False, dtype=torch.float64)
    assert layer.weight.dtype == torch.float64


def test_double_after_construction():
    layer = ACL.from_pattern(2, 4, 3, "G2Tf2P4", generator=gen(0)).double()
    assert layer.weight.dtype == torch.float64
    assert layer.index("G").dtype == torch.long  # index buffers stay integer


def test_device_argument_cpu():
    layer = ACL.from_pattern(2, 4, 3, "G2Tf2P4", device="cpu")
    assert all(t.device.type == "cpu" for t in itertools.chain(layer.parameters(), layer.buffers()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():
    cpu = ACL.from_pattern(
        3, 8, 5, "G4Lg4Tf4Ts4Lt4M2P2", padding=2, gain=True, offset=True, generator=gen(0)
    )
    built = ACL.from_pattern(
        3, 8, 5, "G4Lg4Tf4Ts4Lt4M2P2", padding=2, gain=True, offset=True, device="cuda"
    )
    assert all(
        t.device.type == "cuda" for t in itertools.chain(built.parameters(), built.buffers())
    )
    assert built.weight.device.type == "cuda"
    moved = copy.deepcopy(cpu).cuda()
    x = torch.randn(2, 3, 10, 10, generator=gen(1))
    torch.testing.assert_close(moved(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-5)
    assert moved.to_conv2d().weight.device.type == "cuda"
    loss = built(x.cuda()).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in built.akp.values())


# --- eval cache -------------------------------------------------------------------------------


def counting(layer: ACL, monkeypatch) -> list[int]:
    calls = [0]
    original = layer.synthesize

    def spy():
        calls[0] += 1
        return original()

    monkeypatch.setattr(layer, "synthesize", spy)
    return calls


def test_eval_caches_weight_and_train_drops_it(monkeypatch):
    layer = ACL.from_pattern(3, 8, 5, "G4Lg4Tf4Ts4Lt4M2P2", padding=2, generator=gen(0))
    calls = counting(layer, monkeypatch)
    x = torch.randn(2, 3, 9, 9, generator=gen(1))

    train_out = layer(x)
    with torch.no_grad():
        layer(x)
    assert calls[0] == 2  # training: rebuilt on every call, also without gradients
    assert layer._cached_weight is None

    layer.eval()
    with torch.no_grad():
        first = layer(x)
        assert layer._cached_weight is not None
        assert calls[0] == 3
        second = layer(x)
    assert calls[0] == 3  # no re-synthesis
    torch.testing.assert_close(first, train_out, rtol=0, atol=0)
    torch.testing.assert_close(second, train_out, rtol=0, atol=0)
    assert not layer._cached_weight.requires_grad

    layer.train()
    assert layer._cached_weight is None
    with torch.no_grad():
        layer(x)
    assert calls[0] == 4
    assert "_cached_weight" not in layer.state_dict()


def test_eval_cache_costs_what_a_conv_costs():
    """In eval mode without gradients the forward is one F.conv2d with the cached tensor."""
    layer = ACL.from_pattern(3, 8, 5, "G4Lg4Tf4Ts4Lt4M2P2", padding=2, generator=gen(0)).eval()
    x = torch.randn(2, 3, 9, 9, generator=gen(1))
    with torch.inference_mode():
        layer(x)
        assert layer.weight is layer._cached_weight
    # Frozen parameters need no gradient either: the cache serves grad-enabled inference too.
    layer.requires_grad_(False)
    assert layer.weight is layer._cached_weight


def test_eval_mode_fine_tuning_still_reaches_the_akps():
    """Fine-tuning with the model in eval mode (frozen BatchNorm) must train the AKPs: the cache
    is not used when gradients are needed, and an optimiser step invalidates it."""
    layer = ACL.from_pattern(3, 8, 5, "G4Lg4Tf4Ts4Lt4M2P2", padding=2, generator=gen(0)).eval()
    x = torch.randn(2, 3, 9, 9, generator=gen(1))
    with torch.no_grad():
        before = layer(x)
    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), list(layer.akp.values()), allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        layer.akp["G"].add_(0.1)  # an in-place update, as an optimiser step makes
        after = layer(x)
    assert not torch.allclose(before, after)
    with torch.no_grad():
        layer.train()
        torch.testing.assert_close(after, layer(x), rtol=0, atol=0)


def test_load_state_dict_in_eval_drops_cache():
    src = ACL.from_pattern(3, 8, 5, "G4Lg4Tf4Ts4Lt4M2P2", padding=2, generator=gen(0))
    dst = ACL.from_pattern(3, 8, 5, "G4Lg4Tf4Ts4Lt4M2P2", padding=2, generator=gen(1)).eval()
    x = torch.randn(2, 3, 9, 9, generator=gen(2))
    with torch.no_grad():
        stale = dst(x)
        assert dst._cached_weight is not None
        dst.load_state_dict(src.state_dict())
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
        assert not torch.allclose(stale, dst(x))


def test_set_values_drops_cache():
    codes = ["G", "Lg", "P", "P"]
    layer = ACL(2, 2, 3, assignment=codes, generator=gen(0)).eval()
    x = torch.randn(1, 2, 6, 6, generator=gen(1))
    with torch.no_grad():
        layer(x)
    assert layer._cached_weight is not None
    new_plain = torch.randn(2, 3, 3, generator=gen(2))
    layer.set_values(
        {"G": torch.tensor([[3.0, 0.5, 0.1, 1.0]]), "Lg": torch.tensor([[0.9]])}, plain=new_plain
    )
    assert layer._cached_weight is None
    torch.testing.assert_close(layer.weight.view(-1, 3, 3)[2:], new_plain, rtol=0, atol=0)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.synthesize(), layer.bias))


def test_canonicalize_drops_cache():
    layer = ACL.from_values(1, 1, 5, ["G"], {"G": torch.tensor([[4.0, 4.0, 0.5, 1.5]])})
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(1, 1, 6, 6))
    assert layer._cached_weight is not None
    layer.canonicalize_()
    assert layer._cached_weight is None


def test_cache_from_inference_mode_does_not_break_autograd():
    layer = ACL.from_pattern(2, 3, 3, "G3P3", generator=gen(0)).eval()
    x = torch.randn(1, 2, 8, 8, generator=gen(1))
    with torch.inference_mode():
        layer(x)
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None


# --- state_dict -------------------------------------------------------------------------------


@pytest.mark.parametrize("gain,offset", [(False, False), (True, True)])
def test_state_dict_round_trip(gain, offset):
    kwargs = dict(padding=1, gain=gain, offset=offset)
    src = ACL.from_pattern(3, 8, 5, "G4Lg4Tf4Ts4Lt4M2P2", generator=gen(0), **kwargs)
    if gain:
        with torch.no_grad():  # make gains and offsets non-trivial so that loading them matters
            for p in itertools.chain(src.gain.values(), src.offset.values()):
                p.uniform_(-1, 1, generator=gen(5))
    dst = ACL.from_pattern(3, 8, 5, "G4Lg4Tf4Ts4Lt4M2P2", generator=gen(1), **kwargs)
    x = torch.randn(2, 3, 9, 9, generator=gen(2))
    assert not torch.allclose(dst(x), src(x))

    state = src.state_dict()
    for code in ("G", "Lg", "Tf", "Ts", "Lt", "M", "P"):
        assert f"index_{code}" in state
    assert {"akp.G", "akp.Tf", "plain", "bias"} <= set(state)
    assert ("gain.G" in state) == gain and ("offset.G" in state) == offset
    assert "offset.M" not in state

    result = dst.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(dst(x), src(x))
    for key, value in dst.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_state_dict_survives_torch_save(tmp_path):
    src = ACL.from_pattern(3, 8, 5, "G4Lg4Tf4Ts4Lt4M2P2", gain=True, generator=gen(0))
    torch.save(src.state_dict(), tmp_path / "acl.pt")
    dst = ACL.from_pattern(3, 8, 5, "G4Lg4Tf4Ts4Lt4M2P2", gain=True, generator=gen(1))
    dst.load_state_dict(torch.load(tmp_path / "acl.pt", weights_only=True))
    x = torch.randn(1, 3, 7, 7)
    assert torch.equal(dst(x), src(x))


@pytest.mark.parametrize(
    "other",
    [
        "G4Lg4Tf4Ts4Lt4P4",  # a family missing (no M)
        "G5Lg3Tf4Ts4Lt4M2P2",  # same families, other counts
        "G4Lg4Tf4Ts4Lt4M2G2",  # no plain kernels
    ],
)
def test_load_into_different_assignment_fails(other):
    src = ACL.from_pattern(3, 8, 5, "G4Lg4Tf4Ts4Lt4M2P2", generator=gen(0))
    dst = ACL.from_pattern(3, 8, 5, other, generator=gen(1))
    with pytest.raises(RuntimeError):
        dst.load_state_dict(src.state_dict())


def test_load_into_different_gain_setting_fails():
    src = ACL.from_pattern(3, 8, 5, "G4Lg4Tf4Ts4Lt4M2P2", gain=True, generator=gen(0))
    dst = ACL.from_pattern(3, 8, 5, "G4Lg4Tf4Ts4Lt4M2P2", generator=gen(1))
    with pytest.raises(RuntimeError, match="gain"):
        dst.load_state_dict(src.state_dict())
    with pytest.raises(RuntimeError, match="gain"):
        src.load_state_dict(dst.state_dict())


def test_load_permuted_assignment_adopts_the_saved_mosaic():
    """Same families and counts at other positions: the index buffers are state, so the loaded
    layer must reproduce the saved one exactly (never a silent mix of the two)."""
    src = ACL(1, 8, 3, assignment="G4P4", generator=gen(0))
    dst = ACL(1, 8, 3, assignment="P4G4", generator=gen(1))
    dst.load_state_dict(src.state_dict())
    assert dst.codes == src.codes
    x = torch.randn(1, 1, 6, 6)
    assert torch.equal(dst(x), src(x))


def test_deepcopy():
    layer = ACL.from_pattern(3, 8, 5, "G4Lg4Tf4Ts4Lt4M2P2", gain=True, generator=gen(0))
    clone = copy.deepcopy(layer)
    x = torch.randn(1, 3, 7, 7)
    assert torch.equal(clone(x), layer(x))
    with torch.no_grad():
        clone.akp["G"].add_(0.1)
    assert not torch.equal(clone(x), layer(x))


# --- gradcheck --------------------------------------------------------------------------------


GRAD_CODES = ["G", "Lg", "Tf", "Ts", "Lt", "M", "P", "P"]


@pytest.mark.parametrize("gain,offset", GAIN_OFFSET)
def test_gradcheck_through_forward(gain, offset):
    akps, gains, offsets, plain = values_for(GRAD_CODES, 5, 5, gain=gain, offset=offset, seed=3)
    layer = ACL.from_values(
        2,
        4,
        5,
        GRAD_CODES,
        akps,
        gains=gains,
        offsets=offsets,
        plain=plain,
        bias=torch.randn(4, dtype=torch.float64),
        padding=1,
        dtype=torch.float64,
    )
    names = [name for name, _ in layer.named_parameters()]
    expected = {"akp.G", "akp.Lg", "akp.Tf", "akp.Ts", "akp.Lt", "plain", "bias"}
    expected |= {f"gain.{c}" for c in ALL[:-1]} if gain else set()
    expected |= {f"offset.{c}" for c in ANALYTIC} if offset else set()
    expected |= {"offset.M"} if offset and not gain else set()  # Mean's one constant
    assert set(names) == expected
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]
    x = torch.randn(1, 2, 7, 7, dtype=torch.float64, generator=gen(9), requires_grad=True)

    def fn(x, *ps):
        return functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


def test_gradcheck_circular_strided_grouped():
    codes = ["G", "Tf", "Ts", "P", "Lg", "Lt", "M", "P"]
    akps, gains, offsets, plain = values_for(codes, 3, 3, gain=True, offset=True, seed=5)
    layer = ACL.from_values(
        4,
        4,
        3,
        codes,
        akps,
        gains=gains,
        offsets=offsets,
        plain=plain,
        bias=None,
        stride=2,
        padding=1,
        groups=2,
        padding_mode="circular",
        dtype=torch.float64,
    )
    names = [name for name, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64, generator=gen(9), requires_grad=True)

    def fn(x, *ps):
        return functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


def test_gradients_reach_every_parameter():
    layer = ACL.from_pattern(
        2, 4, 5, "G1Lg1Tf1Ts1Lt1M1P2", padding=2, gain=True, offset=True, generator=gen(0)
    )
    layer(torch.randn(2, 2, 8, 8, generator=gen(1))).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --- compact factor and repr -------------------------------------------------------------------

N7 = 192 * 49  # (3x64) 7x7 layer: Co * Ci * h * w


@pytest.mark.parametrize(
    "text,gain,offset,expected",
    [
        # The paper's values (SPEC §3), no gains.
        (PAPER_PATTERN, False, False, 0.4726),
        ("G72Lg30Lt15Tf27P48", False, False, 0.706),
        ("G192", False, False, 0.9184),
        ("M192", False, False, 1.0),
        # By hand: G 4 AKPs, Lg/Lt 1, Tf 3, P 49, plus one per gain and per offset.
        (PAPER_PATTERN, True, False, 1 - (30 * 5 + 15 * 2 + 15 * 2 + 36 * 4 + 96 * 49) / N7),
        (PAPER_PATTERN, True, True, 1 - (30 * 6 + 15 * 3 + 15 * 3 + 36 * 5 + 96 * 49) / N7),
        (PAPER_PATTERN, False, True, 1 - (30 * 5 + 15 * 2 + 15 * 2 + 36 * 4 + 96 * 49) / N7),
        ("G192", True, True, 1 - 192 * 6 / N7),
        # Mean: g * const + b is one constant, one parameter (SPEC §4).
        ("M192", True, False, 1 - 192 / N7),
        ("M192", True, True, 1 - 192 / N7),
        ("M96P96", True, True, 1 - (96 + 96 * 49) / N7),
    ],
)
def test_compact_factor(text, gain, offset, expected):
    layer = ACL.from_pattern(3, 64, 7, text, gain=gain, offset=offset, generator=gen(0))
    assert round(layer.compact_factor(), 4) == round(expected, 4)


@pytest.mark.parametrize("text", [PAPER_PATTERN, "G72Lg30Lt15Tf27P48", "G192", "M192"])
def test_compact_factor_matches_pattern_module(text):
    layer = ACL.from_pattern(3, 64, 7, text, generator=gen(0))
    assert layer.compact_factor() == pytest.approx(pattern.compact_factor(text, 7, 7), abs=1e-12)


@pytest.mark.parametrize(
    "gain,offset",
    [
        (False, False),
        (False, True),
        (True, False),
        (True, True),
    ],
)
@pytest.mark.parametrize("groups", [1, 2])
def test_compact_factor_counts_the_layers_parameters(gain, offset, groups):
    """Eq. 25 is about the layer's learnable kernel parameters: the number must be the one the
    layer actually holds."""
    layer = ACL(
        4,
        6,
        (3, 5),
        groups=groups,
        assignment=cycled(6 * 4 // groups),
        gain=gain,
        offset=offset,
        generator=gen(0),
    )
    expected = 1 - kernel_params(layer) / (6 * (4 // groups) * 3 * 5)
    assert layer.compact_factor() == pytest.approx(expected, abs=1e-12)


def test_compact_factor_excludes_bias():
    a = ACL.from_pattern(3, 64, 7, PAPER_PATTERN, bias=True)
    b = ACL.from_pattern(3, 64, 7, PAPER_PATTERN, bias=False)
    assert a.compact_factor() == b.compact_factor()


def test_extra_repr():
    layer = ACL.from_pattern(3, 64, 7, PAPER_PATTERN, stride=2, padding=3, generator=gen(0))
    text = repr(layer)
    # Family totals, not the run-length pattern (kilobytes for a converted layer; .pattern).
    assert "families=G30 Lg15 Tf36 Lt15 P96" in text and "(3x64)" not in text
    assert layer.pattern == "(3x64)" + PAPER_PATTERN
    assert "0.4726" in text
    assert "stride=(2, 2)" in text and "padding=(3, 3)" in text
    assert "kernel_size=(7, 7)" in text
    gained = repr(ACL.from_pattern(3, 64, 7, PAPER_PATTERN, gain=True, offset=True))
    assert "gain" in gained and "offset" in gained
    assert f"{1 - (30 * 6 + 15 * 3 + 15 * 3 + 36 * 5 + 96 * 49) / N7:.4f}" in gained


# --- canonicalize_ -----------------------------------------------------------------------------


@pytest.mark.parametrize("gain", [False, True])
def test_canonicalize_keeps_weight(gain):
    n = 12
    g = gen(11)
    codes = ["G"] * n + ["Ts"] * n + ["Tf"] * n + ["Lg"] * 2 + ["P"] * 2
    ci, co = 2, (len(codes)) // 2

    def angles():
        return torch.rand(n, generator=g, dtype=torch.float64) * 20 - 10

    akps = {
        "G": torch.stack(
            [
                torch.full((n,), 3.5, dtype=torch.float64),
                angles(),
                angles(),
                torch.full((n,), 1.4, dtype=torch.float64),
            ],
            -1,
        ),
        "Ts": torch.stack([angles(), torch.full((n,), 1.8, dtype=torch.float64)], -1),
        "Tf": torch.stack(
            [
                angles(),
                torch.full((n,), 1.6, dtype=torch.float64),
                torch.full((n,), 2.2, dtype=torch.float64),
            ],
            -1,
        ),
        "Lg": torch.tensor([[1.1], [0.8]], dtype=torch.float64),
    }
    gains = None
    if gain:
        gains = {
            c: torch.rand(len(v), generator=g, dtype=torch.float64) * 2 - 1 for c, v in akps.items()
        }
    layer = ACL.from_values(
        ci,
        co,
        5,
        codes,
        akps,
        gains=gains,
        plain=torch.randn(2, 5, 5, dtype=torch.float64),
        dtype=torch.float64,
    )
    before = layer.weight.detach().clone()
    assert layer.canonicalize_() is layer
    torch.testing.assert_close(layer.weight, before, rtol=1e-9, atol=1e-9)

    gab = layer.akps("G")
    assert (gab[:, 1] >= 0).all() and (gab[:, 1] < math.pi).all()
    assert (gab[:, 2] > -math.pi).all() and (gab[:, 2] <= math.pi).all()
    torch.testing.assert_close(gab[:, [0, 3]], akps["G"][:, [0, 3]])
    ts = layer.akps("Ts")
    assert (ts[:, 0] >= 0).all() and (ts[:, 0] < math.pi).all()
    tf = layer.akps("Tf")
    top = math.pi if gain else 2 * math.pi
    assert (tf[:, 0] >= 0).all() and (tf[:, 0] < top).all()
    if gain:
        # TGD1st: the half-turn moved into the gain's sign; the kernel is the same.
        assert (layer.gain["Tf"].abs() - gains["Tf"].abs()).abs().max() < 1e-12
    torch.testing.assert_close(layer.akps("Lg"), akps["Lg"])


# --- training -----------------------------------------------------------------------------------


def bars_and_blobs(n: int, size: int, generator: torch.Generator):
    """3-channel images of horizontal bars (class 0), vertical bars (1) or a blob (2)."""
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    labels = torch.arange(n) % 3
    images = []
    for label in labels.tolist():
        phase = torch.rand((), generator=generator) * 2 * math.pi
        period = 3 + 2 * torch.rand((), generator=generator)
        if label == 0:
            img = torch.cos(2 * math.pi * yy / period + phase)
        elif label == 1:
            img = torch.cos(2 * math.pi * xx / period + phase)
        else:
            cy, cx = (torch.rand(2, generator=generator) * (size - 6) + 3).tolist()
            img = 2 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.0) - 0.3
        colour = 0.5 + torch.rand(3, 1, 1, generator=generator)
        noise = 0.3 * torch.randn(3, size, size, generator=generator)
        images.append(img * colour + noise)
    return torch.stack(images), labels


def test_training_lowers_loss_and_moves_akps():
    torch.manual_seed(0)
    acl = ACL.from_pattern(3, 16, 5, PAPER_RATIO, padding=2, generator=gen(0))
    assert acl.family_totals() == {"G": 7, "Lg": 4, "Lt": 4, "Tf": 9, "P": 24}
    net = nn.Sequential(acl, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    x, y = bars_and_blobs(96, 14, gen(1))
    start = {code: acl.akps(code).detach().clone() for code in acl.akp}
    assert set(start) == {"G", "Lg", "Lt", "Tf"}

    opt = torch.optim.Adam(net.parameters(), lr=0.03)
    losses = []
    for step in range(60):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        if step == 0:
            for code, p in acl.akp.items():
                assert p.grad is not None and torch.isfinite(p.grad).all(), code
                assert p.grad.abs().sum() > 0, code
        opt.step()
        losses.append(loss.item())
    net.eval()
    with torch.no_grad():
        final = F.cross_entropy(net(x), y).item()
    assert final < 0.7 * losses[0], (losses[0], final)
    for code, before in start.items():
        after = acl.akps(code).detach()
        assert torch.isfinite(after).all(), code
        assert not torch.allclose(after, before, rtol=0, atol=1e-4), code


def test_akps_alone_learn():
    """Plain kernels, bias and the classifier frozen: the loss can only fall through the AKPs."""
    torch.manual_seed(0)
    acl = ACL.from_pattern(3, 16, 5, PAPER_RATIO, padding=2, generator=gen(0))
    net = nn.Sequential(acl, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    x, y = bars_and_blobs(96, 14, gen(1))
    opt = torch.optim.Adam(acl.akp.parameters(), lr=0.05)
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not n.startswith("0.akp")}
    with torch.no_grad():
        initial = F.cross_entropy(net(x), y).item()
    for _ in range(50):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    with torch.no_grad():
        final = F.cross_entropy(net(x), y).item()
    assert final < 0.8 * initial, (initial, final)
    for name, p in net.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


# --- errors -------------------------------------------------------------------------------------


def test_wrong_assignment_length():
    with pytest.raises(ValueError) as info:
        ACL(3, 4, 3, assignment=["P"] * 11)
    assert "11" in str(info.value) and "12" in str(info.value)
    with pytest.raises(ValueError) as info:
        ACL(4, 4, 3, groups=2, assignment=["P"] * 16)
    assert "16" in str(info.value) and "8" in str(info.value)


def test_unknown_code():
    with pytest.raises(KeyError, match="Q"):
        ACL(1, 3, 3, assignment=["G", "Q", "P"])


def test_unknown_code_in_pattern():
    with pytest.raises(ValueError, match="Q"):
        ACL.from_pattern(1, 3, 3, "G1Q1P1")


@pytest.mark.parametrize("text", ["G30P100", "(3x64)G30Lg15Lt15Tf36P96", "G5P5"])
def test_pattern_not_matching_layer(text):
    with pytest.raises(ValueError) as info:
        ACL.from_pattern(2, 6, 3, text)
    assert "12" in str(info.value)


def test_bad_ratio_pattern():
    with pytest.raises(ValueError):
        ACL.from_pattern(2, 6, 3, "G0.5P0.6")


def test_set_values_wrong_shapes():
    codes = ["G", "G", "Lg", "P", "P", "P"]
    layer = ACL(2, 3, 3, assignment=codes, gain=True, offset=True, generator=gen(0))
    good = {
        "akps": {"G": torch.tensor([[3.0, 0.2, 0.1, 1.0]] * 2), "Lg": torch.tensor([[1.0]])},
        "gains": {"G": torch.ones(2), "Lg": torch.ones(1)},
        "offsets": {"G": torch.zeros(2), "Lg": torch.zeros(1)},
        "plain": torch.zeros(3, 3, 3),
    }
    layer.set_values(
        good["akps"], gains=good["gains"], offsets=good["offsets"], plain=good["plain"]
    )

    def call(**changes):
        kw = {**good, **changes}
        layer.set_values(kw["akps"], gains=kw["gains"], offsets=kw["offsets"], plain=kw["plain"])

    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        call(akps={**good["akps"], "G": torch.ones(3, 4)})
    with pytest.raises(ValueError, match=r"\(1, 1\)"):
        call(akps={**good["akps"], "Lg": torch.ones(1, 2)})
    with pytest.raises(ValueError, match="Lg"):
        call(akps={"G": good["akps"]["G"]})
    with pytest.raises(ValueError, match=r"\(2,\)"):
        call(gains={**good["gains"], "G": torch.ones(3)})
    with pytest.raises(ValueError, match=r"\(1,\)"):
        call(offsets={**good["offsets"], "Lg": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"\(3, 3, 3\)"):
        call(plain=torch.zeros(3, 9))
    with pytest.raises(ValueError, match="plain"):
        call(plain=None)


@pytest.mark.parametrize("shape", [(1,), (5,), (3, 1)])
def test_set_values_wrong_bias_shape(shape):
    layer = ACL(2, 3, 3, assignment="P6")
    with pytest.raises(ValueError, match=r"\(3,\)"):
        layer.set_values({}, plain=torch.zeros(6, 3, 3), bias=torch.ones(shape))


@pytest.mark.parametrize("code,value", [("Lg", [[-1.0]]), ("G", [[0.0, 0.1, 0.2, 1.0]])])
def test_from_assignment_rejects_invalid_akps(code, value):
    with pytest.raises(ValueError):
        ACL.from_values(
            1, 2, 3, [code, "P"], {code: torch.tensor(value)}, plain=torch.zeros(1, 3, 3)
        )


def test_from_assignment_missing_gains_for_a_family():
    codes = ["G", "M", "P", "P"]
    with pytest.raises(ValueError, match="M"):
        ACL.from_values(
            2,
            2,
            3,
            codes,
            {"G": torch.tensor([[3.0, 0.1, 0.0, 1.0]]), "M": torch.empty(1, 0)},
            gains={"G": torch.ones(1)},
            plain=torch.zeros(2, 3, 3),
        )


# --- public name (SPEC §5) ----------------------------------------------------------------------


def test_acl_is_exported_from_the_package():
    import acl_convert

    assert acl_convert.ACL is ACL
