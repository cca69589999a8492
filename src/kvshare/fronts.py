"""Pareto fronts of quality against KV-cache size."""

from __future__ import annotations

import numpy as np
import pandas as pd


def pareto_mask(cost: np.ndarray, quality: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """True where no other point has cost <= and quality >= (better-or-equal) with at least one strictly better."""
    q = np.asarray(quality, float) if higher_is_better else -np.asarray(quality, float)
    c = np.asarray(cost, float)
    keep = np.ones(len(c), bool)
    for i in range(len(c)):
        dominated = (c <= c[i]) & (q >= q[i]) & ((c < c[i]) | (q > q[i]))
        keep[i] = not dominated.any() and not np.isnan(q[i])
    return keep


def front_table(df: pd.DataFrame, cost: str, quality: str, higher_is_better: bool, by: str) -> pd.Series:
    """Per group ``by`` (e.g. converted vs fine-tuned), whether each row is on that group's front."""
    out = pd.Series(False, index=df.index)
    for _, part in df.groupby(by):
        out[part.index] = pareto_mask(part[cost].to_numpy(), part[quality].to_numpy(), higher_is_better)
    return out
