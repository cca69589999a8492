"""Stage ``search``: a base model and a KV budget → a grouping plan (JSON).

    python -m kvshare.search search.model_dir=resources/models/tiny search.method=qcqa-ac \
        search.budget=0.5 search.out=results/smoke/plans/tiny/qcqa-ac/0.5.json

Methods (``search.method``), alone or as ``<within>+cla<k>``:
- ``gqa``: contiguous groups of (near-)equal size, the same count in every layer
  (Ainslie et al.); ``mqa``: one KV head per layer; ``random``: a random
  partition with GQA's counts, the null hypothesis for any smarter grouping;
- ``qcqa-ac`` / ``qcqa-ec``: groupings searched by weight-sharing error, with
  any / equal group sizes, and a choice of which layers stay ungrouped;
- ``cla<k>``: every k adjacent layers share the first one's K/V (CLA).

``search.budget`` is the target KV-cache size as a fraction of the base model's;
the plan's own fraction is at most that. With CLA, the budget counts only the
layers that store K/V.
"""

from __future__ import annotations

import time

import numpy as np
from omegaconf import DictConfig

from kvshare import qcqa
from kvshare.cli import entry
from kvshare.errors import KVShareError
from kvshare.models import load_model
from kvshare.plan import ModelShape, Plan, cla_pattern
from kvshare.tracking import stage_run
from kvshare.wse import kv_head_vectors, pairwise_sq_dists, wse

WITHIN = ("base", "gqa", "mqa", "random", "qcqa-ac", "qcqa-ec")


def parse_method(method: str) -> tuple[str, int]:
    """``"qcqa-ac+cla2"`` → ``("qcqa-ac", 2)``; ``"cla2"`` → ``("base", 2)``; ``"gqa"`` → ``("gqa", 1)``."""
    within, cla = "base", 1
    for part in str(method).lower().split("+"):
        if part.startswith("cla") and part[3:].isdigit() and int(part[3:]) >= 1:
            cla = int(part[3:])
        elif part in WITHIN:
            within = part
        else:
            raise KVShareError(
                f"search.method={method!r} is not known: use one of {', '.join(WITHIN)}, cla<k>, or <within>+cla<k>"
            )
    return within, cla


def contiguous(n: int, k: int) -> tuple[int, ...]:
    """``n`` heads in ``k`` contiguous groups of sizes differing by at most one."""
    return tuple(int(g) for g, part in enumerate(np.array_split(np.arange(n), k)) for _ in part)


def random_partition(n: int, k: int, rng: np.random.Generator) -> tuple[int, ...]:
    labels = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
    return tuple(int(x) for x in labels[rng.permutation(n)])


def find_groups(within: str, dists: list[np.ndarray], max_heads: int, n: int, seed: int) -> tuple[list, dict]:
    """Groupings of the K/V-storing layers using at most ``max_heads`` KV heads in all."""
    layers = len(dists)
    if max_heads < layers:
        raise KVShareError(f"the budget allows {max_heads} KV heads for {layers} layers: raise search.budget")
    per_layer = min(n, max_heads // layers)
    if within == "base":
        if per_layer < n:
            raise KVShareError(
                f"method keeps all {n} KV heads per layer, which exceeds the budget: raise search.budget"
            )
        return [tuple(range(n))] * layers, {}
    if within in ("gqa", "mqa"):
        return [contiguous(n, 1 if within == "mqa" else per_layer)] * layers, {}
    if within == "random":
        rng = np.random.default_rng(seed)
        return [random_partition(n, per_layer, rng) for _ in range(layers)], {}
    result = qcqa.search(dists, max_heads, equal_sizes=within == "qcqa-ec")
    return result.groups, result.info


def run(cfg: DictConfig) -> dict:
    s = cfg.search
    within, cla = parse_method(s.method)
    try:
        budget = float(s.budget)
    except ValueError:
        raise KVShareError(f"search.budget={s.budget!r} is not a number: give a KV fraction in (0, 1]") from None
    if not 0 < budget <= 1:
        raise KVShareError(f"search.budget={s.budget} must be a KV fraction in (0, 1]")
    tags = {"model": cfg.model.name, "method": s.method, "budget": budget}
    with stage_run(cfg, "search", tags) as mlrun:
        t0 = time.perf_counter()
        model, _ = load_model(s.model_dir)
        shape = ModelShape.of(model.config)
        pattern = cla_pattern(shape.num_layers, cla)
        producers = sorted(set(pattern))
        dists = [pairwise_sq_dists(v) for v in kv_head_vectors(model)]
        max_heads = int(np.floor(budget * shape.num_layers * shape.num_kv_heads + 1e-9))
        groups, info = find_groups(within, [dists[j] for j in producers], max_heads, shape.num_kv_heads, s.random_seed)
        by_producer = dict(zip(producers, groups, strict=True))
        layer_wse = [wse(dists[j], by_producer[j]) for j in producers]
        plan = Plan(
            shape,
            tuple(by_producer[pattern[i]] for i in range(shape.num_layers)),
            tuple(pattern),
            s.method,
            s.cla_init,
            {
                "budget": budget,
                "model": cfg.model.name,
                "wse_total": float(sum(layer_wse)),
                "wse_per_layer": dict(zip(map(str, producers), layer_wse, strict=True)),
                "search_run_id": mlrun.run_id,
                **info,
            },
        )
        seconds = time.perf_counter() - t0
        plan.save(s.out)
        mlrun.log_metrics(
            {
                "kv_fraction": plan.kv_fraction,
                "kv_bytes_per_token": plan.kv_bytes_per_token(2),
                "wse_total": plan.meta["wse_total"],
                "grouped_layers": sum(plan.is_grouped(i) for i in range(shape.num_layers)),
                "wall_seconds": seconds,
            }
        )
        mlrun.log_artifact(s.out)
    return plan.to_dict()


main = entry("search", run)

if __name__ == "__main__":
    main()
