"""kvshare.decode_attention in three regimes of the 7B shape, for Nsight Compute to read its counters (issue 15).

The kernels bench times the attention; this says why a regime is slow: each regime (MQA at batch 32, the one
that misses its floor; GQA-16 at batch 1; GQA-16 at batch 32, which reads its cache at the copy rate) calls the
op as a decode step does (query rotated inside, the new entry written) on a full context, three times, so the
last call of each is warm:

    ncu --clock-control none --kernel-name regex:'_partial_kernel|_combine_kernel' --section SpeedOfLight \\
        --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \\
        python benchmarks/decode_attention_ncu.py > ncu.txt        # PYTHONPATH=src, on a GPU
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_kernels_bench import attention_inputs  # noqa: E402

from kvshare.decode_attention import attention  # noqa: E402

REGIMES = {"mqa-b32": (32, 1), "gqa-b1": (1, 16), "gqa-b32": (32, 16)}  # batch, KV heads (32 query heads)


def run(batch: int, n_kv: int, calls: int = 3) -> None:
    [(keys, values)], query, key, value, cos, sin, rows, pos = attention_inputs(torch.device("cuda"), batch, n_kv)
    for _ in range(calls):
        attention(query, keys, values, pos, rows, query.shape[-1] ** -0.5, cos, sin, key, value)
    torch.cuda.synchronize()


if __name__ == "__main__":
    for name, (batch, n_kv) in REGIMES.items():
        print(f"regime {name}: batch {batch}, {n_kv} KV heads", flush=True)
        run(batch, n_kv)
