"""The fitting engine's machinery for speed (issue 12): threads, the dictionary's top-k, the
refinement's solver, working set and sampling. Each must give what the plain computation
gives; nothing here is timed."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from acl_convert import kernels
from acl_convert.fit import dictionary, fit_kernels, lm, threads
from acl_convert.kernels import KernelFamily, Param

# --- threads -------------------------------------------------------------------------------------


def test_default_threads_are_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.delenv("ACL_CONVERT_THREADS", raising=False)
    assert threads.workers() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("ACL_CONVERT_THREADS", "3")
    assert threads.workers() == 3
    monkeypatch.setenv("ACL_CONVERT_THREADS", "many")  # ignored, not an error
    assert threads.workers() == len(os.sched_getaffinity(0))


def test_fit_threads_keeps_torch_single_threaded_and_restores(monkeypatch):
    monkeypatch.delenv("ACL_CONVERT_THREADS", raising=False)
    before = torch.get_num_threads()
    with threads.fit_threads():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_map_in_order_keeps_order_and_runs_torch_single_threaded():
    def work(i: int) -> tuple[int, int]:
        return i, torch.get_num_threads()

    out = list(threads.map_in_order(work, range(20), 2))
    assert [i for i, _ in out] == list(range(20))
    assert all(n == 1 for _, n in out)


def test_map_in_order_passes_errors_on():
    def work(i: int) -> int:
        if i == 3:
            raise ValueError("chunk 3")
        return i

    with pytest.raises(ValueError, match="chunk 3"):
        list(threads.map_in_order(work, range(8), 2))


def _fit_with_threads(monkeypatch, n: int, W: torch.Tensor):
    monkeypatch.setenv("ACL_CONVERT_THREADS", str(n))
    # memory=1: chunks of 256 kernels, so that two threads fit chunks at the same time.
    return fit_kernels(W, families=["G", "Tf", "Lt"], device="cpu", memory=1)


def test_thread_count_does_not_change_the_fit(monkeypatch):
    """Chunks are the same whatever the thread count, and each is fitted single-threaded, so the
    results agree; compared to float32 rounding (1e-6 of unit-norm kernels' residuals) rather
    than bit for bit."""
    W = torch.randn(1100, 3, 3, generator=torch.Generator().manual_seed(5))
    one = _fit_with_threads(monkeypatch, 1, W)
    two = _fit_with_threads(monkeypatch, 2, W)
    torch.testing.assert_close(two.residuals, one.residuals, rtol=0, atol=1e-6)
    q = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(
        two.residuals.quantile(q, dim=0), one.residuals.quantile(q, dim=0), rtol=0, atol=1e-6
    )
    for c in one.families:
        torch.testing.assert_close(two.gain[c], one.gain[c], rtol=1e-5, atol=1e-6)


def test_a_busy_machine_is_reported_once(monkeypatch):
    """Other processes' CPU time during a fit (here: 1 of 2 cores, simulated) gives one
    RuntimeWarning per process; an idle machine gives none."""
    clock = iter(range(0, 10_000, 1))
    monkeypatch.setattr(threads, "busy_seconds", lambda: float(next(clock)) * 1e6)
    monkeypatch.setattr(threads, "_MIN_SECONDS", 0.0)
    monkeypatch.setattr(threads, "_warned", False)
    W = torch.randn(40, 3, 3, generator=torch.Generator().manual_seed(1))
    with pytest.warns(RuntimeWarning, match="other processes kept"):
        fit_kernels(W, families=["Lg"], device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_kernels(W, families=["Lg"], device="cpu")  # once per process
    monkeypatch.setattr(threads, "_warned", False)
    monkeypatch.setattr(threads, "busy_seconds", lambda: 0.0)  # nobody else ran
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_kernels(W, families=["Lg"], device="cpu")


# --- dictionary ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_atoms", [96, 300, 384, 385, 2448, 3456])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_takes_the_largest_scores(n_atoms, k):
    scores = torch.rand(300, n_atoms, generator=torch.Generator().manual_seed(n_atoms + k))
    got = dictionary.top_k(scores, k)
    want = scores.topk(k, dim=1)
    # The same scores, largest first (indices may differ only where scores tie).
    torch.testing.assert_close(scores.gather(1, got), want.values, rtol=0, atol=0)
    assert (got < n_atoms).all()
    assert (got.sort(1).values.diff(dim=1) != 0).all()  # k distinct atoms


def test_top_k_of_all_equal_scores_gives_distinct_atoms():
    got = dictionary.top_k(torch.zeros(3, 2448), 4)
    assert (got.sort(1).values.diff(dim=1) != 0).all() and (got < 2448).all()


# --- refinement ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_akp", [1, 2, 4, 7])
def test_spd_solver_matches_lapack(n_akp):
    gen = torch.Generator().manual_seed(n_akp)
    a = torch.randn(500, 3 * n_akp, n_akp, generator=gen, dtype=torch.float64)
    system = a.transpose(1, 2) @ a + 1e-3 * torch.eye(n_akp, dtype=torch.float64)
    rhs = torch.randn(500, n_akp, generator=gen, dtype=torch.float64)
    got = lm._solve_spd(system.permute(1, 2, 0), rhs.T).T
    torch.testing.assert_close(got, torch.linalg.solve(system, rhs), rtol=1e-9, atol=1e-9)


def _planted(code: str, n: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    fam = kernels.get(code)
    gen = torch.Generator().manual_seed(seed)
    akp = fam.sample(n, h, w, generator=gen, dtype=torch.float64)
    noisy = fam(akp, h, w) + 0.02 * torch.randn(n, h, w, generator=gen, dtype=torch.float64)
    unit = noisy.reshape(n, h * w).float()
    unit = unit / unit.norm(dim=1, keepdim=True)
    book = dictionary.build(
        fam, h, w, offset=True, seed=0, device=torch.device("cpu"), dtype=torch.float32
    )
    u0 = book.u[book.best(lm.project(unit, True), 1)[:, 0]]
    return unit, u0


@pytest.mark.parametrize("code", ["G", "Tf", "Ts"])
def test_working_set_gives_the_same_fits_as_one_batch(code):
    """Kernels streamed through a working set of 64 fit as in one batch of all 700: every
    operation of an iteration is row by row, so only float32 rounding could differ."""
    fam = kernels.get(code)
    unit, u0 = _planted(code, 700, 5, 5, seed=11)
    bounds = tuple(b.float() for b in dictionary.search_box(fam, 5, 5))
    whole = lm.refine(fam, unit, u0, 5, 5, offset=True, bounds=bounds)
    streamed = lm.refine(fam, unit, u0, 5, 5, offset=True, bounds=bounds, batch=64)
    torch.testing.assert_close(streamed[1], whole[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(streamed[0], whole[0], rtol=1e-4, atol=1e-5)


def test_refine_never_increases_the_cost_and_honours_max_iter():
    fam = kernels.get("G")
    unit, u0 = _planted("G", 200, 7, 7, seed=3)
    start = lm.refine(fam, unit, u0, 7, 7, offset=True, max_iter=0)
    one = lm.refine(fam, unit, u0, 7, 7, offset=True, max_iter=1, batch=50)
    full = lm.refine(fam, unit, u0, 7, 7, offset=True, batch=50)
    assert torch.equal(start[0], u0)
    assert (one[1] <= start[1]).all() and (full[1] <= one[1] + 1e-7).all()
    assert float(full[1].median()) < 0.5 * float(start[1].median())


def _shifted_gaussian(x, y, sigma):
    # Depends on the grid's 2-D layout: row i of the kernel is built from row i + 1 (rolled), so
    # on the pixel row (1, h*w) it would be a different kernel.
    g = torch.exp(-(x * x + y * y) / (2 * sigma * sigma))
    return torch.roll(g, shifts=1, dims=-2)


GRID_BOUND = KernelFamily(
    code="Zz",
    name="rolled-gaussian",
    params=(Param("sigma", "px", "positive", "(0, inf)", lambda h, w: (0.5, 3.0)),),
    formula=_shifted_gaussian,
)


def test_formulas_that_need_the_grid_are_sampled_as_documented():
    assert lm._samples_flat(kernels.get("G"), 5, 5)
    assert not lm._samples_flat(GRID_BOUND, 5, 5)
    u = torch.tensor([[math.log(0.8)], [math.log(2.0)]], dtype=torch.float64)
    want = GRID_BOUND(GRID_BOUND.from_unconstrained(u), 5, 5).reshape(2, 25)
    torch.testing.assert_close(lm._evaluate(GRID_BOUND, u, 5, 5), want, rtol=0, atol=0)
