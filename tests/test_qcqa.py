"""QCQA search: exact solver vs brute force, NSGA-II vs the exact front, equal sizes, seeds, stage 2, bad input."""

import itertools

import numpy as np
import pytest

from kvshare import exact, nsga, qcqa
from kvshare.errors import KVShareError
from kvshare.nsga import balance_rows
from kvshare.qcqa import NSGASettings, hypervolume_2d, layer_hypervolume
from kvshare.wse import divisors, pairwise_sq_dists, wse, wse_direct


def layer(n, seed=0, dim=24):
    """Heads in loose clusters, as real layers tend to be; returns (vectors, distances)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 3), dim)) * 2
    x = centres[rng.integers(0, len(centres), n)] + rng.normal(size=(n, dim))
    return x, pairwise_sq_dists(x)


def set_partitions(n):
    """All groupings of n heads as restricted growth strings."""

    def grow(prefix, top):
        if len(prefix) == n:
            yield tuple(prefix)
            return
        for g in range(top + 2):
            yield from grow(prefix + [g], max(top, g))

    yield from grow([0], 0)


@pytest.mark.parametrize("n", range(1, 9))
def test_exact_solver_equals_brute_force(n):
    x, d = layer(n, seed=n)
    best_ac, best_ec = {}, {}
    for p in set_partitions(n):
        k, err = max(p) + 1, wse_direct(x, p)
        best_ac[k] = min(best_ac.get(k, np.inf), err)
        if len(set(np.bincount(p))) == 1:
            best_ec[k] = min(best_ec.get(k, np.inf), err)
    for equal, best in ((False, best_ac), (True, best_ec)):
        groupings, errors = exact.exact_front(d, equal)
        for k in range(1, n + 1):
            if k in best:
                assert errors[k - 1] == pytest.approx(best[k], rel=1e-9, abs=1e-9)
                assert wse(d, groupings[k - 1]) == pytest.approx(errors[k - 1], rel=1e-9, abs=1e-9)
                assert max(groupings[k - 1]) + 1 == k
            else:
                assert groupings[k - 1] is None and errors[k - 1] == np.inf


@pytest.mark.parametrize("equal_sizes", [False, True])
def test_nsga_reaches_the_exact_front_on_12_heads(equal_sizes):
    """Plain NSGA-II (no greedy seeds): at least 99% of the exact front's hypervolume."""
    _, d = layer(12, seed=5)
    _, best = exact.exact_front(d, equal_sizes)
    settings = NSGASettings(pop_size=100, generations=60, seed=3, seed_greedy=False)
    stage1 = qcqa.layer_fronts([d], equal_sizes, "nsga", settings)
    found, scale = np.array(stage1.fronts[0].errors), best[0]
    assert layer_hypervolume(found, scale) >= 0.99 * layer_hypervolume(np.array(best), scale)
    assert stage1.hv_history.shape == (61, 1) and np.all(np.diff(stage1.hv_history[:, 0]) >= 0)
    assert stage1.evaluations > 0 and stage1.seconds > 0


# Operators only matter to NSGA-II.
@pytest.mark.parametrize(
    "solver, operators", [("nsga", "partition"), ("nsga", "paper"), ("greedy", "partition"), ("exact", "partition")]
)
def test_equal_sizes_give_only_equal_groups(solver, operators):
    dists = [layer(12, seed=s)[1] for s in range(3)]
    settings = NSGASettings(pop_size=30, generations=10, operators=operators)
    for front in qcqa.layer_fronts(dists, True, solver, settings).fronts:
        for k, g in enumerate(front.groupings, start=1):
            if 12 % k:
                assert g is None
            elif g is not None:
                assert max(g) + 1 == k and set(np.bincount(g)) == {12 // k}
    result = qcqa.search(dists, 15, True, solver=solver, nsga_settings=settings)
    assert all(len(set(np.bincount(g))) == 1 for g in result.groups)


def test_balance_repair_makes_any_grouping_equal_sized():
    rng = np.random.default_rng(0)
    for n in (6, 12, 32):
        x = rng.integers(0, n, size=(200, n))
        fixed = balance_rows(x, divisors(n), rng)
        for row in fixed:
            assert len(set(np.bincount(row))) == 1 and n % (row.max() + 1) == 0


def test_same_seed_same_result_whatever_the_workers():
    dists = [layer(16, seed=s)[1] for s in range(4)]
    runs = [
        qcqa.search(
            dists,
            24,
            solver="nsga",
            nsga_settings=NSGASettings(pop_size=40, generations=15, seed=7, seed_greedy=False),
            workers=w,
        )
        for w in (1, 1, 2)
    ]
    assert runs[0].groups == runs[1].groups == runs[2].groups
    assert [f.errors for f in runs[0].fronts] == [f.errors for f in runs[2].fronts]
    other = qcqa.search(
        dists, 24, solver="nsga", nsga_settings=NSGASettings(pop_size=40, generations=15, seed=8, seed_greedy=False)
    )
    assert [f.errors for f in other.fronts] != [f.errors for f in runs[0].fronts]


def test_greedy_is_near_exact_and_seeding_keeps_it():
    _, d = layer(10, seed=11)
    _, best = exact.exact_front(d)
    greedy = qcqa.greedy_front(d, False)
    assert layer_hypervolume(np.array(greedy.errors), best[0]) >= 0.99 * layer_hypervolume(np.array(best), best[0])
    seeded = qcqa.layer_fronts([d], False, "nsga", NSGASettings(pop_size=20, generations=2)).fronts
    assert all(s <= g + 1e-9 for s, g in zip(seeded[0].errors, greedy.errors, strict=True))


def test_dp_allocation_is_optimal_and_the_global_front_is_monotone():
    dists = [layer(5, seed=s)[1] for s in range(3)]
    fronts = qcqa.layer_fronts(dists, False, "exact").fronts
    for budget in range(3, 16):
        counts = qcqa.allocate(fronts, budget)
        brute = min(
            sum(f.errors[k - 1] for f, k in zip(fronts, ks, strict=True))
            for ks in itertools.product(range(1, 6), repeat=3)
            if sum(ks) <= budget
        )
        assert sum(counts) <= budget
        assert sum(f.errors[k - 1] for f, k in zip(fronts, counts, strict=True)) == pytest.approx(brute)
    heads, errors = qcqa.global_front(fronts)
    assert heads[0] == 3 and heads[-1] == 15 and errors[-1] == 0
    assert np.all(np.diff(heads) > 0) and np.all(np.diff(errors) < 0)


def test_binary_stage2_meets_the_budget_and_never_beats_the_dp():
    dists = [layer(8, seed=s)[1] for s in range(6)]
    dp = qcqa.search(dists, 24, solver="greedy")
    binary = qcqa.search(dists, 24, solver="greedy", stage2="nsga", stage2_settings=NSGASettings(generations=20))
    assert sum(max(g) + 1 for g in binary.groups) <= 24
    assert binary.total_wse >= dp.total_wse - 1e-9
    assert binary.stage2.solver == "nsga" and binary.stage2.evaluations > 0
    assert binary.evaluations == binary.stage1.evaluations + binary.stage2.evaluations
    assert dp.stage2.solver == "dp" and dp.stage2.evaluations == 0 and dp.stage2.global_front.kv_heads[-1] == 48
    fixed = qcqa.search(dists, 30, solver="greedy", groups=2)
    assert {max(g) + 1 for g in fixed.groups} <= {2, 8}


def test_hypervolume_2d():
    assert hypervolume_2d([[0.5, 0.5]]) == pytest.approx(0.25)
    assert hypervolume_2d([[0.5, 0.5], [0.25, 0.75], [0.9, 0.9]]) == pytest.approx(0.25 + 0.25 * 0.25)
    assert hypervolume_2d([[1.0, 0.0], [0.0, 1.0]]) == 0.0


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda d: qcqa.check_count(13, 12, False), "group count 13 is outside 1..12"),
        (lambda d: qcqa.check_count(0, 12, False), "group count 0 is outside 1..12"),
        (lambda d: qcqa.balanced_grouping(d, 5), "group count 5 does not divide the 12"),
        (lambda d: qcqa.search([d, d], 1), "allows 1 KV heads for 2 layers"),
        (lambda d: qcqa.search([d, d], 10, groups=6), "fewest this search allows is 12"),
        (lambda d: qcqa.search([d], 6, True, groups=5), "group count 5 does not divide"),
        (lambda d: qcqa.search([d], 6, solver="anneal"), "search.solver='anneal'"),
        (lambda d: qcqa.search([d], 6, stage2="greedy"), "search.stage2='greedy'"),
        (lambda d: exact.exact_front(np.zeros((15, 15))), "at most 14 heads"),
        (lambda d: NSGASettings(pop_size=0), "search.nsga.pop_size=0"),
    ],
)
def test_bad_input_is_one_line(call, named):
    _, d = layer(12)
    with pytest.raises(KVShareError) as info:
        call(d)
    assert named in str(info.value) and "\n" not in str(info.value)


def test_partition_operators_work_in_pymoos_own_mating():
    """The custom operators are ordinary pymoo operators too (the default path batches them itself)."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.optimize import minimize

    _, d = layer(12, seed=2)
    problem = nsga.GroupingProblem(d, equal_sizes=True)
    algo = NSGA2(
        pop_size=20,
        sampling=nsga.PartitionSampling(),
        crossover=nsga.AlignedUniformCrossover(0.9),
        mutation=nsga.PartitionMutation(1 / 12),
        repair=nsga.BalanceRepair(),
        eliminate_duplicates=nsga.PartitionDuplicates(canonical=True),
    )
    res = minimize(problem, algo, ("n_gen", 5), seed=1)
    for row in res.pop.get("X").astype(int):
        assert len(set(np.bincount(row))) == 1
    assert np.isfinite(problem.best_f[[0, 1, 2, 3, 5, 11]]).all()
