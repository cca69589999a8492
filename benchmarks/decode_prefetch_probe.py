"""Would reading the next product's weight into L2 during the attention shorten a decode step? (issue 15)

MQA's attention at batch 32 keeps the memory only about half busy (Nsight Compute, h100-ncu/), and the o
product after it reads a 32 MB weight, which fits the L2 (50 MB on an H100). This times, as one CUDA graph over
32 layers of the 7B shape, each layer's attention (kvshare.decode_attention, MQA or GQA-16, the query rotated
and the new entry written as in a step) followed by its o product (cuBLAS):

* ``serial``: attention then product, one stream;
* ``prefetch``, ``prefetch wide``: the same, with a second stream reading the layer's o weight (``evict_last``)
  while the attention runs, the product waiting for both (two readers: ``READERS``);
* ``attention`` and ``product``: each alone; ``hot product``: the product right after the same weight was read
  (what the prefetch could at best make of it); ``touch``, ``touch wide``: the weight reads alone (the prefetch
  hides only what they read within the attention's time).

    PYTHONPATH=src python benchmarks/decode_prefetch_probe.py [--out DIR]    # one GPU, under a minute

Measured on H100s (benchmarks/results/decode_floor/h100-prefetch, h100-prefetch-wide): with either reader the
pair is slower than in series, so GraphDecoder does not prefetch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
import machine  # noqa: E402
from decode_kernels_bench import attention_inputs, graph_ms  # noqa: E402

from kvshare.decode_attention import attention  # noqa: E402
from kvshare.io import atomic_write_json  # noqa: E402


@triton.jit
def _touch(w_ptr, sink_ptr, n, rounds, BLOCK: tl.constexpr):
    """Read this program's share of n elements, asking the L2 to keep them; a sum to sink keeps the loads."""
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(rounds):
        offs = (i * tl.num_programs(0) + pid) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(w_ptr + offs, mask=offs < n, other=0.0, eviction_policy="evict_last").to(tl.float32)
    tl.store(sink_ptr + pid, tl.sum(acc, 0))


def touch(weight: torch.Tensor, sink: torch.Tensor, block: int) -> None:
    """Read ``weight`` by sink.numel() programs of ``block`` elements a step."""
    rounds = triton.cdiv(weight.numel(), sink.numel() * block)
    _touch[(sink.numel(),)](weight, sink, weight.numel(), rounds, BLOCK=block)


# Two readers of a 4096 x 4096 weight: one program a multiprocessor looping over its share (bec88ca's, 0.63 TB/s
# on an H100), and one 16 KB block a program, all of them at once.
READERS = {"": (132, 2048), " wide": (4096 * 4096 // 8192, 8192)}


def probe(n_kv: int, batch: int = 32, layers: int = 32) -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    caches, query, key, value, cos, sin, rows, pos = attention_inputs(dev, batch, n_kv, layers)
    w_o = [torch.randn(4096, 4096, device=dev, dtype=dt) for _ in range(layers)]
    side = torch.cuda.Stream()

    def attend(k, v):
        return attention(query, k, v, pos, rows, query.shape[-1] ** -0.5, cos, sin, key, value).view(batch, -1)

    def serial():
        for (k, v), w in zip(caches, w_o, strict=True):
            F.linear(attend(k, v), w)

    def prefetch(sink, block):
        for (k, v), w in zip(caches, w_o, strict=True):
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                touch(w, sink, block)
            out = attend(k, v)
            torch.cuda.current_stream().wait_stream(side)
            F.linear(out, w)

    x = torch.randn(batch, 4096, device=dev, dtype=dt)
    times = {"serial": graph_ms(serial)}
    for name, (programs, block) in READERS.items():
        sink = torch.empty(programs, device=dev)
        times[f"prefetch{name}"] = graph_ms(lambda sink=sink, block=block: prefetch(sink, block))
        times[f"touch{name}"] = graph_ms(lambda sink=sink, block=block: [touch(w, sink, block) for w in w_o])
    times["attention"] = graph_ms(lambda: [attend(k, v) for k, v in caches])
    times["product"] = graph_ms(lambda: [F.linear(x, w) for w in w_o])
    times["hot product"] = graph_ms(lambda: [(F.linear(x, w), F.linear(x, w)) for w in w_o]) - times["product"]
    return {"n_kv": n_kv, "batch": batch, "layers": layers, "ms": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/decode_floor/prefetch")
    args = ap.parse_args()
    result = {"machine": machine.environment(torch.device("cuda")), "probes": []}
    for n_kv, batch in ((1, 32), (16, 1)):
        result["probes"].append(probe(n_kv, batch))
        print(json.dumps(result["probes"][-1]), flush=True)
        atomic_write_json(Path(args.out) / "decode_prefetch.json", result)


if __name__ == "__main__":
    main()
