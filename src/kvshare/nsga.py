"""QCQA's two NSGA-II stages (pymoo), with operators that keep every grouping valid.

Stage 1, per layer: a chromosome is one group id per KV head; the objectives are
(number of KV heads, WSE). QCQA-AC allows any group sizes; QCQA-EC only equal
sizes, so only counts that divide the head count, and :class:`BalanceRepair`
makes every offspring an equal-size grouping. All layers evolve in lockstep
(pymoo's ask/tell), so one progress bar and one hypervolume curve cover the
whole model; an archive keeps the least WSE seen at each count, which is the
layer's front.

Two operator sets:
- ``partition`` (default): random partitions spread over all counts (plus the
  greedy solvers' groupings as seeds), a crossover that aligns the parents'
  group ids before a uniform mix, and moves that act on groups: move a head,
  swap two heads, merge or split groups, and a WSE-guided move or swap. Group
  ids are arbitrary names, so operators that treat them as numbers waste most
  offspring; these do not.
- ``paper``: the reproduction's settings: integer sampling, SBX (p=0.9) and
  polynomial mutation (p per variable) on the ids, rounded.

Stage 2 (``stage2_binary``): the paper's binary chromosome over layers (grouped
at a given count, or kept whole), objectives (total KV heads, total WSE),
two-point crossover and bit-flip mutation. :mod:`kvshare.qcqa` also has an
exact stage 2 (a DP), which is the default.

Importing this module loads pymoo (about a second), so :mod:`kvshare.qcqa`
imports it only when NSGA-II runs, and holds what is needed without it: the
settings (:class:`~kvshare.qcqa.NSGASettings`), non-domination, hypervolume.
"""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2, binary_tournament
from pymoo.core.crossover import Crossover
from pymoo.core.duplicate import DuplicateElimination
from pymoo.core.infill import InfillCriterion
from pymoo.core.mating import Mating
from pymoo.core.mutation import Mutation
from pymoo.core.population import Population
from pymoo.core.problem import Problem
from pymoo.core.repair import Repair
from pymoo.core.sampling import Sampling
from pymoo.core.termination import NoTermination
from pymoo.operators.crossover.pntx import TwoPointCrossover
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.bitflip import BitflipMutation
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from pymoo.operators.sampling.rnd import BinaryRandomSampling, IntegerRandomSampling
from pymoo.operators.selection.tournament import TournamentSelection
from tqdm import tqdm

from kvshare.qcqa import NSGASettings, layer_hypervolume, nondominated
from kvshare.wse import canonical_rows, divisors, n_groups, random_partitions, wse_population

MATING_TRIES = 5  # mating rounds until offspring are new; tiny layers run out of new groupings fast
OVERSAMPLE = 1.5  # children bred per offspring wanted, so duplicates rarely cost a second mating round


# --- stage 1 ---------------------------------------------------------------------------------------------------


class GroupingProblem(Problem):
    """One layer: minimise (number of KV heads, WSE) over group-id vectors.

    It also keeps the archive: per count, the least-WSE grouping evaluated so far
    (``best_x[k-1]``, ``best_f[k-1]``); both ends (one group, all heads apart) are known upfront.
    """

    def __init__(self, dist: np.ndarray, equal_sizes: bool):
        n = dist.shape[0]
        super().__init__(n_var=n, n_obj=2, xl=0, xu=n - 1, vtype=int)
        self.dist = dist
        self.equal_sizes = equal_sizes
        self.counts = divisors(n) if equal_sizes else np.arange(1, n + 1)
        self.one_group = float(wse_population(dist, np.zeros((1, n), dtype=np.int64))[0])
        self.best_x = np.zeros((n, n), dtype=np.int64)
        self.best_f = np.full(n, np.inf)
        self.best_x[-1], self.best_f[-1] = np.arange(n), 0.0
        self.best_f[0] = self.one_group

    def _evaluate(self, x, out, *args, **kwargs):
        labels = labels_of(x, self.n_var)
        f = np.column_stack([n_groups(labels), wse_population(self.dist, labels)]).astype(float)
        out["F"] = f
        k = f[:, 0].astype(int)
        order = np.lexsort((f[:, 1], k))
        for j in order[np.r_[True, k[order][1:] != k[order][:-1]]]:  # the best row of each count
            if f[j, 1] < self.best_f[k[j] - 1]:
                self.best_f[k[j] - 1] = f[j, 1]
                self.best_x[k[j] - 1] = canonical_rows(labels[j][None])[0]


def labels_of(x: np.ndarray, n: int) -> np.ndarray:
    """Integer group ids in 0..n-1 from a chromosome (SBX/PM leave floats)."""
    return np.clip(np.rint(np.asarray(x, dtype=float)), 0, n - 1).astype(np.int64)


class PartitionSampling(Sampling):
    def __init__(self, seeds: np.ndarray | None = None):
        super().__init__()
        self.seeds = seeds

    def _do(self, problem, n_samples, *args, random_state=None, **kwargs):
        seeds = np.zeros((0, problem.n_var), dtype=np.int64) if self.seeds is None else self.seeds[:n_samples]
        counts = np.resize(random_state.permutation(problem.counts), n_samples - len(seeds))  # all counts, in turn
        return np.concatenate([seeds, random_partitions(problem.n_var, counts, random_state, problem.equal_sizes)])


class AlignedUniformCrossover(Crossover):
    """Rename parent B's groups after the parent-A groups they overlap most, then mix heads uniformly.

    Renaming is one-to-one (a B group that is not its A group's best match gets a
    fresh id), so the mix inherits whole groups where the parents agree.
    """

    def __init__(self, prob: float = 0.9):
        super().__init__(2, 2, prob=prob)
        self.p = prob

    def _do(self, problem, x, *args, random_state=None, **kwargs):
        a, b = (canonical_rows(labels_of(p, problem.n_var)) for p in x)
        return np.stack([canonical_rows(c) for c in recombine(a, b, random_state)])


def recombine(a: np.ndarray, b: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """Two children of canonical parents ``a`` and ``b`` (m, n); their ids lie in 0..2n-1, not canonical."""
    m, n = a.shape
    cell = (np.arange(m)[:, None] * n + a) * n + b
    overlap = np.bincount(cell.ravel(), minlength=m * n * n).reshape(m, n, n)  # [mating, a id, b id]
    best_a = overlap.argmax(axis=1)  # (m, n): for each B group, its best A group
    claim = overlap.argmax(axis=2)  # (m, n): for each A group, the B group that matches it best
    rows = np.arange(m)[:, None]
    mapped = np.where(claim[rows, best_a] == np.arange(n), best_a, n + np.arange(n))
    b2 = mapped[rows, b]
    mix = rng.random((m, n)) < 0.5
    return np.where(mix, a, b2), np.where(mix, b2, a)


class PartitionMutation(Mutation):
    """One move per child, plus one more per other head with probability ``prob_var`` (an unchanged child

    is a duplicate, which pymoo would only mate again). A move is one of
    ``AC_MOVES`` / ``EC_MOVES``; a count change under EC (merge or split) is
    evened out by BalanceRepair.
    """

    AC_MOVES = ("move", "merge_split", "guided_move", "guided_swap")
    EC_MOVES = ("swap", "merge_split", "guided_swap")

    def __init__(self, prob_var: float | None = None):
        super().__init__(prob=1.0, prob_var=prob_var)

    def _do(self, problem, x, *args, random_state=None, **kwargs):
        p_var = self.get_prob_var(problem, size=1)[0]
        return mutate(problem.dist, labels_of(x, problem.n_var), problem.equal_sizes, p_var, random_state)


def mutate(dist: np.ndarray, x: np.ndarray, equal_sizes: bool, p_var: float, rng) -> np.ndarray:
    """Apply each row's moves in rounds; in a round every row still due a move makes one, of a random kind."""
    x = canonical_rows(x)
    n = x.shape[1]
    kinds = PartitionMutation.EC_MOVES if equal_sizes else PartitionMutation.AC_MOVES
    moves = 1 + rng.binomial(n - 1, p_var, size=len(x))
    for t in range(int(moves.max(initial=0))):
        active = np.flatnonzero(moves > t)
        if t:
            x[active] = canonical_rows(x[active])
        kind = rng.integers(len(kinds), size=len(active))
        for j, name in enumerate(kinds):
            rows = active[kind == j]
            if len(rows):
                x[rows] = MOVES[name](dist, x[rows], rng)
    return x


def _move(dist, x, rng):
    """A random head to another group or a new one."""
    m, n = x.shape
    k = x.max(axis=1) + 1
    x[np.arange(m), rng.integers(n, size=m)] = (rng.random(m) * np.minimum(k + 1, n)).astype(np.int64)
    return x


def _swap(dist, x, rng):
    m, n = x.shape
    rows, i, j = np.arange(m), rng.integers(n, size=m), rng.integers(n, size=m)
    x[rows, i], x[rows, j] = x[rows, j], x[rows, i].copy()
    return x


def _merge_split(dist, x, rng):
    """Merge two random groups, or split a random head's group in two at random."""
    m, n = x.shape
    k = x.max(axis=1) + 1
    merge = (k > 1) & ((k == n) | (rng.random(m) < 0.5))
    a = (rng.random(m) * k).astype(np.int64)
    b = (a + 1 + (rng.random(m) * (k - 1)).astype(np.int64)) % k
    merged = np.where(x == b[:, None], a[:, None], x)
    g = x[np.arange(m), rng.integers(n, size=m)]
    split = np.where((x == g[:, None]) & (rng.random((m, n)) < 0.5), k[:, None], x)
    return np.where(merge[:, None], merged, split)


def _guided(dist, x, rng, swap):
    """A random head's best move to another existing group, or its best swap, by the exact WSE change.

    The best one is taken even if it raises WSE: a mutation that does nothing at
    a local optimum would only produce a duplicate.
    """
    m, n = x.shape
    rows, heads = np.arange(m), np.arange(n)
    onehot = (x[:, :, None] == heads).astype(float)  # (m, head, group)
    r = np.matmul(dist, onehot)  # r[row, j, g] = sum of D from head j to group g
    s = np.einsum("mjg,mjg->mg", onehot, r) / 2.0  # pair sums inside groups
    size = onehot.sum(axis=1)
    i = rng.integers(n, size=m)
    a = x[rows, i]
    with np.errstate(divide="ignore", invalid="ignore"):
        if swap:  # exchange i with j (group b): both groups keep their sizes
            b = x
            gain = (r[rows[:, None], heads, a[:, None]] - r[rows, i, a][:, None] - dist[i]) / size[rows, a][:, None]
            gain += (r[rows[:, None], i[:, None], b] - r[rows[:, None], heads, b] - dist[i]) / size[rows[:, None], b]
            gain[b == a[:, None]] = np.inf
            j = gain.argmin(axis=1)
            ok = np.isfinite(gain[rows, j])
            rows, i, j = rows[ok], i[ok], j[ok]
            x[rows, i], x[rows, j] = x[rows, j], x[rows, i].copy()
            return x
        sa, sum_a = size[rows, a], s[rows, a]
        leave = np.where(sa > 1, (sum_a - r[rows, i, a]) / np.maximum(sa - 1, 1) - sum_a / sa, 0.0)
        join = (s + r[rows, i]) / (size + 1) - s / size + leave[:, None]
    join[(size == 0) | (heads == a[:, None])] = np.inf
    g = join.argmin(axis=1)
    ok = np.isfinite(join[rows, g])
    x[rows[ok], i[ok]] = g[ok]
    return x


MOVES = {
    "move": _move,
    "swap": _swap,
    "merge_split": _merge_split,
    "guided_move": lambda dist, x, rng: _guided(dist, x, rng, swap=False),
    "guided_swap": lambda dist, x, rng: _guided(dist, x, rng, swap=True),
}


class PartitionMating(InfillCriterion):
    """NSGA-II mating (binary tournament by dominance, then crowding), repair and duplicate removal on arrays.

    The same steps as pymoo's ``Mating`` + ``Repair`` + duplicate elimination
    with the operators above, done on whole arrays: pymoo's per-individual
    bookkeeping would otherwise cost more than everything else for a 32-head
    layer. It breeds ``OVERSAMPLE`` times the offspring wanted per round, so one
    round usually yields enough new groupings.
    """

    def __init__(self, crossover: AlignedUniformCrossover, mutation: PartitionMutation, fix: Repair):
        super().__init__(repair=AlreadyRepaired(), n_max_iterations=1)  # rounds and repair happen inside _do
        self.crossover, self.mutation, self.fix = crossover, mutation, fix

    def _do(self, problem, pop, n_offsprings, random_state=None, **kwargs):
        rng = random_state
        x, f, crowd = pop.get("X", "F", "crowding")
        x = x.astype(np.int64)  # canonical: every member went through ``fix``
        seen = {r.tobytes() for r in x}
        p_var = self.mutation.get_prob_var(problem, size=1)[0]
        new: list[np.ndarray] = []
        for _ in range(MATING_TRIES):
            n_mat = int(np.ceil((n_offsprings - len(new)) * OVERSAMPLE / 2))
            a, b = rng.integers(len(pop), size=(2, 2 * n_mat))
            a_wins = np.all(f[a] <= f[b], axis=1) & np.any(f[a] < f[b], axis=1)
            b_wins = np.all(f[b] <= f[a], axis=1) & np.any(f[b] < f[a], axis=1)
            tie = ~a_wins & ~b_wins
            a_wins |= tie & ((crowd[a] > crowd[b]) | (crowd[a] == crowd[b]) & (rng.random(len(a)) < 0.5))
            parents = np.where(a_wins, a, b).reshape(2, n_mat)
            p1, p2 = x[parents[0]], x[parents[1]]
            c1, c2 = recombine(p1, p2, rng)
            cross = (rng.random(n_mat) < self.crossover.p)[:, None]
            children = np.concatenate([np.where(cross, c1, p1), np.where(cross, c2, p2)])
            children = self.fix._do(
                problem, mutate(problem.dist, children, problem.equal_sizes, p_var, rng), random_state=rng
            )
            for row in children:
                key = row.tobytes()
                if key not in seen:
                    seen.add(key)
                    new.append(row)
            if len(new) >= n_offsprings:
                break
        return Population.new("X", np.array(new[:n_offsprings], dtype=np.int64).reshape(-1, problem.n_var))


class AlreadyRepaired(Repair):
    """For offspring repaired while they were bred: skips pymoo's per-individual copy in and out."""

    def do(self, problem, pop, **kwargs):
        return pop


class CanonicalRepair(Repair):
    """Integer group ids, relabelled by first appearance (so equal groupings are equal vectors)."""

    def _do(self, problem, x, **kwargs):
        return canonical_rows(labels_of(x, problem.n_var))


class BalanceRepair(Repair):
    """Make every grouping equal-size: snap its count to the nearest divisor of n, keep the largest

    groups' members up to the group size (evicting random ones), and deal the
    evicted heads into the free places at random.
    """

    def _do(self, problem, x, random_state=None, **kwargs):
        return balance_rows(labels_of(x, problem.n_var), problem.counts, random_state)


def balance_rows(x: np.ndarray, counts: np.ndarray, rng) -> np.ndarray:
    x = canonical_rows(x)
    p, n = x.shape
    rows = np.arange(p)[:, None]
    k = counts[np.abs(n_groups(x)[:, None] - counts[None, :]).argmin(axis=1)]
    s = n // k
    size = np.zeros((p, n), dtype=np.int64)
    np.add.at(size, (np.repeat(np.arange(p), n), x.ravel()), 1)
    rank = np.empty_like(size)
    rank[rows, np.argsort(-size, axis=1, kind="stable")] = np.arange(n)  # group's place by size
    new = np.where(rank[rows, x] < k[:, None], rank[rows, x], n)  # kept groups: ids 0..k-1; others: n
    # each head's place inside its kept group, in random order; places >= s are evicted
    order = np.argsort(new * (n + 1) + rng.permuted(np.tile(np.arange(n), (p, 1)), axis=1), axis=1)
    sorted_ids = new[rows, order]
    start = np.argmax(sorted_ids[:, :, None] == np.arange(n + 1), axis=1)  # (p, n+1): first place of each id
    place = np.empty_like(x)
    place[rows, order] = np.arange(n) - start[rows, sorted_ids]
    new = np.where(place < s[:, None], new, n)
    free = np.where(np.arange(n) < k[:, None], s[:, None], 0)
    np.subtract.at(free, (np.repeat(np.arange(p), n), np.minimum(new, n - 1).ravel()), (new < n).ravel())
    # deal evicted heads (in random order) into the free places, group by group
    homeless = new == n
    shuffle = np.argsort(rng.random((p, n)) + ~homeless, axis=1)  # homeless heads first, shuffled
    nth = np.cumsum(homeless[rows, shuffle], axis=1) - 1
    cum = np.cumsum(free, axis=1) + (n + 1) * rows
    slot = np.searchsorted(cum.ravel(), (nth + (n + 1) * rows).ravel(), side="right").reshape(p, n) - n * rows
    dealt = new.copy()
    dealt[rows, shuffle] = np.where(homeless[rows, shuffle], slot, new[rows, shuffle])
    return canonical_rows(dealt)


class PartitionDuplicates(DuplicateElimination):
    """Duplicates are equal groupings, whatever the ids: compare canonical rows by hash.

    With ``canonical`` the rows already are canonical (the Repair made them so).
    """

    def __init__(self, canonical: bool = False):
        super().__init__()
        self.canonical = canonical

    def keys(self, pop) -> list[bytes]:
        x = labels_of(pop.get("X"), pop[0].X.shape[0])
        return [r.tobytes() for r in (x if self.canonical else canonical_rows(x))]

    def _do(self, pop, other, is_duplicate):
        keys = self.keys(pop)
        if other is None:
            seen: set[bytes] = set()
            for i, key in enumerate(keys):
                is_duplicate[i] = key in seen
                seen.add(key)
        else:
            known = set(self.keys(other))
            is_duplicate |= np.array([key in known for key in keys])
        return is_duplicate


def stage1_algorithm(problem: GroupingProblem, s: NSGASettings, seeds: np.ndarray | None) -> NSGA2:
    p_var = s.mutation_prob if s.mutation_prob is not None else 1.0 / problem.n_var
    if s.operators == "partition":
        repair = BalanceRepair() if problem.equal_sizes else CanonicalRepair()
        duplicates = PartitionDuplicates(canonical=True)
        sampling = PartitionSampling(seeds if s.seed_greedy else None)
        mating = PartitionMating(AlignedUniformCrossover(s.crossover_prob), PartitionMutation(p_var), repair)
    else:
        # the paper's AC keeps raw ids (duplicates are still found by grouping); EC needs the balance repair
        repair = BalanceRepair() if problem.equal_sizes else None
        duplicates = PartitionDuplicates(canonical=repair is not None)
        sampling = IntegerRandomSampling()
        mating = Mating(
            TournamentSelection(func_comp=binary_tournament),
            SBX(prob=s.crossover_prob, eta=15, vtype=float, repair=RoundingRepair()),
            PM(prob=1.0, prob_var=p_var, eta=20, vtype=float, repair=RoundingRepair()),
            repair=repair,
            eliminate_duplicates=duplicates,
            n_max_iterations=MATING_TRIES,
        )
    return NSGA2(pop_size=s.pop_size, sampling=sampling, mating=mating, repair=repair, eliminate_duplicates=duplicates)


@dataclass
class Stage1Result:
    groupings: list[np.ndarray]  # per layer, (n, n): best grouping found at count k in row k-1
    errors: list[np.ndarray]  # per layer, (n,): its WSE (inf where none found)
    hv_history: np.ndarray  # (generations + 1, layers): normalised hypervolume after each generation
    evaluations: int


def stage1(
    dists: list[np.ndarray],
    equal_sizes: bool,
    settings: NSGASettings,
    seeds: list[np.ndarray] | None = None,
    progress: bool = True,
    workers: int = 1,
) -> Stage1Result:
    """NSGA-II on every layer; each layer's archive of best-per-count is its front.

    Layers are split into ``workers`` contiguous chunks, one per process (the
    first in this one, which drives the progress bar); layer i always uses seed
    ``settings.seed + i``, so the result does not depend on ``workers``.
    """
    workers = max(1, min(int(workers), len(dists)))
    bounds = np.linspace(0, len(dists), workers + 1).astype(int)
    chunks = [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]

    def args(lo, hi):
        return dists[lo:hi], equal_sizes, settings, None if seeds is None else seeds[lo:hi], lo

    if workers == 1:
        parts = [_stage1_layers(*args(0, len(dists)), progress=progress)]
    else:
        # fork: the children need only numpy and pymoo, and start at once
        with ProcessPoolExecutor(workers - 1, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = [pool.submit(_stage1_layers, *args(lo, hi)) for lo, hi in chunks[1:]]
            parts = [_stage1_layers(*args(*chunks[0]), progress=progress)] + [f.result() for f in futures]
    return Stage1Result(
        [x for p in parts for x in p.groupings],
        [f for p in parts for f in p.errors],
        np.concatenate([p.hv_history for p in parts], axis=1),
        sum(p.evaluations for p in parts),
    )


def _stage1_layers(dists, equal_sizes, settings, seeds, first_layer, progress=False) -> Stage1Result:
    """All given layers in lockstep (one ask/tell per layer per generation)."""
    problems = [GroupingProblem(d, equal_sizes) for d in dists]
    algos = []
    for i, problem in enumerate(problems):
        algo = stage1_algorithm(problem, settings, None if seeds is None else seeds[i])
        algo.setup(problem, termination=NoTermination(), seed=settings.seed + first_layer + i)
        algos.append(algo)
    hv = np.zeros((settings.generations + 1, len(dists)))
    done = [False] * len(dists)
    evaluations = 0
    bar = tqdm(total=settings.generations + 1, desc="stage 1 NSGA-II", file=sys.stderr, disable=not progress)
    for gen in range(settings.generations + 1):  # generation 0 is the initial population
        for i, (algo, problem) in enumerate(zip(algos, problems, strict=True)):
            pop = None if done[i] else algo.ask()
            if pop is None:  # no new grouping left to breed (small layers): the search of this layer is over
                done[i] = True
                hv[gen, i] = hv[gen - 1, i]
                continue
            algo.evaluator.eval(problem, pop)
            algo.tell(infills=pop)
            evaluations += len(pop)
            hv[gen, i] = layer_hypervolume(problem.best_f, problem.one_group)
        bar.update()
    bar.close()
    return Stage1Result([p.best_x for p in problems], [p.best_f for p in problems], hv, evaluations)


# --- stage 2 ---------------------------------------------------------------------------------------------------


class LayerChoiceProblem(Problem):
    """Bit i: layer i grouped (count ``grouped[i]``, WSE ``errors[i]``) or kept whole (``full`` heads, WSE 0)."""

    def __init__(self, grouped: np.ndarray, errors: np.ndarray, full: int, max_heads: int):
        super().__init__(n_var=len(grouped), n_obj=2, n_ieq_constr=1, xl=0, xu=1, vtype=bool)
        self.grouped, self.errors, self.full, self.max_heads = grouped, errors, full, max_heads

    def _evaluate(self, x, out, *args, **kwargs):
        x = np.asarray(x, dtype=bool)
        heads = np.where(x, self.grouped, self.full).sum(axis=1)
        out["F"] = np.column_stack([heads, (x * self.errors).sum(axis=1)]).astype(float)
        out["G"] = (heads - self.max_heads)[:, None].astype(float)


def stage2_binary(
    grouped: np.ndarray, errors: np.ndarray, full: int, max_heads: int, settings: NSGASettings
) -> tuple[np.ndarray, np.ndarray, int]:
    """The paper's stage 2: feasible front (bits, (heads, WSE)) of which layers to group; and evaluations."""
    problem = LayerChoiceProblem(grouped, errors, full, max_heads)
    algo = NSGA2(
        pop_size=settings.pop_size,
        sampling=BinaryRandomSampling(),
        crossover=TwoPointCrossover(prob=settings.crossover_prob),
        mutation=BitflipMutation(
            prob=1.0, prob_var=settings.mutation_prob if settings.mutation_prob is not None else 1.0 / len(grouped)
        ),
        eliminate_duplicates=True,
    )
    algo.setup(problem, termination=NoTermination(), seed=settings.seed)
    bits, objs, evaluations = [], [], 0
    for _ in range(settings.generations + 1):
        pop = algo.ask()
        if pop is None:  # every choice of layers already seen (few layers)
            break
        algo.evaluator.eval(problem, pop)
        algo.tell(infills=pop)
        evaluations += len(pop)
        ok = pop.get("G")[:, 0] <= 0
        bits.append(pop.get("X")[ok].astype(bool))
        objs.append(pop.get("F")[ok])
    # every layer grouped is feasible whenever any choice is: a tight budget may leave the search none else
    bits.append(np.ones((1, len(grouped)), dtype=bool))
    objs.append(np.array([[grouped.sum(), errors.sum()]], dtype=float))
    x, f = np.concatenate(bits), np.concatenate(objs)
    x, f = x[f[:, 0] <= max_heads], f[f[:, 0] <= max_heads]
    keep = nondominated(f)
    return x[keep], f[keep], evaluations
