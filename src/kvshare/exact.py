"""Exact stage 1 for small layers: the least-WSE grouping of n heads at every KV-head count.

A dynamic programme over subsets of heads: f_k(M), the least WSE of splitting
the head set M into k groups, is the minimum over the group S that holds M's
lowest head of WSE(S) + f_{k-1}(M \\ S). There are (3^n + 1) / 2 (M, S) pairs,
so this is instant up to ~12 heads and still fine at 14 (a few seconds); it is
the yardstick the heuristic solvers are measured against, not a production
solver for 32-head layers. With ``equal_sizes`` only groups of size n / k count.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from kvshare.errors import KVShareError

MAX_HEADS = 14  # 3^14 pairs of subsets: about 100 MB of index arrays and a few seconds


@lru_cache(maxsize=4)
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (M, S) with S ⊆ M holding M's lowest element, sorted by M, and each M's first row."""
    m = np.zeros(1, dtype=np.int64)
    s = np.zeros(1, dtype=np.int64)
    for i in range(n):  # every element is outside M, in M only, or in S too
        b = 1 << i
        m = np.concatenate([m, m | b, m | b])
        s = np.concatenate([s, s, s | b])
    keep = (s & (m & -m)) != 0
    m, s = m[keep], s[keep]
    order = np.argsort(m, kind="stable")
    m, s = m[order], s[order]
    starts = np.flatnonzero(np.r_[True, m[1:] != m[:-1]])
    return m, s, starts


def subset_wse(dist: np.ndarray) -> np.ndarray:
    """WSE of every subset of heads taken as one group, indexed by bit mask (mask 0 → 0)."""
    n = dist.shape[0]
    bits = ((np.arange(1 << n)[:, None] >> np.arange(n)) & 1).astype(np.float64)
    size = bits.sum(axis=1)
    pair_sum = ((bits @ dist) * bits).sum(axis=1) / 2.0
    return np.divide(pair_sum, size, out=np.zeros_like(pair_sum), where=size > 0)


def _dp(w: np.ndarray, n: int, k_max: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """f[k-1][M] for k = 1..k_max, and the argmin group S for each (k, M)."""
    m, s, starts = _pairs(n)
    f = [w.copy()]
    f[0][0] = np.inf
    arg = [np.arange(1 << n)]  # one group: S = M
    segment = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(m)]))
    masks = m[starts]
    for _ in range(2, k_max + 1):
        val = w[s] + f[-1][m ^ s]
        best = np.minimum.reduceat(val, starts)
        # the first row of each segment that attains its minimum
        hit = np.flatnonzero(val == best[segment])
        first = hit[np.r_[True, segment[hit][1:] != segment[hit][:-1]]]
        fk = np.full(1 << n, np.inf)
        fk[masks] = best
        ak = np.zeros(1 << n, dtype=np.int64)
        ak[masks[segment[first]]] = s[first]
        f.append(fk)
        arg.append(ak)
    return f, arg


def _unroll(arg: list[np.ndarray], n: int, k: int) -> tuple[int, ...]:
    labels = [0] * n
    mask = (1 << n) - 1
    for g, level in enumerate(range(k, 0, -1)):
        sub = int(arg[level - 1][mask])
        for i in range(n):
            if sub >> i & 1:
                labels[i] = g
        mask ^= sub
    return tuple(labels)


def exact_front(dist: np.ndarray, equal_sizes: bool = False) -> tuple[list, list[float]]:
    """Least-WSE grouping and its WSE for each count k = 1..n (index k-1); (None, inf) where none exists."""
    n = dist.shape[0]
    if n > MAX_HEADS:
        raise KVShareError(
            f"the exact solver handles at most {MAX_HEADS} heads per layer, this layer has {n}: "
            "use search.solver=nsga or greedy"
        )
    w = subset_wse(np.asarray(dist, dtype=np.float64))
    full = (1 << n) - 1
    groupings: list = [None] * n
    errors = [float("inf")] * n
    if not equal_sizes:
        f, arg = _dp(w, n, n)
        for k in range(1, n + 1):
            groupings[k - 1], errors[k - 1] = _unroll(arg, n, k), float(f[k - 1][full])
        return groupings, errors
    sizes = np.array([bin(x).count("1") for x in range(1 << n)])
    for k in (k for k in range(1, n + 1) if n % k == 0):
        f, arg = _dp(np.where(sizes == n // k, w, np.inf), n, k)
        groupings[k - 1], errors[k - 1] = _unroll(arg, n, k), float(f[k - 1][full])
    return groupings, errors
