"""Which KV heads to merge: QCQA's two-stage search over groupings, scored by WSE.

Stage 1 finds, for every layer, the best grouping at each KV-head count (the
layer's front of count against WSE). Stage 2 picks one point of every layer's
front, or leaves the layer whole ("ungrouped"), so that the total count meets
the KV budget at the least summed WSE; the same computation over all totals is
the model's global front.

Stage 1 solvers (``solver``):
- ``nsga``: NSGA-II per layer (:mod:`kvshare.nsga`), by default seeded with the
  greedy groupings, so it can only improve on them;
- ``greedy``: deterministic and fast. AC: Ward agglomeration (merge the two
  groups whose union raises WSE least), each level then polished by exact-gain
  head moves and swaps. EC: balanced assignment (heads to equal-size groups by
  distance to the group centroids, as an assignment problem, repeated to a fixed
  point) from contiguous and Ward starts, then swaps;
- ``exact``: the optimum by a subset DP (:mod:`kvshare.exact`), up to 14 heads.

Stage 2 solvers (``stage2``): ``dp``, an exact multiple-choice knapsack over
integer head counts; ``nsga``, the paper's binary NSGA-II over layers (every
grouped layer at one count, scanned over all counts that fit).

Run ``python -m kvshare.search`` (the stage) or call :func:`search` directly;
it returns a :class:`SearchResult`, whose :class:`Stage1` and :class:`Stage2`
say what each stage found and cost. Importing this module costs numpy only:
scipy (balanced assignment) and pymoo (:mod:`kvshare.nsga`, the hypervolume
indicator) load only inside the functions that use them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from kvshare import exact
from kvshare.errors import KVShareError
from kvshare.wse import canonical_rows, divisors, group_stats, wse

SOLVERS = ("nsga", "greedy", "exact")
STAGE2 = ("dp", "nsga")
OPERATORS = ("partition", "paper")  # NSGA-II stage 1 operator sets (:mod:`kvshare.nsga`)


@dataclass
class NSGASettings:
    """One NSGA-II run's settings (``search.nsga`` or ``search.stage2_nsga``), checked; :mod:`kvshare.nsga` runs it."""

    pop_size: int = 100
    generations: int = 100
    seed: int = 0
    operators: str = "partition"
    crossover_prob: float = 0.9
    mutation_prob: float | None = None  # per head (stage 1) or per layer (stage 2); None: 1 / length
    seed_greedy: bool = True  # stage 1 ``partition``: start from the greedy solvers' groupings too
    name: str = "search.nsga"  # the config section, for error messages

    def __post_init__(self) -> None:
        if self.operators not in OPERATORS:
            raise KVShareError(f"{self.name}.operators={self.operators!r} is not known; use {' or '.join(OPERATORS)}")
        for key in ("pop_size", "generations"):
            if int(getattr(self, key)) < 1:
                raise KVShareError(f"{self.name}.{key}={getattr(self, key)} must be at least 1")
        for key in ("crossover_prob", "mutation_prob"):
            p = getattr(self, key)
            if p is not None and not 0 <= p <= 1:
                raise KVShareError(f"{self.name}.{key}={p} is not a probability: use a value in [0, 1]")


# --- what a search returns -------------------------------------------------------------------------------------


@dataclass
class LayerFront:
    """Best-known grouping of one layer for each KV-head count 1..n (index k-1); None / inf where none."""

    groupings: list[tuple[int, ...] | None]
    errors: list[float]

    @classmethod
    def of(cls, groupings, errors) -> LayerFront:
        errors = [float(e) for e in errors]
        rows = [
            None if not np.isfinite(e) else tuple(int(x) for x in g) for g, e in zip(groupings, errors, strict=True)
        ]
        return cls(rows, errors)

    def to_dict(self) -> dict:
        ok = [k for k, e in enumerate(self.errors, start=1) if np.isfinite(e)]
        return {"n_kv": ok, "wse": [self.errors[k - 1] for k in ok], "groups": [self.groupings[k - 1] for k in ok]}


class GlobalFront(NamedTuple):
    """The model's front: each total KV-head count on it (ascending) and the least summed WSE there."""

    kv_heads: list[int]
    wse: list[float]


@dataclass
class Stage1:
    """Every layer's front, and what finding them cost."""

    fronts: list[LayerFront]
    evaluations: int = 0  # groupings NSGA-II scored (greedy, exact: 0)
    hv_history: np.ndarray | None = None  # NSGA-II: (generations + 1, layers), hypervolume after each generation
    seconds: float = 0.0


@dataclass
class Stage2:
    """The KV-head count chosen per layer within the budget, by ``solver`` (one of :data:`STAGE2`)."""

    solver: str
    counts: list[int]
    global_front: GlobalFront
    evaluations: int = 0  # layer choices the binary NSGA-II scored (dp: 0)
    seconds: float = 0.0


@dataclass
class SearchResult:
    """Groupings of the searched layers and their WSE.

    ``solver``: QCQA's stage 1 solver (one of :data:`SOLVERS`), or the baseline's
    name; ``evaluations``: groupings (and stage 2 choices) scored in all.
    ``stage1`` and ``stage2`` exist only for QCQA's two-stage search.
    """

    groups: list[tuple[int, ...]]
    layer_wse: list[float]
    solver: str
    evaluations: int
    stage1: Stage1 | None = None
    stage2: Stage2 | None = None

    @property
    def total_wse(self) -> float:
        return float(sum(self.layer_wse))

    @property
    def fronts(self) -> list[LayerFront]:
        """Stage 1's per-layer fronts; none for a baseline."""
        return self.stage1.fronts if self.stage1 is not None else []


# --- fronts: non-domination and hypervolume ----------------------------------------------------------------------


def nondominated(f: np.ndarray) -> np.ndarray:
    """Indices of the 2-objective minimisation points no other point dominates (one per distinct point)."""
    if not len(f):
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((f[:, 1], f[:, 0]))
    keep, best = [], np.inf
    for j in order:
        if f[j, 1] < best:
            keep.append(j)
            best = f[j, 1]
    return np.array(keep, dtype=np.int64)


def hypervolume_2d(points: np.ndarray, ref=(1.0, 1.0)) -> float:
    """Area dominated by minimisation points (f1, f2) inside the box below ``ref`` (pymoo's indicator)."""
    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    if not len(pts):
        return 0.0
    from pymoo.indicators.hv import HV  # pymoo's light corner: not its algorithms

    return float(HV(ref_point=np.asarray(ref, dtype=float))(pts))


def layer_hypervolume(errors: np.ndarray, scale: float) -> float:
    """HV of a layer's front in (count / n, WSE / WSE of one group), reference (1, 1)."""
    n = len(errors)
    return hypervolume_2d(np.column_stack([np.arange(1, n + 1) / n, np.asarray(errors) / max(scale, 1e-300)]))


def check_count(k: int, n: int, equal_sizes: bool) -> None:
    """A one-line error for a group count that no grouping of ``n`` heads has."""
    if not 1 <= k <= n:
        raise KVShareError(f"group count {k} is outside 1..{n} (the layer's KV heads): choose a count in that range")
    if equal_sizes and n % k:
        raise KVShareError(
            f"group count {k} does not divide the {n} KV heads, so equal-size groups (qcqa-ec) cannot have it: "
            f"use one of {[int(c) for c in divisors(n)]}"
        )


# --- greedy stage 1 ------------------------------------------------------------------------------------------


def ward_levels(dist: np.ndarray) -> list[np.ndarray]:
    """Agglomeration from n singletons to one group; entry k-1 is the grouping with k groups."""
    n = dist.shape[0]
    labels = np.arange(n)
    levels = {n: labels.copy()}
    for k in range(n - 1, 0, -1):
        onehot = (labels[:, None] == np.arange(k + 1)).astype(float)
        cross = onehot.T @ dist @ onehot  # pair sums between groups; diagonal = 2 * inside pair sums
        inside, size = np.diag(cross) / 2.0, onehot.sum(axis=0)
        union = (inside[:, None] + inside[None, :] + cross) / (size[:, None] + size[None, :])
        cost = union - (inside / size)[:, None] - (inside / size)[None, :]
        cost[np.tril_indices(k + 1)] = np.inf
        a, b = np.unravel_index(np.argmin(cost), cost.shape)
        labels = canonical_rows(np.where(labels == b, a, labels)[None])[0]
        levels[k] = labels.copy()
    return [levels[k] for k in range(1, n + 1)]


def polish(dist: np.ndarray, labels: np.ndarray, equal_sizes: bool, max_steps: int = 1000) -> np.ndarray:
    """Steepest descent on WSE by single-head moves (AC only, never emptying a group) and swaps; keeps the count."""
    row = canonical_rows(np.asarray(labels)[None])[0]
    n = len(row)
    idx = np.arange(n)
    for _ in range(max_steps):
        r, s, size = group_stats(dist, row)
        mean = s / size
        a = row
        # swap i (in a_i) with j (in a_j): both sizes stay
        swap = (r[idx[None, :], a[:, None]] - r[idx, a][:, None] - dist) / size[a][:, None]
        swap = swap + swap.T
        swap[a[:, None] == a[None, :]] = np.inf
        best_swap = np.unravel_index(np.argmin(swap), swap.shape)
        gain = swap[best_swap]
        best_move = None
        if not equal_sizes:
            leave = np.where(size[a] > 1, (s[a] - r[idx, a]) / np.maximum(size[a] - 1, 1) - mean[a], np.inf)
            join = (s[None, :] + r) / (size[None, :] + 1) - mean[None, :]
            moves = leave[:, None] + join
            moves[idx, a] = np.inf
            best_move = np.unravel_index(np.argmin(moves), moves.shape)
            if moves[best_move] < gain:
                gain = moves[best_move]
            else:
                best_move = None
        if not gain < -1e-12 * max(float(s.sum()), 1e-300):
            break
        if best_move is not None:
            row[best_move[0]] = best_move[1]
        else:
            i, j = best_swap
            row[i], row[j] = row[j], row[i]
        row = canonical_rows(row[None])[0]
    return row


def balanced_grouping(dist: np.ndarray, k: int, starts: list[np.ndarray] | None = None) -> np.ndarray:
    """Equal-size grouping into ``k`` groups: balanced assignment to centroids to a fixed point, then swaps."""
    from scipy.optimize import linear_sum_assignment

    n = dist.shape[0]
    check_count(k, n, equal_sizes=True)
    size = n // k
    slot_group = np.repeat(np.arange(k), size)
    best, best_err = None, np.inf
    for start in starts or [np.arange(n) // size]:
        row = canonical_rows(np.asarray(start)[None])[0]
        for _ in range(50):
            r, s, sz = group_stats(dist, row)
            kk = len(sz)
            # squared distance of head i to the centroid of group g: R[i, g] / |g| - S_g / |g|^2
            centroid = r / sz - s / sz**2
            # the k centroids of the biggest start groups serve as the k targets
            use = np.argsort(-sz, kind="stable")[: min(k, kk)]
            if len(use) < k:  # fewer start groups than k: the farthest heads seed the rest
                extra = np.argsort(-centroid[np.arange(n), row])[: k - len(use)]
                centroid = np.column_stack([centroid[:, use], dist[:, extra]])
            else:
                centroid = centroid[:, use]
            rows_, cols = linear_sum_assignment(centroid[:, slot_group])
            new = canonical_rows(slot_group[cols][np.argsort(rows_)][None])[0]
            if np.array_equal(new, row):
                break
            row = new
        row = polish(dist, row, equal_sizes=True)
        err = wse(dist, row)
        if err < best_err:
            best, best_err = row, err
    return best


def greedy_front(dist: np.ndarray, equal_sizes: bool) -> LayerFront:
    n = dist.shape[0]
    levels = ward_levels(dist)
    groupings: list = [None] * n
    errors = [np.inf] * n
    for k in divisors(n) if equal_sizes else range(1, n + 1):
        if equal_sizes:
            row = balanced_grouping(dist, k, [np.arange(n) // (n // k), levels[k - 1]])
        else:
            row = polish(dist, levels[k - 1], equal_sizes=False)
        groupings[k - 1], errors[k - 1] = row, wse(dist, row)
    return LayerFront.of(groupings, errors)


# --- stage 2 -------------------------------------------------------------------------------------------------


def _options(fronts: list[LayerFront], groups: int | None) -> np.ndarray:
    """(layers, n) WSE per layer and count; with ``groups``, only that count and the whole layer."""
    e = np.array([f.errors for f in fronts], dtype=float)
    if groups is not None:
        n = e.shape[1]
        keep = np.zeros(n, dtype=bool)
        keep[[groups - 1, n - 1]] = True
        e[:, ~keep] = np.inf
    return e


def budget_dp(errors: np.ndarray, max_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Least summed WSE for each exact total count 0..max_heads, and the count chosen per (layer, total)."""
    layers, n = errors.shape
    cap = min(max_heads, layers * n)
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((layers, cap + 1), dtype=np.int64)
    for layer in range(layers):
        cand = np.full((n, cap + 1), np.inf)
        for k in range(1, min(n, cap) + 1):
            cand[k - 1, k:] = best[: cap + 1 - k] + errors[layer, k - 1]
        choice[layer] = cand.argmin(axis=0) + 1
        best = cand.min(axis=0)
    return best, choice


def _unroll(choice: np.ndarray, total: int) -> list[int]:
    counts = []
    for layer in range(choice.shape[0] - 1, -1, -1):
        k = int(choice[layer, total])
        counts.append(k)
        total -= k
    return counts[::-1]


def allocate(fronts: list[LayerFront], max_heads: int, groups: int | None = None) -> list[int]:
    """Exact stage 2: KV-head count per layer with total <= max_heads minimising summed WSE."""
    errors = _options(fronts, groups)
    best, choice = budget_dp(errors, max_heads)
    if not np.isfinite(best).any():
        need = int(np.where(np.isfinite(errors), np.arange(1, errors.shape[1] + 1), np.inf).min(axis=1).sum())
        raise KVShareError(
            f"no grouping fits {max_heads} KV heads: the fewest this search allows is {need}; raise search.budget"
            + (f" or lower search.groups={groups}" if groups is not None else "")
        )
    total = int(np.argmin(best))  # least WSE; among equals the fewest heads
    return _unroll(choice, total)


def global_front(fronts: list[LayerFront], groups: int | None = None) -> GlobalFront:
    """The model's front: for each total KV-head count that lowers WSE, the least summed WSE."""
    errors = _options(fronts, groups)
    best, _ = budget_dp(errors, errors.size)
    keep = nondominated(np.column_stack([np.arange(len(best)), best])[np.isfinite(best)])
    heads = np.flatnonzero(np.isfinite(best))[keep]
    return GlobalFront([int(h) for h in heads], [float(best[h]) for h in heads])


def allocate_nsga(
    fronts: list[LayerFront], max_heads: int, settings: NSGASettings, groups: int | None = None
) -> Stage2:
    """The paper's stage 2 at each usable count (or ``groups``): binary NSGA-II, best feasible point overall."""
    errors = _options(fronts, groups)
    layers, n = errors.shape
    if layers * n <= max_heads:
        return Stage2("nsga", [n] * layers, GlobalFront([layers * n], [0.0]))
    counts = [k for k in range(1, n) if np.isfinite(errors[:, k - 1]).all() and layers * k <= max_heads]
    if not counts:
        raise KVShareError(
            f"no grouping fits {max_heads} KV heads: grouping every layer needs at least "
            f"{layers * (groups or 1)}; raise search.budget"
        )
    from kvshare import nsga  # pymoo: only when NSGA-II runs

    found_x, found_f, evaluations = [], [], 0
    for k in counts:
        x, f, ev = nsga.stage2_binary(np.full(layers, k), errors[:, k - 1], n, max_heads, settings)
        found_x += [np.where(bits, k, n) for bits in x]
        found_f.append(f)
        evaluations += ev
    f = np.concatenate(found_f)
    keep = nondominated(f)
    best = keep[np.argmin(f[keep, 1])]
    front = GlobalFront([int(h) for h in f[keep, 0]], [float(e) for e in f[keep, 1]])
    return Stage2("nsga", [int(c) for c in found_x[best]], front, evaluations)


# --- both stages ---------------------------------------------------------------------------------------------


def layer_fronts(
    dists: list[np.ndarray],
    equal_sizes: bool,
    solver: str = "greedy",
    nsga_settings: NSGASettings | None = None,
    progress: bool = False,
    workers: int = 1,
) -> Stage1:
    """Stage 1 for every layer, and what it cost."""
    if solver not in SOLVERS:
        raise KVShareError(f"search.solver={solver!r} is not known; use one of {', '.join(SOLVERS)}")
    t0 = time.perf_counter()
    if solver == "exact":
        result = Stage1([LayerFront.of(*exact.exact_front(d, equal_sizes)) for d in dists])
    else:
        result = _greedy_or_nsga(dists, equal_sizes, solver, nsga_settings or NSGASettings(), progress, workers)
    result.seconds = time.perf_counter() - t0
    return result


def _greedy_or_nsga(dists, equal_sizes: bool, solver: str, s: NSGASettings, progress: bool, workers: int) -> Stage1:
    greedy = None
    if solver == "greedy" or s.seed_greedy and s.operators == "partition":
        greedy = [greedy_front(d, equal_sizes) for d in dists]
    if solver == "greedy":
        return Stage1(greedy)
    from kvshare import nsga  # pymoo: only when NSGA-II runs

    seeds = None
    if greedy is not None:
        seeds = [np.array([g for g in f.groupings if g is not None], dtype=np.int64) for f in greedy]
    r = nsga.stage1(dists, equal_sizes, s, seeds, progress, workers)
    fronts = [LayerFront.of(x, e) for x, e in zip(r.groupings, r.errors, strict=True)]
    return Stage1(fronts, r.evaluations, r.hv_history)


def choose_counts(
    fronts: list[LayerFront], max_heads: int, stage2: str, settings: NSGASettings | None, groups: int | None
) -> Stage2:
    """Stage 2 by ``stage2`` (one of :data:`STAGE2`), timed."""
    t0 = time.perf_counter()
    if stage2 == "dp":
        result = Stage2("dp", allocate(fronts, max_heads, groups), global_front(fronts, groups))
    else:
        result = allocate_nsga(fronts, max_heads, settings or NSGASettings(), groups)
    result.seconds = time.perf_counter() - t0
    return result


def search(
    dists: list[np.ndarray],
    max_heads: int,
    equal_sizes: bool = False,
    *,
    solver: str = "greedy",
    stage2: str = "dp",
    groups: int | None = None,
    nsga_settings: NSGASettings | None = None,
    stage2_settings: NSGASettings | None = None,
    progress: bool = False,
    workers: int = 1,
) -> SearchResult:
    """Groupings of every layer using at most ``max_heads`` KV heads in all, least summed WSE.

    ``groups`` fixes the count of every grouped layer (the paper's binary
    choice per layer); ``workers`` processes share NSGA-II's layers.
    """
    if stage2 not in STAGE2:
        raise KVShareError(f"search.stage2={stage2!r} is not known; use one of {', '.join(STAGE2)}")
    n = dists[0].shape[0]
    if groups is not None:
        check_count(int(groups), n, equal_sizes)
    if max_heads < len(dists):
        raise KVShareError(
            f"the budget allows {max_heads} KV heads for {len(dists)} layers, and no grouping has fewer than "
            "one per layer: raise search.budget"
        )
    first = layer_fronts(dists, equal_sizes, solver, nsga_settings, progress, workers)
    second = choose_counts(first.fronts, max_heads, stage2, stage2_settings, groups)
    groupings = [f.groupings[k - 1] for f, k in zip(first.fronts, second.counts, strict=True)]
    errors = [f.errors[k - 1] for f, k in zip(first.fronts, second.counts, strict=True)]
    return SearchResult(groupings, errors, solver, first.evaluations + second.evaluations, first, second)
