"""The papers' comparisons, read off the Pareto table.

- QCQA minus GQA quality at matched KV bytes (QCQA's headline);
- the KV saving of QCQA at GQA's quality: the fewest bytes a QCQA variant needs
  to match or beat each GQA point;
- CLA against within-layer sharing at equal bytes (CLA's headline: MQA-CLA2 vs
  a smaller MQA/GQA);
- how well WSE ranks variants as measured quality does (Spearman correlation);
- models pretrained from scratch in each layout, in the form of CLA's Table 1,
  beside the paper's numbers.

Each comparison is made separately per model and variant (converted / fine-tuned
/ pretrained). Methods spelled ``<name>-s<seed>`` (the random baseline's seeds)
enter the comparisons as the mean over seeds, with their standard deviation.
"""

from __future__ import annotations

import pandas as pd

from kvshare.methods import SEED, family

# Quality columns and whether higher is better.
QUALITY = {"zeroshot_avg": True, "perplexity": False, "kl_to_base": False}

# CLA (Brandon et al., arXiv 2405.12981) Table 1, 1B scale, 20 layers, 16 heads of 128: KV bytes per token
# (16-bit) and validation perplexity, keyed by the layout name kvshare's pretrain stage uses.
CLA_TABLE1 = {
    "mha": ("H128-MHA", 163840, 13.15),
    "gqa4": ("H128-GQA4", 40960, 13.36),
    "gqa2": ("H128-GQA2", 20480, 13.52),
    "mqa": ("H128-MQA", 10240, 13.54),
    "mqa+cla2": ("H128-MQA-CLA2", 5120, 13.60),
    "mqa+cla3": ("H128-MQA-CLA3", 3584, 13.77),
}


def seed_means(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``<name>-s<seed>`` methods replaced by one row per name and KV size: the mean over seeds, with
    ``<quality>_sd``, ``seeds`` and ``seeded``; other rows keep ``seeds`` = 1."""
    names = df.method.str.extract(SEED)["name"]
    single = df[names.isna()].assign(seeds=1)
    seeded = df[names.notna()].assign(method=names[names.notna()])
    if seeded.empty:
        return single.assign(seeded=False)
    keys = ["model", "variant", "method", "kv_bytes_per_token"]
    quality = [q for q in QUALITY if q in df]
    grouped = seeded.groupby(keys)
    means = grouped[[*quality, *(c for c in ("wse_total", "kv_fraction") if c in df)]].mean()
    sds = grouped[quality].std().add_suffix("_sd")
    agg = pd.concat([means, sds, grouped.size().rename("seeds")], axis=1).reset_index().assign(seeded=True)
    return pd.concat([single.assign(seeded=False), agg], ignore_index=True)


def matched(df: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Rows of family ``a`` and ``b`` at equal KV bytes, side by side with quality differences (a - b)."""
    fam = df.method.map(family)
    keys = ["model", "variant", "kv_bytes_per_token"]
    left, right = df[fam == a], df[fam == b]
    cols = keys + ["method", *[q for q in QUALITY if q in df], *(["seeds"] if "seeds" in df else [])]
    out = left[cols].merge(right[cols], on=keys, suffixes=(f"_{a}", f"_{b}"))
    for q in QUALITY:
        if f"{q}_{a}" in out:
            out[f"{q}_diff"] = out[f"{q}_{a}"] - out[f"{q}_{b}"]
    return out


def kv_saving_at_quality(df: pd.DataFrame, quality: str = "zeroshot_avg") -> pd.DataFrame:
    """For each GQA point, the fewest KV bytes of a QCQA point at least as good, and the saving."""
    higher = QUALITY[quality]
    rows = []
    fam = df.method.map(family)
    for (model, variant), part in df.groupby(["model", "variant"]):
        qcqa = part[fam[part.index] == "qcqa"]
        if qcqa.empty:
            continue
        for _, g in part[fam[part.index] == "gqa"].iterrows():
            good = qcqa[qcqa[quality] >= g[quality]] if higher else qcqa[qcqa[quality] <= g[quality]]
            best = good.kv_bytes_per_token.min() if len(good) else float("nan")
            rows.append(
                {
                    "model": model,
                    "variant": variant,
                    "gqa_method": g.method,
                    "gqa_bytes": g.kv_bytes_per_token,
                    f"gqa_{quality}": g[quality],
                    "qcqa_bytes_at_least_as_good": best,
                    "kv_saving": 1 - best / g.kv_bytes_per_token,
                }
            )
    return pd.DataFrame(rows)


def wse_rank_correlation(df: pd.DataFrame) -> pd.DataFrame:
    """Spearman correlation of total WSE with each quality measure, over variants with a within-layer grouping."""
    rows = []
    for (model, variant), part in df[df.wse_total > 0].groupby(["model", "variant"]):
        for q in QUALITY:
            if q in part and part[q].notna().sum() >= 3:
                rho = part.wse_total.rank().corr(part[q].rank())
                rows.append({"model": model, "variant": variant, "quality": q, "spearman": rho, "n": len(part)})
    return pd.DataFrame(rows)


def seed_table(means: pd.DataFrame) -> pd.DataFrame:
    """The seeded baselines' rows of :func:`seed_means`, with their quality means and standard deviations."""
    quality = [c for q in QUALITY for c in (q, f"{q}_sd") if c in means]
    cols = ["model", "variant", "method", "kv_bytes_per_token", "seeds", *quality]
    return means[means.seeded].reindex(columns=cols)


def cla_table1(df: pd.DataFrame) -> pd.DataFrame:
    """Models pretrained from scratch: KV bytes and perplexity, each relative to the MHA model's, beside CLA's
    Table 1 rows of the same layout name. The MHA model's perplexity is its own evaluation, or else that of
    its identity conversion (method ``base``), which has the same weights."""
    rows = []
    for model, part in df[df.variant == "pretrained"].groupby("model"):
        mha = part[part.method == "mha"].perplexity
        if mha.empty:
            mha = df[(df.model == model) & (df.method == "base") & (df.variant == "converted")].perplexity
        paper_mha = CLA_TABLE1["mha"]
        for _, r in part.sort_values("kv_bytes_per_token", ascending=False).iterrows():
            name, paper_bytes, paper_ppl = CLA_TABLE1.get(r.method, ("", float("nan"), float("nan")))
            rows.append(
                {
                    "model": model,
                    "layout": r.method,
                    "kv_bytes_per_token": r.kv_bytes_per_token,
                    "kv_fraction": r.kv_fraction,
                    "perplexity": r.perplexity,
                    "ppl_vs_mha": r.perplexity / mha.iloc[0] if len(mha) else float("nan"),
                    "paper_row": name,
                    "paper_kv_fraction": paper_bytes / paper_mha[1],
                    "paper_perplexity": paper_ppl,
                    "paper_ppl_vs_mha": paper_ppl / paper_mha[2],
                }
            )
    return pd.DataFrame(rows)


def report(df: pd.DataFrame) -> str:
    """All comparisons as one Markdown document."""
    means = seed_means(df)
    sections = [
        ("QCQA minus GQA at equal KV bytes", matched(means, "qcqa", "gqa")),
        ("QCQA minus random grouping (mean over seeds) at equal KV bytes", matched(means, "qcqa", "random")),
        ("GQA minus random grouping (mean over seeds) at equal KV bytes", matched(means, "gqa", "random")),
        ("KV saving of QCQA at GQA's zero-shot average", kv_saving_at_quality(means)),
        ("KV saving of QCQA at GQA's perplexity", kv_saving_at_quality(means, "perplexity")),
        ("CLA-only against MQA at equal KV bytes", matched(means, "cla", "mqa")),
        ("CLA-only against GQA at equal KV bytes", matched(means, "cla", "gqa")),
        ("Pretrained from scratch, in the form of CLA's Table 1 (paper: 1B, 20 layers, H128)", cla_table1(df)),
        ("Random grouping: mean and standard deviation over seeds", seed_table(means)),
        ("Rank correlation of WSE with measured quality (every seed a variant)", wse_rank_correlation(df)),
    ]
    parts = []
    for title, table in sections:
        body = table.to_markdown(index=False, floatfmt=".4g") if len(table) else "No matching variants in this study."
        parts.append(f"## {title}\n\n{body}\n")
    return "\n".join(parts)
