"""Scratch (session 9): kvshare.decode_attention's chunk kernel with K/V read by TMA descriptors against cp.async, side by side."""

import json
import os
import sys

sys.path.insert(0, "benchmarks")
import decode_kernels_bench as dkb
import machine
import torch

import kvshare.decode_attention as da

out = os.environ.get("OUT", "tma_out")
dev = torch.device("cuda")
res = {"machine": machine.environment(dev, ("triton",)), "command": " ".join(sys.argv), "cells": [], "checks": []}
# equality: TMA against cp.async, positions past pos filled with NaN
for batch, n_kv, pos in ((1, 16, 2110), (32, 1, 2110), (32, 1, 700), (4, 8, 63)):
    caches, query, key, value, cos, sin, rows, _ = dkb.attention_inputs(dev, batch, n_kv, 1)
    k, v = caches[0]
    k[:, :, pos + 1 :] = v[:, :, pos + 1 :] = float("nan")
    p = torch.tensor([pos], device=dev)
    outs = {}
    for tma in (False, True):
        da.TMA = tma
        kk, vv = k.clone(), v.clone()
        outs[tma] = (da.attention(query, kk, vv, p, rows, 0.088, cos, sin, key, value), kk, vv)
    da.TMA = False
    rec = {
        "batch": batch,
        "n_kv": n_kv,
        "pos": pos,
        "nan_out": bool(outs[True][0].isnan().any()),
        "max_diff": (outs[True][0].float() - outs[False][0].float()).abs().max().item(),
        "equal": torch.equal(outs[True][0], outs[False][0]),
        "cache_equal": torch.equal(outs[True][1][:, :, : pos + 1], outs[False][1][:, :, : pos + 1]),
    }
    print("check", rec, flush=True)
    res["checks"].append(rec)
cells = [(1, 16), (32, 16), (32, 1), (1, 1)]
for rnd in range(3):
    for batch, n_kv in cells:
        for per_sm in (2, 3):
            for tma in (False, True):
                if per_sm == 3 and not tma and (batch, n_kv) != (32, 1):
                    continue
                da.TMA = tma
                try:
                    rec = dkb.time_splits(dev, batch, n_kv, {"programs_per_sm": per_sm})
                finally:
                    da.TMA = False
                rec |= {"tma": tma, "round": rnd}
                print(
                    "attention", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}, flush=True
                )
                res["cells"].append(rec)
os.makedirs(out, exist_ok=True)
json.dump(res, open(f"{out}/tma_ab.json", "w"), indent=1)
