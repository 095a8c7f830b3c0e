"""Which kernels become analytic under a budget: parameters to save, or output error to spend.

Every kernel has options: stay plain (error 0, saving 0) or take one eligible family ``f``
(error ``error[i, f]`` >= 0, saving ``saving[i, f]`` > 0 parameters). The errors are squared
output errors, additive over kernels; the savings are parameter counts (``h*w`` minus the
family's). Picking one option per kernel for the least total error at a given total saving is a
multiple-choice knapsack, NP-hard in general; with many kernels and few options each, the
Lagrangian relaxation is nearly exact and fast:

* For a multiplier ``mu`` (error units per parameter), every kernel on its own minimises
  ``error - mu * saving`` (:func:`choose_by_multiplier`). Any such choice is *optimal* for its
  own totals: no choice saves as much with less error, or spends as little error and saves more.
* The options ``mu`` can pick for one kernel are the vertices of the lower convex hull of its
  options in the (saving, error) plane, walked from plain; the hull's edge slopes are the
  breakpoints of ``mu``. Sorting all kernels' edges by slope lists every Lagrangian choice as a
  prefix, so the sweep over ``mu`` is exact and needs no bisection.
* A budget usually falls inside one edge (the choice jumps there), so the budgeted selections
  take the Lagrangian choice just short of the budget and finish with a greedy fix-up. The
  result is never more than one kernel's error from the optimum (the duality gap).

Ties are settled towards fewer parameters saved: plain before a family, a smaller saving before
a larger one, then the lower column. Hence ``mu = 0`` keeps everything plain, and collinear
hull points stay separate edges, which lets the fix-up move in smaller steps.

Per-layer budgets: pass ``layer`` (``(N,)`` layer index per kernel) and one budget per layer;
each layer is solved on its own with its own budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .threads import single_threaded

__all__ = ["choose_by_multiplier", "select_for_saving", "select_for_error", "totals"]

_INF = float("inf")


def choose_by_multiplier(error: Tensor, saving: Tensor, mu: float) -> Tensor:
    """Each kernel's option minimising ``error - mu * saving`` (the Lagrangian choice).

    Args:
        error: ``(N, F)`` error each kernel adds with family column ``f``; inf/nan = not usable.
        saving: ``(F,)`` or ``(N, F)`` parameters saved by family ``f``; <= 0 = not eligible.
        mu: finite multiplier in error units per parameter saved. ``mu <= 0`` keeps every kernel
            plain; ``mu`` above every kernel's largest hull slope gives each kernel its largest
            saving (least error among equal savings).

    Returns:
        ``(N,)`` long: the chosen family column, ``-1`` for plain. Ties go to plain, then to the
        smaller saving, then to the lower column.
    """
    if not abs(float(mu)) < _INF:
        raise ValueError(f"mu must be a finite number, got {mu!r}")
    opts = _options(error, saving)
    # The where keeps an unusable option's inf from meeting an overflowing ``mu * saving``.
    key = torch.where(torch.isinf(opts.err), _INF, opts.err - mu * opts.save)
    return opts.column(key.argmin(1))


@single_threaded
def select_for_saving(
    error: Tensor, saving: Tensor, target: float | Tensor, layer: Tensor | None = None
) -> tuple[Tensor, bool]:
    """The choice saving at least ``target`` parameters with (close to) the least total error.

    The Lagrangian choice with the largest saving below ``target``, plus the single cheapest
    change of one kernel (a plain kernel taking a family, or a converted one moving to a family
    that saves more) that closes the gap. Its error is at most the optimum plus one kernel's
    error, and equals the optimum whenever ``target`` is a Lagrangian choice's saving.

    Args:
        error, saving: as in :func:`choose_by_multiplier`.
        target: parameters to save; a number, or with ``layer`` a ``(L,)`` tensor, one per layer
            (a number then applies to every layer). ``target <= 0`` keeps the kernels plain.
        layer: optional ``(N,)`` integer layer of each kernel, in ``[0, L)``.

    Returns:
        ``(choice, met)``: ``(N,)`` long family column per kernel (``-1`` plain), and whether
        every target was reached. A layer whose target exceeds its largest possible saving gets
        that largest saving (least error among the ways to reach it), and ``met`` is False; the
        caller decides whether that is an error.
    """
    return _per_layer(_options(error, saving), target, layer, _least_error, "target")


@single_threaded
def select_for_error(
    error: Tensor, saving: Tensor, max_error: float | Tensor, layer: Tensor | None = None
) -> Tensor:
    """The choice adding at most ``max_error`` total error with (close to) the largest saving.

    The Lagrangian choice with the largest error within the bound, then a greedy fill-up:
    rounds of changes of one kernel each (from its current option to one that saves more),
    best ratio of error added to parameters saved first, while the bound still holds. Its
    saving is at most one kernel's saving short of the optimum, and optimal whenever
    ``max_error`` is a Lagrangian choice's error. The bound holds for the float64 sum of the
    chosen errors, up to that sum's rounding.

    Args:
        error, saving: as in :func:`choose_by_multiplier`.
        max_error: total error allowed, >= 0 (inf: the largest saving); a number, or with
            ``layer`` a ``(L,)`` tensor, one per layer (a number then applies to every layer).
        layer: optional ``(N,)`` integer layer of each kernel, in ``[0, L)``.

    Returns:
        ``(N,)`` long family column per kernel, ``-1`` for plain. All plain always meets a bound
        >= 0, so there is nothing to report beyond the choice.
    """
    return _per_layer(_options(error, saving), max_error, layer, _most_saving, "max_error")[0]


def totals(
    error: Tensor, saving: Tensor, choice: Tensor, layer: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Total ``(saving, error)`` of ``choice`` (``(N,)`` columns, ``-1`` plain), in float64.

    Scalars (0-dim tensors), or ``(L,)`` per layer with ``layer`` (``L = layer.max() + 1``).
    Raises ``ValueError`` if ``choice`` takes a family that is not eligible or not usable.
    """
    opts = _options(error, saving)
    n, n_fam = error.shape
    if not isinstance(choice, Tensor) or choice.shape != (n,) or choice.is_floating_point():
        raise ValueError(f"choice must be an ({n},) integer tensor, got {choice!r}")
    if ((choice < -1) | (choice >= n_fam)).any():
        raise ValueError(f"choice must hold family columns in [-1, {n_fam - 1}]")
    # Back from columns to the options' saving order.
    state = (opts.col == choice[:, None].long()).long().argmax(1)
    err, save = opts.at(state)
    if not torch.isfinite(err).all():
        raise ValueError("choice takes a family that is not eligible or has no finite error")
    if layer is None:
        return save.sum(), err.sum()
    _check_layer(layer, n)
    zeros = torch.zeros(int(layer.max()) + 1 if n else 0, dtype=torch.float64)
    return zeros.index_add(0, layer.long(), save), zeros.index_add(0, layer.long(), err)


@dataclass
class _Options:
    """Each kernel's options: plain first, then the families sorted by saving (stable).

    Attributes:
        err: ``(n, 1 + F)`` float64 error; inf where the option may not be taken (unusable
            fit, or not eligible).
        save: ``(n, 1 + F)`` float64 parameters saved; 0 for plain and for families that save
            nothing. May be an expanded view.
        col: ``(n, 1 + F)`` long family column of each option, ``-1`` for plain. May be an
            expanded view.

    In this order the first of equal minima, which is what ``min``/``argmin`` return, is the
    option saving fewer parameters, then the lower column: the tie rule of the module for free.
    A kernel's state is a position in this order.
    """

    err: Tensor
    save: Tensor
    col: Tensor

    def rows(self, index: Tensor | slice) -> _Options:
        return _Options(self.err[index], self.save[index], self.col[index])

    def at(self, state: Tensor) -> tuple[Tensor, Tensor]:
        """``(n,)`` error and saving of each kernel's option ``state`` (``(n,)`` positions)."""
        return _at(self.err, state), _at(self.save, state)

    def column(self, state: Tensor) -> Tensor:
        """``(n,)`` family column of each kernel's option ``state``, ``-1`` for plain."""
        return _at(self.col, state)


def _at(x: Tensor, state: Tensor) -> Tensor:
    return x.gather(1, state[:, None])[:, 0]


def _row_min(x: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's least value and its first column. ``argmin`` then a gather, not ``min(1)``,
    which on small tensors is sporadically 100x slower (it wakes the thread pool)."""
    col = x.argmin(1)
    return _at(x, col), col


def _options(error: Tensor, saving: Tensor) -> _Options:
    if not isinstance(error, Tensor) or error.ndim != 2:
        raise ValueError(f"error must be an (N, F) tensor, got {getattr(error, 'shape', error)!r}")
    n, n_fam = error.shape
    if not isinstance(saving, Tensor) or tuple(saving.shape) not in ((n_fam,), (n, n_fam)):
        got = tuple(saving.shape) if isinstance(saving, Tensor) else saving
        raise ValueError(f"saving must be an ({n_fam},) or ({n}, {n_fam}) tensor, got {got!r}")
    if not torch.isfinite(saving).all():
        raise ValueError("saving must be finite (parameter counts)")
    if (error < 0).any():
        raise ValueError("error must be >= 0 (a squared output error), got negative values")
    # A family that saves nothing is as good as plain but never chosen: its error becomes inf.
    s = saving.to(torch.float64).clamp(min=0)
    if saving.ndim == 1:
        # One saving per family, so one column order for all kernels, and views, not copies.
        # A stable sort keeps plain (saving 0, first) first.
        save = torch.cat([s.new_zeros(1), s])
        order = torch.sort(save, stable=True).indices
        save, col = save[order], order - 1
        err = torch.empty(n, n_fam + 1, dtype=torch.float64)
        err[:, 0] = 0
        err[:, 1:] = error[:, col[1:]]
        err[:, (save == 0) & (col >= 0)] = _INF
        save, col = save.expand(n, -1), col.expand(n, -1)
    else:
        save, order = torch.sort(torch.cat([s.new_zeros(n, 1), s], 1), dim=1, stable=True)
        col = order - 1
        err = torch.cat([s.new_zeros(n, 1), error.to(torch.float64)], 1).gather(1, order)
        err.masked_fill_((save == 0) & (col >= 0), _INF)
    return _Options(err.nan_to_num_(nan=_INF, posinf=_INF), save, col)


@dataclass
class _Hull:
    """The lower convex hull of each kernel's options in the (saving, error) plane, walked
    from plain by increasing saving.

    Attributes:
        vert: ``(n, 1 + F)`` option position of each kernel's hull vertices in order (0 =
            plain); past a kernel's last vertex the last one repeats.
        kernel: ``(M,)`` kernel of every hull edge, all kernels' edges sorted by slope.
        dsave: ``(M,)`` parameters the edge saves (> 0), same order.
        derr: ``(M,)`` error the edge adds (>= 0), same order.

    Taking the first ``k`` edges is the Lagrangian choice at ``mu`` = the ``k``-th slope: a
    kernel's edges have nondecreasing slopes and equal slopes keep their hull order, so every
    prefix takes a prefix of each kernel's hull.
    """

    vert: Tensor
    kernel: Tensor
    dsave: Tensor
    derr: Tensor

    def state(self, k: int) -> Tensor:
        """``(n,)`` option position of each kernel after the first ``k`` edges."""
        return _at(self.vert, torch.bincount(self.kernel[:k], minlength=self.vert.shape[0]))


#: Kernels per block of the hull walk: bounds its temporaries (a dozen ``(block, 1 + F)``
#: tensors per step) instead of allocating them at full size for every step.
_BLOCK = 1 << 15


def _hull(opts: _Options) -> _Hull:
    """Every kernel's hull, walked block by block, with all edges sorted by slope."""
    n, n_opt = opts.err.shape
    vert = torch.zeros(n, n_opt, dtype=torch.long)
    edges = [(torch.zeros(0, dtype=torch.long),) + (torch.zeros(0, dtype=torch.float64),) * 3]
    for start in range(0, n, _BLOCK):
        part = slice(start, start + _BLOCK)
        vert[part], block = _walk(opts.err[part], opts.save[part])
        edges += [(rows + start, *rest) for rows, *rest in block]
    kernel, slope, dsave, derr = (torch.cat(x) for x in zip(*edges, strict=True))
    # Each kernel's edges are listed in hull order, which a stable sort keeps for equal slopes.
    order = torch.sort(slope, stable=True).indices
    return _Hull(vert=vert, kernel=kernel[order], dsave=dsave[order], derr=derr[order])


def _walk(err: Tensor, save: Tensor) -> tuple[Tensor, list[tuple[Tensor, ...]]]:
    """Walk the hulls of ``n`` kernels (``(n, O)`` options): from the current vertex the next is
    the option saving more at the least slope ``d error / d saving`` (ties: the nearer one).

    Returns ``(n, O)`` vertices (the last one repeated), and per step the kernels still walking
    with the slope, saving and error of their edge (``(k,)`` each).
    """
    n, n_opt = err.shape
    vert = torch.zeros(n, n_opt, dtype=torch.long)
    rows, cur = torch.arange(n), torch.zeros(n, dtype=torch.long)
    floor = torch.zeros(n, dtype=torch.float64)
    edges = []
    for step in range(1, n_opt):
        e0, s0 = _at(err, cur), _at(save, cur)
        ds = save - s0[:, None]
        least, nxt = _row_min(torch.where(ds > 0, (err - e0[:, None]) / ds, _INF))
        live = torch.isfinite(least)
        if not live.all():
            keep = live.nonzero()[:, 0]
            err, save, rows, e0, s0, least, nxt, floor = (
                x[keep] for x in (err, save, rows, e0, s0, least, nxt, floor)
            )
        if len(rows) == 0:
            break
        # Rounding may put a collinear edge a hair below its predecessor; the prefix property
        # of the sorted edges needs nondecreasing slopes along each hull.
        floor = torch.maximum(least, floor)
        vert[rows, step:] = nxt[:, None]
        edges.append((rows, floor, _at(save, nxt) - s0, _at(err, nxt) - e0))
        cur = nxt
    return vert, edges


def _least_error(opts: _Options, target: float) -> tuple[Tensor, bool]:
    """One layer of :func:`select_for_saving`: ``(n,)`` option positions, and whether
    ``target`` is met."""
    hull = _hull(opts)
    cum = hull.dsave.cumsum(0)
    if len(cum) == 0 or target > cum[-1]:
        state = hull.state(len(cum))
        return state, bool(opts.at(state)[1].sum() >= target)
    # Every edge saves > 0, so the edges short of the target are a prefix, and the next edge
    # alone would close the gap: the cheapest single change that closes it is at most that.
    state = hull.state(int((cum < target).sum()))
    err, save = opts.at(state)
    gap = target - float(save.sum())
    if gap > 0:
        gain = opts.save - save[:, None]
        cost, best = _row_min(torch.where(gain >= gap, opts.err - err[:, None], _INF))
        kernel = cost.argmin()
        # Always finite, unless float savings round the next edge's gain below the gap.
        if torch.isfinite(cost[kernel]):
            state[kernel] = best[kernel]
    return state, bool(opts.at(state)[1].sum() >= target)


def _most_saving(opts: _Options, max_error: float) -> tuple[Tensor, bool]:
    """One layer of :func:`select_for_error`: ``(n,)`` option positions (the bound holds)."""
    hull = _hull(opts)
    within = hull.derr.cumsum(0) <= max_error
    state = hull.state(int(within.long().cumprod(0).sum()))
    # Each round offers every kernel's best-ratio change that fits the slack on its own, and
    # takes them in ratio order until the next no longer fits; as the slack shrinks, the
    # changes skipped drop out and smaller ones get their turn. No change gives error back
    # (from a hull vertex nothing saves more for less, and a best-ratio change never lands on
    # an option that another beats on both counts), so the slack only shrinks and a kernel
    # without an offer never gets one again. Every round takes at least one change that saves
    # more, so the rounds end.
    rows = torch.arange(len(state))
    while True:
        err, save = opts.at(state)
        slack = max_error - float(err.sum())
        err, save, sub = err[rows], save[rows], opts.rows(rows)
        gain, cost = sub.save - save[:, None], sub.err - err[:, None]
        ratio, best = _row_min(torch.where((gain > 0) & (cost <= slack), cost / gain, _INF))
        offer = torch.isfinite(ratio)
        rows, ratio, best, cost = rows[offer], ratio[offer], best[offer], cost[offer]
        if len(rows) == 0:
            return state, True
        order = torch.sort(ratio, stable=True).indices
        fits = _at(cost, best)[order].cumsum(0) <= slack
        take = order[: int(fits.long().cumprod(0).sum())]
        state[rows[take]] = best[take]


def _check_layer(layer: Tensor, n: int) -> None:
    if not isinstance(layer, Tensor) or layer.shape != (n,) or layer.is_floating_point():
        got = tuple(layer.shape) if isinstance(layer, Tensor) else layer
        raise ValueError(f"layer must be an ({n},) integer tensor, got {got!r}")
    if (layer < 0).any():
        raise ValueError("layer indices must be >= 0")


def _budgets(
    budget: float | Tensor, layer: Tensor | None, name: str, nonnegative: bool
) -> list[float]:
    """One budget per layer (a single one without ``layer``), checked."""
    if isinstance(budget, Tensor) and budget.ndim == 1 and layer is not None:
        values = budget.tolist()
        if len(layer) and int(layer.max()) >= len(values):
            raise ValueError(f"{name} has {len(values)} entries but layer goes up to {layer.max()}")
    elif isinstance(budget, Tensor) and budget.numel() != 1:
        raise ValueError(f"{name} must be a number (or an (L,) tensor with layer), got {budget!r}")
    else:
        n_layers = 1 if layer is None else (int(layer.max()) + 1 if len(layer) else 0)
        values = [float(budget)] * n_layers
    if any(v != v or (nonnegative and v < 0) for v in values):
        raise ValueError(f"{name} must be {'>= 0' if nonnegative else 'a number'}, got {budget!r}")
    return values


def _per_layer(
    opts: _Options,
    budget: float | Tensor,
    layer: Tensor | None,
    solve: Callable[[_Options, float], tuple[Tensor, bool]],
    name: str,
) -> tuple[Tensor, bool]:
    """``solve(options, budget) -> (positions, met)`` on each layer's kernels on their own;
    returns ``(N,)`` family columns and whether every layer's budget was met."""
    n = opts.err.shape[0]
    if layer is not None:
        _check_layer(layer, n)
    budgets = _budgets(budget, layer, name, nonnegative=solve is _most_saving)
    if layer is None:
        state, met = solve(opts, budgets[0])
        return opts.column(state), met
    order = torch.argsort(layer, stable=True)
    opts = opts.rows(order)
    counts = torch.bincount(layer.long(), minlength=len(budgets)).tolist()
    choice = torch.empty(n, dtype=torch.long)
    met, start = True, 0
    for count, b in zip(counts, budgets, strict=True):
        part = opts.rows(slice(start, start + count))
        state, layer_met = solve(part, b)
        choice[order[start : start + count]] = part.column(state)
        met, start = met and layer_met, start + count
    return choice, met
