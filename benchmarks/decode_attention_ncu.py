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

import torch

from kvshare.decode_attention import attention

REGIMES = {"mqa-b32": (32, 1), "gqa-b1": (1, 16), "gqa-b32": (32, 16)}  # batch, KV heads (32 query heads)


def run(batch: int, n_kv: int, calls: int = 3, max_len: int = 2048 + 64 - 1, dim: int = 128) -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    keys, values = torch.randn(2, batch, n_kv, max_len, dim, device=dev, dtype=dt).unbind(0)
    query = torch.randn(batch, 32, dim, device=dev, dtype=dt)
    key, value = torch.randn(2, batch, n_kv, dim, device=dev, dtype=dt).unbind(0)
    cos, sin = torch.randn(2, batch, 1, dim, device=dev, dtype=dt).unbind(0)
    rows = torch.arange(32, dtype=torch.int32, device=dev).view(n_kv, -1)
    pos = torch.tensor([max_len - 1], device=dev)
    for _ in range(calls):
        attention(query, keys, values, pos, rows, dim**-0.5, cos, sin, key, value)
    torch.cuda.synchronize()


if __name__ == "__main__":
    for name, (batch, n_kv) in REGIMES.items():
        print(f"regime {name}: batch {batch}, {n_kv} KV heads", flush=True)
        run(batch, n_kv)
