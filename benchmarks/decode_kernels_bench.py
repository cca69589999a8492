"""The parts of a decode step against the bandwidth they could reach, and the graph decoder against generate().

Issue 15's floor is every weight and every cached K/V read once per step. This measures, on the
Llama-2-7B shape in bf16 with random weights (speed depends on shapes only), each part a decode
step is made of, as one CUDA graph over all 32 layers, so launch gaps count as in a real step:

* ``gemv``: every matrix product of a step (q/k/v and gate/up fused, as kvshare.decode.GraphDecoder does,
  plus o, down and the logits), with cuBLAS (``F.linear``) and with kvshare.gemv (its Triton kernel up to
  gemv.MAX_ROWS rows, PyTorch beyond), at 1 and 32 rows; the weight bytes over the time is the bandwidth
  reached; the largest differences, relative to the largest output, of the Triton products from cuBLAS's and
  of GraphDecoder's products with their norms, activation and residuals (kvshare.gemv.linear_product) from
  kvshare.decode.linear_reference's are recorded; and each kind of product alone, by cuBLAS and by kvshare.gemv's
  kernel whatever the rows;
* ``attention``: one token's attention over a full static cache per layer (triton, flex, sdpa, matmul), at batch
  1 and 32; the K/V bytes over the time;
* ``splits``: kvshare.decode_attention's kernel over 32 layers' caches (16 KV heads, as GQA-16, and 1, as MQA) at
  batch 1 and 32, aiming for 1 to 16 programs per multiprocessor (its default: 2), with and without the query's
  rotation inside: what picks its split of the context; ``tune``: its block of positions, warps and pipelining
  stages, in the regimes furthest from their bytes' time; ``few``: MQA at batch 32 (32 sequences × 1 KV head) split
  into 1 to 17 chunks (from 0.2 to 2 programs aimed for per multiprocessor), with each block, warps and stages:
  whether longer chunks and no merge read its short cache faster;
* ``check``: GraphDecoder.generate against the model's own eager generate() (static cache, greedy, bf16)
  for every variant: identical tokens out of how many, and the largest logit difference of one decode step.

    PYTHONPATH=src python benchmarks/decode_kernels_bench.py --out DIR       # one H200: a few minutes
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import decode_floor_bench as dfb  # noqa: E402
import machine  # noqa: E402

from kvshare.decode import GraphDecoder, _decode_attention, static_cache  # noqa: E402
from kvshare.io import atomic_write_json  # noqa: E402

MAX_LEN = 2048 + 64 - 1  # the cache of decode_floor_bench's default cell: prompt 2048, 64 new tokens


def graph_ms(fn, reps: int = 20) -> float:
    """Median milliseconds of one replay of ``fn`` captured as a CUDA graph (after two warm-up calls)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def step_products(decoder, rows: int) -> list[tuple]:
    """Every product of one step as the decoder calls it, with random inputs of ``rows`` rows: (x, weight, bias,
    norm, eps, act, residual) for q/k/v and gate/up fused (each after its RMSNorm, gate/up then SiLU(gate) × up),
    o and down (each adding the residual), and the logits (after the final norm)."""
    model = decoder.model
    hidden, eps, act = model.config.hidden_size, model.config.rms_norm_eps, model.config.hidden_act

    def rand(width, like):
        return torch.randn(rows, width, device=like.device, dtype=like.dtype)

    out = []
    for _, w, _ in decoder.layers:
        ln1, qkv_w, qkv_b, _, _, _, o_w, o_b, ln2, gu_w, gu_b, down_w, down_b = w
        x = rand(hidden, qkv_w)
        out += [(x, qkv_w, qkv_b, ln1, eps, None, None), (rand(o_w.shape[1], o_w), o_w, o_b, None, 0.0, None, x),
                (x, gu_w, gu_b, ln2, eps, act, None), (rand(down_w.shape[1], down_w), down_w, down_b, None, 0.0, None, x)]  # fmt: skip
    head, norm = model.lm_head, model.model.norm
    return out + [(rand(hidden, head.weight), head.weight, head.bias, norm.weight, norm.variance_epsilon, None, None)]


def time_gemv(decoder, rows: int) -> dict:
    """The step's products by cuBLAS and by kvshare.gemv, and how far kvshare.gemv's outputs are from theirs."""
    from kvshare.decode import linear_reference
    from kvshare.gemv import linear, linear_product

    products = step_products(decoder, rows)
    nbytes = sum(p[1].numel() * p[1].element_size() for p in products)
    rec = {"rows": rows, "weight_bytes": nbytes}
    bare = [p[:3] for p in products]

    def worst(fn, ref, calls):
        diffs = []
        for c in calls:
            want = ref(*c)
            diffs.append((fn(*c) - want).abs().max() / want.abs().max())
        return max(diffs).item()

    rec["triton_max_rel_diff"] = worst(linear, F.linear, bare)
    rec["product_max_rel_diff"] = worst(linear_product, linear_reference, products)
    for name, fn in (("cublas", F.linear), ("triton", linear)):
        ms = graph_ms(lambda fn=fn: [fn(*c) for c in bare])
        rec[f"{name}_ms"], rec[f"{name}_GBps"] = ms, nbytes / ms / 1e6
    return rec | {"by_product": time_by_product(bare)}


def time_by_product(bare: list[tuple]) -> list[dict]:
    """Each kind of product (q/k/v, o, gate/up, down: every layer's; the logits) by cuBLAS and by kvshare.gemv's
    kernel at any number of rows (gemv.linear leaves more than MAX_ROWS to cuBLAS): where each is faster."""
    from kvshare.gemv import _kernel, _launch

    kinds = {"qkv": bare[0:-1:4], "o": bare[1:-1:4], "gate_up": bare[2:-1:4], "down": bare[3:-1:4], "logits": bare[-1:]}
    out = []
    for kind, calls in kinds.items():
        nbytes = sum(w.numel() * w.element_size() for _, w, _ in calls)
        rec = {"product": kind, "shape": list(calls[0][1].shape), "calls": len(calls), "weight_bytes": nbytes}
        for name, fn in (("cublas", F.linear), ("triton", lambda x, w, b: _launch(_kernel, x, w, b, None))):
            ms = graph_ms(lambda fn=fn, calls=calls: [fn(*c) for c in calls])
            rec[f"{name}_ms"], rec[f"{name}_GBps"] = ms, nbytes / ms / 1e6
        out.append(rec)
    return out


def time_attention(decoder, kind: str) -> dict:
    batch = decoder.batch_size
    pos = torch.tensor([decoder.max_cache_len - 1], device=decoder.device)
    calls, nbytes = [], 0
    for kv_layer, w, spec in decoder.layers:
        entry = decoder.cache.layers[kv_layer]
        rows = torch.randn(batch, spec.n_kv, spec.gmax, spec.head_dim, device=decoder.device, dtype=entry.keys.dtype)
        calls.append((rows, entry.keys, entry.values, spec._replace(attention=kind), w[5]))
        nbytes += 2 * entry.keys.numel() * entry.keys.element_size()
    if kind == "triton":  # one query per query head, in the model's order (GQA here: the rows as they are)
        from kvshare.decode_attention import attention

        def attend(r, k, v, pos, s, heads):
            return attention(r.reshape(r.shape[0], -1, r.shape[-1]), k, v, pos, heads, s.scaling)
    else:
        compiled = torch.compile(_decode_attention, fullgraph=True, dynamic=False)

        def attend(r, k, v, pos, s, heads):
            return compiled(r, k, v, pos, s)

    ms = graph_ms(lambda: [attend(r, k, v, pos, s, h) for r, k, v, s, h in calls])
    return {"attention": kind, "batch": batch, "kv_bytes": nbytes, "ms": ms, "GBps": nbytes / ms / 1e6}


def attention_inputs(device, batch: int, n_kv: int, layers: int = 1, max_len: int = MAX_LEN, d: int = 128):
    """What a 7B decode step hands kvshare.decode_attention (32 query heads in equal groups on n_kv KV heads, bf16,
    random): each layer's (keys, values) cache, the query, the new key and value, cos and sin, rows, and the
    position, the cache's last."""
    dt = torch.bfloat16
    caches = [torch.randn(2, batch, n_kv, max_len, d, device=device, dtype=dt).unbind(0) for _ in range(layers)]
    query = torch.randn(batch, 32, d, device=device, dtype=dt)
    key, value = torch.randn(2, batch, n_kv, d, device=device, dtype=dt).unbind(0)
    cos, sin = torch.randn(2, batch, 1, d, device=device, dtype=dt).unbind(0)
    rows = torch.arange(32, dtype=torch.int32, device=device).view(n_kv, -1)
    return caches, query, key, value, cos, sin, rows, torch.tensor([max_len - 1], device=device)


def time_splits(device, batch: int, n_kv: int, tune: dict, layers: int = 32, max_len: int = MAX_LEN) -> dict:
    """kvshare.decode_attention over ``layers`` caches of n_kv KV heads (32 query heads in equal groups), reading
    up to the last position, with ``tune``'s values of its module constants (``programs_per_sm``: the programs
    it aims for per multiprocessor, default 2); with the query rotated inside (rope) and without."""
    import kvshare.decode_attention as da

    sms = torch.cuda.get_device_properties(device).multi_processor_count
    caches, query, _, _, cos, sin, rows, pos = attention_inputs(device, batch, n_kv, layers, max_len)
    per_sm = tune.get("programs_per_sm", 2)
    saved = {name: getattr(da, name) for name in ("_programs", "BLOCK_N", "WARPS", "STAGES")}
    da._programs = lambda _device: max(1, int(per_sm * sms))
    for name in ("BLOCK_N", "WARPS", "STAGES"):
        setattr(da, name, tune.get(name, saved[name]))
    try:
        rec = {
            "batch": batch,
            "n_kv": n_kv,
            "programs_per_sm": per_sm,
            "splits": da._splits(batch, n_kv, max_len, da._programs(device))[0],
        }
        rec |= {name: getattr(da, name) for name in ("BLOCK_N", "WARPS", "STAGES")}
        for rope in (False, True):
            extra = (cos, sin) if rope else ()
            ms = graph_ms(lambda extra=extra: [da.attention(query, k, v, pos, rows, 0.088, *extra) for k, v in caches])
            rec["rope_ms" if rope else "ms"] = ms
    finally:
        for name, value in saved.items():
            setattr(da, name, value)
    nbytes = 2 * layers * caches[0][0].numel() * caches[0][0].element_size()
    return rec | {"kv_bytes": nbytes, "GBps": nbytes / rec["ms"] / 1e6}


PARTS = ("gemv", "attention", "splits", "tune", "few", "check")


def attention_configs(parts: list[str]) -> list[tuple[int, int, dict]]:
    """(batch, KV heads, time_splits' tune) of the splits, tune and few parts asked for."""
    configs = []
    if "splits" in parts:
        configs += [(b, n, {"programs_per_sm": p}) for b, n, p in itertools.product((1, 32), (16, 1), (1, 2, 4, 8, 16))]
    if "tune" in parts:  # the regimes furthest from their bytes' time (H100, 2026-12-06)
        tunes = itertools.product([(1, 16), (32, 1), (1, 1)], (32, 64, 128), (4, 8), (2, 3))
        configs += [(b, n, {"BLOCK_N": bn, "WARPS": w, "STAGES": st}) for (b, n), bn, w, st in tunes]
    if "few" in parts:
        few = itertools.product((0.2, 0.4, 1, 2), (64, 128), (4, 8), (2, 3, 4))
        configs += [(32, 1, {"programs_per_sm": p, "BLOCK_N": bn, "WARPS": w, "STAGES": st}) for p, bn, w, st in few]
    return configs


@torch.no_grad()
def check(model, variant: str, args) -> dict:
    """Graph decoder against the model's eager generate() on one prompt batch (bf16)."""
    batch, prompt, new = 2, 128, args.check_new
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(1))
    ids = ids.to(model.device)
    cache = static_cache(model, batch, prompt + new - 1)
    want = model.generate(ids, past_key_values=cache, max_new_tokens=new, do_sample=False, eos_token_id=None,
                          pad_token_id=0)  # fmt: skip
    decoder = GraphDecoder(model, batch, prompt + new - 1, attention=args.attention, gemv=args.gemv)
    got = decoder.generate(ids, new)
    # One decode step from the same cache and token: the decoder's logits against the model's forward.
    pos = torch.tensor([prompt], device=model.device)
    token = got[:, prompt : prompt + 1]
    mine = decoder.step(token, pos).float()
    for layer in decoder.cache.layers:  # the model's forward writes at the cache's own count: back to the prompt
        if layer.is_initialized:
            layer.cumulative_length.fill_(prompt)
            layer.length = prompt
    theirs = model(input_ids=token, past_key_values=decoder.cache, cache_position=pos).logits[:, -1].float()
    same = (got[:, prompt:] == want[:, prompt:]).all(0)
    first_diff = int((~same).nonzero()[0]) if not same.all() else None
    return {"variant": variant, "tokens_equal": int(same.sum()), "of": new, "first_difference_at": first_diff,
            "step_logits_max_abs_diff": (mine - theirs).abs().max().item(),
            "logits_max_abs": theirs.abs().max().item()}  # fmt: skip


def best_options(result: dict) -> str:
    """The attention with the least time summed over the batches measured, and kvshare.gemv's products (GraphDecoder's
    gemv="triton") unless cuBLAS's took less time in all or the Triton outputs differ from them by more than 1e-2
    (relative)."""
    attention = {}
    for r in result["attention"]:
        attention[r["attention"]] = attention.get(r["attention"], 0.0) + r.get("ms", float("inf"))
    gemv = result["gemv"]
    triton_ok = all(r["triton_max_rel_diff"] <= 1e-2 for r in gemv)
    faster = sum(r["triton_ms"] for r in gemv) <= sum(r["cublas_ms"] for r in gemv)
    return f"--decode-attention {min(attention, key=attention.get)} --gemv {'triton' if triton_ok and faster else 'cublas'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="gemv,attention,check", help=f"comma-separated, of {','.join(PARTS)}")
    ap.add_argument("--variants", default="gqa,qcqa-ac,qcqa-ec,cla2,mqa", help="of the check")
    ap.add_argument("--attention", default="flex")
    ap.add_argument("--gemv", default="triton")
    ap.add_argument("--check-new", type=int, default=32)
    ap.add_argument("--best", action="store_true", help="print decode_floor_bench's options for the fastest parts")
    args = ap.parse_args()
    if args.best:
        return print(best_options(json.loads((Path(args.out) / "decode_kernels.json").read_text())))
    torch._dynamo.config.recompile_limit = 64
    device, parts = torch.device("cuda"), args.parts.split(",")
    if unknown := [p for p in parts if p not in PARTS]:
        ap.error(f"unknown part {unknown[0]!r} in --parts {args.parts!r}: use {','.join(PARTS)}")
    result = {"machine": machine.environment(device), "gemv": [], "attention": [], "splits": [], "check": []}
    out = Path(args.out) / "decode_kernels.json"
    build = argparse.Namespace(
        decoder="graph", smoke=False, backend="inductor", decode_attention="sdpa", prefill_attention="buckets"
    )

    def save(what, rec):
        result[what].append(rec)
        atomic_write_json(out, result)
        print(what, rec, flush=True)

    for batch, n_kv, tune in attention_configs(parts):
        try:
            rec = time_splits(device, batch, n_kv, tune)
        except Exception as e:  # a configuration out of the GPU's resources: a miss, the others still measured
            rec = {"batch": batch, "n_kv": n_kv, **tune, "error": f"{type(e).__name__}: {e}"[:200]}
        save("splits", rec)
        dfb.free(device)
    if not {"gemv", "attention", "check"} & set(parts):
        return
    gqa = dfb.build_models("llama2-7b", dfb.LLAMA2_7B, ["gqa"], device, torch.bfloat16, build)["gqa"]
    for batch in (1, 32):
        decoder = GraphDecoder(gqa, batch, MAX_LEN)
        if "gemv" in parts:
            save("gemv", time_gemv(decoder, batch))
        for kind in ("triton", "flex", "sdpa", "matmul") if "attention" in parts else ():
            t0 = time.perf_counter()
            try:
                rec = time_attention(decoder, kind)
            except Exception as e:  # recorded as a miss: the other kernels are still measured
                rec = {"attention": kind, "batch": batch, "error": f"{type(e).__name__}: {e}"[:300]}
            save("attention", rec | {"compile_and_time_s": time.perf_counter() - t0})
        del decoder
        dfb.free(device)
    del gqa
    dfb.free(device)
    for variant in args.variants.split(",") if "check" in parts else ():
        model = dfb.build_models("llama2-7b", dfb.LLAMA2_7B, [variant], device, torch.bfloat16, build)[variant]
        save("check", check(model, variant, args))
        del model
        dfb.free(device)


if __name__ == "__main__":
    main()
