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
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from kvshare import qcqa
from kvshare.checkpoint import Tensors, read_config
from kvshare.cli import entry
from kvshare.errors import KVShareError
from kvshare.families import check_family
from kvshare.methods import parse_method
from kvshare.nsga import NSGASettings, layer_hypervolume
from kvshare.plan import ModelShape, Plan, cla_pattern
from kvshare.tracking import stage_run
from kvshare.wse import checkpoint_head_vectors, pairwise_sq_dists, wse

PROXIES = ("weight", "output")


def contiguous(n: int, k: int) -> tuple[int, ...]:
    """``n`` heads in ``k`` contiguous groups of sizes differing by at most one."""
    return tuple(int(g) for g, part in enumerate(np.array_split(np.arange(n), k)) for _ in part)


def random_partition(n: int, k: int, rng: np.random.Generator) -> tuple[int, ...]:
    labels = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
    return tuple(int(x) for x in labels[rng.permutation(n)])


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


def nsga_settings(node, name: str = "search.nsga") -> NSGASettings:
    d = OmegaConf.to_container(node, resolve=True)
    return NSGASettings(**{k: v for k, v in d.items() if k in NSGASettings.__dataclass_fields__}, name=name)


def find_groups(
    within: str, dists: list[np.ndarray], max_heads: int, n: int, s: DictConfig, settings: tuple, seed: int
) -> qcqa.SearchResult:
    """Groupings of the K/V-storing layers using at most ``max_heads`` KV heads in all.

    ``settings``: the NSGA-II settings of stage 1 and stage 2; ``seed``: the random baseline's.
    """
    layers = len(dists)
    if max_heads < layers:
        raise KVShareError(
            f"the budget allows {max_heads} KV heads for {layers} layers, and no grouping has fewer than one per "
            "layer: raise search.budget"
        )
    if within in ("qcqa-ac", "qcqa-ec"):
        return qcqa.search(
            dists,
            max_heads,
            equal_sizes=within == "qcqa-ec",
            solver=s.solver,
            stage2=s.stage2,
            groups=s.groups,
            nsga_settings=settings[0],
            stage2_settings=settings[1],
            progress=s.progress,
            workers=s.workers,
        )
    if within == "base":
        if max_heads < n * layers:
            raise KVShareError(
                f"method keeps all {n} KV heads per layer, which exceeds the budget: raise search.budget"
            )
        groups = [tuple(range(n))] * layers
    elif within == "mqa":
        groups = [contiguous(n, 1)] * layers
    elif within == "gqa":
        groups = [contiguous(n, k) for k in layer_counts(layers, n, max_heads)]
    else:
        rng = np.random.default_rng(seed)
        counts = layer_counts(layers, n, max_heads, lambda k: rng.choice(layers, k, replace=False))
        groups = [random_partition(n, k, rng) for k in counts]
    errors = [wse(d, g) for d, g in zip(dists, groups, strict=True)]
    return qcqa.SearchResult(groups, errors, [], {"solver": within, "evaluations": len(groups)})


def plot_fronts(result: qcqa.SearchResult, dists: list[np.ndarray], out_dir: Path) -> list[Path]:
    """Per-layer fronts (one panel each) and the global front, WSE against KV fraction, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = dists[0].shape[0]
    cols = int(np.ceil(np.sqrt(len(result.fronts))))
    rows = int(np.ceil(len(result.fronts) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.8 * rows), squeeze=False, sharex=True)
    for ax, (i, front), groups in zip(axes.flat, enumerate(result.fronts), result.groups, strict=False):
        d = front.to_dict()
        ax.plot(np.array(d["n_kv"]) / n, d["wse"], ".-", ms=3, lw=0.8)
        ax.plot([(max(groups) + 1) / n], [wse(dists[i], groups)], "r*", ms=7)
        ax.set_title(f"layer {i}", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(result.fronts) :]:
        ax.axis("off")
    fig.supxlabel("KV fraction of the layer")
    fig.supylabel("WSE")
    fig.tight_layout()
    paths = [out_dir / "layer_fronts.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    heads, errors = result.info["global_front"]
    total = len(dists) * n
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(np.array(heads) / total, errors, ".-", ms=3, label="QCQA front")
    gqa = [(k / n, sum(wse(d, contiguous(n, k)) for d in dists)) for k in range(1, n + 1) if n % k == 0]
    ax.plot(*zip(*gqa, strict=True), "s--", ms=4, label="GQA (contiguous)")
    ax.plot([sum(max(g) + 1 for g in result.groups) / total], [result.total_wse], "r*", ms=10, label="plan")
    ax.set_xlabel("KV fraction")
    ax.set_ylabel("total WSE")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "global_front.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def run(cfg: DictConfig) -> dict:
    s = cfg.search
    method = parse_method(s.method)
    within, cla, seed = method.within, method.cla, method.seed
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
    settings = nsga_settings(s.nsga), nsga_settings(s.stage2_nsga, "search.stage2_nsga")
    check = int(s.proxy_check.candidates or 0)
    if (s.proxy == "output" or check) and not s.calibration.data_dir:
        raise KVShareError(
            "search.proxy=output and search.proxy_check need calibration tokens: set search.calibration.data_dir "
            "to a folder written by the tokenize stage (kvshare.tokens)"
        )
    tags = {"model": cfg.model.name, "method": s.method, "budget": budget}
    with stage_run(cfg, "search", tags) as mlrun:
        t0 = time.perf_counter()
        config = read_config(s.model_dir)
        check_family(config, f"search.model_dir={s.model_dir}")
        shape = ModelShape.of(config)
        pattern = cla_pattern(shape.num_layers, list(s.cla_layers) if s.cla_layers is not None else cla)
        producers = sorted(set(pattern))
        # The weight proxy reads only the K/V projections, a layer at a time; the output proxy runs the model.
        vectors = checkpoint_head_vectors(Tensors(s.model_dir), shape.num_layers, shape.head_dim)
        weight_dists = [pairwise_sq_dists(v) for v in vectors]
        c = s.calibration
        dists = weight_dists
        model = None
        if s.proxy == "output" or check:
            from kvshare import proxy
            from kvshare.checkpoint import load_model
            from kvshare.data import calibration_windows
            from kvshare.devices import resolve_device

            model, _ = load_model(s.model_dir, resolve_device(cfg.device), "float32")
        if s.proxy == "output":
            windows = calibration_windows(c.data_dir, c.tokens, c.seq_len)
            dists = proxy.output_dists(model, windows, c.batch_size)
        max_heads = int(np.floor(budget * shape.num_layers * shape.num_kv_heads + 1e-9))
        t_search = time.perf_counter()
        result = find_groups(
            within,
            [dists[j] for j in producers],
            max_heads,
            shape.num_kv_heads,
            s,
            settings,
            s.random_seed if seed is None else seed,
        )
        search_seconds = time.perf_counter() - t_search
        by_producer = dict(zip(producers, result.groups, strict=True))
        info = result.info
        meta = {
            "budget": budget,
            "model": cfg.model.name,
            "proxy": s.proxy,
            "wse_total": result.total_wse,
            "wse_per_layer": dict(zip(map(str, producers), result.layer_wse, strict=True)),
            "wse_weight_total": float(sum(wse(weight_dists[j], by_producer[j]) for j in producers)),
            "solver": info["solver"],
            "evaluations": int(info.get("evaluations", 0)) + int(info.get("stage2_evaluations", 0)),
            "search_seconds": search_seconds,
            "search_run_id": mlrun.run_id,
        }
        if result.fronts:
            n = shape.num_kv_heads
            scale = [wse(d, [0] * n) for d in (dists[j] for j in producers)]
            hv = [layer_hypervolume(np.array(f.errors), sc) for f, sc in zip(result.fronts, scale, strict=True)]
            meta |= {
                "stage2": info["stage2"],
                "hypervolume": float(np.mean(hv)),
                "stage1_seconds": info["stage1_seconds"],
                "stage2_seconds": info["stage2_seconds"],
            }
            if info["solver"] == "nsga":
                meta["nsga"] = OmegaConf.to_container(s.nsga, resolve=True)
            if info["stage2"] == "nsga":
                meta["stage2_nsga"] = OmegaConf.to_container(s.stage2_nsga, resolve=True)
        if check:
            n_groups = s.proxy_check.groups or max(1, shape.num_kv_heads // 2)
            candidates = proxy.random_candidates(
                len(producers), shape.num_kv_heads, int(n_groups), check, s.random_seed
            )
            windows = calibration_windows(c.data_dir, s.proxy_check.tokens, c.seq_len, offset=c.tokens)
            calib = calibration_windows(c.data_dir, c.tokens, c.seq_len)
            ranked = proxy.rank_check(
                model,
                windows,
                {"weight": weight_dists, "output": proxy.output_dists(model, calib, c.batch_size)},
                [(producers[i], g) for i, g in candidates],
                c.batch_size,
            )
            meta["proxy_check"] = {k: v for k, v in ranked.items() if k != "candidates"} | {"groups": int(n_groups)}
        plan = Plan(
            shape,
            tuple(by_producer[pattern[i]] for i in range(shape.num_layers)),
            tuple(pattern),
            s.method,
            s.cla_init,
            meta,
        )
        meta["wall_seconds"] = time.perf_counter() - t0
        plan.save(s.out)
        _log(mlrun, plan, s.out, result, [dists[j] for j in producers], ranked if check else None)
    return plan.to_dict()


def _log(mlrun, plan: Plan, out: str, result: qcqa.SearchResult, dists: list[np.ndarray], ranked) -> None:
    meta, info = plan.meta, result.info
    if "hv_history" in info:  # stage 1 NSGA-II: mean and worst layer hypervolume after each generation
        for gen, row in enumerate(info["hv_history"]):
            mlrun.log_metrics({"hypervolume": float(row.mean()), "hypervolume_min": float(row.min())}, step=gen)
    metrics = {
        "kv_fraction": plan.kv_fraction,
        "kv_bytes_per_token": plan.kv_bytes_per_token(2),
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
    mlrun.log_artifact(out)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if result.fronts:
            fronts = {
                "layers": [f.to_dict() for f in result.fronts],
                "global_front": dict(zip(("kv_heads", "wse"), info["global_front"], strict=True)),
            }
            (tmp / "fronts.json").write_text(json.dumps(fronts) + "\n")
            for path in [tmp / "fronts.json", *plot_fronts(result, dists, tmp)]:
                mlrun.log_artifact(path)
        if ranked is not None:
            (tmp / "proxy_check.json").write_text(json.dumps(ranked, indent=1) + "\n")
            mlrun.log_artifact(tmp / "proxy_check.json")


main = entry("search", run)

if __name__ == "__main__":
    main()
