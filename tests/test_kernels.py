"""Tests of the kernel-family library (SPEC §2), in kornia's per-filter discipline.

Every family gets the same set: hand-worked values, shape/cardinality, exceptions, non-contiguous
input, dtype/device, gradcheck, reparameterisation, canonicalisation, sampling and a compile smoke.
Expected values come from the paper's formulas written out again here with :mod:`math` on scalar
coordinates, never from the library's own formula helpers. The opt-in families beyond the paper
(``Ge``, ``Dx``, ``Dxx``, docs/kernels.md "Extended families") go through the same matrix.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from acl_convert import kernels
from acl_convert.kernels import KernelFamily, Param, registry

DELTA = 1e-4  # TGD1st dead band (paper: "such as 1e-4")

#: The families with AKPs; Mean and Plain are tested where they are meaningful.
EXTENDED = ("Ge", "Dx", "Dxx")
ANALYTIC = ("G", "Lg", "Tf", "Ts", "Lt", *EXTENDED)
ALL = ("M", "G", "Lg", "Tf", "Ts", "Lt", "P", *EXTENDED)
#: Families whose kernel changes sign under theta + pi: canonical theta is [0, 2 pi) without a gain.
ODD_UNDER_HALF_TURN = ("Tf", "Dx")
SIZES = [(3, 3), (4, 4), (5, 3), (2, 6), (7, 7)]

#: Generic AKPs: no grid point of any size in SIZES or of 5x5 / 4x6 lies on x' = 0 (min |x'| is
#: >= 0.07 for theta = 0.41 and 0.37), so sign() / |.| are smooth around every sample.
GENERIC = {
    "G": (4.0, 0.3, 0.2, 1.5),
    "Lg": (1.3,),
    "Tf": (0.41, 1.6, 2.3),
    "Ts": (0.37, 1.8),
    "Lt": (1.7,),
    "Ge": (4.0, 0.3, 0.2, 1.5, 0.7, 0.4, -0.3),
    "Dx": (0.41, 1.3),
    "Dxx": (0.37, 1.6),
}

#: SPEC §2 table: names and AKPs in order.
TABLE = {
    "M": ("mean", ()),
    "G": ("gabor", ("lambda", "theta", "psi", "sigma")),
    "Lg": ("log", ("sigma",)),
    "Tf": ("tgd1st", ("theta", "gamma1", "gamma2")),
    "Ts": ("tgd2nd", ("theta", "gamma")),
    "Lt": ("lot", ("sigma",)),
    "P": ("plain", ()),
    "Ge": ("gabor_ext", ("lambda", "theta", "psi", "sigma", "gamma", "x0", "y0")),
    "Dx": ("gauss1st", ("theta", "sigma")),
    "Dxx": ("gauss2nd", ("theta", "sigma")),
}

# --- independent scalar references of the paper's formulas ---------------------------------


def coords(h: int, w: int):
    """(i, j, x, y) for every sample, Eqs. 2-3: x = i - (h+1)/2 down rows, y = j - (w+1)/2."""
    return [
        (i - 1, j - 1, i - (h + 1) / 2, j - (w + 1) / 2)
        for i in range(1, h + 1)
        for j in range(1, w + 1)
    ]


def rot(x, y, theta):
    return x * math.cos(theta) + y * math.sin(theta), -x * math.sin(theta) + y * math.cos(theta)


def ref_gabor(x, y, h, w, lam, theta, psi, sigma, gamma=1.0):
    xr, yr = rot(x, y, theta)
    return math.exp(-(xr**2 + gamma**2 * yr**2) / (2 * sigma**2)) * math.cos(
        2 * math.pi * xr / lam + psi
    )


def ref_gabor_ext(x, y, h, w, lam, theta, psi, sigma, gamma, x0, y0):
    """The paper's Gabor with gamma free, evaluated about the centre (x0, y0)."""
    return ref_gabor(x - x0, y - y0, h, w, lam, theta, psi, sigma, gamma)


def ref_gauss(x, y, sigma):
    return math.exp(-(x * x + y * y) / (2 * sigma**2))


def ref_gauss1st(x, y, h, w, theta, sigma):
    """sigma * d/dx' of the Gaussian; d/dx' = cos(theta) d/dx + sin(theta) d/dy (chain rule)."""
    xr, _ = rot(x, y, theta)
    return sigma * (-xr / sigma**2) * ref_gauss(x, y, sigma)


def ref_gauss2nd(x, y, h, w, theta, sigma):
    """sigma^2 * d^2/dx'^2 of the Gaussian: (x'^2 / sigma^4 - 1 / sigma^2) g."""
    xr, _ = rot(x, y, theta)
    return sigma**2 * (xr**2 / sigma**4 - 1 / sigma**2) * ref_gauss(x, y, sigma)


def ref_log(x, y, h, w, sigma):
    r2 = x * x + y * y
    return -1 / (math.pi * sigma**4) * (1 - r2 / (2 * sigma**2)) * math.exp(-r2 / (2 * sigma**2))


def ref_tgd1st(x, y, h, w, theta, g1, g2):
    xr, yr = rot(x, y, theta)
    if abs(xr) <= DELTA:
        return 0.0
    return math.exp(-(xr**2) / g1**2 - yr**2 / g2**2) * math.copysign(1.0, xr)


def ref_tgd2nd_v(x, y, theta, gamma):
    if x == 0 and y == 0:
        return 0.0
    xr, yr = rot(x, y, theta)
    return math.exp(-(xr**2 + yr**2) / gamma**2) * abs(xr / (xr**2 + yr**2))


def ref_lot_v(x, y, sigma):
    return math.exp(-(x * x + y * y) / sigma**2)


def _with_origin(v, x, y, h, w, *akp):
    """Eqs. 19 / 23: V - sum(V) at the origin, nothing elsewhere."""
    if x == 0 and y == 0:
        return v(x, y, *akp) - sum(v(xx, yy, *akp) for _, _, xx, yy in coords(h, w))
    return v(x, y, *akp)


def ref_tgd2nd(x, y, h, w, theta, gamma):
    return _with_origin(ref_tgd2nd_v, x, y, h, w, theta, gamma)


def ref_lot(x, y, h, w, sigma):
    return _with_origin(ref_lot_v, x, y, h, w, sigma)


REF = {
    "G": ref_gabor,
    "Lg": ref_log,
    "Tf": ref_tgd1st,
    "Ts": ref_tgd2nd,
    "Lt": ref_lot,
    "Ge": ref_gabor_ext,
    "Dx": ref_gauss1st,
    "Dxx": ref_gauss2nd,
}


def akp(code: str, dtype=torch.float64, *batch: int) -> torch.Tensor:
    return torch.tensor(GENERIC[code], dtype=dtype).expand(*batch, len(GENERIC[code])).clone()


def params_for(code: str, h: int, w: int, *batch: int, dtype=torch.float64) -> torch.Tensor:
    """Valid parameters of any family, including Mean (``(..., 0)``) and Plain (``(..., h*w)``)."""
    if code == "M":
        return torch.zeros(*batch, 0, dtype=dtype)
    if code == "P":
        return torch.randn(*batch, h * w, dtype=dtype)
    return akp(code, dtype, *batch)


def generic_akps(code: str, n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """n random AKPs: positive ones from the init ranges, angles anywhere in [-10, 10]."""
    fam = kernels.get(code)
    g = torch.Generator().manual_seed(seed)
    a = fam.sample(n, h, w, generator=g, dtype=torch.float64)
    for k, name in enumerate(fam.param_names):
        if name in ("theta", "psi"):
            a[:, k] = torch.rand(n, generator=g, dtype=torch.float64) * 20 - 10
    return a


# --- hand-worked values --------------------------------------------------------------------


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("code", ANALYTIC)
def test_values_match_paper_formula(code, h, w):
    """Three samples per kernel: two corners and the centre (the origin for odd sizes)."""
    out = kernels.get(code)(akp(code), h, w)
    picks = {(0, 0), (h - 1, w // 3), ((h - 1) // 2, (w - 1) // 2)}
    for i, j, x, y in coords(h, w):
        if (i, j) in picks:
            expected = REF[code](x, y, h, w, *GENERIC[code])
            assert out[i, j].item() == pytest.approx(expected, rel=1e-12, abs=1e-14), (i, j, x, y)


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("code", ANALYTIC)
def test_whole_kernel_matches_paper_formula(code, h, w):
    out = kernels.get(code)(akp(code), h, w)
    expected = torch.tensor(
        [REF[code](x, y, h, w, *GENERIC[code]) for *_, x, y in coords(h, w)], dtype=torch.float64
    ).reshape(h, w)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)


def test_gabor_hand_values():
    g = kernels.get("G")
    k = g(torch.tensor([4.0, 0.0, 0.0, 1.0], dtype=torch.float64), 3, 3)
    assert k[1, 1].item() == pytest.approx(1.0)  # origin: envelope 1, cos(0)
    assert k[0, 1].item() == pytest.approx(0.0, abs=1e-15)  # x=-1: cos(-pi/2)
    assert k[1, 2].item() == pytest.approx(math.exp(-0.5))  # y=1, theta=0: x'=0
    k = g(torch.tensor([4.0, 0.0, 0.0, 1.0], dtype=torch.float64), 5, 3)
    assert k[0, 1].item() == pytest.approx(-math.exp(-2))  # x=-2: cos(-pi)
    # theta = pi/2 turns the wave onto the columns: x' = y.
    k = g(torch.tensor([4.0, math.pi / 2, 0.0, 1.0], dtype=torch.float64), 3, 3)
    assert k[0, 1].item() == pytest.approx(math.exp(-0.5))
    assert k[1, 0].item() == pytest.approx(0.0, abs=1e-15)
    # The brief's example point: (x=-1, y=0) with lambda=4, theta=0.3, psi=0.2, sigma=1.5.
    k = g(torch.tensor([4.0, 0.3, 0.2, 1.5], dtype=torch.float64), 3, 3)
    xr = -math.cos(0.3)
    assert k[0, 1].item() == pytest.approx(
        math.exp(-1 / (2 * 1.5**2)) * math.cos(2 * math.pi * xr / 4 + 0.2)
    )


def test_gabor_phase_symmetry():
    """psi = 0 gives an even kernel, psi = pi/2 an odd one (the grid is point-symmetric)."""
    g = kernels.get("G")
    for h, w in SIZES:
        even = g(torch.tensor([3.0, 0.7, 0.0, 1.2], dtype=torch.float64), h, w)
        odd = g(torch.tensor([3.0, 0.7, math.pi / 2, 1.2], dtype=torch.float64), h, w)
        torch.testing.assert_close(even.flip(-2, -1), even)
        torch.testing.assert_close(odd.flip(-2, -1), -odd)


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0])
def test_log_origin_has_the_normalising_factor(sigma):
    k = kernels.get("Lg")(torch.tensor([sigma], dtype=torch.float64), 5, 5)
    assert k[2, 2].item() == pytest.approx(-1 / (math.pi * sigma**4))
    r2 = 4.0  # x=0, y=2
    assert k[2, 4].item() == pytest.approx(
        -1 / (math.pi * sigma**4) * (1 - r2 / (2 * sigma**2)) * math.exp(-r2 / (2 * sigma**2))
    )


def test_log_hand_values():
    k = kernels.get("Lg")(torch.tensor([1.0], dtype=torch.float64), 5, 5)
    assert k[2, 2].item() == pytest.approx(-1 / math.pi)
    assert k[1, 1].item() == pytest.approx(0.0, abs=1e-15)  # r^2 = 2 sigma^2: zero crossing
    assert k[2, 0].item() == pytest.approx(math.exp(-2) / math.pi)  # r^2 = 4: positive surround


def test_tgd1st_hand_values():
    k = kernels.get("Tf")(torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64), 3, 3)
    expected = torch.tensor(
        [
            [-math.exp(-2), -math.exp(-1), -math.exp(-2)],
            [0.0, 0.0, 0.0],  # x' = 0: the indicator |x'| > delta removes the middle row
            [math.exp(-2), math.exp(-1), math.exp(-2)],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(k, expected)


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("theta", [0.41, 1.1, 2.3, 4.0])
def test_tgd1st_reads_sign_of_x_rotated(theta, h, w):
    """SPEC decision: sign(x'), not the paper's printed sign(cos theta), which is one-signed."""
    k = kernels.get("Tf")(torch.tensor([theta, 1.6, 2.3], dtype=torch.float64), h, w)
    assert (k > 0).any() and (k < 0).any()
    for i, j, x, y in coords(h, w):
        xr = x * math.cos(theta) + y * math.sin(theta)
        assert math.copysign(1.0, xr) * k[i, j].item() >= 0
    # 180 degree rotation maps (x, y) -> (-x, -y), hence x' -> -x'.
    torch.testing.assert_close(k.flip(-2, -1), -k, rtol=0, atol=0)
    assert k.sum().item() == pytest.approx(0.0, abs=1e-12)


def test_tgd1st_dead_band_at_delta():
    """Samples with |x'| <= delta are zero, those just outside are not."""
    # theta with cos(theta) = delta/2 (x'(x=1, y=0) inside the band) and 2 delta (outside).
    inside = math.acos(DELTA / 2)
    outside = math.acos(2 * DELTA)
    tf = kernels.get("Tf")
    k_in = tf(torch.tensor([inside, 1.0, 1.0], dtype=torch.float64), 3, 1)
    k_out = tf(torch.tensor([outside, 1.0, 1.0], dtype=torch.float64), 3, 1)
    assert k_in[2, 0].item() == 0.0
    assert k_out[2, 0].item() > 0.0 and k_out[0, 0].item() < 0.0


def test_tgd2nd_hand_values():
    k = kernels.get("Ts")(torch.tensor([0.0, 1.0], dtype=torch.float64), 3, 3)
    e1, e2 = math.exp(-1), math.exp(-2) / 2  # V(+-1, 0) and V(+-1, +-1); V(0, +-1) = 0
    expected = torch.tensor(
        [[e2, e1, e2], [0.0, -(2 * e1 + 4 * e2), 0.0], [e2, e1, e2]], dtype=torch.float64
    )
    torch.testing.assert_close(k, expected)


def test_lot_hand_values():
    k = kernels.get("Lt")(torch.tensor([1.0], dtype=torch.float64), 3, 3)
    e1, e2 = math.exp(-1), math.exp(-2)
    expected = torch.tensor(
        [[e2, e1, e2], [e1, -(4 * e1 + 4 * e2), e1], [e2, e1, e2]], dtype=torch.float64
    )
    torch.testing.assert_close(k, expected)
    k = kernels.get("Lt")(torch.tensor([1.0], dtype=torch.float64), 2, 2)
    torch.testing.assert_close(k, torch.full((2, 2), math.exp(-0.5), dtype=torch.float64))


def test_lot_origin_does_not_cancel_in_float32():
    """Small sigma: 1 - (1 + tiny) would be 0 in float32; the origin must still be -sum(rest)."""
    k = kernels.get("Lt")(torch.tensor([0.3]), 3, 3)
    rest = 4 * math.exp(-1 / 0.09) + 4 * math.exp(-2 / 0.09)
    assert k[1, 1].item() == pytest.approx(-rest, rel=1e-5)


# --- hand-worked values of the extended families -------------------------------------------------


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_gabor_ext_hand_values():
    """lambda = 4, theta = 0, psi = 0, sigma = 1, gamma = 2, centre (x0, y0) = (1, 0) on 3x3:
    x' = x - 1 down the rows, y' = y along the columns."""
    k = kernels.get("Ge")(_t(4.0, 0.0, 0.0, 1.0, 2.0, 1.0, 0.0), 3, 3)
    assert k[2, 1].item() == pytest.approx(1.0)  # (x, y) = (1, 0): the centre
    assert k[1, 1].item() == pytest.approx(0.0, abs=1e-15)  # x' = -1: cos(-pi/2)
    assert k[0, 1].item() == pytest.approx(-math.exp(-2))  # x' = -2: e^{-4/2} cos(-pi)
    # y' = 1 at the centre row: the envelope along y' has s.d. sigma / gamma = 0.5, e^{-4/2}.
    assert k[2, 2].item() == pytest.approx(math.exp(-2))
    assert k[2, 0].item() == pytest.approx(math.exp(-2))


def test_gabor_ext_with_gamma_one_and_no_offset_is_the_paper_gabor():
    a = generic_akps("G", 20, 7, 7, seed=11)
    ext = torch.cat([a, torch.ones(20, 1, dtype=a.dtype), torch.zeros(20, 2, dtype=a.dtype)], 1)
    for h, w in SIZES:
        torch.testing.assert_close(kernels.get("Ge")(ext, h, w), kernels.get("G")(a, h, w))


def test_gabor_ext_centre_offset_translates_the_kernel():
    """Moving the centre by one pixel down and two to the left moves the whole kernel with it."""
    ge = kernels.get("Ge")
    base = _t(*GENERIC["Ge"][:5], 0.0, 0.0)
    moved = _t(*GENERIC["Ge"][:5], 1.0, -2.0)
    k0, k1 = ge(base, 9, 9), ge(moved, 9, 9)
    torch.testing.assert_close(k1[1:, :-2], k0[:-1, 2:])


def test_gabor_ext_aspect_ratio_stretches_along_the_stripes():
    """theta = 0 and psi = 0: the wave runs down the rows, so along a row the kernel is the bare
    envelope exp(-gamma^2 y^2 / (2 sigma^2)); gamma < 1 elongates it along the stripes."""
    for gamma in (0.5, 1.0, 2.0):
        k = kernels.get("Ge")(_t(3.0, 0.0, 0.0, 1.2, gamma, 0.0, 0.0), 5, 5)
        row = [math.exp(-(gamma**2) * y * y / (2 * 1.2**2)) for y in (-2, -1, 0, 1, 2)]
        torch.testing.assert_close(k[2], _t(*row))


def test_gauss_derivative_hand_values():
    """theta = 0, sigma = 1 on 3x3: x' = x (down the rows)."""
    e1, e2 = math.exp(-0.5), math.exp(-1.0)
    d1 = kernels.get("Dx")(_t(0.0, 1.0), 3, 3)
    # -x e^{-(x^2+y^2)/2}: negative on the side x' > 0 (the last row).
    torch.testing.assert_close(d1, _t([e2, e1, e2], [0.0, 0.0, 0.0], [-e2, -e1, -e2]))
    d2 = kernels.get("Dxx")(_t(0.0, 1.0), 3, 3)
    # (x^2 - 1) e^{-(x^2+y^2)/2}: zero at |x'| = sigma, -1 at the origin.
    torch.testing.assert_close(d2, _t([0.0, 0.0, 0.0], [-e1, -1.0, -e1], [0.0, 0.0, 0.0]))
    # theta = pi/2 turns the derivative onto the columns: x' = y.
    torch.testing.assert_close(kernels.get("Dx")(_t(math.pi / 2, 1.0), 3, 3), d1.t())
    torch.testing.assert_close(kernels.get("Dxx")(_t(math.pi / 2, 1.0), 3, 3), d2.t())


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("theta,sigma", [(0.41, 1.3), (2.2, 0.7), (4.0, 2.5)])
def test_gauss_derivatives_match_finite_differences(theta, sigma, h, w):
    """Dx = sigma g', Dxx = sigma^2 g'' along the unit vector (cos theta, sin theta), checked by
    central differences of the plain Gaussian g, evaluated with math at every sample."""
    step = 1e-4
    c, s = math.cos(theta), math.sin(theta)
    d1 = kernels.get("Dx")(_t(theta, sigma), h, w)
    d2 = kernels.get("Dxx")(_t(theta, sigma), h, w)
    for i, j, x, y in coords(h, w):
        fwd = ref_gauss(x + step * c, y + step * s, sigma)
        bwd = ref_gauss(x - step * c, y - step * s, sigma)
        mid = ref_gauss(x, y, sigma)
        assert d1[i, j].item() == pytest.approx(sigma * (fwd - bwd) / (2 * step), abs=1e-8)
        fd2 = sigma**2 * (fwd - 2 * mid + bwd) / step**2
        assert d2[i, j].item() == pytest.approx(fd2, abs=1e-6)


@pytest.mark.parametrize("h,w", SIZES)
def test_gauss_derivative_symmetries(h, w):
    """A half-turn maps (x, y) to (-x, -y): Dx is odd (and sums to zero), Dxx is even."""
    d1 = kernels.get("Dx")(akp("Dx"), h, w)
    d2 = kernels.get("Dxx")(akp("Dxx"), h, w)
    torch.testing.assert_close(d1.flip(-2, -1), -d1)
    assert d1.sum().item() == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(d2.flip(-2, -1), d2)
    # Dx's period is 2 pi (theta + pi negates it), Dxx's is pi.
    for code, sign in (("Dx", -1.0), ("Dxx", 1.0)):
        a = akp(code)
        turned = a.clone()
        turned[0] += math.pi
        f = kernels.get(code)
        torch.testing.assert_close(f(turned, h, w), sign * f(a, h, w))


def test_gauss_derivative_peaks_do_not_depend_on_sigma():
    """The chosen normalisation (sigma^n d^n/dx'^n of the unnormalised Gaussian): Dx peaks at
    x' = sigma with e^{-1/2}, Dxx is -1 at the origin, at every scale."""
    for sigma in (0.5, 1.0, 3.0):
        # The sampling grid has no sample at x' = sigma for most sigma: call the formula there.
        x, y = torch.tensor([[-sigma]], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
        peak = kernels.get("Dx").formula(x, y, *_t(0.0, sigma))
        assert peak.item() == pytest.approx(math.exp(-0.5))
        assert kernels.get("Dxx")(_t(0.3, sigma), 1, 1).item() == pytest.approx(-1.0)


@pytest.mark.parametrize("h,w", SIZES + [(1, 1), (1, 5), (6, 1)])
@pytest.mark.parametrize("code", ["Ts", "Lt"])
def test_origin_term(code, h, w):
    """Odd sizes: the origin is minus the sum of all other samples. Even sizes: no origin
    sample, so the kernel is V everywhere (and does not sum to zero)."""
    k = kernels.get(code)(akp(code), h, w)
    v = ref_tgd2nd_v if code == "Ts" else ref_lot_v
    expected_v = torch.tensor(
        [v(x, y, *GENERIC[code]) for *_, x, y in coords(h, w)], dtype=torch.float64
    ).reshape(h, w)
    if h % 2 and w % 2:
        ci, cj = (h - 1) // 2, (w - 1) // 2
        others = k.sum() - k[ci, cj]
        assert k[ci, cj].item() == pytest.approx(-others.item(), rel=1e-12, abs=1e-14)
        assert k.sum().item() == pytest.approx(0.0, abs=1e-12)
        mask = torch.ones(h, w, dtype=torch.bool)
        mask[ci, cj] = False
        torch.testing.assert_close(k[mask], expected_v[mask])
    else:
        torch.testing.assert_close(k, expected_v)
        assert k.sum().item() > 0


@pytest.mark.parametrize("h,w", SIZES + [(1, 1), (1, 4)])
def test_mean_values(h, w):
    k = kernels.get("M")(torch.zeros(2, 0, dtype=torch.float64), h, w)
    torch.testing.assert_close(k, torch.full((2, h, w), 1 / math.sqrt(h * w), dtype=torch.float64))
    assert k[0].norm().item() == pytest.approx(1.0)


@pytest.mark.parametrize("h,w", [(3, 3), (2, 6), (5, 3)])
def test_plain_is_row_major(h, w):
    """Eq. 4: W[i, j] = phi[(i-1) w + j] (1-based), i.e. a row-major reshape."""
    phi = torch.arange(h * w, dtype=torch.float64)
    k = kernels.get("P")(phi, h, w)
    for i, j, _, _ in coords(h, w):
        assert k[i, j].item() == i * w + j
    assert k[0, 1].item() == 1.0  # the second value goes along the first row


# --- shape and cardinality -----------------------------------------------------------------


@pytest.mark.parametrize("batch", [(), (5,), (2, 3)])
@pytest.mark.parametrize("code", ALL)
def test_batch_shapes(code, batch):
    h, w = 5, 3
    params = params_for(code, h, w, *batch)
    out = kernels.get(code)(params, h, w)
    assert out.shape == (*batch, h, w)
    if code != "P":  # every batch element of identical AKPs gives the same kernel
        single = kernels.get(code)(params_for(code, h, w), h, w)
        torch.testing.assert_close(out, single.expand(*batch, h, w))


def test_batch_elements_are_independent():
    g = kernels.get("G")
    a = generic_akps("G", 6, 5, 5, seed=3)
    out = g(a.reshape(2, 3, 4), 5, 5)
    for n in range(6):
        torch.testing.assert_close(out.reshape(6, 5, 5)[n], g(a[n], 5, 5))


@pytest.mark.parametrize("h,w", [(1, 1), (1, 5), (5, 1)])
@pytest.mark.parametrize("code", ALL)
def test_size_one(code, h, w):
    out = kernels.get(code)(params_for(code, h, w, 2), h, w)
    assert out.shape == (2, h, w)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("code", ALL)
def test_dtype_preserved(code, dtype):
    out = kernels.get(code)(params_for(code, 4, 6, 3, dtype=dtype), 4, 6)
    assert out.dtype == dtype


@pytest.mark.parametrize("code", ANALYTIC)
def test_float32_agrees_with_float64(code):
    f = kernels.get(code)
    a = generic_akps(code, 8, 7, 7, seed=1)
    torch.testing.assert_close(f(a.float(), 7, 7).double(), f(a, 7, 7), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("code", ALL)
def test_non_contiguous_params(code):
    h, w = 4, 6
    f = kernels.get(code)
    p = f.param_count(h, w)
    if code in ANALYTIC:
        base = generic_akps(code, 6, h, w, seed=2).t().contiguous()  # (P, 6)
    else:
        base = torch.randn(p, 6, dtype=torch.float64)
    params = base.t()  # (6, P) view with strides (1, 6)
    assert not params.is_contiguous() or p <= 1
    torch.testing.assert_close(f(params, h, w), f(params.contiguous(), h, w))
    strided = torch.cat([params, params], 0)[::2]
    torch.testing.assert_close(f(strided, h, w), f(strided.contiguous(), h, w))


# --- exceptions ----------------------------------------------------------------------------


@pytest.mark.parametrize("code", ALL)
def test_wrong_last_dim(code):
    f = kernels.get(code)
    p = f.param_count(3, 3)
    with pytest.raises(ValueError, match=rf"\(\.\.\., {p}\)"):
        f(torch.zeros(2, p + 1), 3, 3)
    with pytest.raises(ValueError, match=rf"\(\.\.\., {p}\)"):
        f(torch.tensor(1.0), 3, 3)  # 0-d: no parameter axis at all


@pytest.mark.parametrize("code", ALL)
def test_integer_or_non_tensor_params(code):
    f = kernels.get(code)
    p = f.param_count(3, 3)
    with pytest.raises(TypeError, match="floating point"):
        f(torch.ones(p, dtype=torch.int64), 3, 3)
    with pytest.raises(TypeError, match="torch.Tensor"):
        f([1.0] * p, 3, 3)


@pytest.mark.parametrize("h,w", [(0, 3), (3, 0), (0, 0), (-1, 3)])
@pytest.mark.parametrize("code", ALL)
def test_empty_kernel_size(code, h, w):
    f = kernels.get(code)
    params = torch.zeros(max(h * w, 0)) if code == "P" else params_for(code, 3, 3)
    with pytest.raises(ValueError):
        f(params, h, w)


def test_non_integer_kernel_size():
    with pytest.raises(ValueError, match="kernel size"):
        kernels.get("G")(akp("G"), 3.0, 3)


def test_unknown_family():
    with pytest.raises(KeyError, match="unknown kernel family 'X'"):
        kernels.get("X")
    with pytest.raises(KeyError, match="G \\(gabor\\)"):  # the message lists the known ones
        kernels.get("nope")
    with pytest.raises(TypeError):
        kernels.get(3)


def _throwaway(code: str, name: str) -> KernelFamily:
    return KernelFamily(
        code=code,
        name=name,
        params=(Param("sigma", "px", "positive", "(0, inf)", lambda h, w: (0.5, 2.0)),),
        formula=lambda x, y, s: torch.exp(-(x * x + y * y) / (s * s)),
    )


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry, so families registered by a test do not outlive it."""
    monkeypatch.setattr(registry, "_BY_CODE", dict(registry._BY_CODE))
    monkeypatch.setattr(registry, "_BY_NAME", dict(registry._BY_NAME))


def test_registry_refuses_duplicates(scratch_registry):
    before = kernels.codes()
    with pytest.raises(ValueError, match="code 'G'"):
        kernels.register(_throwaway("G", "another"))
    with pytest.raises(ValueError, match="GABOR"):
        kernels.register(_throwaway("Zz", "GABOR"))  # names clash case-insensitively
    with pytest.raises(TypeError, match="KernelFamily"):
        kernels.register("G")
    assert kernels.codes() == before
    with pytest.raises(KeyError):
        kernels.get("Zz")


def test_registering_a_new_family(scratch_registry):
    fam = kernels.register(_throwaway("Zz", "zigzag"))
    assert kernels.get("Zz") is fam and kernels.get("ZIGZAG") is fam
    assert kernels.codes()[-1] == "Zz"
    out = fam(torch.tensor([1.0]), 3, 3)
    assert out.shape == (3, 3) and out[1, 1].item() == 1.0


def test_registry_restored_after_scratch():
    assert "Zz" not in kernels.codes()


# --- lookup and meta-data ------------------------------------------------------------------


@pytest.mark.parametrize("code", ALL)
def test_lookup_by_code_and_name(code):
    name, names = TABLE[code]
    fam = kernels.get(code)
    assert fam.code == code and fam.name == name
    assert kernels.get(name) is fam
    assert kernels.get(name.upper()) is fam
    assert kernels.get(name.capitalize()) is fam
    assert kernels.get(fam) is fam
    assert fam.param_names == names
    if code == "P":
        assert fam.num_params is None
        assert fam.param_count(5, 3) == 15
    else:
        assert fam.num_params == len(names)
        assert fam.param_count(5, 3) == len(names)


def test_all_spec_families_registered():
    assert set(ALL) <= set(kernels.codes())
    assert kernels.PAPER_FAMILIES == ("G", "Lg", "Tf", "Ts", "Lt", "M")


def test_extended_families_are_registered_but_opt_in():
    """Beyond the paper: registered (usable by code in --families and patterns), never a default."""
    assert kernels.EXTENDED_FAMILIES == EXTENDED
    assert set(EXTENDED) <= set(kernels.codes())
    assert not set(EXTENDED) & set(kernels.PAPER_FAMILIES)
    # Registered after the paper's families (and Plain), which keep their registry order.
    codes = kernels.codes()
    paper = [*kernels.PAPER_FAMILIES, "P"]
    assert max(map(codes.index, paper)) < min(map(codes.index, EXTENDED))
    assert all(kernels.get(c).smooth for c in EXTENDED)


#: (unit, kind) of every AKP name; the rest are lengths in px, kept positive.
PARAM_META = {
    "theta": ("rad", "angle"),
    "psi": ("rad", "angle"),
    "x0": ("px", "real"),
    "y0": ("px", "real"),
}


@pytest.mark.parametrize("code", ANALYTIC)
def test_param_meta_data(code):
    fam = kernels.get(code)
    for p in fam.params:
        if code == "Ge" and p.name == "gamma":  # an aspect ratio, not TGD2nd's length
            assert (p.unit, p.kind) == ("1", "positive")
        else:
            assert (p.unit, p.kind) == PARAM_META.get(p.name, ("px", "positive")), p.name


def test_param_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        Param("a", "px", "bounded", "(0, 1)", lambda h, w: (0.0, 1.0))


def test_grid_convention():
    x, y = kernels.grid(4, 3, dtype=torch.float64)
    assert x.shape == (4, 1) and y.shape == (1, 3)
    assert x.flatten().tolist() == [i - 2.5 for i in range(1, 5)]
    assert y.flatten().tolist() == [-1.0, 0.0, 1.0]


# --- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("h,w", [(5, 5), (4, 6)])
@pytest.mark.parametrize("code", ANALYTIC)
def test_gradcheck(code, h, w):
    if code == "Tf":  # theta-gradient is the envelope's: stay away from the sign's jumps
        theta = GENERIC["Tf"][0]
        nearest = min(
            abs(x * math.cos(theta) + y * math.sin(theta))
            for *_, x, y in coords(h, w)
            if (x, y) != (0, 0)
        )
        assert nearest > 1e-2
    params = akp(code, torch.float64, 2).requires_grad_(True)
    params.data[1] *= 1.1  # two different points in one batch
    assert torch.autograd.gradcheck(lambda p: kernels.get(code)(p, h, w), (params,))


@pytest.mark.parametrize("code", ANALYTIC)
def test_gradcheck_through_reparameterisation(code):
    f = kernels.get(code)
    u = f.to_unconstrained(akp(code)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: f(f.from_unconstrained(v), 5, 5), (u,))


def test_tgd2nd_origin_gradient_is_finite():
    """V(0, 0) = 0 is a special case; its gradient must not be NaN (0/0)."""
    p = torch.tensor([0.3, 1.4], dtype=torch.float64, requires_grad=True)
    kernels.get("Ts")(p, 5, 5).pow(2).sum().backward()
    assert torch.isfinite(p.grad).all()


# --- reparameterisation --------------------------------------------------------------------


@pytest.mark.parametrize("code", ANALYTIC)
def test_reparameterisation_round_trip(code):
    f = kernels.get(code)
    a = generic_akps(code, 50, 7, 7, seed=4)
    torch.testing.assert_close(f.from_unconstrained(f.to_unconstrained(a)), a)


@pytest.mark.parametrize("code", ANALYTIC)
def test_any_unconstrained_value_is_valid(code):
    f = kernels.get(code)
    u = torch.randn(200, f.num_params, generator=torch.Generator().manual_seed(5)) * 5
    a = f.from_unconstrained(u)
    for k, name in enumerate(f.param_names):
        if name.startswith(("sigma", "lambda", "gamma")):
            assert (a[:, k] > 0).all(), name
            torch.testing.assert_close(a[:, k], torch.exp(u[:, k]))
        else:
            torch.testing.assert_close(a[:, k], u[:, k])
    assert torch.isfinite(f(a, 5, 5)).all()


def test_mean_reparameterisation_is_empty():
    f = kernels.get("M")
    z = torch.zeros(3, 0)
    assert f.to_unconstrained(z).shape == (3, 0)
    assert f.from_unconstrained(z).shape == (3, 0)


# --- canonicalisation ----------------------------------------------------------------------


def _theta(fam, a):
    return a[..., fam.param_names.index("theta")]


@pytest.mark.parametrize("h,w", [(5, 5), (4, 6)])
@pytest.mark.parametrize("code", ANALYTIC)
def test_canonicalize_keeps_the_kernel(code, h, w):
    f = kernels.get(code)
    a = generic_akps(code, 200, h, w, seed=6)
    gain = torch.randn(200, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    c, g = f.canonicalize(a, gain)
    torch.testing.assert_close(g[:, None, None] * f(c, h, w), gain[:, None, None] * f(a, h, w))
    for k, name in enumerate(f.param_names):
        if name not in ("theta", "psi"):
            torch.testing.assert_close(c[:, k], a[:, k])  # sigma, lambda, gamma untouched
    if "theta" in f.param_names:
        theta = _theta(f, c)
        assert (theta >= 0).all() and (theta < math.pi).all()
    if code in ("G", "Ge"):
        psi = c[:, 2]
        assert (psi > -math.pi).all() and (psi <= math.pi).all()
        assert (g >= 0).all()
        torch.testing.assert_close(g, gain.abs())
    else:
        torch.testing.assert_close(g.abs(), gain.abs())  # only the sign may move


@pytest.mark.parametrize("code", ANALYTIC)
def test_canonicalize_without_gain(code):
    f = kernels.get(code)
    a = generic_akps(code, 200, 5, 5, seed=8)
    c, g = f.canonicalize(a)
    assert g is None
    torch.testing.assert_close(f(c, 5, 5), f(a, 5, 5))
    if "theta" in f.param_names:
        # TGD1st, Dx: theta + pi flips the sign and nothing absorbs it, so the period is 2 pi.
        hi = 2 * math.pi if code in ODD_UNDER_HALF_TURN else math.pi
        theta = _theta(f, c)
        assert (theta >= 0).all() and (theta < hi).all()
    if code in ODD_UNDER_HALF_TURN:
        assert (_theta(f, c) >= math.pi).any()  # really [0, 2 pi), not folded further


def test_canonicalize_is_idempotent():
    for code in ANALYTIC:
        f = kernels.get(code)
        a = generic_akps(code, 50, 5, 5, seed=9)
        gain = torch.linspace(-2, 2, 50, dtype=torch.float64)
        c, g = f.canonicalize(a, gain)
        c2, g2 = f.canonicalize(c, g)
        torch.testing.assert_close(c2, c)
        torch.testing.assert_close(g2, g)


@pytest.mark.parametrize("theta", [0.0, math.pi, -math.pi, 2 * math.pi, 3 * math.pi, -1e-20, -1e-9])
@pytest.mark.parametrize("code", ["G", "Tf", "Ts", *EXTENDED])
def test_canonical_theta_range_at_its_edges(code, theta):
    """Angles on or just below a multiple of pi must still land in [0, pi)."""
    f = kernels.get(code)
    a = torch.tensor(GENERIC[code], dtype=torch.float64)
    a[f.param_names.index("theta")] = theta
    c, _ = f.canonicalize(a[None], torch.ones(1, dtype=torch.float64))
    t = _theta(f, c).item()
    assert 0 <= t < math.pi, t


@pytest.mark.parametrize("code", ["G", "Tf", "Ts", *EXTENDED])
def test_canonical_theta_range_float32(code):
    """In float32 an angle a few 1e-8 below zero folds onto pi(float32) unless it is caught."""
    f = kernels.get(code)
    a = torch.tensor(GENERIC[code], dtype=torch.float32)
    a[f.param_names.index("theta")] = -1e-8
    c, _ = f.canonicalize(a[None], torch.ones(1))
    t = _theta(f, c)
    assert (t >= 0).all() and (t < math.pi).all(), t.item()  # compared in float32


@pytest.mark.parametrize("theta", [0.0, 2 * math.pi, -2 * math.pi, -1e-20, -1e-9])
@pytest.mark.parametrize("code", ODD_UNDER_HALF_TURN)
def test_canonical_theta_range_without_gain_at_its_edges(code, theta):
    f = kernels.get(code)
    a = torch.tensor([GENERIC[code]], dtype=torch.float64)
    a[0, 0] = theta
    c, _ = f.canonicalize(a)
    assert 0 <= c[0, 0].item() < 2 * math.pi, c[0, 0].item()


@pytest.mark.parametrize("psi", [math.pi, -math.pi, 3 * math.pi, -1e-20])
@pytest.mark.parametrize("code", ["G", "Ge"])
def test_canonical_psi_range_at_its_edges(code, psi):
    f = kernels.get(code)
    a = torch.tensor([GENERIC[code]], dtype=torch.float64)
    a[0, 2] = psi
    c, _ = f.canonicalize(a)
    assert -math.pi < c[0, 2].item() <= math.pi


# --- sampling ------------------------------------------------------------------------------


@pytest.mark.parametrize("h,w", [(3, 3), (7, 7), (4, 6), (1, 1)])
@pytest.mark.parametrize("code", ANALYTIC + ("M",))
def test_sample_is_seeded_and_in_range(code, h, w):
    f = kernels.get(code)
    a = f.sample(500, h, w, generator=torch.Generator().manual_seed(0))
    b = f.sample(500, h, w, generator=torch.Generator().manual_seed(0))
    assert a.shape == (500, f.num_params)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    if code == "M":
        return
    c = f.sample(500, h, w, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, c)
    for k, (p, (lo, hi)) in enumerate(zip(f.params, f.init_ranges(h, w), strict=True)):
        assert lo < hi
        if p.kind == "positive":
            assert lo > 0
        col = a[:, k]
        assert (col >= lo * (1 - 1e-6)).all() and (col <= hi * (1 + 1e-6)).all(), p.name


def test_sample_dtype_and_plain():
    f = kernels.get("G")
    assert f.sample(3, 5, 5, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="plain"):
        kernels.get("P").sample(3, 5, 5)


def test_init_ranges_grow_with_kernel_size():
    for code in ANALYTIC:
        f = kernels.get(code)
        small, large = f.init_ranges(3, 3), f.init_ranges(15, 15)
        for p, (_, hi_s), (_, hi_l) in zip(f.params, small, large, strict=True):
            if p.kind == "positive":
                assert hi_l >= hi_s


# --- compile and device --------------------------------------------------------------------


def test_compile_smoke():
    """torch.compile (eager backend: tracing only, no code generation) gives the same kernels."""
    start = time.perf_counter()
    for code in ANALYTIC:
        f = kernels.get(code)
        a = akp(code, torch.float32, 3)
        compiled = torch.compile(lambda p, f=f: f(p, 5, 5), backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(a), f(a, 5, 5))
        if time.perf_counter() - start > 5:
            pytest.skip("torch.compile tracing is too slow here")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("code", ALL)
def test_cuda_matches_cpu(code):
    h, w = 5, 4
    params = params_for(code, h, w, 3)
    f = kernels.get(code)
    out = f(params.cuda(), h, w)
    assert out.device.type == "cuda" and out.dtype == params.dtype
    torch.testing.assert_close(out.cpu(), f(params, h, w))
    if code in ANALYTIC:
        s = f.sample(4, h, w, generator=torch.Generator().manual_seed(0), device="cuda")
        assert s.device.type == "cuda"
