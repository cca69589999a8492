"""Decode throughput and peak memory of KV-sharing variants at matched KV bytes (issue 3).

Every variant is built in this script with ``kvshare.merge.convert_model`` from one
random-weight ``LlamaForCausalLM`` and a ``Plan``; decode speed and memory depend on
shapes, not weight values, so no checkpoint is needed. Two source shapes:

* ``smollm2-135m``: SmolLM2-135M's shape (30 layers, hidden 576, FFN 1536, 9 query
  heads, 3 KV heads, head_dim 64, vocab 49152, tied embeddings). With 3 KV heads a
  layer can keep 1, 2 or 3; the 2/3-KV variants all store 60 of 90 KV heads:
  ``gqa`` [0,0,1] in every layer (query groups 6+3), ``qcqa-ac`` a per-layer mix of
  3 / 2 (unequal groups, differing by layer) / 1 heads, ``qcqa-ec`` half the layers
  MQA and half full. ``cla2`` (1/2) and ``mqa`` (1/3) complete the scale.
* ``mha-12l``: an MHA model (12 layers, hidden 768, FFN 3072, 12 heads = 12 KV heads,
  head_dim 64). ``gqa`` / ``qcqa-ec`` / ``qcqa-ac`` keep 4 KV heads in every layer:
  equal contiguous, equal scattered (reordered to contiguous by the conversion) and
  unequal groups (sizes differ by layer); ``cla2`` keeps 1/2.

``(gather)`` rows run the runtime's reference layout for unequal groups (K/V copied
per query head before attention) to show what the default ("pad") layout saves.

Measured with ``model.generate(do_sample=False)`` and the default dynamic cache: a
logits processor synchronises and stamps the clock once per step, giving prefill time
and per-step decode time from the same call. Medians over ``--reps`` runs after a
warm-up. Memory: peak allocated bytes over the weights (torch.cuda.max_memory_allocated).
Max batch: under a memory cap (torch.cuda.set_per_process_memory_fraction), the prompt
prefilled in chunks (so the cache, not prefill activations, is what fills memory),
then generate() continues from that cache. ``--cache static`` (the default) preallocates
the whole cache (kvshare.modeling.KVShareStaticCache, prompt + new - 1 tokens) before
prefill; ``--cache dynamic`` is transformers' DynamicCache, which grows by torch.cat.
The batch is predicted (static: from two small probe runs, memory being linear in the
batch; dynamic: from the KV size), run, and shrunk on OOM or grown until one fails;
"max batch" is also extrapolated from the measured peak.

    PYTHONPATH=src python benchmarks/decode_bench.py --out DIR            # GPU
    PYTHONPATH=src python benchmarks/decode_bench.py --smoke --out DIR    # CPU, tiny
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONPATH=src python benchmarks/decode_bench.py \
        --only maxbatch --maxbatch-new 64 --out DIR                       # max batch only (GPU)
    python benchmarks/decode_bench.py --report DIR/decode_bench.json      # table only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import time
from pathlib import Path

import machine
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from kvshare.merge import convert_model
from kvshare.modeling import KVShareStaticCache, cache_bytes
from kvshare.plan import ModelShape, Plan, cla_pattern

SHAPES = {
    "smollm2-135m": dict(
        num_hidden_layers=30,
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
    ),
    "mha-12l": dict(
        num_hidden_layers=12,
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_key_value_heads=12,
        head_dim=64,
        vocab_size=49152,
    ),
}
SMOKE_SHAPES = {
    "smollm2-135m": dict(
        SHAPES["smollm2-135m"], num_hidden_layers=6, hidden_size=144, intermediate_size=256, head_dim=16, vocab_size=512
    ),
    "mha-12l": dict(
        SHAPES["mha-12l"], num_hidden_layers=4, hidden_size=192, intermediate_size=384, head_dim=16, vocab_size=512
    ),
}


def llama_config(dims: dict) -> LlamaConfig:
    return LlamaConfig(
        **dims,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )


def variants(name: str, shape: ModelShape) -> dict[str, tuple[Plan, str]]:
    """Variant name → (plan, layout of unequal groups)."""
    layers, kv = shape.num_layers, shape.num_kv_heads
    ident = Plan.identity(shape)
    out = {"base": (ident, "pad")}
    if name == "smollm2-135m":
        two = [(0, 0, 1), (0, 1, 1), (0, 1, 0)]  # unequal groups of 2 KV heads, varied by layer
        ac = [(0, 1, 2) if i % 3 == 0 else two[(i // 3) % 3] if i % 3 == 1 else (0, 0, 0) for i in range(layers)]
        ec = [(0, 1, 2) if i % 2 == 0 else (0, 0, 0) for i in range(layers)]
        out["gqa-2/3"] = (Plan(shape, ((0, 0, 1),) * layers, tuple(range(layers)), "gqa"), "pad")
        out["qcqa-ac-2/3"] = (Plan(shape, tuple(ac), tuple(range(layers)), "qcqa-ac"), "pad")
        out["qcqa-ec-2/3"] = (Plan(shape, tuple(ec), tuple(range(layers)), "qcqa-ec"), "pad")
        out["cla2"] = (ident.with_cla(cla_pattern(layers, 2)), "pad")
        out["mqa"] = (Plan(shape, ((0, 0, 0),) * layers, tuple(range(layers)), "mqa"), "pad")
        out["gqa-2/3 (gather)"] = (out["gqa-2/3"][0], "gather")
        out["qcqa-ac-2/3 (gather)"] = (out["qcqa-ac-2/3"][0], "gather")
    else:
        rng = random.Random(0)
        n_new = 4
        sizes = [(6, 3, 2, 1), (5, 4, 2, 1), (4, 4, 3, 1), (7, 2, 2, 1), (5, 3, 2, 2), (6, 2, 2, 2)]
        ac, ec = [], []
        for i in range(layers):
            for layer_sizes, dest in ((sizes[i % len(sizes)], ac), ((kv // n_new,) * n_new, ec)):
                labels = [g for g, s in enumerate(layer_sizes) for _ in range(s)]
                rng.shuffle(labels)
                dest.append(tuple(labels))
        gqa = tuple(h // (kv // n_new) for h in range(kv))
        out["gqa-4"] = (Plan(shape, (gqa,) * layers, tuple(range(layers)), "gqa"), "pad")
        out["qcqa-ec-4"] = (Plan(shape, tuple(ec), tuple(range(layers)), "qcqa-ec"), "pad")
        out["qcqa-ac-4"] = (Plan(shape, tuple(ac), tuple(range(layers)), "qcqa-ac"), "pad")
        out["cla2"] = (ident.with_cla(cla_pattern(layers, 2)), "pad")
        out["qcqa-ac-4 (gather)"] = (out["qcqa-ac-4"][0], "gather")
    return out


class StepClock(LogitsProcessor):
    """Stamps the clock (after a device sync) each time generate() has a step's logits."""

    def __init__(self, device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def one_run(model, device, batch, prompt, new, seed=0, chunk=None, cache_kind="dynamic"):
    """One generate() call; timings, memory and cache size."""
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(seed)).to(device)
    clock = StepClock(device)
    free(device)
    cuda = device.type == "cuda"
    before = torch.cuda.memory_allocated(device) if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        cache = None
        if cache_kind == "static":  # the whole cache, allocated before anything runs
            cache = KVShareStaticCache(model.config, prompt + new - 1, batch, model.dtype, device)
        elif chunk:
            cache = DynamicCache(config=model.config)
        if chunk:  # prefill all but the last prompt token in chunks; generate() feeds the rest
            for s in range(0, prompt - 1, chunk):
                model(input_ids=ids[:, s : min(s + chunk, prompt - 1)], past_key_values=cache, logits_to_keep=1)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=new,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
            return_dict_in_generate=True,
            pad_token_id=0,
            eos_token_id=None,
            disable_compile=True,  # eager, as with the dynamic cache (a static one would make generate() compile)
        )
    sync(device)
    t1 = time.perf_counter()
    if out.sequences.shape[1] != prompt + new:
        raise RuntimeError(f"generated {out.sequences.shape[1] - prompt} tokens, not {new}")
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)]
    rec = {
        "batch": batch,
        "prompt": prompt,
        "new": new,
        "chunked_prefill": chunk,
        "cache": cache_kind,
        "prefill_s": clock.stamps[0] - t0,
        "decode_s": clock.stamps[-1] - clock.stamps[0],
        "step_ms_median": 1e3 * statistics.median(steps) if steps else None,
        "total_s": t1 - t0,
        "decode_tok_s": batch * (new - 1) / (clock.stamps[-1] - clock.stamps[0]) if new > 1 else None,
        "e2e_tok_s": batch * new / (t1 - t0),
        "cache_bytes": cache_bytes(out.past_key_values),
        "cached_tokens": prompt + new - 1,
    }
    if cuda:
        rec["alloc_delta_with_cache"] = torch.cuda.memory_allocated(device) - before - out.sequences.numel() * 8
        rec["peak_over_weights"] = torch.cuda.max_memory_allocated(device) - before
        rec["peak_reserved"] = torch.cuda.max_memory_reserved(device)
    del out, cache
    free(device)
    return rec


def predicted_max_batch(model, device, prompt, new, chunk, room) -> tuple[int, dict]:
    """The largest batch whose peak fits in ``room`` bytes, from two small static-cache runs.

    With a preallocated cache, peak memory is linear in the batch: per sequence, the cache plus
    a working set (activations of a prefill chunk or a decode step). The probes generate 2 tokens,
    so their cache is shorter; the working set is what they held beyond it.
    """
    one_run(model, device, 1, min(64, prompt), 2, chunk=chunk, cache_kind="static")  # one-time allocations (cuBLAS)
    b1, b2 = 4, 16
    r1, r2 = (one_run(model, device, b, prompt, 2, chunk=chunk, cache_kind="static") for b in (b1, b2))
    work1, work2 = (r["peak_over_weights"] - r["cache_bytes"] for r in (r1, r2))
    per_seq_work = (work2 - work1) / (b2 - b1)
    fixed = work1 - b1 * per_seq_work
    per_seq_cache = r2["cache_bytes"] / b2 / r2["cached_tokens"] * (prompt + new - 1)
    probe = {"work_per_seq": per_seq_work, "fixed": fixed, "cache_per_seq": per_seq_cache}
    return int((room - fixed) / (per_seq_cache + per_seq_work)), probe


def median_runs(model, device, batch, prompt, new, reps, cache_kind="dynamic"):
    runs = [one_run(model, device, batch, prompt, new, seed=r, cache_kind=cache_kind) for r in range(reps)]
    med = {k: statistics.median([r[k] for r in runs]) for k in runs[0] if isinstance(runs[0][k], float)}
    return {**runs[0], **med, "reps": reps, "decode_tok_s_all": [r["decode_tok_s"] for r in runs]}


def build(shape_name, dims, variant, device, dtype, base_cache):
    if shape_name not in base_cache:
        base_cache.clear()
        free(device)
        torch.manual_seed(0)
        with torch.device(device):
            base_cache[shape_name] = LlamaForCausalLM(llama_config(dims)).to(dtype).eval()
    base = base_cache[shape_name]
    if variant == "llama (HF)":
        return base, Plan.identity(ModelShape.of(base.config)), "n/a"
    plan, layout = variants(shape_name, ModelShape.of(base.config))[variant]
    with torch.device(device):
        model = convert_model(base, plan).to(device)
    for layer in model.model.layers:
        layer.self_attn.kv_layout = layout
    model.generation_config.eos_token_id = None
    return model, plan, layout


def environment(device) -> dict:
    alloc = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    return machine.environment(device) | {"attn_implementation": "sdpa (transformers default)", "alloc_conf": alloc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU-friendly")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=64, help="new tokens in the throughput runs")
    ap.add_argument("--maxbatch-new", type=int, default=128, help="new tokens in the max-batch runs")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cap-gib", type=float, default=16.0, help="memory cap for the max-batch runs")
    ap.add_argument("--cache", choices=["static", "dynamic"], default="static", help="KV cache of the max-batch runs")
    ap.add_argument(
        "--chunk",
        type=int,
        help="prefill chunk in the max-batch runs (default: 32 with the static cache, as its working set scales with "
        "the chunk; 256 with the dynamic cache, which re-allocates every layer's K/V at each chunk)",
    )
    ap.add_argument("--maxbatch-step", type=float, default=0.02, help="relative batch step of the max-batch search")
    ap.add_argument("--maxbatch-tries", type=int, default=6, help="runs per variant in the max-batch search")
    ap.add_argument(
        "--maxbatch-plan",
        help="run only these max-batch variants, in this order, each starting from batch B if given: "
        "'shape:variant[=B];shape:variant[=B]'",
    )
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip what would start after this many seconds")
    ap.add_argument("--shapes", default="smollm2-135m,mha-12l")
    ap.add_argument("--variants", help="comma-separated variant names to run (default: all of each shape)")
    ap.add_argument(
        "--throughput-cache", choices=["static", "dynamic"], default="dynamic", help="KV cache of the throughput runs"
    )
    ap.add_argument("--only", choices=["throughput", "maxbatch"], help="run one phase (maxbatch: gather rows too)")
    ap.add_argument("--report", help="only write the markdown table from this JSON")
    args = ap.parse_args()
    if args.report:
        data = json.loads(Path(args.report).read_text())
        Path(args.report).with_suffix(".md").write_text(report(data))
        return
    if args.chunk is None:
        args.chunk = 32 if args.cache == "static" else 256
    if args.smoke:
        args.prompt, args.new, args.maxbatch_new, args.reps, args.chunk = 48, 6, 6, 2, 16
        args.batches = "1,4"
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dims_of = SMOKE_SHAPES if args.smoke else SHAPES
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = {
        "env": environment(device),
        "settings": {k: v for k, v in vars(args).items() if k != "report"} | {"dtype": str(dtype)},
        "shapes": {s: dims_of[s] for s in args.shapes.split(",")},
        "throughput": [],
        "maxbatch": [],
        "skipped": [],
    }

    def save():
        data["elapsed_s"] = time.perf_counter() - start
        (out / "decode_bench.json").write_text(json.dumps(data, indent=1) + "\n")

    def over_budget(what):
        if time.perf_counter() - start > args.budget_s:
            data["skipped"].append(what)
            print("skip (budget):", what, flush=True)
            return True
        return False

    batches = [int(b) for b in args.batches.split(",")]
    start_batch = {}
    for item in filter(None, (args.maxbatch_plan or "").split(";")):
        key, _, value = item.partition("=")
        shape_name, _, variant = key.partition(":")
        start_batch[(shape_name, variant)] = int(value) if value else None
    bases: dict = {}
    main_variants = {s: list(variants(s, ModelShape.of(llama_config(dims_of[s]))).keys()) for s in data["shapes"]}
    extra = {s: [v for v in main_variants[s] if "gather" in v] + ["llama (HF)"] for s in main_variants}
    main_variants = {s: [v for v in main_variants[s] if "gather" not in v] for s in main_variants}
    if args.variants:
        keep = args.variants.split(",")
        main_variants = {s: [v for v in vs if v in keep] for s, vs in main_variants.items()}

    def throughput(shape_name, variant):
        if over_budget(f"throughput {shape_name} {variant}"):
            return
        model, plan, layout = build(shape_name, dims_of[shape_name], variant, device, dtype, bases)
        one_run(model, device, batches[0], min(64, args.prompt), 4, cache_kind=args.throughput_cache)  # warm-up
        for b in batches:
            rec = {"batch": b, "oom": True}
            try:
                rec = median_runs(model, device, b, args.prompt, args.new, args.reps, args.throughput_cache)
            except torch.OutOfMemoryError:
                pass
            free(device)  # outside the handler, so the failed call's frames are gone
            weights = sum(t.numel() * t.element_size() for t in model.parameters())
            rec.update(shape=shape_name, variant=variant, layout=layout, weights_bytes=weights, **plan_facts(plan))
            data["throughput"].append(rec)
            print(summary(rec), flush=True)
            save()
        del model
        free(device)

    def maxbatch(shape_name, variant):
        if over_budget(f"maxbatch {shape_name} {variant}"):
            return
        model, plan, layout = build(shape_name, dims_of[shape_name], variant, device, dtype, bases)
        bases.clear()  # only this variant's weights count under the cap
        tokens = args.prompt + args.maxbatch_new
        kv_seq = plan.kv_bytes_per_token(2 if dtype == torch.bfloat16 else 4) * tokens
        rec = {"shape": shape_name, "variant": variant, "layout": layout, **plan_facts(plan), "tries": []}
        rec.update(cache=args.cache, chunk=args.chunk)
        if device.type == "cuda":
            free(device)
            total = torch.cuda.get_device_properties(device).total_memory
            cap = int(args.cap_gib * 2**30)
            weights = torch.cuda.memory_allocated(device)
            b = start_batch.get((shape_name, variant))
            if b is None and args.cache == "static":
                b, rec["probe"] = predicted_max_batch(
                    model, device, args.prompt, args.maxbatch_new, args.chunk, cap - weights
                )
            elif b is None:
                # cache + one layer's copy while the dynamic cache grows + a chunk's activations (rough)
                per_seq = kv_seq * (1 + 1 / plan.shape.num_layers) + args.chunk * model.config.intermediate_size * 2 * 4
                b = int(0.97 * (cap - weights - 2**28) / per_seq)
            torch.cuda.set_per_process_memory_fraction(cap / total, device)
        else:
            cap, weights, b = None, 0, batches[-1]
        run, ran_b, oom_b = None, None, None
        try:
            # Bracket the largest batch by measurement: shrink by --maxbatch-step on OOM until one runs; after a
            # first-try success, grow by the same step until one fails. ran_b ran, oom_b (the smallest failure
            # above it) did not: the true limit lies in [ran_b, oom_b).
            for _ in range(args.maxbatch_tries):
                try:
                    got = one_run(
                        model, device, b, args.prompt, args.maxbatch_new, chunk=args.chunk, cache_kind=args.cache
                    )
                except torch.OutOfMemoryError:
                    got = None
                rec["tries"].append({"batch": b, "ok": got is not None})
                print("  try", shape_name, variant, b, "ok" if got else "OOM", flush=True)
                free(device)  # outside the handler, so the failed call's frames are gone
                if got is not None:
                    run, ran_b = got, b
                    if cap is None or oom_b is not None or time.perf_counter() - start > args.budget_s:
                        break
                    b = max(b + 1, int(b * (1 + args.maxbatch_step)))
                else:
                    oom_b = b if oom_b is None else min(oom_b, b)
                    if ran_b is not None:
                        break
                    b = int(b * (1 - args.maxbatch_step))
        finally:
            if device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, device)
        b = ran_b
        rec.update(cap_bytes=cap, weights_bytes=weights, kv_bytes_per_seq=kv_seq, run=run)
        rec.update(max_batch_ran=ran_b, min_batch_oom=oom_b)
        if run and cap:
            per_seq_meas = run["peak_over_weights"] / b
            rec["max_batch_extrapolated"] = int((cap - weights) / per_seq_meas)
            rec["peak_per_seq"] = per_seq_meas
        data["maxbatch"].append(rec)
        print("maxbatch", shape_name, variant, rec["tries"], rec.get("max_batch_extrapolated"), flush=True)
        save()
        del model
        free(device)

    def guarded(fn, s, v):
        try:
            fn(s, v)
        except Exception as e:  # a broken measurement must not lose the others
            data.setdefault("errors", []).append(f"{fn.__name__} {s} {v}: {type(e).__name__}: {e}")
            print("ERROR", data["errors"][-1], flush=True)
            if device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, device)
            free(device)
            save()

    if args.only != "maxbatch":
        for s in data["shapes"]:
            for v in main_variants[s]:
                guarded(throughput, s, v)
    if args.only != "throughput":
        if start_batch:  # only the listed variants, in the order given
            for s, v in start_batch:
                guarded(maxbatch, s, v)
        for s in data["shapes"] if not start_batch else []:
            for v in main_variants[s]:
                guarded(maxbatch, s, v)
        if args.only == "maxbatch" and not start_batch:  # gather rows last, so the budget skips them first
            for s in data["shapes"]:
                for v in [v for v in extra[s] if "gather" in v]:
                    guarded(maxbatch, s, v)
    if args.only is None:
        for s in data["shapes"]:
            for v in extra[s]:
                guarded(throughput, s, v)
    save()
    (out / "decode_bench.md").write_text(report(data))
    print(report(data))


def extrapolated_max_batch(data: dict, rows: dict, batches: list[int]) -> list[str]:
    """Largest batch under a memory cap, from the peaks measured at the two largest throughput batches."""
    if len(batches) < 2 or data["env"].get("gpu_mem_gib") is None:
        return []
    b1, b2 = batches[-2], batches[-1]
    st, gib = data["settings"], 2**30
    caps = [("16 GiB", 16 * gib), (f"whole GPU ({data['env']['gpu_mem_gib']} GiB)", data["env"]["gpu_mem_gib"] * gib)]
    lines = [
        "",
        f"## Largest batch, extrapolated from measured peaks (prompt {st['prompt']} + {st['new']} new, plain generate)",
        "",
        f"Peak allocated memory is linear in the batch: per-sequence peak = slope between B={b1} and B={b2}; "
        "max batch = (cap − weights − intercept) / slope. KV-only: (cap − weights) / cache bytes per sequence "
        "(cache_bytes measured, = analytic), i.e. what the cache alone allows (prefill in chunks would approach it).",
        "",
        "| shape | variant | KV fraction | 1/KV frac | weights MiB | peak MiB/seq | cache MiB/seq | "
        + " | ".join(f"max B {c} | × base | KV-only max B {c} | × base" for c, _ in caps)
        + " |",
        "|" + "---|" * (7 + 4 * len(caps)),
    ]
    fits = {}
    for (shape, variant), by_b in rows.items():
        r1, r2 = by_b.get(b1), by_b.get(b2)
        if (
            not r1
            or not r2
            or "peak_over_weights" not in r1
            or "peak_over_weights" not in r2
            or variant == "llama (HF)"
        ):
            continue
        slope = (r2["peak_over_weights"] - r1["peak_over_weights"]) / (b2 - b1)
        intercept = r1["peak_over_weights"] - slope * b1
        cache_seq = r2["cache_bytes"] / b2
        w = r2.get("weights_bytes", 0)
        fits[(shape, variant)] = [
            (int((cap - w - intercept) / slope), int((cap - w) / cache_seq)) for _, cap in caps
        ] + [(slope, cache_seq, w, r2["kv_fraction"])]
    for (shape, variant), f in fits.items():
        slope, cache_seq, w, frac = f[-1]
        base = fits.get((shape, "base"))
        cells = [shape, variant, f"{frac:.3f}", f"{1 / frac:.2f}", f"{w / 2**20:.0f}"]
        cells += [f"{slope / 2**20:.1f}", f"{cache_seq / 2**20:.1f}"]
        for i in range(len(caps)):
            m, kvm = f[i]
            cells += [
                str(m),
                f"{m / base[i][0]:.2f}" if base else "",
                str(kvm),
                f"{kvm / base[i][1]:.2f}" if base else "",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plan_facts(plan: Plan) -> dict:
    return {
        "stored_kv_heads": plan.stored_kv_heads,
        "kv_fraction": plan.kv_fraction,
        "kv_bytes_per_token_bf16": plan.kv_bytes_per_token(2),
    }


def summary(rec: dict) -> str:
    if rec.get("oom"):
        return f"{rec['shape']} {rec['variant']} B={rec['batch']}: OOM"
    return (
        f"{rec['shape']:13} {rec['variant']:22} B={rec['batch']:<4} decode {rec['decode_tok_s']:9.1f} tok/s "
        f"step {rec['step_ms_median']:.2f} ms prefill {rec['prefill_s']:.3f} s "
        f"peak {rec.get('peak_over_weights', 0) / 2**30:.2f} GiB cache {rec['cache_bytes']}"
    )


def report(data: dict) -> str:
    env, st = data["env"], data["settings"]
    gib = 2**30
    lines = [
        "# Decode throughput and memory at matched KV bytes",
        "",
        f"Machine: {env.get('gpu', env['device'])} ({env.get('gpu_mem_gib', '?')} GiB, driver {env.get('driver', '?')}), "
        f"torch {env['torch']} (CUDA {env.get('cuda')}), transformers {env['transformers']}, Python {env['python']}; "
        f"{env['attn_implementation']}, dtype {st['dtype']}.",
        f"Command: `{env['argv']}`",
        f"Throughput runs: prompt {st['prompt']} + {st['new']} new tokens, greedy `generate()`, "
        f"{st.get('throughput_cache', 'dynamic')} cache, "
        f"median of {st['reps']} after a warm-up. Random weights: speed and memory depend on shapes only."
        if data["throughput"]
        else "Random weights: speed and memory depend on shapes only.",
        "",
    ]
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]
    rows: dict = {}
    for r in data["throughput"]:
        rows.setdefault((r["shape"], r["variant"]), {})[r["batch"]] = r
    batches = sorted({r["batch"] for r in data["throughput"]})
    if data["throughput"]:  # a --only maxbatch run has no throughput tables
        lines += ["## Decode tokens/s (median) and peak memory over the weights", ""]
        head = "| shape | variant | stored KV heads | KV bytes/token | " + " | ".join(f"tok/s B={b}" for b in batches)
        head += f" | step ms B={batches[-1] if batches else ''} | prefill s B={batches[-1] if batches else ''}"
        head += f" | peak GiB B={batches[-1] if batches else ''} |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for (shape, variant), by_b in rows.items():
            any_r = next(iter(by_b.values()))
            cells = [shape, variant, str(any_r["stored_kv_heads"]), str(any_r["kv_bytes_per_token_bf16"])]
            for b in batches:
                r = by_b.get(b)
                cells.append("OOM" if r and r.get("oom") else f"{r['decode_tok_s']:.0f}" if r else "")
            last = by_b.get(batches[-1], {})
            ok = last and not last.get("oom")
            cells.append(f"{last['step_ms_median']:.2f}" if ok else "")
            cells.append(f"{last['prefill_s']:.3f}" if ok else "")
            cells.append(f"{last['peak_over_weights'] / gib:.2f}" if ok and "peak_over_weights" in last else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "## Same-KV comparisons (decode tokens/s ratio)", ""]
        pairs = [
            ("smollm2-135m", "qcqa-ac-2/3", "gqa-2/3"),
            ("smollm2-135m", "qcqa-ec-2/3", "gqa-2/3"),
            ("smollm2-135m", "qcqa-ac-2/3", "qcqa-ac-2/3 (gather)"),
            ("mha-12l", "qcqa-ac-4", "gqa-4"),
            ("mha-12l", "qcqa-ec-4", "gqa-4"),
            ("mha-12l", "qcqa-ac-4", "qcqa-ac-4 (gather)"),
            ("smollm2-135m", "base", "llama (HF)"),
            ("mha-12l", "base", "llama (HF)"),
        ]
        lines += ["| shape | A | B | " + " | ".join(f"A/B B={b}" for b in batches) + " |"]
        lines += ["|" + "---|" * (3 + len(batches))]
        for shape, a, b in pairs:
            ra, rb = rows.get((shape, a)), rows.get((shape, b))
            if not ra or not rb:
                continue
            cells = []
            for bt in batches:
                x, y = ra.get(bt), rb.get(bt)
                ok = x and y and not x.get("oom") and not y.get("oom")
                cells.append(f"{x['decode_tok_s'] / y['decode_tok_s']:.3f}" if ok else "")
            lines.append(f"| {shape} | {a} | {b} | " + " | ".join(cells) + " |")
    if data["maxbatch"]:
        mst = data.get("maxbatch_settings", st)
        lines += [
            "",
            f"## Largest batch under a {mst['cap_gib']:g} GiB cap, measured ({mst.get('cache', 'dynamic')} cache, "
            f"prompt {mst['prompt']} prefilled in chunks of {mst['chunk']}, + {mst['maxbatch_new']} new tokens; "
            f"allocator: {data['env'].get('alloc_conf') or 'default'})",
            "",
            "Cap: torch.cuda.set_per_process_memory_fraction(cap / GPU memory); the cap covers the weights too. "
            "Largest B ran: the largest batch whose whole run (chunked prefill + generate) finished under the cap; "
            "first OOM: the smallest batch above it that ran out of memory (the limit lies between the two; tries in "
            f"steps of {mst.get('maxbatch_step', 0.05)}). × base: largest B ran over base's, against 1 / KV fraction. "
            "Extrapolated: (cap − weights) / measured peak per sequence of the largest run. Unchunked: the same "
            "from the plain-generate throughput peaks (B=64 and 256, 64 new tokens), for comparison. Cache and "
            "overhead per sequence: the cache's bytes and the rest of the peak over the weights, divided by the "
            "largest batch that ran.",
            "",
            "| shape | variant | KV fraction | 1/KV frac | largest B ran | first OOM B | × base | peak GiB (incl. weights) "
            "| cache MiB/seq | overhead MiB/seq "
            "| extrapolated max B | × base | decode tok/s at largest B | step ms | unchunked max B (extrap.) | × base |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        # Unchunked prefill (plain generate): per-sequence peak from the two largest throughput batches.
        unchunked = {}
        for r in data["maxbatch"]:
            by_b = rows.get((r["shape"], r["variant"]), {})
            ok = [b for b in batches if b in by_b and "peak_over_weights" in by_b[b]]
            if len(ok) >= 2 and r.get("cap_bytes"):
                b1, b2 = ok[-2], ok[-1]
                slope = (by_b[b2]["peak_over_weights"] - by_b[b1]["peak_over_weights"]) / (b2 - b1)
                unchunked[(r["shape"], r["variant"])] = int((r["cap_bytes"] - r["weights_bytes"]) / slope)
        base = {r["shape"]: r for r in data["maxbatch"] if r["variant"] == "base"}

        def ratio(x, y):
            return f"{x / y:.2f}" if x and y else ""

        for r in data["maxbatch"]:
            run, b0 = r.get("run") or {}, base.get(r["shape"], {})
            ran = r.get("max_batch_ran", run.get("batch"))
            m = r.get("max_batch_extrapolated")
            un = unchunked.get((r["shape"], r["variant"]))
            cells = [
                r["shape"],
                r["variant"],
                f"{r['kv_fraction']:.3f}",
                f"{1 / r['kv_fraction']:.2f}",
                str(ran or "none"),
                str(r.get("min_batch_oom") or "not reached"),
                ratio(ran, b0.get("max_batch_ran")),
                f"{(run['peak_over_weights'] + r['weights_bytes']) / gib:.2f}" if "peak_over_weights" in run else "",
                f"{run['cache_bytes'] / ran / 2**20:.1f}" if run else "",
                f"{(run['peak_over_weights'] - run['cache_bytes']) / ran / 2**20:.2f}"
                if "peak_over_weights" in run
                else "",
                str(m or ""),
                ratio(m, b0.get("max_batch_extrapolated")),
                f"{run['decode_tok_s']:.0f}" if run else "",
                f"{run['step_ms_median']:.2f}" if run else "",
                str(un or ""),
                ratio(un, unchunked.get((r["shape"], "base"))),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if "maxbatch_expandable_segments" in data:  # a later run's results, written up by hand and kept in the JSON
        lines += ["", data["maxbatch_expandable_segments"]["markdown"]]
    lines += extrapolated_max_batch(data, rows, batches)
    lines += [
        "",
        "## KV cache: measured on the device vs analytic",
        "",
        "cache_bytes: kvshare.modeling.cache_bytes of the returned cache; allocated: torch.cuda.memory_allocated "
        "with the cache alive minus before the call (less the output ids); analytic: batch × cached tokens × "
        "Plan.kv_bytes_per_token(2). Throughput runs at the largest batch, then the largest max-batch runs.",
        "",
        "| shape | variant | cache | batch | cached tokens | cache_bytes | allocated | analytic | cache/analytic |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    largest = [r for r in data["throughput"] if not r.get("oom") and r["batch"] == batches[-1]]
    facts = ("shape", "variant", "kv_bytes_per_token_bf16")
    largest += [m["run"] | {k: m[k] for k in facts} for m in data["maxbatch"] if m.get("run")]
    for r in largest:
        if r["variant"] == "llama (HF)":
            continue
        bpt = r["kv_bytes_per_token_bf16"] * (1 if st["dtype"] == "torch.bfloat16" else 2)
        analytic = r["batch"] * r["cached_tokens"] * bpt
        lines.append(
            f"| {r['shape']} | {r['variant']} | {r.get('cache', 'dynamic')} | {r['batch']} | {r['cached_tokens']} | "
            f"{r['cache_bytes']} | {r.get('alloc_delta_with_cache', '')} | {analytic} | "
            f"{r['cache_bytes'] / analytic:.4f} |"
        )
    if data.get("errors"):
        lines += ["", "Errors: " + "; ".join(data["errors"])]
    if data["skipped"]:
        lines += ["", "Skipped for the time budget: " + "; ".join(data["skipped"])]
    lines += ["", f"Script wall time: {data.get('elapsed_s', 0):.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
