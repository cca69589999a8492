"""Where a Llama-2-7B-shaped decode step's time goes on one GPU (issue 15); plain transformers Llama, GQA-16:

1. every nn.Linear as a batch-1 GEMV, all captured in one CUDA graph: the weight-read rate cuBLAS reaches;
2. the forward alone on transformers' StaticCache at position 2047, compiled ("reduce-overhead") and eager,
   batch 1 and 32;
3. generate() with the compiled decode step: per step, from 64 against 8 new tokens after a 2048-token prompt.

    python benchmarks/decode_step_diag.py OUT.json      # CUDA; random bf16 weights

Run on 2026-12-02 (H200, torch 2.11, transformers 5.17): benchmarks/results/decode_floor/decode_step_diag.json.
"""

import json
import statistics
import sys
import time

import torch
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM, StaticCache

CONFIG = LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                     num_key_value_heads=16, head_dim=128, vocab_size=32000, max_position_embeddings=4096)  # fmt: skip
DEV = torch.device("cuda")


def cuda_ms(fn, n: int = 20) -> float:
    """Median over 5 timings of ``n`` calls, per call, on CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / n)
    return statistics.median(times)


def gemv_graph(model) -> dict:
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(1, m.in_features, device=DEV, dtype=torch.bfloat16) for m in linears]

    def gemvs():
        for m, x in zip(linears, xs, strict=True):
            torch.nn.functional.linear(x, m.weight)

    gemvs()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gemvs()
    ms = cuda_ms(graph.replay)
    return {"gemv_graph_ms": ms, "gemv_GBps": sum(m.weight.numel() * 2 for m in linears) / ms / 1e6}


def forward_ms(model, batch: int, compiled: bool) -> float:
    cache = StaticCache(config=CONFIG, max_cache_len=2112)
    cache.early_initialization(batch, 16, 128, torch.bfloat16, DEV)
    ids = torch.ones(batch, 1, dtype=torch.long, device=DEV)
    pos = torch.tensor([2047], device=DEV)
    forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True) if compiled else model.forward

    def step():
        with torch.no_grad():
            kw = dict(past_key_values=cache, cache_position=pos, position_ids=pos[None].expand(batch, 1))
            return forward(input_ids=ids, use_cache=True, **kw).logits

    for _ in range(3):
        step()
    return cuda_ms(step)


def generate_step_ms(model, batch: int) -> float:
    ids = torch.ones(batch, 2048, dtype=torch.long, device=DEV)

    def seconds(new: int) -> float:
        cache = StaticCache(config=CONFIG, max_cache_len=2048 + 64)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, past_key_values=cache, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    seconds(64), seconds(8)  # compile, warm up
    t64 = statistics.median(seconds(64) for _ in range(3))
    t8 = statistics.median(seconds(8) for _ in range(3))
    return (t64 - t8) / 56 * 1e3


def main() -> None:
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.recompile_limit = 64
    with DEV:
        torch.manual_seed(0)
        model = LlamaForCausalLM(CONFIG).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    out = {"weight_gb": sum(p.numel() * 2 for p in model.parameters()) / 1e9} | gemv_graph(model)
    for batch in (1, 32):
        for compiled in (True, False):
            out[f"forward_B{batch}_{'compiled' if compiled else 'eager'}_ms"] = forward_ms(model, batch, compiled)
            print(out, flush=True)
    model.generation_config.compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead")
    for batch in (1, 32):
        out[f"generate_B{batch}_step_ms"] = generate_step_ms(model, batch)
        print(out, flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
