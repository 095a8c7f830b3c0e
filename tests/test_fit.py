"""Tests of the fitting engine (SPEC §4): ``fit_kernels``, ``FitResult`` and the selection rules.

Planted kernels are each family's formula at random AKPs (``family.sample``), a random gain of
magnitude in [0.5, 2] and either sign, a random offset when the offset is on, plus Gaussian noise
of per-pixel standard deviation ``0.01 * |clean| / sqrt(h*w)``, so that the relative residual of
the true parameters is about 0.01. The quality target of the issue: the planted family reaches the
noise level and wins the model selection for >= 99 % of the kernels.

On ties in the selection: a more flexible family can also reach the noise level on a planted
kernel (Gabor mimics a LoG, any family with an offset reproduces a constant), so "wins" is tested
through ``select(mode="compact")``, which prefers the fewest parameters. The only genuine ties are
between families with the *same* parameter count that both reach the noise level. Worked by hand
for LoG vs LoT (1 AKP each): on 3x3 kernels with an offset both are three-level radial kernels
``(centre, edge, corner)``; modulo gain and offset only ``t = (corner - centre) / (edge - centre)``
matters. LoG covers t in (1, 2) (``t -> 2`` for large sigma, ``t -> 1`` for small), LoT covers
t in (0.8, 1) (``t = (5a + 4) / (4a + 5)``, ``a = exp(-1/sigma^2)``); both meet at t = 1, the
centre-spike limit, and near it the two differ by less than 1 % noise. So on 3x3 the winner
between Lg and Lt is decided by the noise; on 5x5 and 7x7 the two are distinct and no tie is
allowed. Ts kernels that compact selection gives to Lt are legitimate too (Lt has fewer
parameters, and a Ts at theta ~ pi/4 with a tiny gamma is a 4-neighbour Laplacian), which is why
the threshold is a rate, not "every kernel".

Runs on the CPU only; the planted fits are cached per configuration and shared by the tests.
"""

from __future__ import annotations

import dataclasses
import math
from functools import cache
from typing import NamedTuple

import pytest
import torch

from acl_convert import kernels, pattern
from acl_convert.fit import SELECT_MODES, FitResult, Selection, fit_kernels

PAPER = kernels.PAPER_FAMILIES  # ("G", "Lg", "Tf", "Ts", "Lt", "M")
ANALYTIC = tuple(c for c in PAPER if c != "M")
NOISE = 0.01  # relative noise of the planted kernels
TAU = 0.02  # selection threshold of the planted tests: twice the noise level
N_PLANT = 400  # planted kernels per family and configuration
#: (h, w, offset) of the planted sets: the sizes of the issue, with and without the offset, and
#: a non-square one. The rates are pooled over them; per configuration TGD2nd on 5x5 sits right at
#: the target (~1-1.6 % misses: theta near 0 sometimes converges to the mirror pi - theta).
CONFIGS = [(7, 7, True), (7, 7, False), (5, 5, True), (5, 5, False), (5, 7, True)]

#: Parameters of one converted kernel (AKPs + gain + offset; Mean is one constant).
COUNT_OFFSET = {"G": 6, "Lg": 3, "Tf": 5, "Ts": 4, "Lt": 3, "M": 1}
COUNT_NO_OFFSET = {"G": 5, "Lg": 2, "Tf": 4, "Ts": 3, "Lt": 2, "M": 1}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The fits are many small batched ops. On a busy 2-core machine torch's default of one
    OpenMP thread per core spin-waits so badly that a 1 s fit takes 40 s; one thread keeps the
    module at its idle speed. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- planted kernels ---------------------------------------------------------------------------


class Planted(NamedTuple):
    akp: torch.Tensor  # (n, P) float64, as drawn (not canonical)
    gain: torch.Tensor  # (n,) float64
    clean: torch.Tensor  # (n, h, w) float32
    noisy: torch.Tensor  # (n, h, w) float32


def plant(
    code: str, n: int, h: int, w: int, *, offset: bool, seed: int, noise: float = NOISE
) -> Planted:
    """``n`` kernels of family ``code``: formula at random AKPs, gain, offset, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    fam = kernels.get(code)
    f64 = torch.float64
    akp = fam.sample(n, h, w, generator=gen, dtype=f64)  # (n, 0) for Mean
    base = fam(akp, h, w)
    sign = torch.where(torch.rand(n, generator=gen, dtype=f64) < 0.5, -1.0, 1.0)
    gain = sign * (0.5 + 1.5 * torch.rand(n, generator=gen, dtype=f64))
    clean = gain[:, None, None] * base
    if offset:
        rms = clean.flatten(1).norm(dim=1) / math.sqrt(h * w)
        b = (2 * torch.rand(n, generator=gen, dtype=f64) - 1) * rms
        clean = clean + b[:, None, None]
    std = noise * clean.flatten(1).norm(dim=1) / math.sqrt(h * w)
    noisy = clean + std[:, None, None] * torch.randn(n, h, w, generator=gen, dtype=f64)
    return Planted(akp, gain, clean.float(), noisy.float())


def _seed(code: str, h: int, w: int, offset: bool) -> int:
    return 1000 * PAPER.index(code) + 100 * h + 10 * w + int(offset)


class PlantedFit(NamedTuple):
    noisy: torch.Tensor  # (6 * N_PLANT, h, w), shuffled: the batch that was fitted
    clean: torch.Tensor  # the same kernels without noise
    labels: list[str]  # planted family of each row of `noisy`
    fit: FitResult


@cache
def planted_fit(h: int, w: int, offset: bool) -> PlantedFit:
    """All families' planted kernels, shuffled into one mixed batch, fitted to all families."""
    sets = {c: plant(c, N_PLANT, h, w, offset=offset, seed=_seed(c, h, w, offset)) for c in PAPER}
    noisy = torch.cat([sets[c].noisy for c in PAPER])
    labels = [c for c in PAPER for _ in range(N_PLANT)]
    perm = torch.randperm(len(noisy), generator=torch.Generator().manual_seed(h * w))
    noisy, clean = noisy[perm], torch.cat([sets[c].clean for c in PAPER])[perm]
    labels = [labels[i] for i in perm.tolist()]
    return PlantedFit(noisy, clean, labels, fit_kernels(noisy, offset=offset, device="cpu"))


def rows_of(pf: PlantedFit, code: str) -> torch.Tensor:
    return torch.tensor([i for i, c in enumerate(pf.labels) if c == code])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a - b| / |b|`` per kernel of ``(N, h, w)`` tensors."""
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)


# --- quality target on planted kernels -----------------------------------------------------------


@pytest.mark.parametrize("code", PAPER)
def test_planted_family_reaches_noise_level(code):
    """The planted family's own residual is <= 1.5x the noise for >= 99 % of the kernels, pooled
    over CONFIGS (2000 kernels per family)."""
    own, detail = [], []
    for h, w, offset in CONFIGS:
        pf = planted_fit(h, w, offset)
        r = pf.fit.residuals[rows_of(pf, code), pf.fit.families.index(code)]
        own.append(r)
        detail.append(f"{h}x{w} offset={offset}: {(r <= 1.5 * NOISE).float().mean():.3f}")
    rate = (torch.cat(own) <= 1.5 * NOISE).float().mean().item()
    assert rate >= 0.99, f"{code}: {rate:.4f} at the noise level ({'; '.join(detail)})"


@pytest.mark.parametrize("code", PAPER)
def test_planted_family_wins_compact_selection(code):
    """In one shuffled batch of all families, compact selection at tau = 2x noise picks the
    planted family for >= 99 % of its kernels (pooled over the configurations)."""
    wins, total, detail = 0, 0, []
    for h, w, offset in CONFIGS:
        pf = planted_fit(h, w, offset)
        chosen = pf.fit.select(TAU, mode="compact").codes
        got = [chosen[i] for i in rows_of(pf, code).tolist()]
        wins += sum(c == code for c in got)
        total += len(got)
        others = {c: got.count(c) for c in sorted(set(got)) if c != code}
        detail.append(f"{h}x{w} offset={offset}: {got.count(code)}/{len(got)} {others}")
    assert wins / total >= 0.99, f"{code}: {wins}/{total} ({'; '.join(detail)})"


def test_more_starts_recover_planted_tgd1st():
    """The TGD1st misses of the default search are search misses, not model errors: refining
    more dictionary atoms reaches the noise level on the same kernels."""
    own = []
    for h, w, offset in CONFIGS:
        pf = planted_fit(h, w, offset)
        rows = rows_of(pf, "Tf")
        r = fit_kernels(pf.noisy[rows], families=["Tf"], offset=offset, device="cpu", starts=8)
        own.append(r.residuals[:, 0])
    rate = (torch.cat(own) <= 1.5 * NOISE).float().mean().item()
    assert rate >= 0.99


def test_planted_family_reaches_noise_level_on_4x4():
    """Even size: every family's own residual at the noise level for >= 99 %. (Compact selection
    is not tested here: on 4x4 with an offset Lg and Lt are both three-level radial kernels with
    3 parameters, a genuine tie.)"""
    misses = {}
    for code in PAPER:
        p = plant(code, 400, 4, 4, offset=True, seed=_seed(code, 4, 4, True))
        r = fit_kernels(p.noisy, families=[code], device="cpu")
        misses[code] = int((r.residuals[:, 0] > 1.5 * NOISE).sum())
    assert all(m <= 4 for m in misses.values()), misses


def test_planted_fits_reproduce_the_clean_kernel():
    """The fit removes noise: where the planted family is at the noise level, its fitted kernel
    is closer to the clean kernel than the noisy input is (for >= 95 % of those kernels)."""
    for h, w, offset in CONFIGS:
        pf = planted_fit(h, w, offset)
        for code in PAPER:
            rows = rows_of(pf, code)
            ok = pf.fit.residuals[rows, pf.fit.families.index(code)] <= 1.5 * NOISE
            clean = pf.clean[rows][ok]
            err_fit = relative_error(pf.fit.fitted(code)[rows][ok], clean)
            err_noise = relative_error(pf.noisy[rows][ok], clean)
            assert (err_fit < err_noise).float().mean() >= 0.95, (code, h, w, offset)


def test_lg_lt_tie_on_3x3_is_legitimate():
    """On 3x3 with an offset LoG and LoT coincide near the centre-spike limit (see the module
    docstring), have the same parameter count, and compact selection may pick either."""
    for code, other in (("Lg", "Lt"), ("Lt", "Lg")):
        p = plant(code, 100, 3, 3, offset=True, seed=_seed(code, 3, 3, True))
        r = fit_kernels(p.noisy, families=["Lg", "Lt"], device="cpu")
        assert r.param_count("Lg") == r.param_count("Lt") == 3
        chosen = r.select(TAU, mode="compact").codes
        assert sum(c in ("Lg", "Lt") for c in chosen) >= 99
        took_other = torch.tensor([c == other for c in chosen])
        res = r.residuals[took_other]
        # Whenever the other family was chosen, both reached the threshold and it fitted better.
        assert (res <= TAU).all()
        j, k = r.families.index(other), r.families.index(code)
        assert (res[:, j] <= res[:, k]).all()


def rows_result(fit: FitResult, rows: torch.Tensor) -> FitResult:
    """The part of ``fit`` for the kernels ``rows``."""
    return dataclasses.replace(
        fit,
        residuals=fit.residuals[rows],
        params={c: v[rows] for c, v in fit.params.items()},
        gain={c: v[rows] for c, v in fit.gain.items()},
        offset={c: v[rows] for c, v in fit.offset.items()},
        weighted=None if fit.weighted is None else fit.weighted[rows],
        energy=None if fit.energy is None else fit.energy[rows],
    )


def agreeing(a: FitResult, b: FitResult) -> torch.Tensor:
    """``(N,)`` bool: the kernels whose whole result (every family's residual, AKPs, gain and
    offset) is the same in ``a`` and ``b`` up to float32 rounding."""
    # 1e-6 in residual: the fit's float32 accuracy (the fit_kernels docstring); AKPs, gains and
    # offsets within 1e-5 relative: a flat minimum lets the parameters move ~10x more than the
    # residual, and a search that took another path differs by far more (seed test below: all).
    same = ((a.residuals - b.residuals).abs() <= 1e-6).all(1)
    for c in a.families:
        same &= torch.isclose(a.params[c], b.params[c], rtol=1e-5, atol=1e-5).all(1)
        same &= torch.isclose(a.gain[c], b.gain[c], rtol=1e-5, atol=1e-6)
        same &= torch.isclose(a.offset[c], b.offset[c], rtol=1e-5, atol=1e-6)
    return same


#: Share of kernels whose result must not depend on the batch around them. Each kernel's
#: arithmetic is its own (lm._normal_equations), but BLAS products (the dictionary scores) may
#: round a row differently with the number of rows on some CPUs, and a near-tie between starts or
#: an accept/reject decision on the edge then sends that kernel down another path, possibly to
#: another local minimum. Measured: 100 % on AMD EPYC under every MKL_CBWR path and thread
#: count; 50 % (mixed batch) and 70 % (chunks) before the normal equations were per kernel.
BATCH_AGREEMENT = 0.98


def test_mixed_batch_matches_separate_fits():
    """A kernel's result does not depend on the other kernels of its batch: the shuffled mixed
    batch gives the same per-kernel outcome as fitting every family's kernels on their own, for
    all but a few kernels whose search rounding sends elsewhere (see BATCH_AGREEMENT)."""
    pf = planted_fit(5, 5, True)
    chosen = pf.fit.select(TAU, mode="compact").codes
    same, same_choice, detail = [], [], []
    for code in PAPER:
        rows = rows_of(pf, code)
        alone = fit_kernels(pf.noisy[rows], device="cpu")
        agree = agreeing(alone, rows_result(pf.fit, rows))
        same.append(agree)
        picked = alone.select(TAU, mode="compact").codes
        same_choice += [c == chosen[i] for c, i in zip(picked, rows.tolist(), strict=True)]
        detail.append(f"{code}: {agree.float().mean():.3f}")
    rate = torch.cat(same).float().mean().item()
    assert rate >= BATCH_AGREEMENT, f"{rate:.4f} of kernels agree ({', '.join(detail)})"
    # The selection only changes where a result did; allowing for that share.
    assert sum(same_choice) / len(same_choice) >= BATCH_AGREEMENT


def test_residuals_match_the_fitted_kernels():
    """``residuals`` is ``|W - fitted(code)| / |W|``, with the canonical AKPs, for the planted
    family of every kernel (the entries that decide the selection)."""
    for h, w, offset in CONFIGS:
        pf = planted_fit(h, w, offset)
        for j, code in enumerate(pf.fit.families):
            rows = rows_of(pf, code)
            recomputed = relative_error(pf.fit.fitted(code)[rows], pf.noisy[rows])
            torch.testing.assert_close(
                pf.fit.residuals[rows, j],
                recomputed,
                rtol=1e-3,
                atol=1e-6,
                msg=f"{code} {h}x{w} offset={offset}",
            )


def test_every_residual_matches_its_fitted_kernel():
    worst = []
    for h, w, offset in CONFIGS:
        pf = planted_fit(h, w, offset)
        for j, code in enumerate(pf.fit.families):
            recomputed = relative_error(pf.fit.fitted(code), pf.noisy)
            d = (pf.fit.residuals[:, j] - recomputed).abs() / recomputed.clamp_min(1e-6)
            if d.max() > 1e-3:
                worst.append(f"{code} {h}x{w} offset={offset}: {d.max():.1e}")
    assert not worst, worst


def test_fitted_akps_are_canonical():
    """SPEC §2: sigma, lambda, gamma > 0; theta in [0, pi) (TGD1st too, since a gain absorbs the
    flip); psi in (-pi, pi]; Gabor gains >= 0 (the sign is a phase of pi)."""
    pf = planted_fit(7, 7, True)
    for code in ANALYTIC:
        fam = kernels.get(code)
        akp = pf.fit.params[code]
        assert akp.shape == (len(pf.noisy), fam.num_params)
        for k, p in enumerate(fam.params):
            v = akp[:, k]
            if p.kind == "positive":
                assert (v > 0).all(), (code, p.name)
            elif p.name.startswith("theta"):
                assert ((v >= 0) & (v < math.pi)).all(), (code, p.name)
            else:
                assert ((v > -math.pi) & (v <= math.pi)).all(), (code, p.name)
    assert (pf.fit.gain["G"] >= 0).all()


# --- opt-in extended families (docs/kernels.md, "Extended families") ----------------------------

#: (h, w, offset) of the extended families' planted sets.
EXT_CONFIGS = [(7, 7, True), (7, 7, False), (5, 5, True)]


def _ext_seed(code: str, h: int, w: int, offset: bool) -> int:
    return 50_000 + 1000 * kernels.EXTENDED_FAMILIES.index(code) + 100 * h + 10 * w + int(offset)


def _assert_canonical(code: str, fit: FitResult, h: int, w: int) -> None:
    """theta in [0, pi) (Dx too: the gain absorbs the half-turn), Ge's psi in (-pi, pi] with a
    gain >= 0, and centre offsets inside the refinement's box (half-size + 1 px)."""
    fam, akp = kernels.get(code), fit.params[code]
    theta = akp[:, fam.param_names.index("theta")]
    assert ((theta >= 0) & (theta < math.pi)).all(), code
    if code == "Ge":
        assert ((akp[:, 2] > -math.pi) & (akp[:, 2] <= math.pi)).all()
        assert (fit.gain[code] >= 0).all()
        assert (akp[:, 5:].abs() <= (max(h, w) - 1) / 2 + 1 + 1e-5).all()
    positive = [k for k, p in enumerate(fam.params) if p.kind == "positive"]
    assert (akp[:, positive] > 0).all(), code


@pytest.mark.parametrize("code", ["Dx", "Dxx"])
def test_planted_gaussian_derivatives_reach_noise_level(code):
    """Two smooth AKPs and the dense two-AKP grid: the planted family is at the noise level for
    >= 99 %, the paper families' target, pooled over EXT_CONFIGS (300 kernels each). (Measured:
    100 % on 7x7, 5x5 and 3x3; Dxx on 4x4 with an offset ~96 %, where at sigma ~0.5 theta and
    pi/2 - theta sample almost alike, as for TGD2nd.)"""
    own = []
    for h, w, offset in EXT_CONFIGS:
        p = plant(code, 300, h, w, offset=offset, seed=_ext_seed(code, h, w, offset))
        r = fit_kernels(p.noisy, families=[code], offset=offset, device="cpu")
        _assert_canonical(code, r, h, w)
        own.append(r.residuals[:, 0])
    rate = (torch.cat(own) <= 1.5 * NOISE).float().mean().item()
    assert rate >= 0.99, f"{code}: {rate:.4f}"


def test_planted_gabor_ext_reaches_noise_level():
    """Seven AKPs: planted Ge kernels reach the noise level for >= 95 % with ``starts=4``, pooled
    over 7x7 with and 5x5 without the offset, for envelopes of sigma >= 0.8 px.

    Measured on 2,000 kernels per size (docs/kernels.md): with the default two starts 95-97 %
    for sigma >= 0.8 px, but 89 % over Ge's whole initialisation range (sigma >= 0.4 px). The
    misses are search misses (starting from the planted AKPs reaches the noise level): an
    envelope under a pixel wide, centred between pixels, changes its sampled shape with the
    sub-pixel centre, so its basin is narrower than the grid spacing; and a wavelength many
    times the envelope (a near-Gaussian-derivative) leaves lambda and psi almost free. More
    starts cure both (starts=8: 96 % over the whole range)."""
    own = []
    for h, w, offset in [(7, 7, True), (5, 5, False)]:
        p = plant("Ge", 600, h, w, offset=offset, seed=_ext_seed("Ge", h, w, offset))
        keep = p.akp[:, 3] >= 0.8
        r = fit_kernels(p.noisy[keep], families=["Ge"], offset=offset, device="cpu", starts=4)
        _assert_canonical("Ge", r, h, w)
        own.append(r.residuals[:, 0])
    rate = (torch.cat(own) <= 1.5 * NOISE).float().mean().item()
    assert len(torch.cat(own)) >= 600 and rate >= 0.95, f"Ge: {rate:.4f}"


def test_extended_families_are_opt_in():
    """The default families stay the paper's six; an extended family is fitted when named."""
    W = plant("Dx", 8, 5, 5, offset=True, seed=7).noisy
    assert fit_kernels(W, device="cpu").families == list(PAPER)
    r = fit_kernels(W, families=[*PAPER, *kernels.EXTENDED_FAMILIES], device="cpu")
    assert r.families == [*PAPER, "Ge", "Dx", "Dxx"]
    assert {c: r.param_count(c) for c in kernels.EXTENDED_FAMILIES} == {"Ge": 9, "Dx": 4, "Dxx": 4}
    assert (r.residuals[:, r.families.index("Dx")] <= 1.5 * NOISE).all()


# --- recovered AKPs on noiseless planted kernels -------------------------------------------------


def _circular(d: torch.Tensor, period: float) -> torch.Tensor:
    return (torch.remainder(d + period / 2, period) - period / 2).abs()


def _akp_error(code: str, fit: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per-kernel worst AKP error between canonical AKPs ``(n, P)``: log-ratio for scales,
    circular difference for angles (Gabor: up to theta + pi == psi -> -psi)."""
    fam = kernels.get(code)
    cols = []
    for k, p in enumerate(fam.params):
        if p.kind == "positive":
            cols.append((fit[:, k] / true[:, k]).log().abs())
    if code == "G":
        dt, dp, sp = fit[:, 1] - true[:, 1], fit[:, 2] - true[:, 2], fit[:, 2] + true[:, 2]
        same = _circular(dt, 2 * math.pi) + _circular(dp, 2 * math.pi)
        flipped = _circular(dt - math.pi, 2 * math.pi) + _circular(sp, 2 * math.pi)
        cols.append(torch.minimum(same, flipped))
    elif code in ("Tf", "Ts"):
        cols.append(_circular(fit[:, 0] - true[:, 0], math.pi))
    return torch.stack(cols, 1).max(1).values


#: Worst AKP error allowed per family (log-ratio or radians); LoT's sigma and the TGDs' angles are
#: the least sharply determined on a 7x7 grid.
AKP_TOLERANCE = {"G": 0.02, "Lg": 0.005, "Tf": 0.05, "Ts": 0.05, "Lt": 0.03}


@pytest.mark.parametrize("code", ANALYTIC)
def test_noiseless_planted_akps_are_recovered(code):
    """Noiseless 7x7 planted kernels: the fitted kernel reproduces the clean one (<= 1e-3) for
    >= 95 %, and wherever it does, the canonical AKPs and gain are the planted ones (canonical
    AKPs are unique). Gabor AKPs are compared only where they are identifiable on the grid:
    lambda >= 3 px (lambda ~ 2 aliases: theta and pi - theta sample alike) and sigma >= 1 px."""
    h = w = 7
    fam = kernels.get(code)
    p = plant(code, 100, h, w, offset=True, seed=_seed(code, h, w, True) + 7)
    r = fit_kernels(p.clean, families=[code], device="cpu")
    reproduced = relative_error(r.fitted(code), p.clean) <= 1e-3
    assert reproduced.float().mean() >= 0.95
    true_akp, true_gain = fam.canonicalize(p.akp, p.gain)
    sel = reproduced
    if code == "G":
        sel = sel & (true_akp[:, 0] >= 3) & (true_akp[:, 3] >= 1)
        assert sel.sum() >= 20
    err = _akp_error(code, r.params[code][sel].double(), true_akp[sel])
    assert err.max() <= AKP_TOLERANCE[code], err.max()
    gain_err = (r.gain[code][sel].double() - true_gain[sel]).abs() / true_gain[sel].abs()
    assert gain_err.max() <= 0.05


# --- selection rules on hand-made residual tables ------------------------------------------------


def table(residuals, families, h: int = 7, w: int = 7, offset: bool = True) -> FitResult:
    """A ``FitResult`` with the given residual rows and dummy AKPs (ones), gains and offsets."""
    res = torch.tensor(residuals, dtype=torch.float32).reshape(-1, len(families))
    n = len(res)
    return FitResult(
        families=list(families),
        residuals=res,
        params={c: torch.ones(n, kernels.get(c).num_params) for c in families},
        gain={c: torch.ones(n) for c in families},
        offset={c: torch.zeros(n) for c in families},
        kernel_size=(h, w),
        offset_enabled=offset,
    )


def test_param_counts_and_eligibility_7x7():
    r = table([[0.5] * 6], PAPER)
    assert {c: r.param_count(c) for c in PAPER} == COUNT_OFFSET
    assert r.eligible().tolist() == [True] * 6
    r = table([[0.5] * 6], PAPER, offset=False)
    assert {c: r.param_count(c) for c in PAPER} == COUNT_NO_OFFSET
    for c in PAPER:
        assert r.param_count(c) == pattern.params_per_kernel(c, 7, 7, gain=True, offset=False)


def test_eligibility_needs_fewer_parameters_than_pixels():
    """2x2 (4 pixels) with an offset: G 4+2=6, Tf 3+2=5, Ts 2+2=4 are not < 4; Lg, Lt 1+2=3 and
    M 1 are. Without the offset Ts (2+1=3) becomes eligible, Tf (3+1=4) does not."""
    r = table([[0.1] * 6], PAPER, h=2, w=2)
    assert dict(zip(PAPER, r.eligible().tolist(), strict=True)) == {
        "G": False,
        "Lg": True,
        "Tf": False,
        "Ts": False,
        "Lt": True,
        "M": True,
    }
    r = table([[0.1] * 6], PAPER, h=2, w=2, offset=False)
    assert dict(zip(PAPER, r.eligible().tolist(), strict=True)) == {
        "G": False,
        "Lg": True,
        "Tf": False,
        "Ts": True,
        "Lt": True,
        "M": True,
    }
    # 1x2: only Mean (1 < 2).
    r = table([[0.1] * 6], PAPER, h=1, w=2)
    assert r.eligible().tolist() == [c == "M" for c in PAPER]


@pytest.mark.parametrize("mode", SELECT_MODES)
def test_selection_never_picks_an_ineligible_family(mode):
    fams = ("G", "Tf", "Lg")
    r = table([[0.0, 0.0, 0.01], [0.0, 0.001, 0.5]], fams, h=2, w=2)
    s = r.select(0.05, mode=mode)
    assert s.codes == ["Lg", "P"]
    assert s.choice.tolist() == [2, -1]


def test_best_takes_lowest_residual_within_threshold():
    fams = ("G", "Lg", "Tf", "M")
    r = table(
        [
            [0.010, 0.015, 0.030, 0.200],  # G lowest
            [0.050, 0.040, 0.030, 0.060],  # lowest (Tf) above tau -> plain
            [0.030, 0.019, 0.025, 0.900],  # Lg
            [0.300, 0.300, 0.300, 0.005],  # M lowest
        ],
        fams,
    )
    s = r.select(0.02)  # best is the default mode
    assert isinstance(s, Selection)
    assert s.codes == ["G", "P", "Lg", "M"]
    assert s.choice.tolist() == [0, -1, 1, 3]
    torch.testing.assert_close(s.residual, torch.tensor([0.010, 0.0, 0.019, 0.005]))
    assert s.totals() == {"G": 1, "P": 1, "Lg": 1, "M": 1}


def test_best_breaks_exact_ties_by_fewer_parameters():
    fams = ("G", "Tf", "Lg", "M")
    r = table(
        [
            [0.01, 0.01, 0.01, 0.01],  # all equal -> M (1 parameter)
            [0.01, 0.01, 0.01, 0.50],  # -> Lg (3)
            [0.01, 0.01, 0.02, 0.50],  # -> Tf (5) over G (6)
        ],
        fams,
    )
    assert r.select(0.05, mode="best").codes == ["M", "Lg", "Tf"]
    # A strictly lower residual still wins over fewer parameters.
    r = table([[0.0100, 0.0101, 0.0101, 0.0101]], fams)
    assert r.select(0.05, mode="best").codes == ["G"]


def test_compact_takes_fewest_parameters_within_threshold():
    fams = ("G", "Tf", "Ts", "Lg", "M")
    r = table(
        [
            [0.001, 0.005, 0.010, 0.015, 0.300],  # Lg: fewest among r <= tau
            [0.001, 0.005, 0.010, 0.150, 0.019],  # M (1 parameter) at 0.019
            [0.001, 0.050, 0.050, 0.050, 0.050],  # only G qualifies
            [0.030, 0.050, 0.050, 0.050, 0.050],  # none -> plain
            [0.001, 0.015, 0.019, 0.021, 0.300],  # Ts
        ],
        fams,
    )
    s = r.select(0.02, mode="compact")
    assert s.codes == ["Lg", "M", "G", "P", "Ts"]
    torch.testing.assert_close(s.residual, torch.tensor([0.015, 0.019, 0.001, 0.0, 0.019]))
    # best picks the lowest residual of the same rows instead
    assert r.select(0.02, mode="best").codes == ["G", "G", "G", "P", "G"]


@pytest.mark.parametrize("mode", SELECT_MODES)
def test_threshold_is_inclusive(mode):
    """``r <= tau`` qualifies (dyadic values, so float32 storage is exact)."""
    tau = 2.0**-6
    r = table([[tau, 0.5], [0.5, tau], [tau * (1 + 2**-20), 0.5]], ("G", "Lg"))
    s = r.select(tau, mode=mode)
    assert s.codes == ["G", "Lg", "P"]
    assert s.residual.tolist() == [tau, tau, 0.0]


@pytest.mark.parametrize("order", [("Lg", "Lt"), ("Lt", "Lg")])
def test_compact_breaks_parameter_ties_by_lower_residual(order):
    """Lg and Lt have the same count (3): the lower residual wins, whatever the column order."""
    res = {"Lg": [0.012, 0.010, 0.0150001], "Lt": [0.010, 0.012, 0.0150000]}
    r = table([[res[order[0]][i], res[order[1]][i]] for i in range(3)], order)
    assert r.select(0.02, mode="compact").codes == ["Lt", "Lg", "Lt"]


def test_selection_skips_non_finite_residuals():
    r = table(
        [[float("nan"), 0.01], [0.001, float("inf")], [float("nan"), float("nan")]], ("G", "Lg")
    )
    for mode in SELECT_MODES:
        assert r.select(0.05, mode=mode).codes == ["Lg", "G", "P"]


def test_selection_rejects_bad_mode_and_threshold():
    r = table([[0.01, 0.02]], ("G", "Lg"))
    with pytest.raises(ValueError, match="mode"):
        r.select(0.02, mode="fast")
    for bad in (-0.01, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            r.select(bad)


def test_selection_of_an_empty_table():
    r = table([], PAPER)
    s = r.select(0.02)
    assert s.codes == [] and s.choice.shape == (0,) and s.residual.shape == (0,)


# --- edge inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [True, False])
def test_all_zero_kernel_becomes_mean_with_gain_zero(offset):
    """Pruned models have many all-zero kernels: residual 0 for every family, 'M' with gain 0
    under best at any tau >= 0 (exact tie -> fewest parameters), and every fitted kernel is 0."""
    W = torch.randn(6, 5, 5, generator=torch.Generator().manual_seed(0))
    W[[1, 4]] = 0
    r = fit_kernels(W, offset=offset, device="cpu")
    assert (r.residuals[[1, 4]] == 0).all()
    for tau in (0.0, 0.02, 1.0):
        s = r.select(tau, mode="best")
        assert s.codes[1] == s.codes[4] == "M"
        assert s.residual[1] == s.residual[4] == 0
        assert r.select(tau, mode="compact").codes[1] == "M"
    assert (r.gain["M"][[1, 4]] == 0).all()
    for c in r.families:
        assert torch.isfinite(r.params[c][[1, 4]]).all()
        assert (r.fitted(c)[[1, 4]] == 0).all()


def test_constant_kernel_is_mean():
    """Every family with an offset reproduces a constant, but Mean does it with 1 parameter."""
    W = torch.full((3, 5, 5), 2.5)
    W[1] *= -1
    r = fit_kernels(W, device="cpu")
    assert (r.residuals <= 1e-5).all()
    assert r.select(0.01, mode="compact").codes == ["M"] * 3
    torch.testing.assert_close(r.gain["M"], torch.tensor([12.5, -12.5, 12.5]))
    assert (r.offset["M"] == 0).all()  # the constant of Mean is carried by its gain


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_kernels_are_an_error_that_counts_them(bad):
    W = torch.randn(10, 3, 3)
    W[2, 0, 1] = float(bad)
    W[7, 2, 2] = float(bad)
    W[7, 1, 1] = float("nan")  # two bad values in one kernel count once
    with pytest.raises(ValueError, match=r"\b2 of 10\b"):
        fit_kernels(W, device="cpu")


@pytest.mark.parametrize("shape", [(4, 1, 1), (4, 0, 3)])
def test_kernels_without_room_for_a_fit_are_rejected(shape):
    with pytest.raises(ValueError, match="1x1"):
        fit_kernels(torch.randn(*shape), device="cpu")


@pytest.mark.parametrize("shape", [(3, 3), (5,), (2, 1, 1, 3, 3)])
def test_wrong_number_of_dimensions_is_rejected(shape):
    with pytest.raises(ValueError, match=r"\(N, h, w\)"):
        fit_kernels(torch.randn(*shape), device="cpu")


def test_non_tensor_input_is_rejected():
    with pytest.raises(TypeError, match="torch.Tensor"):
        fit_kernels([[[1.0, 2.0], [3.0, 4.0]]], device="cpu")


def test_no_kernels():
    r = fit_kernels(torch.zeros(0, 5, 5), device="cpu")
    assert len(r) == 0 and r.residuals.shape == (0, len(PAPER))
    assert r.families == list(PAPER)
    for c in PAPER:
        assert r.params[c].shape == (0, kernels.get(c).num_params)
        assert r.gain[c].shape == r.offset[c].shape == (0,)
    assert r.select(0.02).codes == []


@pytest.mark.parametrize("families", [["P"], ["G", "P"], ["plain"]])
def test_plain_is_not_a_family_to_fit(families):
    with pytest.raises(ValueError, match="plain"):
        fit_kernels(torch.randn(2, 3, 3), families=families, device="cpu")


def test_family_arguments():
    W = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(1))
    r = fit_kernels(W, families=["gabor", "Lt", "mean"], device="cpu")
    assert r.families == ["G", "Lt", "M"] and r.residuals.shape == (4, 3)
    assert set(r.params) == set(r.gain) == set(r.offset) == {"G", "Lt", "M"}
    with pytest.raises(ValueError, match="twice"):
        fit_kernels(W, families=["G", "gabor"], device="cpu")
    with pytest.raises(KeyError, match="unknown kernel family"):
        fit_kernels(W, families=["X"], device="cpu")


def test_bad_starts_is_rejected():
    with pytest.raises(ValueError, match="starts"):
        fit_kernels(torch.randn(2, 3, 3), device="cpu", starts=0)


def test_cuda_without_a_gpu_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(ValueError, match="CUDA"):
        fit_kernels(torch.randn(2, 3, 3), device="cuda")


@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (2, 6), (6, 2), (2, 2), (1, 2), (2, 1)])
def test_even_non_square_and_tiny_sizes_run(shape):
    h, w = shape
    W = torch.randn(16, h, w, generator=torch.Generator().manual_seed(h * 10 + w))
    r = fit_kernels(W, device="cpu")
    assert r.kernel_size == (h, w) and r.residuals.shape == (16, len(PAPER))
    assert torch.isfinite(r.residuals).all() and (r.residuals >= 0).all()
    for c in PAPER:
        assert r.fitted(c).shape == (16, h, w)
    s = r.select(0.5)
    eligible = [c for c, ok in zip(r.families, r.eligible().tolist(), strict=True) if ok]
    assert set(s.codes) <= {*eligible, "P"}


def test_input_dtypes_and_layout():
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(8, 5, 5, generator=gen)
    ref = fit_kernels(W, device="cpu")
    assert ref.residuals.dtype == torch.float32
    # Non-contiguous input: the same numbers give the same result; the input is not modified.
    Wt = W.transpose(1, 2).contiguous().transpose(1, 2)
    assert not Wt.is_contiguous()
    before = Wt.clone()
    other = fit_kernels(Wt, device="cpu")
    assert torch.equal(Wt, before)
    torch.testing.assert_close(other.residuals, ref.residuals, rtol=0, atol=0)
    # float64 in -> float64 out
    r64 = fit_kernels(W.double(), device="cpu")
    assert r64.residuals.dtype == torch.float64
    assert all(r64.params[c].dtype == r64.gain[c].dtype == torch.float64 for c in PAPER)
    # integers are fitted as float32
    Wi = torch.randint(-5, 6, (8, 3, 3), generator=gen)
    Wi[0] = 0
    ri = fit_kernels(Wi, device="cpu")
    assert ri.residuals.dtype == torch.float32 and (ri.residuals[0] == 0).all()
    torch.testing.assert_close(ri.residuals, fit_kernels(Wi.float(), device="cpu").residuals)


def test_progress_reports_every_chunk():
    calls = []
    W = torch.randn(600, 3, 3, generator=torch.Generator().manual_seed(3))
    fit_kernels(
        W,
        families=["Lg", "M"],
        device="cpu",
        memory=1,
        progress=lambda code, n: calls.append((code, n)),
    )
    assert calls == [("Lg", 256), ("Lg", 256), ("Lg", 88), ("M", 256), ("M", 256), ("M", 88)]


# --- determinism, chunking, offset, scale ------------------------------------------------------


@cache
def small_planted(h: int = 5, w: int = 5, n: int = 20) -> tuple[torch.Tensor, list[str]]:
    """``n`` noisy planted kernels per family, offset on, in family order."""
    W = torch.cat(
        [plant(c, n, h, w, offset=True, seed=_seed(c, h, w, True) + 3).noisy for c in PAPER]
    )
    return W, [c for c in PAPER for _ in range(n)]


@cache
def small_fit(seed: int = 0) -> FitResult:
    return fit_kernels(small_planted()[0], device="cpu", seed=seed)


def assert_identical(a: FitResult, b: FitResult) -> None:
    assert a.families == b.families
    assert torch.equal(a.residuals, b.residuals)
    for c in a.families:
        assert torch.equal(a.params[c], b.params[c]), c
        assert torch.equal(a.gain[c], b.gain[c]), c
        assert torch.equal(a.offset[c], b.offset[c]), c


def test_same_seed_gives_identical_results():
    again = fit_kernels(small_planted()[0], device="cpu", seed=0)
    assert_identical(small_fit(0), again)


def test_other_seed_gives_comparable_results():
    a, b = small_fit(0), small_fit(1)
    W, labels = small_planted()
    assert any(not torch.equal(a.params[c], b.params[c]) for c in ANALYTIC)
    own = torch.tensor([a.families.index(c) for c in labels])
    rows = torch.arange(len(W))
    diff = (a.residuals[rows, own] - b.residuals[rows, own]).abs()
    assert (diff <= 1e-3).float().mean() >= 0.95
    assert (a.residuals - b.residuals).abs().median() <= 1e-4


def test_chunked_and_unchunked_runs_agree():
    """``memory=1`` forces the smallest chunks (256 kernels): 600 kernels in three chunks give
    the same numbers as one chunk (for all but a few kernels, see BATCH_AGREEMENT)."""
    W = small_planted(5, 5, 100)[0]
    assert len(W) >= 600
    whole = fit_kernels(W, device="cpu")
    sizes = []
    chunked = fit_kernels(W, device="cpu", memory=1, progress=lambda c, n: sizes.append(n))
    assert max(sizes) == 256 and len(sizes) == len(PAPER) * math.ceil(len(W) / 256)
    assert chunked.families == whole.families
    rate = agreeing(chunked, whole).float().mean().item()
    assert rate >= BATCH_AGREEMENT, f"{rate:.4f} of kernels agree"
    # The criterion can fail: another seed (another dictionary grid) changes nearly every result.
    assert agreeing(fit_kernels(W, device="cpu", seed=1), whole).float().mean() < 0.1


def test_offset_off_gives_zero_offsets():
    pf = planted_fit(5, 5, False)
    assert not pf.fit.offset_enabled
    for c in PAPER:
        assert (pf.fit.offset[c] == 0).all()
        # fitted() evaluates in float64: TGD1st's dead band |x'| > delta can decide differently
        # in float32 for a sample right at its edge.
        base = kernels.get(c)(pf.fit.params[c].double(), 5, 5)
        expected = (pf.fit.gain[c].double()[:, None, None] * base).float()
        torch.testing.assert_close(pf.fit.fitted(c), expected)


@cache
def refit_with_offset(h: int, w: int) -> FitResult:
    """The kernels planted without an offset, fitted with one."""
    return fit_kernels(planted_fit(h, w, False).noisy, device="cpu", offset=True)


def test_offset_on_is_no_worse_for_the_planted_family():
    """The model with an offset contains the one without: on kernels planted without an offset,
    the planted family's residual with the offset is no larger (up to 1e-5) for >= 99 % (every
    kernel and family is the xfail test below)."""
    for h, w in ((5, 5), (7, 7)):
        pf, with_offset = planted_fit(h, w, False), refit_with_offset(h, w)
        labels = torch.tensor([pf.fit.families.index(c) for c in pf.labels])
        rows = torch.arange(len(labels))
        r_on = with_offset.residuals[rows, labels]
        r_off = pf.fit.residuals[rows, labels]
        assert (r_on <= r_off + 1e-5).float().mean() >= 0.99


@pytest.mark.xfail(
    strict=True,
    reason=(
        "local search: for ~0.5-1 % of (kernel, family) pairs the offset=True fit lands in a "
        "worse local minimum than the offset=False fit (mostly G and Tf fitted to other "
        "families' kernels, worst 0.19; also ~1 in 400 planted Gabor kernels, by up to 0.008), "
        "although the offset model contains the no-offset model"
    ),
)
def test_offset_on_is_never_worse_than_offset_off():
    """Nested models: ``r(offset=True) <= r(offset=False)`` for every kernel and family."""
    pf, with_offset = planted_fit(7, 7, False), refit_with_offset(7, 7)
    worse = with_offset.residuals - pf.fit.residuals
    assert worse.max() <= 1e-5, f"{int((worse > 1e-5).sum())} pairs, worst {worse.max():.4f}"


def test_scaling_by_a_power_of_two_is_exact():
    """Kernels are normalised first, so 1024 W gives the same fit with gains and offsets x 1024."""
    W = small_planted()[0]
    a, b = small_fit(0), fit_kernels(W * 1024, device="cpu")
    assert torch.equal(a.residuals, b.residuals)
    for c in PAPER:
        assert torch.equal(a.params[c], b.params[c])
        assert torch.equal(a.gain[c] * 1024, b.gain[c])
        assert torch.equal(a.offset[c] * 1024, b.offset[c])


def test_scaling_by_1000_scales_gains_and_offsets():
    """1000 W is not exactly representable, so rounding may move a fit within its minimum;
    for the planted family residuals are unchanged and gains and offsets scale by 1000."""
    W, labels = small_planted()
    a, b = small_fit(0), fit_kernels(W * 1000, device="cpu")
    for code in PAPER:
        rows = torch.tensor([i for i, c in enumerate(labels) if c == code])
        j = a.families.index(code)
        torch.testing.assert_close(b.residuals[rows, j], a.residuals[rows, j], rtol=0, atol=1e-4)
        scale = W[rows].flatten(1).norm(dim=1) * 1000
        torch.testing.assert_close(
            b.gain[code][rows], 1000 * a.gain[code][rows], rtol=1e-2, atol=1e-3
        )
        off = (b.offset[code][rows] - 1000 * a.offset[code][rows]).abs() / scale
        assert off.max() <= 1e-3, code


# --- defects kept as failing tests ---------------------------------------------------------------


def test_fitted_akps_are_finite_on_random_kernels():
    W = torch.randn(50, 5, 5, generator=torch.Generator().manual_seed(0))
    r = fit_kernels(W, device="cpu")
    bad = {c: int((~torch.isfinite(r.params[c])).any(1).sum()) for c in ANALYTIC}
    assert not any(bad.values()), bad


def test_residuals_of_poor_fits_are_consistent_and_at_most_one():
    W = torch.randn(64, 4, 4, generator=torch.Generator().manual_seed(0))
    r = fit_kernels(W, device="cpu")
    assert r.residuals.max() <= 1 + 1e-6
    for j, c in enumerate(r.families):
        torch.testing.assert_close(
            r.residuals[:, j], relative_error(r.fitted(c), W), rtol=0, atol=1e-4, msg=c
        )


@pytest.mark.parametrize("offset", [True, False])
def test_sobel_and_prewitt_are_exact_tgd1st(offset):
    """Worked by hand: Sobel is TGD1st at theta = pi/2 (x' = y, the middle column is in the dead
    band |x'| <= delta) with exp(-1/gamma^2) = 1/2 across it; Prewitt is the limit of a flat
    envelope. Both exist only at exact angles, which the fit's orientation grid must contain."""
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    prewitt = torch.tensor([[-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0]])
    W = torch.stack([sobel, sobel.T, prewitt, -prewitt.T])
    fit = fit_kernels(W, families=("Tf",), offset=offset, device="cpu")
    assert (fit.residuals[:, 0] < 1e-3).all(), fit.residuals[:, 0]
    theta = fit.params["Tf"][:, 0]
    expected = torch.tensor([math.pi / 2, 0.0, math.pi / 2, 0.0])
    # theta in [0, pi): an angle within 1e-3 of pi counts as 0 (the same axis, sign in the gain).
    diff = (theta - expected).abs()
    assert (torch.minimum(diff, math.pi - diff) < 1e-3).all(), theta
