"""Stage ``search``: a base model and a KV budget → a grouping plan (JSON).

    python -m kvshare.search search.model_dir=resources/models/tiny search.method=qcqa-ac \
        search.budget=0.5 search.out=results/smoke/plans/tiny/qcqa-ac/0.5.json
    python -m kvshare.search search=paper ...      # the QCQA reproduction's settings

Methods (``search.method``), alone or as ``<within>+cla<k>``:
- ``gqa``: contiguous groups of (near-)equal size (Ainslie et al.), the same
  count in every layer where the budget allows one; between two counts, the
  layers with one KV head more are spaced evenly over the depth; ``mqa``: one KV
  head per layer; ``random``: random partitions with GQA's counts, the extra KV
  heads in random layers, the null hypothesis for any smarter grouping;
  ``random-s<k>`` is the same with seed k (``search.random_seed`` otherwise);
- ``qcqa-ac`` / ``qcqa-ec``: groupings searched by weight-sharing error, with
  any / equal group sizes, and a choice of which layers stay ungrouped
  (:mod:`kvshare.qcqa`; solvers and proxies are set under ``search:`` in conf);
- ``search.servable=true``: only plans a serving engine runs as they are (equal
  groups in every layer, no CLA; :mod:`kvshare.serving`): QCQA searches equal
  groups (as ``qcqa-ec``), any other method whose plan is not servable is refused;
- ``cla<k>``: every k adjacent layers share the first one's K/V (CLA); any other
  sharing pattern is ``search.cla_layers=[0,0,2,...]`` (layer i uses layer j's K/V).

``search.budget`` is the target KV-cache size as a fraction of the base model's;
the plan's own fraction is at most that. With CLA, the budget counts only the
layers that store K/V.

Besides the plan, the MLflow run gets the per-generation hypervolume of the
layer fronts (stepped metric ``hypervolume``), the fronts (``fronts.json``) and
their plots, and, with ``search.proxy_check.candidates``, how well the weight
and output proxies rank one-layer merges by measured KL to the base model.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from kvshare import qcqa
from kvshare.checkpoint import Tensors, read_config
from kvshare.cli import entry
from kvshare.errors import KVShareError
from kvshare.families import check_family
from kvshare.methods import Method, parse_method
from kvshare.plan import ModelShape, Plan, cla_pattern
from kvshare.qcqa import NSGASettings, layer_hypervolume
from kvshare.serving import Layout, check_servable, deployable_kv_bytes_per_token
from kvshare.tracking import stage_run
from kvshare.wse import checkpoint_head_vectors, contiguous, pairwise_sq_dists, random_partitions, wse

PROXIES = ("weight", "output")


# --- settings --------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """What ``search:`` asks for, checked before any work."""

    method: Method
    budget: float  # KV fraction in (0, 1]
    nsga: NSGASettings  # stage 1 (search.nsga)
    stage2_nsga: NSGASettings  # stage 2 (search.stage2_nsga)
    seed: int  # the random baseline's: random-s<k>'s k, else search.random_seed
    check: int  # one-layer merges the proxy check measures; 0: no check


def nsga_settings(node, name: str = "search.nsga") -> NSGASettings:
    d = OmegaConf.to_container(node, resolve=True)
    return NSGASettings(**{k: v for k, v in d.items() if k in NSGASettings.__dataclass_fields__}, name=name)


def check_settings(s: DictConfig) -> Settings:
    """The stage's settings, or a one-line error naming the first bad one."""
    method = parse_method(s.method)
    try:
        budget = float(s.budget)
    except ValueError:
        raise KVShareError(f"search.budget={s.budget!r} is not a number: give a KV fraction in (0, 1]") from None
    if not 0 < budget <= 1:
        raise KVShareError(f"search.budget={s.budget} must be a KV fraction in (0, 1]")
    if s.proxy not in PROXIES:
        raise KVShareError(f"search.proxy={s.proxy!r} is not known; use one of {', '.join(PROXIES)}")
    if s.solver not in qcqa.SOLVERS:
        raise KVShareError(f"search.solver={s.solver!r} is not known; use one of {', '.join(qcqa.SOLVERS)}")
    if s.stage2 not in qcqa.STAGE2:
        raise KVShareError(f"search.stage2={s.stage2!r} is not known; use one of {', '.join(qcqa.STAGE2)}")
    stage1, stage2 = nsga_settings(s.nsga), nsga_settings(s.stage2_nsga, "search.stage2_nsga")
    check = int(s.proxy_check.candidates or 0)
    if (s.proxy == "output" or check) and not s.calibration.data_dir:
        raise KVShareError(
            "search.proxy=output and search.proxy_check need calibration tokens: set search.calibration.data_dir "
            "to a folder written by the tokenize stage (kvshare.tokens)"
        )
    if s.servable and (method.cla > 1 or s.cla_layers is not None):
        raise KVShareError(
            f"search.servable=true and search.method={s.method} (cross-layer sharing): no serving engine shares K/V "
            "across layers; drop +cla<k> or search.servable"
        )
    seed = s.random_seed if method.seed is None else method.seed
    return Settings(method, budget, stage1, stage2, seed, check)


# --- distances -------------------------------------------------------------------------------------------------


@dataclass
class Distances:
    """The model's shape and K/V sharing pattern, and each layer's pairwise KV-head distances."""

    shape: ModelShape
    pattern: list[int]  # layer i uses the K/V of layer pattern[i]
    producers: list[int]  # the layers that store K/V: the ones the search groups
    weight: list[np.ndarray]  # on the K/V projection weights, every layer
    searched: list[np.ndarray]  # on search.proxy's vectors (weights, or K/V outputs), every layer
    model: Any = None  # the model object, loaded only for the output proxy and the proxy check

    def of_producers(self, dists: list[np.ndarray]) -> list[np.ndarray]:
        return [dists[j] for j in self.producers]


def read_distances(cfg: DictConfig, settings: Settings) -> Distances:
    """The weight proxy reads only the K/V projections, a layer at a time (no torch); the output proxy runs the
    model on calibration tokens."""
    s = cfg.search
    config = read_config(s.model_dir)
    check_family(config, f"search.model_dir={s.model_dir}")
    shape = ModelShape.of(config)
    cla = list(s.cla_layers) if s.cla_layers is not None else settings.method.cla
    pattern = cla_pattern(shape.num_layers, cla)
    vectors = checkpoint_head_vectors(Tensors(s.model_dir), shape.num_layers, shape.head_dim)
    weight = [pairwise_sq_dists(v) for v in vectors]
    d = Distances(shape, pattern, sorted(set(pattern)), weight, weight)
    if s.proxy == "output" or settings.check:
        from kvshare.checkpoint import load_model
        from kvshare.devices import resolve_device

        d.model, _ = load_model(s.model_dir, resolve_device(cfg.device), "float32")
    if s.proxy == "output":
        from kvshare import proxy
        from kvshare.data import calibration_windows

        c = s.calibration
        d.searched = proxy.output_dists(d.model, calibration_windows(c.data_dir, c.tokens, c.seq_len), c.batch_size)
    return d


# --- groups ----------------------------------------------------------------------------------------------------


def layer_counts(layers: int, n: int, max_heads: int, extra_layers=None) -> list[int]:
    """KV heads per layer for GQA-style baselines: ``max_heads`` (capped at ``n`` per layer) spread as evenly as
    possible; the layers with one more are ``extra_layers(k)``, by default ``k`` evenly spaced ones."""
    per_layer = min(n, max_heads // layers)
    k = 0 if per_layer == n else max_heads - per_layer * layers
    if extra_layers is None:
        chosen = np.floor((np.arange(k) + 0.5) * layers / k).astype(int) if k else []
    else:
        chosen = extra_layers(k)
    counts = [per_layer] * layers
    for i in chosen:
        counts[int(i)] += 1
    return counts


def baseline_groups(within: str, layers: int, n: int, max_heads: int, seed: int) -> list[tuple[int, ...]]:
    """The groupings of ``base``, ``mqa``, ``gqa`` or ``random`` (with ``seed``) within ``max_heads`` KV heads."""
    if within == "base":
        if max_heads < n * layers:
            raise KVShareError(
                f"method keeps all {n} KV heads per layer, which exceeds the budget: raise search.budget"
            )
        return [tuple(range(n))] * layers
    if within == "mqa":
        return [contiguous(n, 1)] * layers
    if within == "gqa":
        return [contiguous(n, k) for k in layer_counts(layers, n, max_heads)]
    rng = np.random.default_rng(seed)
    counts = layer_counts(layers, n, max_heads, lambda k: rng.choice(layers, k, replace=False))
    return [tuple(int(x) for x in row) for row in random_partitions(n, counts, rng)]


def find_groups(dists: list[np.ndarray], max_heads: int, s: DictConfig, settings: Settings) -> qcqa.SearchResult:
    """Groupings of the K/V-storing layers (``dists``, one matrix each) using at most ``max_heads`` KV heads."""
    layers, n = len(dists), dists[0].shape[0]
    if max_heads < layers:
        raise KVShareError(
            f"the budget allows {max_heads} KV heads for {layers} layers, and no grouping has fewer than one per "
            "layer: raise search.budget"
        )
    within = settings.method.within
    if within in ("qcqa-ac", "qcqa-ec"):
        options = {key: s[key] for key in ("solver", "stage2", "groups", "progress", "workers")}  # search.<key>
        nsga = {"nsga_settings": settings.nsga, "stage2_settings": settings.stage2_nsga}
        equal = within == "qcqa-ec" or bool(s.servable)  # servable: equal groups in every layer
        return qcqa.search(dists, max_heads, equal, **options, **nsga)
    groups = baseline_groups(within, layers, n, max_heads, settings.seed)
    errors = [wse(d, g) for d, g in zip(dists, groups, strict=True)]
    return qcqa.SearchResult(groups, errors, solver=within, evaluations=len(groups))


# --- the plan and its meta -------------------------------------------------------------------------------------


def plan_meta(
    cfg: DictConfig, settings: Settings, d: Distances, result: qcqa.SearchResult, search_seconds: float, run_id: str
) -> dict:
    """What the plan records about its search (the caller adds ``proxy_check`` and ``wall_seconds``)."""
    s = cfg.search
    weight_wse = [wse(w, g) for w, g in zip(d.of_producers(d.weight), result.groups, strict=True)]
    meta = {
        "budget": settings.budget,
        "model": cfg.model.name,
        "proxy": s.proxy,
        "wse_total": result.total_wse,
        "wse_per_layer": dict(zip(map(str, d.producers), result.layer_wse, strict=True)),
        "wse_weight_total": float(sum(weight_wse)),
        "solver": result.solver,
        "evaluations": result.evaluations,
        "search_seconds": search_seconds,
        "search_run_id": run_id,
    }
    if result.stage1 is not None and result.stage2 is not None:
        n = d.shape.num_kv_heads
        scale = [wse(x, [0] * n) for x in d.of_producers(d.searched)]
        hv = [layer_hypervolume(np.array(f.errors), sc) for f, sc in zip(result.fronts, scale, strict=True)]
        meta |= {
            "stage2": result.stage2.solver,
            "hypervolume": float(np.mean(hv)),
            "stage1_seconds": result.stage1.seconds,
            "stage2_seconds": result.stage2.seconds,
        }
        if result.solver == "nsga":
            meta["nsga"] = OmegaConf.to_container(s.nsga, resolve=True)
        if result.stage2.solver == "nsga":
            meta["stage2_nsga"] = OmegaConf.to_container(s.stage2_nsga, resolve=True)
    return meta


def check_proxies(cfg: DictConfig, d: Distances, candidates: int) -> tuple[dict, int]:
    """How well each proxy ranks random one-layer merges by measured KL to the base model (:mod:`kvshare.proxy`),
    and the merges' KV-head count."""
    from kvshare import proxy
    from kvshare.data import calibration_windows

    s, c = cfg.search, cfg.search.calibration
    n = d.shape.num_kv_heads
    n_groups = int(s.proxy_check.groups or max(1, n // 2))
    merges = proxy.random_candidates(len(d.producers), n, n_groups, candidates, s.random_seed)
    windows = calibration_windows(c.data_dir, s.proxy_check.tokens, c.seq_len, offset=c.tokens)
    calib = calibration_windows(c.data_dir, c.tokens, c.seq_len)
    ranked = proxy.rank_check(
        d.model,
        windows,
        {"weight": d.weight, "output": proxy.output_dists(d.model, calib, c.batch_size)},
        [(d.producers[i], g) for i, g in merges],
        c.batch_size,
    )
    return ranked, n_groups


def make_plan(s: DictConfig, d: Distances, result: qcqa.SearchResult, meta: dict) -> Plan:
    """Every layer's grouping: its K/V producer's."""
    by_producer = dict(zip(d.producers, result.groups, strict=True))
    groups = tuple(by_producer[d.pattern[i]] for i in range(d.shape.num_layers))
    return Plan(d.shape, groups, tuple(d.pattern), s.method, s.cla_init, meta)


# --- MLflow ----------------------------------------------------------------------------------------------------


def plot_fronts(result: qcqa.SearchResult, dists: list[np.ndarray], out_dir: Path) -> list[Path]:
    """``fronts.png``: every layer's front on one axes (WSE relative to merging the whole layer, coloured by
    depth, the plan's point marked), and the model's front beside GQA's. One axes for all layers, not a panel
    each: 30 panels took half of a QCQA job's wall time on SmolLM2 (``fronts.json`` has the numbers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    _layer_fronts(left, plt.get_cmap("viridis"), result, dists)
    _global_front(right, result, dists)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.92, wspace=0.25)
    path = out_dir / "fronts.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _layer_fronts(ax, cmap, result: qcqa.SearchResult, dists: list[np.ndarray]) -> None:
    n, layers = dists[0].shape[0], len(dists)
    for i, (front, groups) in enumerate(zip(result.fronts, result.groups, strict=True)):
        d, whole = front.to_dict(), max(wse(dists[i], [0] * n), 1e-300)
        colour = cmap(i / max(layers - 1, 1))
        ax.plot(np.array(d["n_kv"]) / n, np.array(d["wse"]) / whole, "-", lw=0.8, color=colour, alpha=0.7)
        ax.plot([(max(groups) + 1) / n], [wse(dists[i], groups) / whole], "o", ms=4, color=colour)
    ax.set_xlabel("KV fraction of the layer")
    ax.set_ylabel("WSE / WSE of one group")
    ax.set_title(f"{layers} layers' fronts (dark: first); dots: the plan", fontsize=9)


def _global_front(ax, result: qcqa.SearchResult, dists: list[np.ndarray]) -> None:
    n = dists[0].shape[0]
    heads, errors = result.stage2.global_front
    total = len(dists) * n
    ax.plot(np.array(heads) / total, errors, ".-", ms=3, label="QCQA front")
    gqa = [(k / n, sum(wse(d, contiguous(n, k)) for d in dists)) for k in range(1, n + 1) if n % k == 0]
    ax.plot(*zip(*gqa, strict=True), "s--", ms=4, label="GQA (contiguous)")
    ax.plot([sum(max(g) + 1 for g in result.groups) / total], [result.total_wse], "r*", ms=10, label="plan")
    ax.set_xlabel("KV fraction")
    ax.set_ylabel("total WSE")
    ax.legend(fontsize=8)


def log_run(mlrun, plan: Plan, out: str, result: qcqa.SearchResult, dists: list[np.ndarray], ranked) -> None:
    """Metrics, the plan, and (QCQA) the fronts as JSON and plots, (proxy check) its candidates."""
    _log_metrics(mlrun, plan, result)
    mlrun.log_artifact(out)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if result.stage1 is not None and result.stage2 is not None:
            fronts = {
                "layers": [f.to_dict() for f in result.fronts],
                "global_front": result.stage2.global_front._asdict(),
            }
            (tmp / "fronts.json").write_text(json.dumps(fronts) + "\n")
            for path in [tmp / "fronts.json", *plot_fronts(result, dists, tmp)]:
                mlrun.log_artifact(path)
        if ranked is not None:
            (tmp / "proxy_check.json").write_text(json.dumps(ranked, indent=1) + "\n")
            mlrun.log_artifact(tmp / "proxy_check.json")


def _log_metrics(mlrun, plan: Plan, result: qcqa.SearchResult) -> None:
    meta = plan.meta
    if result.stage1 is not None and result.stage1.hv_history is not None:
        for gen, row in enumerate(result.stage1.hv_history):  # mean and worst layer hypervolume per generation
            mlrun.log_metrics({"hypervolume": float(row.mean()), "hypervolume_min": float(row.min())}, step=gen)
    metrics = {
        "kv_fraction": plan.kv_fraction,
        "kv_bytes_per_token": plan.kv_bytes_per_token(2),
        "deployable_kv_bytes_per_token": deployable_kv_bytes_per_token(plan, 2),
        "wse_total": meta["wse_total"],
        "wse_weight_total": meta["wse_weight_total"],
        "grouped_layers": sum(plan.is_grouped(i) for i in range(plan.shape.num_layers)),
        "evaluations": meta["evaluations"],
        "search_seconds": meta["search_seconds"],
        "wall_seconds": meta["wall_seconds"],
    }
    for key in ("hypervolume", "stage1_seconds", "stage2_seconds"):
        if key in meta:  # the stepped "hypervolume" is the history; this is the final fronts'
            metrics[key + "_final" if key == "hypervolume" else key] = meta[key]
    for key, value in meta.get("proxy_check", {}).items():
        if key.startswith("rho"):
            metrics[f"proxy_{key}"] = value
    mlrun.log_metrics(metrics)


# --- the stage -------------------------------------------------------------------------------------------------


def run(cfg: DictConfig) -> dict:
    """Settings → distances → groups → the plan and its meta → plan file and MLflow."""
    s = cfg.search
    settings = check_settings(s)
    with stage_run(cfg, "search", {"model": cfg.model.name, "method": s.method, "budget": settings.budget}) as mlrun:
        t0 = time.perf_counter()
        d = read_distances(cfg, settings)
        max_heads = int(np.floor(settings.budget * d.shape.num_layers * d.shape.num_kv_heads + 1e-9))
        t_search = time.perf_counter()
        result = find_groups(d.of_producers(d.searched), max_heads, s, settings)
        meta = plan_meta(cfg, settings, d, result, time.perf_counter() - t_search, mlrun.run_id)
        ranked = None
        if settings.check:
            ranked, n_groups = check_proxies(cfg, d, settings.check)
            meta["proxy_check"] = {k: v for k, v in ranked.items() if k != "candidates"} | {"groups": n_groups}
        plan = make_plan(s, d, result, meta)
        if s.servable:
            check_servable(plan)
        meta["servable"] = Layout.of_plan(plan).form() is not None
        meta["wall_seconds"] = time.perf_counter() - t0
        plan.save(s.out)
        log_run(mlrun, plan, s.out, result, d.of_producers(d.searched), ranked)
    return plan.to_dict()


main = entry("search", run)

if __name__ == "__main__":
    main()
