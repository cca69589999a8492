"""Data-aware WSE, and how well a WSE proxy ranks groupings by a measured quality signal.

Output proxy: merging heads changes a layer's K/V *outputs* X W^T, where X are
the layer's normalised attention inputs (after ``input_layernorm``) on a few
calibration tokens. The squared output error of a head's replacement is
||(W_i - W_mean) X^T||^2 = ||(W_i - W_mean) R||^2 for any R with
C = X^T X = R R^T, so heads become the rows W R and the pairwise WSE machinery
of :mod:`kvshare.wse` stays unchanged. (RoPE rotates every head's keys alike,
an isometry, so it does not change these distances.) C is divided by the token
count: the WSE is then a mean squared K/V output error per token.

Rank check: merge one layer's heads by a candidate grouping (the group mean
written into every member, as a real merge does), measure KL(base || merged) of
next-token distributions on a calibration slice, and compare the order of the
candidates by each proxy with their order by KL (Spearman's rho).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kvshare.errors import KVShareError
from kvshare.wse import kv_head_vectors, kv_projections, pairwise_sq_dists, random_partitions, wse


@torch.no_grad()
def input_covariances(model, windows: torch.Tensor, batch_size: int = 4) -> list[np.ndarray]:
    """Per layer, C / T for the attention inputs X (T tokens; a ones column appended where K/V have a bias)."""
    projections = kv_projections(model)
    layers = model.model.layers
    hidden = model.config.hidden_size
    device = next(model.parameters()).device
    bias = [k.bias is not None for k, _, _ in projections]
    acc = [torch.zeros(hidden + b, hidden + b, dtype=torch.float64, device=device) for b in bias]

    def hook(i):
        def add(_module, _inputs, out):
            x = out.reshape(-1, hidden).to(torch.float64)
            if bias[i]:
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
            acc[i] += x.T @ x

        return add

    handles = [layer.input_layernorm.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for i in range(0, len(windows), batch_size):
            model(input_ids=windows[i : i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return [(c / windows.numel()).cpu().numpy() for c in acc]


def covariance_factor(cov: np.ndarray) -> np.ndarray:
    """R with R R^T = C (symmetric square root; C may be singular when tokens < width)."""
    vals, vecs = np.linalg.eigh(cov)
    return vecs * np.sqrt(np.clip(vals, 0.0, None))


def output_dists(model, windows: torch.Tensor, batch_size: int = 4) -> list[np.ndarray]:
    """Per layer, pairwise squared distances between KV heads' K/V outputs on the calibration windows."""
    factors = [covariance_factor(c) for c in input_covariances(model, windows, batch_size)]
    return [pairwise_sq_dists(v) for v in kv_head_vectors(model, factors)]


@torch.no_grad()
def merge_layer_(model, layer: int, groups) -> list[torch.Tensor]:
    """Write each group's mean K/V projection into all its members, in place; returns the originals."""
    k_proj, v_proj, head_dim = kv_projections(model)[layer]
    saved = []
    groups = torch.as_tensor(np.asarray(groups))
    for proj in (k_proj, v_proj):
        for t in (proj.weight, proj.bias):
            if t is None:
                continue
            saved.append(t.detach().clone())
            heads = t.data.view(len(groups), head_dim, -1)
            for g in groups.unique():
                members = groups == g
                heads[members] = heads[members].mean(dim=0, keepdim=True)
    return saved


@torch.no_grad()
def restore_layer_(model, layer: int, saved: list[torch.Tensor]) -> None:
    k_proj, v_proj, _ = kv_projections(model)[layer]
    tensors = [t for proj in (k_proj, v_proj) for t in (proj.weight, proj.bias) if t is not None]
    for t, s in zip(tensors, saved, strict=True):
        t.copy_(s)


@torch.no_grad()
def kl_to_base(model, windows: torch.Tensor, base_logp: list[torch.Tensor], batch_size: int = 4) -> float:
    """Mean KL(base || model) of next-token distributions over the windows' tokens."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for j, i in enumerate(range(0, len(windows), batch_size)):
        logp = F.log_softmax(model(input_ids=windows[i : i + batch_size].to(device)).logits.float(), -1)
        total += F.kl_div(logp, base_logp[j], log_target=True, reduction="sum").item()
        count += logp.shape[0] * logp.shape[1]
    return total / count


def random_candidates(n_layers: int, n: int, n_groups: int, count: int, seed: int = 0) -> list[tuple[int, list]]:
    """``count`` random groupings of ``n`` heads into ``n_groups``, one layer each, taking the layers in turn."""
    if not 1 <= n_groups < n:
        raise KVShareError(
            f"search.proxy_check.groups={n_groups} must lie in 1..{n - 1} (the layer has {n} KV heads) "
            "for a merge to change anything"
        )
    rows = random_partitions(n, [n_groups] * count, np.random.default_rng(seed))
    return [(c % n_layers, row.tolist()) for c, row in enumerate(rows)]


@torch.no_grad()
def rank_check(
    model,
    windows: torch.Tensor,
    dists: dict[str, list[np.ndarray]],
    candidates: list[tuple[int, list]],
    batch_size: int = 4,
) -> dict:
    """Spearman's rho between each proxy's WSE and measured KL over one-layer merges ``(layer, groups)``.

    ``rho_<proxy>`` ranks all candidates (which layer and which heads);
    ``rho_within_<proxy>`` is the mean rho over the candidates of one layer
    (which heads, the layer fixed), over layers with at least 3 candidates.
    """
    from scipy.stats import spearmanr

    device = next(model.parameters()).device
    base_logp = [
        F.log_softmax(model(input_ids=windows[i : i + batch_size].to(device)).logits.float(), -1)
        for i in range(0, len(windows), batch_size)
    ]
    rows = []
    for layer, groups in candidates:
        saved = merge_layer_(model, layer, groups)
        try:
            kl = kl_to_base(model, windows, base_logp, batch_size)
        finally:
            restore_layer_(model, layer, saved)
        rows.append(
            {"layer": layer, "groups": list(groups), "kl": kl} | {k: wse(d[layer], groups) for k, d in dists.items()}
        )
    out: dict = {"candidates": rows}
    kl = np.array([r["kl"] for r in rows])
    layer_of = np.array([r["layer"] for r in rows])
    for name in dists:
        proxy = np.array([r[name] for r in rows])
        out[f"rho_{name}"] = float(spearmanr(proxy, kl).statistic)
        within = [
            spearmanr(proxy[layer_of == li], kl[layer_of == li]).statistic
            for li in np.unique(layer_of)
            if (layer_of == li).sum() >= 3
        ]
        within = [w for w in within if np.isfinite(w)]
        out[f"rho_within_{name}"] = float(np.mean(within)) if within else None  # JSON has no NaN
    return out
