"""QCQA's weight-sharing error (WSE), computed from pairwise distances.

Merging a group of KV heads replaces each member's K and V projection with the
group mean; the WSE of the group is the summed squared distance of the members
to that mean. For a group G with pairwise squared distances D,

    WSE(G) = sum_{i in G} ||x_i - mean_G||^2 = (1 / (2|G|)) * sum_{i,j in G} D_ij,

so one (n x n) distance matrix per layer prices every grouping of that layer
without touching the weights again.
"""

from __future__ import annotations

import numpy as np
import torch


def kv_head_vectors(model) -> list[np.ndarray]:
    """Per layer, one row per source KV head: its K and V projection weights (and biases) flattened."""
    out = []
    for layer in model.model.layers:
        attn = layer.self_attn
        parts = []
        for proj in (attn.k_proj, attn.v_proj):
            n_kv = proj.out_features // attn.head_dim
            parts.append(proj.weight.detach().to(torch.float64).reshape(n_kv, -1))
            if proj.bias is not None:
                parts.append(proj.bias.detach().to(torch.float64).reshape(n_kv, -1))
        out.append(torch.cat(parts, dim=1).cpu().numpy())
    return out


def pairwise_sq_dists(x: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between rows, through the Gram matrix (exactly symmetric, zero diagonal)."""
    gram = x @ x.T
    sq = np.diag(gram)
    d = np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
    d = (d + d.T) / 2.0
    np.fill_diagonal(d, 0.0)
    return d


def wse(dist: np.ndarray, groups) -> float:
    """WSE of one layer's grouping (``groups[i]`` = group id of head i)."""
    return float(wse_population(dist, np.asarray(groups)[None, :])[0])


def wse_population(dist: np.ndarray, pop: np.ndarray) -> np.ndarray:
    """WSE of many groupings of one layer at once: ``pop`` is (P, n) group ids, result (P,)."""
    pop = np.asarray(pop)
    same = pop[:, :, None] == pop[:, None, :]  # (P, n, n): i and j share a group
    size = same.sum(axis=2)  # (P, n): size of head i's group
    pair_sum = (same * dist[None]).sum(axis=2)  # (P, n): sum_j in group(i) D_ij
    return (pair_sum / (2.0 * size)).sum(axis=1)
