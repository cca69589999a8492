"""Which KV heads to merge: QCQA's search over groupings, scored by WSE.

Stage 1 builds, for every layer, the best grouping found at each KV-head count
(a per-layer front of count against WSE). Stage 2 chooses one point of every
layer's front (keeping all heads = "ungrouped") so that the total count meets
the KV budget at the least summed WSE.

Solvers here: agglomerative Ward clustering for stage 1 (greedy: at each step
merge the two groups whose union raises WSE least) and an exact dynamic
programme for stage 2 (a multiple-choice knapsack over integer head counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvshare.errors import KVShareError
from kvshare.plan import canonical
from kvshare.wse import wse


@dataclass
class LayerFront:
    """Best-known grouping of one layer for each KV-head count 1..n (index k-1)."""

    groupings: list[tuple[int, ...]]
    errors: list[float]


@dataclass
class SearchResult:
    groups: list[tuple[int, ...]]
    layer_wse: list[float]
    fronts: list[LayerFront]
    info: dict = field(default_factory=dict)

    @property
    def total_wse(self) -> float:
        return float(sum(self.layer_wse))


def ward_front(dist: np.ndarray) -> LayerFront:
    """Greedy agglomeration from n singletons down to one group, recording each level."""
    n = dist.shape[0]
    labels = list(range(n))
    by_count: dict[int, tuple[tuple[int, ...], float]] = {n: (canonical(labels), 0.0)}
    for k in range(n - 1, 0, -1):
        ids = sorted(set(labels))
        best = None
        for a_i, a in enumerate(ids):
            for b in ids[a_i + 1 :]:
                trial = [a if g == b else g for g in labels]
                err = wse(dist, trial)
                if best is None or err < best[0]:
                    best = (err, trial)
        labels = best[1]
        by_count[k] = (canonical(labels), best[0])
    return LayerFront([by_count[k][0] for k in range(1, n + 1)], [by_count[k][1] for k in range(1, n + 1)])


def allocate(fronts: list[LayerFront], max_heads: int) -> list[int]:
    """Exact stage 2: KV-head count per layer with total <= max_heads minimising summed WSE."""
    n_layers = len(fronts)
    inf = float("inf")
    # best[c] = (least WSE over the layers so far using exactly c heads, choices)
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for front in fronts:
        nxt: dict[int, tuple[float, list[int]]] = {}
        for used, (err, picks) in best.items():
            for k, e in enumerate(front.errors, start=1):
                c = used + k
                if c <= max_heads and err + e < nxt.get(c, (inf, None))[0]:
                    nxt[c] = (err + e, picks + [k])
        best = nxt
    if not best:
        need = n_layers
        raise KVShareError(f"no grouping fits {max_heads} KV heads: at least {need} (one per layer) are needed")
    return min(best.values(), key=lambda t: t[0])[1]


def search(dists: list[np.ndarray], max_heads: int, equal_sizes: bool = False) -> SearchResult:
    """Groupings of every layer using at most ``max_heads`` KV heads in all, least summed WSE."""
    if equal_sizes:
        raise KVShareError("qcqa-ec needs the NSGA-II or balanced solver, not yet in this build; use qcqa-ac")
    fronts = [ward_front(d) for d in dists]
    counts = allocate(fronts, max_heads)
    groups = [f.groupings[k - 1] for f, k in zip(fronts, counts, strict=True)]
    errors = [f.errors[k - 1] for f, k in zip(fronts, counts, strict=True)]
    return SearchResult(groups, errors, fronts, {"solver": "ward+dp", "max_heads": max_heads})
