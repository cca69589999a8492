"""WSE from one pairwise-distance matrix equals WSE from the weights themselves (group means)."""

import numpy as np
import pytest
import torch

from kvshare.plan import canonical
from kvshare.wse import (
    canonical_rows,
    contiguous,
    divisors,
    group_stats,
    kv_head_vectors,
    n_groups,
    pairwise_sq_dists,
    random_partitions,
    wse,
    wse_direct,
    wse_population,
)
from tests.builders import tiny_llama


def random_groupings(rng, n, count):
    return np.array([rng.integers(0, rng.integers(1, n + 1), n) for _ in range(count)])


@pytest.mark.parametrize("n", [1, 2, 5, 8, 13, 32])
def test_distance_wse_equals_group_mean_wse(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 40)) * rng.uniform(0.1, 3, size=(n, 1))
    d = pairwise_sq_dists(x)
    pop = random_groupings(rng, n, 50)
    direct = [wse_direct(x, g) for g in pop]
    np.testing.assert_allclose(wse_population(d, pop), direct, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose([wse(d, g) for g in pop], direct, rtol=1e-9, atol=1e-9)


def test_identity_grouping_has_zero_wse_and_one_group_the_total_scatter():
    x = np.random.default_rng(0).normal(size=(9, 7))
    d = pairwise_sq_dists(x)
    assert wse(d, range(9)) == 0.0
    assert wse(d, [0] * 9) == pytest.approx(((x - x.mean(0)) ** 2).sum())


def test_ids_are_names_not_numbers():
    d = pairwise_sq_dists(np.random.default_rng(1).normal(size=(6, 4)))
    assert wse(d, [5, 5, 2, 2, 0, 5]) == pytest.approx(wse(d, [0, 0, 1, 1, 2, 0]))


def test_near_equal_heads_keep_their_small_distances():
    """Heads far from the origin but close to each other: centring keeps the Gram route accurate."""
    rng = np.random.default_rng(2)
    base = rng.normal(size=2000) * 1e3
    x = base + rng.normal(size=(4, 2000)) * 1e-3
    exact = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.testing.assert_allclose(pairwise_sq_dists(x), exact, rtol=1e-6)


def test_canonical_rows_and_group_counts():
    rng = np.random.default_rng(3)
    pop = random_groupings(rng, 10, 40)
    assert [tuple(r) for r in canonical_rows(pop)] == [canonical(r) for r in pop]
    assert list(n_groups(pop)) == [len(set(r)) for r in pop]


def test_model_head_vectors_price_a_real_merge():
    """Per layer, rows are KV heads; WSE equals the squared change of K and V weights when a group is averaged."""
    model = tiny_llama(heads=8, kv_heads=4, layers=2)
    vecs = kv_head_vectors(model)
    assert [v.shape for v in vecs] == [(4, 2 * 8 * 64)] * 2
    groups = [0, 1, 0, 0]
    attn = model.model.layers[1].self_attn
    change = 0.0
    for proj in (attn.k_proj, attn.v_proj):
        w = proj.weight.detach().double().reshape(4, 8, -1)
        merged = w.clone()
        for g in set(groups):
            members = torch.tensor([s for s in range(4) if groups[s] == g])
            merged[members] = w[members].mean(0)
        change += ((merged - w) ** 2).sum().item()
    assert vecs[1].dtype == np.float32  # weights as loaded: the float32 Gram route
    assert wse(pairwise_sq_dists(vecs[1]), groups) == pytest.approx(change, rel=1e-5)
    assert wse(pairwise_sq_dists(vecs[1].astype(np.float64)), groups) == pytest.approx(change, rel=1e-9)


def test_random_partitions_fill_every_group():
    rng = np.random.default_rng(4)
    counts = [1, 3, 5, 8, 8]
    rows = random_partitions(8, counts, rng)
    assert rows.shape == (5, 8) and list(n_groups(rows)) == counts
    equal = random_partitions(8, [1, 2, 4, 8], rng, equal_sizes=True)
    assert [set(np.bincount(r)) for r in equal] == [{8}, {4}, {2}, {1}]
    assert random_partitions(8, [], rng).shape == (0, 8)
    again = random_partitions(8, counts, np.random.default_rng(4))
    assert np.array_equal(rows, again)  # one seed, one sequence of groupings


def test_partition_maths():
    assert list(divisors(12)) == [1, 2, 3, 4, 6, 12]
    assert contiguous(7, 3) == (0, 0, 0, 1, 1, 2, 2)
    d = pairwise_sq_dists(np.random.default_rng(5).normal(size=(6, 3)))
    row = np.array([0, 1, 0, 2, 1, 0])
    r, s, size = group_stats(d, row)
    assert list(size) == [3, 2, 1] and r.shape == (6, 3)
    assert s / size == pytest.approx([wse(d, np.where(row == g, 0, np.arange(1, 7))) for g in range(3)])
