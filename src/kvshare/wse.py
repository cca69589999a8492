"""QCQA's weight-sharing error (WSE), computed from pairwise distances.

Merging a group of KV heads replaces each member's K and V projection with the
group mean; the WSE of the group is the summed squared distance of the members
to that mean. For a group G with pairwise squared distances D,

    WSE(G) = sum_{i in G} ||x_i - mean_G||^2 = (1 / (2|G|)) * sum_{i,j in G} D_ij,

so one (n x n) distance matrix per layer prices every grouping of that layer
without touching the weights again. :func:`wse_population` prices a whole
population of groupings in a few array passes (several 100k groupings/s for
32 heads); :func:`wse_direct` is the definition itself, for tests and benchmarks.

A grouping is a vector of group ids, one per head. The partition maths that the
solvers and baselines share lives here too: random and contiguous groupings,
canonical ids, group counts, divisors, per-group distance sums.

A head's vector is its K and V projection rows (and biases), flattened. With a
factor R of a layer's input covariance C = X^T X = R R^T (see
:mod:`kvshare.proxy`), the vector is [W | b] R instead, and distances become
distances between the heads' K/V *outputs* on the calibration inputs X.
"""

from __future__ import annotations

import numpy as np

from kvshare.errors import KVShareError


def checkpoint_head_vectors(tensors, num_layers: int, head_dim: int):
    """Per layer, one row per KV head: its K and V projection rows [W | b] as float32, read from a checkpoint's
    weights (:class:`kvshare.checkpoint.Tensors`) one layer at a time."""
    for i in range(num_layers):
        parts = []
        for proj in ("k", "v"):
            name = f"model.layers.{i}.self_attn.{proj}_proj"
            w = tensors.float32(f"{name}.weight")
            if f"{name}.bias" in tensors:
                w = np.concatenate([w, tensors.float32(f"{name}.bias")[:, None]], axis=1)
            parts.append(w.reshape(w.shape[0] // head_dim, -1))
        yield np.concatenate(parts, axis=1)


def kv_projections(model) -> list[tuple]:
    """Per layer, the (k_proj, v_proj, head_dim) of a model object's attention; a one-line error if there are none."""
    import torch

    kind = getattr(model.config, "model_type", type(model).__name__)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise KVShareError(f"model type {kind!r} has no model.layers: kvshare searches Llama-family decoders")
    out = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        k, v = getattr(attn, "k_proj", None), getattr(attn, "v_proj", None)
        head_dim = getattr(attn, "head_dim", None)
        if not isinstance(k, torch.nn.Linear) or not isinstance(v, torch.nn.Linear) or not head_dim:
            raise KVShareError(
                f"layer {i} of model type {kind!r} has no separate k_proj/v_proj with a head_dim: "
                "kvshare needs attention with separable K/V heads (Llama-style)"
            )
        if k.out_features % head_dim or v.out_features != k.out_features:
            raise KVShareError(
                f"layer {i}: k_proj/v_proj give {k.out_features}/{v.out_features} outputs, not a whole number "
                f"of heads of dim {head_dim}: kvshare needs attention with separable K/V heads"
            )
        out.append((k, v, head_dim))
    return out


def kv_head_vectors(model, factors: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Per layer, one row per source KV head: its K and V projection rows [W | b], times ``factors[i]`` if given.

    Rows keep the weights' float32 unless ``factors`` are given (float64, see
    below). ``factors[i]`` is (in_features + has_bias, r): a factor of the
    layer's input covariance (bias input 1 appended), so rows become output-space vectors.
    """
    import torch

    out = []
    for i, (k_proj, v_proj, head_dim) in enumerate(kv_projections(model)):
        n_kv = k_proj.out_features // head_dim
        dtype = torch.float32 if factors is None else torch.float64
        parts = []
        for proj in (k_proj, v_proj):
            w = proj.weight.detach().to(dtype)
            if proj.bias is not None:
                w = torch.cat([w, proj.bias.detach().to(dtype)[:, None]], dim=1)
            w = w.cpu().numpy()
            if factors is not None:
                w = w @ factors[i]
            parts.append(w.reshape(n_kv, -1))
        out.append(np.concatenate(parts, axis=1))
    return out


def pairwise_sq_dists(x: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between rows, through the Gram matrix (float64, symmetric, zero diagonal).

    float64 rows are centred first (distances do not change, and small Gram
    entries make ``|a|^2 + |b|^2 - 2ab`` lose far fewer digits for near-equal
    heads). float32 rows (weights as loaded) take one float32 product instead:
    about 1e-6 relative error, and 5x faster for a 7B layer's 32 x 1M rows.
    """
    x = np.asarray(x)
    if x.dtype == np.float64:
        x = x - x.mean(axis=0)
        gram = x @ x.T
    else:
        x = np.ascontiguousarray(x, dtype=np.float32)
        gram = (x @ x.T).astype(np.float64)
    sq = np.diag(gram)
    d = np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
    d = (d + d.T) / 2.0
    np.fill_diagonal(d, 0.0)
    return d


# --- partitions: a grouping of n heads is a vector of group ids, one per head ------------------------------------


def contiguous(n: int, k: int) -> tuple[int, ...]:
    """``n`` heads in ``k`` contiguous groups of sizes differing by at most one (GQA's grouping)."""
    return tuple(int(g) for g, part in enumerate(np.array_split(np.arange(n), k)) for _ in part)


def random_partitions(n: int, counts, rng: np.random.Generator, equal_sizes: bool = False) -> np.ndarray:
    """One random grouping of ``n`` heads per entry of ``counts`` (its group count), as rows (len(counts), n).

    Every group is non-empty: groups 0..k-1 get one head each and the other
    heads a random group (or, with ``equal_sizes``, n / k heads per group), then
    the heads are shuffled. The random baseline, NSGA-II's initial population
    and the proxy check's candidates all draw from here, in this order of calls
    to ``rng``, so a seed gives the same groupings everywhere.
    """
    rows = []
    for k in counts:
        if equal_sizes:
            labels = np.repeat(np.arange(k), n // k)
        else:
            labels = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
        rows.append(labels[rng.permutation(n)])
    return np.array(rows, dtype=np.int64).reshape(len(rows), n)


def canonical_rows(pop: np.ndarray) -> np.ndarray:
    """Relabel every row's group ids 0, 1, ... in order of first appearance (equal partitions → equal rows)."""
    pop = np.asarray(pop, dtype=np.int64)
    p, n = pop.shape
    rows = np.arange(p)
    labels = int(pop.max()) + 1 if pop.size else 1
    first = np.full((p, labels), n, dtype=np.int64)
    for i in range(n - 1, -1, -1):  # the last write per label is its first occurrence
        first[rows, pop[:, i]] = i
    rank = np.empty_like(first)
    rank[rows[:, None], np.argsort(first, axis=1, kind="stable")] = np.arange(labels)
    return rank[rows[:, None], pop]


def n_groups(pop: np.ndarray) -> np.ndarray:
    """Number of distinct group ids in each row of ``pop``."""
    s = np.sort(np.asarray(pop), axis=1)
    return 1 + (s[:, 1:] != s[:, :-1]).sum(axis=1)


def divisors(n: int) -> np.ndarray:
    """The group counts that split ``n`` heads into equal-size groups."""
    return np.array([k for k in range(1, n + 1) if n % k == 0])


def group_stats(dist: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """R[i, g] = sum of D from head i to group g; S[g] = pair sum inside g; sizes."""
    k = int(row.max()) + 1
    onehot = np.zeros((len(row), k))
    onehot[np.arange(len(row)), row] = 1.0
    r = dist @ onehot
    return r, np.einsum("ig,ig->g", onehot, r) / 2.0, onehot.sum(axis=0)


# --- WSE --------------------------------------------------------------------------------------------------------


def wse(dist: np.ndarray, groups) -> float:
    """WSE of one layer's grouping (``groups[i]`` = group id of head i)."""
    return float(wse_population(dist, np.asarray(groups)[None, :])[0])


def wse_population(dist: np.ndarray, pop: np.ndarray) -> np.ndarray:
    """WSE of many groupings of one layer at once: ``pop`` is (P, n) non-negative group ids, result (P,).

    Per group, WSE = (sum of D over the group's unordered pairs) / size; both sums
    are bincounts over (row, group) cells, so the cost is O(P * n^2 / 2).
    """
    pop = np.asarray(pop, dtype=np.int64)
    p, n = pop.shape
    iu, ju = np.triu_indices(n, 1)
    labels = int(pop.max()) + 1
    cell = pop + labels * np.arange(p)[:, None]  # (row, group) → one flat cell id
    size = np.bincount(cell.ravel(), minlength=p * labels)
    a = cell[:, iu]
    same = a == cell[:, ju]
    pair_sum = np.bincount(a[same], weights=np.broadcast_to(dist[iu, ju], a.shape)[same], minlength=p * labels)
    per_group = np.divide(pair_sum, size, out=np.zeros(pair_sum.shape), where=size > 0)
    return per_group.reshape(p, labels).sum(axis=1)


def wse_direct(x: np.ndarray, groups) -> float:
    """WSE from the head vectors themselves: replace each head by its group mean, sum squared errors."""
    x = np.asarray(x, dtype=np.float64)
    groups = np.asarray(groups)
    total = 0.0
    for g in np.unique(groups):
        members = x[groups == g]
        total += float(((members - members.mean(axis=0)) ** 2).sum())
    return total
