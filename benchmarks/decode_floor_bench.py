"""Decode against its memory-bandwidth floor, and prefill of unequal groups (issue 15).

A decode step reads every weight and every cached K/V once: its floor is
``(weight bytes + batch × context × KV bytes per token) / bandwidth`` (4.3e12 B/s for
the H200; context = prompt + new / 2, the mean over the steps). Each cell is one
(shape, variant, phase, batch) and records its step time, floor and fraction of floor.

Variants, at matched KV bytes where the shape allows: ``gqa`` / ``qcqa-ac`` (unequal
groups, sizes differing by layer) / ``qcqa-ec`` (equal groups within a layer, counts
differing by layer) keep half the KV heads (llama2-7b: 16 of 32 per layer), ``cla2``
halves by sharing across layer pairs, ``mqa`` is its own point; ``hf-static`` is the
plain GQA export (a ``LlamaForCausalLM``) with transformers' StaticCache and compiled
generate: what a user has today. The small shapes take decode_bench.py's variants.

All models are built on the device in bf16 with random weights (speed depends on
shapes only) and converted with kvshare.merge.convert_model; decode runs
``generate`` with a static cache and the compiled decode step
(kvshare.decode.compile_for_decode: torch.compile "reduce-overhead", CUDA graphs).

Phases:

* ``decode``: at each batch, the variants alternate rep by rep (medians of their
  per-run median step). No prefill is run: the static cache is marked as holding
  prompt − 1 tokens (a step reads the same bytes whatever they hold), generate()
  feeds the last prompt token and decodes ``--new`` tokens. A warm-up run per cell
  compiles (its time is recorded as ``warmup_s``).
* ``prefill``: ``--prefill-batch`` × prompt tokens into an empty static cache, eager
  (as generate's prefill), variants alternating.
* ``max``: the largest batch whose weights + cache + working set fit ``--mem-gib``
  (from the analytic KV size), one variant at a time, shrunk by 10% on OOM.

Results merge into ``<out>/decode_floor.json`` (one entry per cell, replaced when
re-run, each with its command) and ``<out>/decode_floor.md``, so the bench runs in
pieces of a few minutes each; pieces written to separate folders are merged with
``--merge DIR1/decode_floor.json DIR2/decode_floor.json ... --out DIR``:

    PYTHONPATH=src python benchmarks/decode_floor_bench.py --shape llama2-7b --variants gqa,qcqa-ac,hf-static \\
        --phase decode --batches 1,32 --out DIR
    PYTHONPATH=src python benchmarks/decode_floor_bench.py --smoke --out DIR     # CPU, tiny shapes, < 1 min
    python benchmarks/decode_floor_bench.py --report DIR                         # the markdown only
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).parent))
import decode_bench as db  # noqa: E402
import machine  # noqa: E402

from kvshare.decode import (  # noqa: E402
    GraphDecoder,
    compile_for_decode,
    floor_seconds,
    kv_bytes_per_token,
    kv_read_bytes_per_token,
    static_cache,
)
from kvshare.io import atomic_write_json, atomic_write_text  # noqa: E402
from kvshare.merge import convert_model  # noqa: E402
from kvshare.plan import ModelShape, Plan, cla_pattern  # noqa: E402

free, sync = db.free, db.sync  # gc + empty_cache; a device sync
BANDWIDTH = 4.3e12  # H200 HBM3e, bytes/s: the device-to-device copy rate measured on it (issue 15)
LLAMA2_7B = dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32, head_dim=128, vocab_size=32000)  # fmt: skip
SHAPES = {"llama2-7b": LLAMA2_7B, **db.SHAPES}
SMOKE_SHAPES = {"llama2-7b": dict(LLAMA2_7B, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                  num_attention_heads=8, num_key_value_heads=8, head_dim=8, vocab_size=512),
                **db.SMOKE_SHAPES}  # fmt: skip
VARIANTS = ("gqa", "qcqa-ac", "qcqa-ec", "cla2", "mqa", "hf-static")
# decode_bench's names for the variants of its shapes.
DB_NAMES = {
    "smollm2-135m": {
        "gqa": "gqa-2/3",
        "qcqa-ac": "qcqa-ac-2/3",
        "qcqa-ec": "qcqa-ec-2/3",
        "cla2": "cla2",
        "mqa": "mqa",
    },
    "mha-12l": {"gqa": "gqa-4", "qcqa-ac": "qcqa-ac-4", "qcqa-ec": "qcqa-ec-4", "cla2": "cla2"},
}


def half_kv_plans(shape: ModelShape) -> dict[str, Plan]:
    """Half the KV heads of every layer (gqa, qcqa-ac, qcqa-ec) or of the model (cla2), and mqa."""
    layers, kv = shape.num_layers, shape.num_kv_heads
    half, rng = kv // 2, random.Random(0)
    ac, ec = [], []
    for i in range(layers):
        sizes = [1] * half
        for _ in range(kv - half):  # unequal group sizes, differing by layer
            sizes[rng.randrange(half)] += 1
        ac.append([g for g, s in enumerate(sizes) for _ in range(s)])
        per = (1, 4, 2, 4)[i % 4]  # equal groups within a layer: kv, kv/4, kv/2, kv/4 heads, half on average
        ec.append([h // per for h in range(kv)])
    for labels in ac + ec:
        rng.shuffle(labels)  # scattered members (conversion makes each group's queries contiguous)
    every = tuple(range(layers))
    return {
        "gqa": Plan(shape, (tuple(h // 2 for h in range(kv)),) * layers, every, "gqa"),
        "qcqa-ac": Plan(shape, tuple(map(tuple, ac)), every, "qcqa-ac"),
        "qcqa-ec": Plan(shape, tuple(map(tuple, ec)), every, "qcqa-ec"),
        "cla2": Plan.identity(shape).with_cla(cla_pattern(layers, 2)),
        "mqa": Plan(shape, ((0,) * kv,) * layers, every, "mqa"),
    }


def plans_of(shape_name: str, shape: ModelShape) -> dict[str, Plan]:
    if shape_name not in DB_NAMES:
        return half_kv_plans(shape)
    theirs = db.variants(shape_name, shape)
    out = {v: theirs[name][0] for v, name in DB_NAMES[shape_name].items()}
    out.setdefault("mqa", half_kv_plans(shape)["mqa"])
    return out


def build_models(shape_name, dims, variants, device, dtype, args) -> dict:
    """Variant → model, built on ``device`` from one random base (freed before returning)."""
    config = db.llama_config(dims)
    config.tie_word_embeddings = shape_name != "llama2-7b"  # Llama-2 has its own lm_head
    with torch.device(device):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    plans = plans_of(shape_name, ModelShape.of(base.config))
    models = {}
    for v in variants:
        with torch.device(device):
            if v == "hf-static":
                model = convert_model(base, plans["gqa"], export=True)
                if type(model).__name__ != "LlamaForCausalLM":
                    print(f"skip {shape_name} hf-static: its gqa variant is not plain GQA", flush=True)
                    continue
            else:
                model = convert_model(base, plans[v])
        model.generation_config.eos_token_id = None
        # Modes are inductor's ("reduce-overhead": CUDA graphs); the "cudagraphs" backend graphs without inductor.
        mode = "reduce-overhead" if args.backend == "inductor" else None
        backend = (
            dict(backend="eager", mode=None, all_devices=True) if args.smoke else dict(backend=args.backend, mode=mode)
        )
        model = model.to(device)
        for module in model.modules():
            if hasattr(module, "prefill_attention"):
                module.prefill_attention = args.prefill_attention
        if v == "hf-static" or args.decoder == "generate":
            models[v] = compile_for_decode(model, attention=args.decode_attention, **backend)
        else:
            models[v] = model
        models[v].kvshare_plan = plans["gqa" if v == "hf-static" else v]
    del base
    free(device)
    return models


def fill_context(cache, tokens: int) -> None:
    """Mark ``tokens`` positions of a static cache as written (left as allocated: a step reads the same bytes
    whatever they hold), so a decode step can be timed at any context without running the prefill."""
    cache.reset()
    for layer in cache.layers:
        if layer.is_initialized:
            layer.cumulative_length.fill_(tokens)
        if hasattr(layer, "length"):  # kvshare's _StaticKV: its Python count
            layer.length = tokens


def decode_run(model, cache, batch, prompt, new, seed, device) -> float:
    """One generate() call from a cache holding prompt − 1 tokens; the median decode step in seconds."""
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)
    fill_context(cache, prompt - 1)
    clock = db.StepClock(device)
    greedy = dict(max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        clocked = LogitsProcessorList([clock])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), past_key_values=cache, logits_processor=clocked, **greedy
        )
    if out.shape[1] != prompt + new:
        raise RuntimeError(f"generated {out.shape[1] - prompt} tokens, not {new}")
    return statistics.median(b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False))


def prefill_run(model, batch, prompt, seed, device) -> float:
    """Seconds to prefill ``batch`` × ``prompt`` tokens into an empty static cache (eager, as in generate)."""
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)
    cache = static_cache(model, batch, prompt + 1)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, logits_to_keep=1)
    sync(device)
    return time.perf_counter() - t0


def facts(model, batch, args) -> dict:
    """Bytes a decode step reads and its floor."""
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    kv = kv_bytes_per_token(model.config, model.dtype.itemsize)
    context = args.prompt + args.new / 2
    floor = floor_seconds(weights, kv, batch, context, args.bandwidth)
    read = kv_read_bytes_per_token(model.config, model.dtype.itemsize)
    plan = model.kvshare_plan
    rec = dict(bandwidth=args.bandwidth, weights_bytes=weights, kv_bytes_per_token=kv, context=context, floor_ms=1e3 * floor,
               read_floor_ms=1e3 * floor_seconds(weights, read, batch, context, args.bandwidth),
               stored_kv_heads=plan.stored_kv_heads, kv_fraction=plan.kv_fraction)  # fmt: skip
    if args.matmul_rate:  # large batches: the products bound by compute, not by reading weights
        products = 2 * batch * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        compute = max(weights / args.bandwidth, products / args.matmul_rate)
        rec["compute_floor_ms"] = 1e3 * (compute + batch * context * kv / args.bandwidth)
    return rec


def max_batch(model, args) -> int:
    """The largest batch whose weights, cache and decode working set (mostly float32 logits) fit --mem-gib."""
    f = facts(model, 1, args)
    cache_seq = (args.prompt + args.new) * f["kv_bytes_per_token"]
    work_seq = 4 * 4 * model.config.vocab_size + 64 * model.config.hidden_size
    room = args.mem_gib * 2**30 - f["weights_bytes"] - args.reserve_gib * 2**30
    return max(1, int(room / (cache_seq + work_seq)))


def uses_graph(model, args) -> bool:
    return args.decoder == "graph" and type(model).__name__ == "KVShareLlamaForCausalLM"


def warm_up(model, batch, args, device):
    """The cell's cache (the graph path: its GraphDecoder), after a first run that compiles the decode step and
    records its CUDA graphs."""
    if uses_graph(model, args):
        backend = None if args.smoke else "inductor"
        decoder = GraphDecoder(model, batch, args.prompt + args.new - 1, attention=args.decode_attention,
                               backend=backend, gemv=args.gemv, compile_unit=args.compile_unit)  # fmt: skip
        decoder.warm_up()
        graph_run(decoder, batch, args.prompt, min(args.new, 8), 0, device)
        return decoder
    cache = static_cache(model, batch, args.prompt + args.new - 1)
    decode_run(model, cache, batch, args.prompt, min(args.new, 8), 0, device)
    return cache


def graph_run(decoder, batch, prompt, new, seed, device) -> float:
    """``new`` steps of a GraphDecoder from a cache holding prompt − 1 tokens (as allocated: a step reads the same
    bytes whatever they hold); the mean step in seconds (the steps run back to back: no per-step clock)."""
    ids = torch.randint(3, decoder.model.config.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(seed))
    decoder.start(ids.to(device), prompt - 1)
    sync(device)
    t0 = time.perf_counter()
    decoder.decode(new)
    sync(device)
    return (time.perf_counter() - t0) / new


def kernel_profile(decoder, batch, prompt, steps, device) -> dict:
    """Each kernel's time and count per step over ``steps`` steps replayed from the decoder's graphs (torch.profiler;
    on the CPU, each op's), their total and count: the step's time less the total is what launch gaps cost."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    decoder.start(torch.zeros(batch, 1, dtype=torch.long, device=device), prompt - 1)
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        decoder.decode(steps)
        sync(device)
    kernels = [(e.key, (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / steps, e.count / steps)
               for e in prof.key_averages() if not cuda or e.device_type.name == "CUDA"]  # fmt: skip
    kernels = sorted((k for k in kernels if k[1] > 0), key=lambda k: -k[1])
    return dict(kernel_ms_per_step=sum(k[1] for k in kernels), kernels_per_step=sum(k[2] for k in kernels),
                top_kernels=[[name[:160], round(ms, 5), count] for name, ms, count in kernels[:30]])  # fmt: skip


def time_decode(models, batch, args, device, record, phase="decode", ready=None) -> None:
    """One batch, the variants alternating rep by rep; ``ready``: variant → (warmed-up cache, warm-up seconds)."""
    ready = ready or {}
    caches = {v: c for v, (c, _) in ready.items()}
    warm = {v: w for v, (_, w) in ready.items()}
    for v, model in models.items():
        if v in caches:
            continue
        t0 = time.perf_counter()
        try:
            caches[v] = warm_up(model, batch, args, device)
            warm[v] = time.perf_counter() - t0
        except Exception as e:  # an OOM or a failure is a cell too (a miss)
            record(v, phase, batch, {"batch": batch, "error": error_text(e)})
            free(device)

    def run(v, rep):
        go = graph_run if isinstance(caches[v], GraphDecoder) else lambda *a: decode_run(models[v], *a)
        return go(caches[v], batch, args.prompt, args.new, rep, device)

    runs = {v: lambda rep, v=v: run(v, rep) for v in caches}
    steps = alternate(runs, args.reps, lambda v, e: record(v, phase, batch, {"batch": batch, "error": error_text(e)}))
    for v, s in steps.items():
        f = facts(models[v], batch, args)
        step = statistics.median(s)
        rec = f | dict(batch=batch, step_ms=1e3 * step, step_ms_reps=[1e3 * x for x in s], warmup_s=warm[v])
        rec.update(tok_s=batch / step, fraction_of_floor=f["floor_ms"] / (1e3 * step))
        cache = caches[v].cache if isinstance(caches[v], GraphDecoder) else caches[v]
        rec["cache_bytes_exact"] = cache_bytes_exact(cache, models[v], batch, args)
        if args.profile and isinstance(caches[v], GraphDecoder):
            rec |= kernel_profile(caches[v], batch, args.prompt, min(args.new, 16), device)
        record(v, phase, batch, rec)
    caches.clear()
    free(device)


def cache_bytes_exact(cache, model, batch, args) -> bool:
    """kvshare.modeling.cache_bytes of the cache equals batch × tokens × the analytic bytes per token."""
    from kvshare.modeling import cache_bytes

    analytic = batch * (args.prompt + args.new - 1) * kv_bytes_per_token(model.config, model.dtype.itemsize)
    return cache_bytes(cache) == analytic


def error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


def alternate(runs: dict, reps: int, miss) -> dict[str, list[float]]:
    """``runs``: variant → f(rep) → seconds, called rep by rep with the variants in turn. A variant that fails is
    passed to ``miss(variant, error)`` and dropped, so the others are still measured."""
    out = {v: [] for v in runs}
    for rep in range(1, reps + 1):
        for v in list(out):
            try:
                out[v].append(runs[v](rep))
            except Exception as e:
                miss(v, e)
                del out[v]
    return out


def time_prefill(models, args, device, record) -> None:
    """Prefill of --prefill-batch × prompt tokens, the variants alternating, after a short warm-up each."""

    def miss(v, e):
        record(v, "prefill", args.prefill_batch, {"batch": args.prefill_batch, "error": error_text(e)})

    warm = {
        v: lambda rep, m=m: prefill_run(m, args.prefill_batch, min(args.prompt, 256), 0, device)
        for v, m in models.items()
    }
    ok = alternate(warm, 1, miss)  # cuBLAS, allocator
    runs = {v: lambda rep, m=models[v]: prefill_run(m, args.prefill_batch, args.prompt, rep, device) for v in ok}
    times = alternate(runs, args.reps, miss)
    tokens = args.prefill_batch * args.prompt
    for v, t in times.items():
        s = statistics.median(t)
        record(v, "prefill", args.prefill_batch, dict(batch=args.prefill_batch, prefill_s=s, prefill_s_reps=t,
                                                      tok_s=tokens / s))  # fmt: skip


def time_max(model, variant, args, device, record) -> None:
    """One variant at the largest batch that fits --mem-gib, shrunk by 10% while it runs out of memory."""
    b, ready = args.max_batch or max_batch(model, args), None
    for _ in range(4):
        t0 = time.perf_counter()
        try:
            ready = {variant: (warm_up(model, b, args, device), time.perf_counter() - t0)}
        except torch.OutOfMemoryError:
            print(f"  max: OOM at batch {b}", flush=True)
        if ready:
            break
        free(device)  # out of the except block: its traceback held the failed try's tensors
        b = int(b * 0.9)
    time_decode({variant: model}, b, args, device, record, phase="max", ready=ready)


def path_of(variant: str, phase: str, args) -> str:
    """How a cell decodes: "graph/<attention>/<gemv>" (kvshare.decode.GraphDecoder) or "generate/<attention>"
    (compiled generate; transformers' own attention for hf-static); prefill is the model's eager forward
    ("forward/<prefill attention>")."""
    if phase == "prefill":
        return "forward/hf" if variant == "hf-static" else f"forward/{args.prefill_attention}"
    if variant == "hf-static":
        return "generate/hf"
    if args.decoder == "graph":
        unit = "" if args.compile_unit == "layer" else "/step-compiled"
        return f"graph/{args.decode_attention}/{args.gemv}{unit}"
    return f"generate/{args.decode_attention}"


def cell_key(shape, variant, phase, batch, path) -> str:
    return f"{shape}|{variant}|{phase}|{batch}|{path}"


def load(out: Path) -> dict:
    path = out / "decode_floor.json"
    data = json.loads(path.read_text()) if path.exists() else {"cells": {}, "machines": {}}
    for key, rec in list(data["cells"].items()):  # cells of 2026-12-02, before paths: compiled generate
        if "path" not in rec:
            rec["variant"] = rec["variant"].split()[0]
            args = argparse.Namespace(decoder="generate", decode_attention=rec.get("decode_attention", "sdpa"),
                                      prefill_attention="buckets")  # fmt: skip
            rec["path"] = path_of(rec["variant"], rec["phase"], args)
            del data["cells"][key]
            data["cells"][cell_key(rec["shape"], rec["variant"], rec["phase"], rec.get("batch"), rec["path"])] = rec
    return data


def save(data: dict, out: Path) -> None:
    atomic_write_json(out / "decode_floor.json", data)
    atomic_write_text(out / "decode_floor.md", report(data))


def median_seconds(run, device, reps: int = 10) -> float:
    """The median time of ``run()`` over ``reps`` calls, after one to warm up."""
    times = []
    for _ in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def copy_rate(device, nbytes: int = 2**31) -> float:
    """Bytes read and written per second by a device-to-device copy (median of 10)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * nbytes / median_seconds(lambda: b.copy_(a), device)


def matmul_rate(device, n: int = 8192) -> float:
    """Floating-point operations per second of a bf16 n × n × n matrix product (median of 10)."""
    a, b = torch.randn(2, n, n, device=device, dtype=torch.bfloat16).unbind(0)
    return 2 * n**3 / median_seconds(lambda: a @ b, device)


def run_piece(args, device, dtype, data, out) -> None:
    env = machine.environment(device)
    if args.mem_gib is None:
        args.mem_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 16.0
    if device.type == "cuda":
        env["copy_rate_Bps"] = copy_rate(device)
        env["matmul_flops"] = args.matmul_rate = matmul_rate(device)
        args.bandwidth = BANDWIDTH if "H200" in env.get("gpu", "") else env["copy_rate_Bps"]
    else:
        args.bandwidth, args.matmul_rate = BANDWIDTH, None  # no compute floor off the GPU
    env_id = f"{env.get('gpu', env['device'])} / {env['host']}"
    data["machines"][env_id] = env
    dims_of = SMOKE_SHAPES if args.smoke else SHAPES

    for shape in args.shape.split(","):
        variants = [v for v in (args.variants or ",".join(VARIANTS)).split(",") if v]

        def record(variant, phase, batch, rec, shape=shape):
            path = path_of(variant, phase, args)
            rec |= dict(shape=shape, variant=variant, phase=phase, path=path, machine=env_id, command=env["argv"])
            rec |= dict(prompt=args.prompt, new=args.new, reps=args.reps, backend=args.backend, dtype=str(dtype))
            rec["decode_attention"] = args.decode_attention
            rec["when"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            data["cells"][cell_key(shape, variant, phase, batch, path)] = rec
            save(data, out)
            print(summary(rec), flush=True)

        if args.phase == "max":  # one variant on the device at a time
            for v in variants:
                for model in build_models(shape, dims_of[shape], [v], device, dtype, args).values():
                    time_max(model, v, args, device, record)
                free(device)
            continue
        try:
            models = build_models(shape, dims_of[shape], variants, device, dtype, args)
        except Exception as e:  # every cell of the piece is a miss
            for v in variants:
                record(v, args.phase, "build", {"error": error_text(e)})
            continue
        if args.phase == "prefill":
            time_prefill(models, args, device, record)
        else:
            for b in [int(x) for x in args.batches.split(",")]:
                time_decode(models, b, args, device, record)
        del models
        free(device)


def summary(rec: dict) -> str:
    head = f"{rec['shape']} {rec['variant']} {rec['phase']} B={rec.get('batch')}"
    if "error" in rec:
        return f"{head}: {rec['error']}"
    if rec["phase"] == "prefill":
        return f"{head}: {rec['tok_s']:.0f} tok/s ({rec['prefill_s']:.3f} s)"
    return (f"{head}: step {rec['step_ms']:.4g} ms, floor {rec['floor_ms']:.4g} ms ({rec['fraction_of_floor']:.2f}), "
            f"{rec['tok_s']:.0f} tok/s, warm-up {rec['warmup_s']:.0f} s")  # fmt: skip


HEAD = ["shape", "variant", "path", "phase", "batch", "KV heads", "KV B/token", "step ms", "floor ms", "of floor", "tok/s",
        "× gqa", "× gqa by floor", "warm-up s", "cache exact", "cmd"]  # fmt: skip


def table_row(r: dict, base: dict | None, cmd: int) -> str:
    """One cell; ``base``: gqa's cell to compare with (same shape, phase and batch; max: gqa's largest batch)."""
    row = [r["shape"], r["variant"], r["path"], r["phase"], str(r.get("batch"))] + [""] * (len(HEAD) - 6)
    row.append(f"[{cmd}]")
    if "error" in r:
        row[5] = f"miss: {r['error']}"
        return "| " + " | ".join(row) + " |"
    row[10] = f"{r['tok_s']:.0f}"
    if base:
        row[11] = f"{r['tok_s'] / base['tok_s']:.3f}"
    if r["phase"] == "prefill":  # batch × prompt tokens; "step ms" holds the prefill's time
        row[3], row[7] = f"prefill ×{r['prompt']}", f"{1e3 * r['prefill_s']:.1f}"
        return "| " + " | ".join(row) + " |"
    row[5:10] = [str(r["stored_kv_heads"]), str(r["kv_bytes_per_token"]), f"{r['step_ms']:.4g}",
                 f"{r['floor_ms']:.4g}", f"{r['fraction_of_floor']:.2f}"]  # fmt: skip
    if base:  # what the floor predicts: floor tokens/s over gqa's
        row[12] = f"{(r['batch'] / r['floor_ms']) / (base['batch'] / base['floor_ms']):.3f}"
    row[13:15] = [f"{r['warmup_s']:.0f}", str(r["cache_bytes_exact"])]
    return "| " + " | ".join(row) + " |"


def gqa_at_max(gqa: dict, shape: str, path: str) -> dict | None:
    """gqa's cell at its largest batch on ``path`` (the base of the max phase's ratios)."""
    return next((g for (s, phase, _, p), g in gqa.items() if (s, phase, p) == (shape, "max", path)), None)


def targets(cells: list[dict], gqa: dict) -> list[str]:
    """The issue's targets, each as met or not from the cells measured, path by path. ``gqa``: (shape, phase,
    batch, path) → gqa's cell."""
    lines = ["", "## Targets", ""]
    for r in cells:
        if "error" in r or r["variant"] == "hf-static":
            continue
        key = (r["shape"], r["phase"], r.get("batch"), r["path"])
        where, base = f"{r['shape']} {r['variant']} [{r['path']}]", gqa.get(key)
        if r["phase"] == "decode" and r["batch"] in (1, 32):
            ok = r["fraction_of_floor"] >= 0.80
            line = (f"- {'met' if ok else 'MISSED'}: {where} B={r['batch']} at {r['fraction_of_floor']:.2f} of its "
                    "floor (target ≥ 0.80)")  # fmt: skip
            if r.get("read_floor_ms", r["floor_ms"]) > r["floor_ms"]:  # CLA: attention reads shared K/V again
                line += (f"; counting the K/V its CLA layers read again, floor {r['read_floor_ms']:.4g} ms and "
                         f"{r['read_floor_ms'] / r['step_ms']:.2f} of it")  # fmt: skip
            lines.append(line)
        if r["variant"] == "qcqa-ac" and base and r["phase"] in ("decode", "prefill"):
            ratio, want = r["tok_s"] / base["tok_s"], 0.95 if r["phase"] == "decode" else 0.97
            lines.append(f"- {'met' if ratio >= want else 'MISSED'}: {where} {r['phase']} B={r['batch']}: "
                         f"{ratio:.3f}× gqa's tokens/s (target ≥ {want})")  # fmt: skip
        top = gqa_at_max(gqa, r["shape"], r["path"])
        if r["phase"] == "max" and top and r["variant"] != "gqa":
            by_floor = (r["batch"] / r["floor_ms"]) / (top["batch"] / top["floor_ms"])
            line = (f"- {where} at its largest batch (B={r['batch']}): {r['tok_s'] / top['tok_s']:.2f}× gqa's "
                    f"tokens/s (B={top['batch']}); the floor predicts {by_floor:.2f}×")  # fmt: skip
            if "compute_floor_ms" in r and "compute_floor_ms" in top:
                by_compute = (r["batch"] / r["compute_floor_ms"]) / (top["batch"] / top["compute_floor_ms"])
                line += (f", and {by_compute:.2f}× with the products bound by the measured GEMM rate where that is "
                         f"slower than reading their weights ({r['step_ms']:.4g} ms against {r['compute_floor_ms']:.4g})")  # fmt: skip
            lines.append(line)
    return lines


def report(data: dict) -> str:
    phases, names = ("decode", "max", "prefill"), list(VARIANTS)
    cells = sorted(data["cells"].values(), key=lambda r: (r["shape"], phases.index(r["phase"]), r.get("batch") or 0,
                                                          r["path"], names.index(r["variant"])))  # fmt: skip
    commands = sorted({r["command"] for r in cells})
    lines = ["# Decode at the memory-bandwidth bound (issue 15)", "", "Machines:", ""]
    for name, env in data["machines"].items():
        lines.append(f"- {name}: {env.get('gpu_mem_gib', '?')} GiB, driver {env.get('driver', '?')}, torch "
                     f"{env['torch']} (CUDA {env.get('cuda')}), transformers {env['transformers']}, "
                     f"Python {env['python']}, {env['cpus']} CPUs"
                     + (f", copy rate {env['copy_rate_Bps'] / 1e12:.2f} TB/s" if "copy_rate_Bps" in env else ""))  # fmt: skip
    lines += ["", "Floor: (weight bytes + batch × context × KV bytes per token) / bandwidth (4.3e12 B/s on the H200, "
              "else the device-to-device copy rate measured at the start of the piece), context = "
              "prompt + new / 2. Paths: `graph/<attention>/<gemv>` is kvshare.decode.GraphDecoder (CUDA graphs of "
              "whole steps replayed back to back; step = the run's time over its steps); `generate/<attention>` is "
              "generate() with a static cache and the decode step compiled (kvshare.decode.compile_for_decode; "
              "step = the median of the run's steps), `generate/hf` the same for the plain GQA export on "
              "transformers' StaticCache; each from a cache holding prompt − 1 tokens, the median over reps with "
              "the variants alternating. × gqa: tokens/s over gqa's in the same shape, path, phase and batch (max: "
              "each at its own largest batch); × gqa by floor: the same ratio of floor tokens/s. Prefill: batch × "
              "prompt tokens into an empty static cache, eager. Random bf16 weights: speed depends on shapes "
              "only.", ""]  # fmt: skip
    lines += ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    gqa = {(r["shape"], r["phase"], r.get("batch"), r["path"]): r for r in cells
           if r["variant"] == "gqa" and "error" not in r}  # fmt: skip
    for r in cells:
        top = [g for k, g in gqa.items() if (k[0], k[1], k[3]) == (r["shape"], "max", r["path"])]
        base = (
            (top or [None])[0] if r["phase"] == "max" else gqa.get((r["shape"], r["phase"], r.get("batch"), r["path"]))
        )
        lines.append(table_row(r, base, commands.index(r["command"]) + 1))
    lines += targets(cells, gqa)
    lines += ["", "Commands (PYTHONPATH=src, from the repository root):", ""]
    lines += [f"{i + 1}. `python {c}`" for i, c in enumerate(commands)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/decode_floor")
    ap.add_argument("--shape", default="llama2-7b", help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--variants", help=f"comma-separated, of {','.join(VARIANTS)} (default: all)")
    ap.add_argument("--phase", choices=["decode", "prefill", "max"], default="decode")
    ap.add_argument("--batches", default="1,32", help="decode batches")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--mem-gib", type=float,
                    help="memory the max phase fills (weights, cache, work; default: the device's)")  # fmt: skip
    ap.add_argument("--reserve-gib", type=float, default=4.0, help="kept free of cache in the max phase")
    ap.add_argument("--max-batch", type=int, help="the max phase's batch, instead of the one computed")
    ap.add_argument(
        "--backend",
        default="inductor",
        help="torch.compile backend of the decode step (inductor with "
        "reduce-overhead; cudagraphs: CUDA graphs of the traced step without inductor, faster to compile)",
    )
    ap.add_argument(
        "--decoder",
        choices=["graph", "generate"],
        default="graph",
        help="kvshare models' decode path: kvshare.decode.GraphDecoder, or compiled generate()",
    )
    ap.add_argument(
        "--decode-attention",
        choices=["flex", "sdpa", "matmul", "triton"],
        default="flex",
        help="kvshare models' decode attention (flex, triton: the graph path only)",
    )
    ap.add_argument("--compile-unit", choices=["layer", "step"], default="layer",
                    help="the graph path compiles each layer, or the whole step as one graph")  # fmt: skip
    ap.add_argument(
        "--prefill-attention",
        choices=["buckets", "gather"],
        default="buckets",
        help="kvshare models' prefill of unequal groups (kvshare.modeling.SharedKVAttention)",
    )
    ap.add_argument("--gemv", choices=["cublas", "triton"], default="triton",
                    help="the graph path's matrix products (kvshare.gemv's Triton kernel up to 16 rows: "
                    "kvshare.decode.GraphDecoder's gemv)")  # fmt: skip
    ap.add_argument("--profile", action="store_true",
                    help="the graph path's cells also record each kernel's time per step (torch.profiler)")  # fmt: skip
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, every phase, in well under a minute")
    ap.add_argument("--report", action="store_true", help="only rewrite the markdown from <out>/decode_floor.json")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge these pieces' results into <out> (no run)")
    args = ap.parse_args()
    out = Path(args.out)
    data = load(out)
    for piece in args.merge or []:  # later pieces replace earlier cells of the same key
        more = json.loads(Path(piece).read_text())
        data["cells"] |= more["cells"]
        data["machines"] |= more["machines"]
    if args.report or args.merge:
        save(data, out)
        return
    torch._dynamo.config.recompile_limit = 64  # one graph per model and batch; all share one forward
    torch._dynamo.config.automatic_dynamic_shapes = False  # each batch its own static graph, not a symbolic one
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not args.smoke:
        return run_piece(args, device, dtype, data, out)
    # Every phase and variant once, small: one decode batch, and a "memory" that fits about ten sequences.
    args.prompt, args.new, args.reps, args.prefill_batch, args.mem_gib, args.reserve_gib = 24, 6, 2, 2, 0.001, 0.0
    for phase, batches in (("decode", "2"), ("prefill", ""), ("max", "")):
        args.phase, args.batches = phase, batches
        run_piece(args, device, dtype, data, out)


if __name__ == "__main__":
    main()
