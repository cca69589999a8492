"""Stage ``pareto``: evaluation runs read back from MLflow → one table, Pareto fronts and plots.

    python -m kvshare.pareto 'pareto.metrics=[a.json,b.json]' pareto.out_dir=results/smoke

The metrics files written by evaluate name their MLflow runs; this stage reads
those runs' metrics and tags from the tracking store (so the table is what
MLflow holds), marks which variants are Pareto-optimal in quality against KV
bytes per token (``pareto.x``: the plan's nominal bytes, or the deployable bytes a
standard engine caches to serve it, :mod:`kvshare.serving`; the table has both) (separately for converted and fine-tuned models), and writes
``pareto.csv``, ``pareto.md``, ``pareto_perplexity.png`` and
``pareto_accuracy.png`` (zero-shot average), and ``comparisons.md`` (the
papers' comparisons, see :mod:`kvshare.comparisons`), all also logged
as artifacts of a ``pareto`` run.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from kvshare.cli import entry
from kvshare.errors import KVShareError
from kvshare.io import atomic_path, atomic_write_text
from kvshare.methods import SEED
from kvshare.tracking import runs_frame, stage_run, tracking_uri

COLUMNS = {
    "tags.kvshare.model": "model",
    "tags.kvshare.method": "method",
    "tags.kvshare.budget": "budget",
    "tags.kvshare.variant": "variant",
    "metrics.kv_fraction": "kv_fraction",
    "metrics.kv_bytes_per_token": "kv_bytes_per_token",
    "metrics.deployable_kv_bytes_per_token": "deployable_kv_bytes_per_token",
    "metrics.servable": "servable",
    "metrics.perplexity": "perplexity",
    "metrics.kl_to_base": "kl_to_base",
    "metrics.top1_agreement": "top1_agreement",
    "metrics.wse_total": "wse_total",
    "metrics.zeroshot_avg": "zeroshot_avg",
    "run_id": "evaluate_run_id",
}


XLABEL = {"kv_bytes_per_token": "nominal", "deployable_kv_bytes_per_token": "deployable"}


def read_runs(uri: str, run_ids: list[str]):
    quoted = ", ".join(f"'{r}'" for r in run_ids)
    df = runs_frame(uri, f"attributes.run_id IN ({quoted})")
    missing = set(run_ids) - set(df.get("run_id", []))
    if missing:
        raise KVShareError(
            f"evaluation runs {sorted(missing)} are not in the MLflow store {uri}: point at the store the evaluate jobs used"
        )
    extra = sorted(c for c in df.columns if c.startswith("metrics.acc_") and "_stderr_" not in c)
    cols = {**COLUMNS, **{c: c.removeprefix("metrics.") for c in extra}}
    return df.reindex(columns=list(cols)).rename(columns=cols)


def plot(df, quality: str, path: Path, log_y: bool, x: str = "kv_bytes_per_token") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted(df.variant.unique())
    fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 4.5), squeeze=False, sharey=True)
    if df[quality].isna().all():  # e.g. a study run without zero-shot tasks: say so rather than fail
        for ax in axes[0]:
            ax.text(0.5, 0.5, f"no {quality.replace('_', ' ')} measured in this study", ha="center", va="center")
            ax.set_axis_off()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120)
        plt.close(fig)
        return
    # One colour per method in every panel; a seeded baseline's seeds share it ("random-s1" -> "random").
    labels = df.method.str.extract(SEED)["name"].fillna(df.method)
    names = sorted(labels.unique())
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colours = {m: cmap(i % cmap.N) for i, m in enumerate(names)}
    for ax, variant in zip(axes[0], variants, strict=True):
        part = df[df.variant == variant]
        for method, pts in part.groupby(labels[part.index]):
            ax.scatter(pts[x], pts[quality], color=colours[method], s=40)
        front = part[part[f"front_{quality}"]].sort_values(x)
        ax.step(front[x], front[quality], where="post", color="k", lw=1, alpha=0.6)
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(f"{XLABEL[x]} KV-cache bytes per token (16-bit)")
        ax.set_title(f"{variant}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(quality.replace("_", " "))
    handles = [plt.Line2D([], [], ls="", marker="o", color=c, label=m) for m, c in colours.items()]
    handles.append(plt.Line2D([], [], color="k", alpha=0.6, label="Pareto front"))
    axes[0][-1].legend(handles=handles, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def run(cfg: DictConfig) -> dict:
    p = cfg.pareto
    files = list(p.metrics)
    if not files:
        raise KVShareError("pareto.metrics is empty: give the evaluate stage's JSON files")
    if p.x not in XLABEL:
        raise KVShareError(f"pareto.x={p.x!r} is not known; use one of {', '.join(XLABEL)}")
    from kvshare.comparisons import report
    from kvshare.fronts import front_table

    run_ids = [json.loads(Path(f).read_text())["runs"]["evaluate"] for f in files]
    out = Path(p.out_dir)
    with stage_run(cfg, "pareto") as mlrun:
        df = read_runs(tracking_uri(cfg), run_ids)
        df = df.sort_values(["model", "variant", "kv_bytes_per_token", "method"]).reset_index(drop=True)
        df["front_perplexity"] = front_table(df, p.x, "perplexity", False, "variant")
        df["front_kl_to_base"] = front_table(df, p.x, "kl_to_base", False, "variant")
        df["front_zeroshot_avg"] = front_table(df, p.x, "zeroshot_avg", True, "variant")
        with atomic_path(out / "pareto.csv") as tmp:
            df.to_csv(tmp, index=False)
        atomic_write_text(out / "pareto.md", df.to_markdown(index=False, floatfmt=".4g") + "\n")
        atomic_write_text(out / "comparisons.md", report(df))
        plot(df, "perplexity", out / "pareto_perplexity.png", log_y=True, x=p.x)
        plot(df, "zeroshot_avg", out / "pareto_accuracy.png", log_y=False, x=p.x)
        for name in ("pareto.csv", "pareto.md", "comparisons.md", "pareto_perplexity.png", "pareto_accuracy.png"):
            mlrun.log_artifact(out / name)
        mlrun.log_metrics({"variants": len(df), "on_front": int(df.front_perplexity.sum())})
        mlrun.set_tags({"kvshare.input_runs": ",".join(run_ids), "kvshare.model": ",".join(sorted(set(df.model)))})
    return {"rows": len(df)}


main = entry("pareto", run)

if __name__ == "__main__":
    main()
