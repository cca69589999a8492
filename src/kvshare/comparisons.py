"""The papers' comparisons, read off the Pareto table.

- QCQA minus GQA quality at matched KV bytes (QCQA's headline);
- the KV saving of QCQA at GQA's quality: the fewest bytes a QCQA variant needs
  to match or beat each GQA point;
- CLA against within-layer sharing at equal bytes (CLA's headline: MQA-CLA2 vs
  a smaller MQA/GQA);
- how well WSE ranks variants as measured quality does (Spearman correlation).

Each comparison is made separately per model and variant (converted / fine-tuned).
"""

from __future__ import annotations

import pandas as pd

# Quality columns and whether higher is better.
QUALITY = {"zeroshot_avg": True, "perplexity": False, "kl_to_base": False}


def _family(method: str) -> str:
    within = [p for p in method.split("+") if not p.startswith("cla")]
    return within[0].split("-")[0] if within else "cla"


def matched(df: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Rows of family ``a`` and ``b`` at equal KV bytes, side by side with quality differences (a - b)."""
    fam = df.method.map(_family)
    keys = ["model", "variant", "kv_bytes_per_token"]
    left, right = df[fam == a], df[fam == b]
    cols = keys + ["method", *[q for q in QUALITY if q in df]]
    out = left[cols].merge(right[cols], on=keys, suffixes=(f"_{a}", f"_{b}"))
    for q in QUALITY:
        if f"{q}_{a}" in out:
            out[f"{q}_diff"] = out[f"{q}_{a}"] - out[f"{q}_{b}"]
    return out


def kv_saving_at_quality(df: pd.DataFrame, quality: str = "zeroshot_avg") -> pd.DataFrame:
    """For each GQA point, the fewest KV bytes of a QCQA point at least as good, and the saving."""
    higher = QUALITY[quality]
    rows = []
    fam = df.method.map(_family)
    for (model, variant), part in df.groupby(["model", "variant"]):
        qcqa = part[fam[part.index] == "qcqa"]
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


def report(df: pd.DataFrame) -> str:
    """All comparisons as one Markdown document."""
    sections = [
        ("QCQA minus GQA at equal KV bytes", matched(df, "qcqa", "gqa")),
        ("KV saving of QCQA at GQA's zero-shot average", kv_saving_at_quality(df)),
        ("CLA-only against MQA at equal KV bytes", matched(df, "cla", "mqa")),
        ("CLA-only against GQA at equal KV bytes", matched(df, "cla", "gqa")),
        ("Rank correlation of WSE with measured quality", wse_rank_correlation(df)),
    ]
    parts = []
    for title, table in sections:
        body = table.to_markdown(index=False, floatfmt=".4g") if len(table) else "No matching variants in this study."
        parts.append(f"## {title}\n\n{body}\n")
    return "\n".join(parts)
