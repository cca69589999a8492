"""Fine-tuning throughput and MFU: transformers' ``Trainer`` against kvshare's loop, in one run (issue 5).

The model has SmolLM2-135M's shape (30 layers, hidden 576, FFN 1536, 9 query
heads, 3 KV heads, vocab 49152, tied embeddings) with random weights: speed
depends on shapes, not values. Tokens are random too. Every variant starts from
the same initial weights and trains with the same batch (``--micro-batch``
windows of ``--seq-len`` per forward, ``--global-batch`` per optimizer step):

* ``trainer``: ``transformers.Trainer`` with its defaults plus bf16, SDPA
  attention and fused AdamW (full float32 logits, eager modules);
* ``ours-eager``: :func:`kvshare.training.train` without torch.compile
  (chunked LM head + loss, fused AdamW, bf16 autocast);
* ``ours``: the same with torch.compile (what ``finetune.compile=auto`` does on CUDA);
* ``ours-cla2``: ``ours`` on the same shape with cross-layer attention (pairs of
  layers share K/V; kvshare.modeling; its decoder compiles whole), to measure that path.

Tokens/s are medians over steps after ``--warmup`` steps (compilation, autotuning),
each step ending with a device synchronisation; MFU counts 6 FLOPs per weight
per token plus attention's 12 x layers x hidden x seq_len, against ``--peak-flops``
(default: a bf16 8192^3 matmul timed on the same machine at the start of the run).
Imports only torch, transformers and kvshare's loop (no Hydra, no MLflow):

    PYTHONPATH=src python benchmarks/finetune_bench.py --out DIR      # GPU
    PYTHONPATH=src torchrun --nproc_per_node=2 benchmarks/finetune_bench.py --variants ours --out DIR  # DDP
    PYTHONPATH=src torchrun --nproc_per_node=2 benchmarks/finetune_bench.py --variants ours --parallel fsdp --out DIR
    PYTHONPATH=src python benchmarks/finetune_bench.py --smoke        # CPU, tiny, seconds

Results: benchmarks/results/finetune_bench.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from kvshare.modeling import KVShareLlamaConfig, KVShareLlamaForCausalLM
from kvshare.training import (
    Dist,
    TrainSettings,
    flops_per_token,
    leave_distributed,
    matmul_flops,
    setup_distributed,
    train,
)

SMOLLM2_135M = dict(
    num_hidden_layers=30,
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
    rope_theta=100000.0,
    max_position_embeddings=8192,
)
TINY = dict(SMOLLM2_135M, num_hidden_layers=2, hidden_size=72, intermediate_size=128, vocab_size=512)


def build(shape: dict, device: torch.device, cla: int = 1):
    torch.manual_seed(0)
    if cla == 1:
        return LlamaForCausalLM(LlamaConfig(**shape, use_cache=False, attn_implementation="sdpa")).to(device)
    layers = shape["num_hidden_layers"]
    config = KVShareLlamaConfig(**shape, kv_layer=[i - i % cla for i in range(layers)], attn_implementation="sdpa")
    return KVShareLlamaForCausalLM(config).to(device)


def run_trainer(model, tokens: np.ndarray, a, micro: int, device) -> dict:
    seq, n = a.seq_len, a.global_batch * (a.warmup + a.steps)
    windows = torch.from_numpy(tokens[: n * seq].astype(np.int64)).view(n, seq)
    data = [{"input_ids": w, "labels": w} for w in windows]  # the model shifts labels itself
    stamps, losses = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=a.warmup + a.steps,
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=a.global_batch // micro,
            learning_rate=1e-4,
            bf16=device.type == "cuda",
            optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=device.type == "cpu",
        )
        Trainer(model=model, args=args, train_dataset=data, callbacks=[Clock()]).train()
    step_times = np.diff(stamps)[a.warmup - 1 :]  # stamps[k] ends step k + 1
    return {"step_seconds": float(statistics.median(step_times)), "losses": losses}


def run_ours(model, tokens: np.ndarray, a, micro: int, device, dist: Dist, compile_: bool) -> dict:
    stamps, losses = [], []
    prof = None
    if a.profile:  # CUDA kernel times over two steps after the warm-up
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        schedule = torch.profiler.schedule(wait=a.warmup, warmup=1, active=2, repeat=1)
        prof = torch.profiler.profile(activities=acts, schedule=schedule)
        prof.start()

    def log(metrics, step):  # train() synchronises every step (it reads the loss)
        stamps.append(time.perf_counter())
        losses.append(metrics["train_loss"])
        if prof is not None:
            prof.step()

    s = TrainSettings(
        seq_len=a.seq_len,
        micro_batch=micro,
        global_batch=a.global_batch,
        max_steps=a.warmup + a.steps,
        lr=1e-4,
        bf16=device.type == "cuda",
        compile=compile_,
        eval_windows=0,
        progress=False,
        peak_flops=a.peak_flops,
        parallel=a.parallel,
    )
    train(model, tokens, tokens[: 10 * a.seq_len], s, device, dist, log=log)
    if prof is not None:
        prof.stop()
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90))
    if not dist.main:
        return {}
    step_times = np.diff(stamps)[a.warmup - 1 :]
    return {"step_seconds": float(statistics.median(step_times)), "losses": losses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script runs")
    p.add_argument(
        "--variants", default="trainer,ours-eager,ours,ours-cla2", help="comma-separated; NAME@M runs micro batch M"
    )
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    p.add_argument("--peak-flops", type=float, help="per GPU FLOP/s; default: measured (bf16 8192^3 matmul)")
    p.add_argument("--profile", action="store_true", help="print our loop's top kernels (torch.profiler)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp", help="our loop under torchrun")
    p.add_argument("--out", type=Path, help="folder for finetune_bench.json")
    a = p.parse_args()
    shape = SMOLLM2_135M
    dist, device = setup_distributed(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if a.smoke:
        shape, device = TINY, torch.device("cpu")
        a.seq_len, a.micro_batch, a.global_batch, a.steps, a.warmup = 64, 2, 4, 2, 2
    if a.peak_flops is None:  # the MFU: against the matmul rate of this very machine
        a.peak_flops = matmul_flops(device)
    tokens = np.random.default_rng(0).integers(0, shape["vocab_size"], 4_000_000, dtype=np.uint32)
    need = a.global_batch * (a.warmup + a.steps) * (a.seq_len + 1)
    assert len(tokens) >= need, f"raise the token count to {need}"
    env = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "gpus": dist.world,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "settings": {k: v for k, v in vars(a).items() if k != "out"} | {"shape": shape},
    }
    rows = []
    for variant in a.variants.split(","):
        name, _, m = variant.partition("@")
        micro = int(m) if m else a.micro_batch
        if name == "trainer" and dist.world > 1:
            continue  # under torchrun only our loop runs
        torch._dynamo.reset()  # each variant compiles afresh, at its own shapes
        model = build(shape, device, cla=2 if name == "ours-cla2" else 1)
        flops = flops_per_token(model, a.seq_len)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            if name == "trainer":
                r = run_trainer(model, tokens, a, micro, device)
            else:
                compiled = name in ("ours", "ours-cla2") and device.type == "cuda"
                r = run_ours(model, tokens, a, micro, device, dist, compile_=compiled)
        except Exception as e:  # one failing variant must not cost the others' numbers
            print(f"{variant} failed: {type(e).__name__}: {e}", flush=True)
            continue
        finally:
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if not dist.main:
            continue
        tok_s = a.global_batch * a.seq_len / r["step_seconds"]
        rows.append(
            {
                "variant": variant,
                "micro_batch": micro,
                "tokens_per_second": tok_s,
                "mfu": tok_s / dist.world * flops / a.peak_flops,
                "step_seconds": r["step_seconds"],
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                "wall_seconds": time.perf_counter() - t0,
                "flops_per_token": flops,
                "losses": r["losses"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        if a.out:  # after every variant, so a run cut short keeps what it measured
            a.out.mkdir(parents=True, exist_ok=True)
            name = f"finetune_bench{f'_{a.parallel}' if dist.world > 1 else ''}.json"
            (a.out / name).write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    leave_distributed(dist)
    if not dist.main:
        return
    base = next((r["tokens_per_second"] for r in rows if r["variant"].startswith("trainer")), None)
    how = f" ({a.parallel})" if dist.world > 1 else ""
    print(f"\n{env['device']} x {dist.world}{how}, torch {env['torch']}, transformers {env['transformers']}")
    print(f"seq {a.seq_len}, global batch {a.global_batch}, peak {a.peak_flops:.3g} FLOP/s per GPU")
    print("| variant | micro | tokens/s | MFU | vs Trainer | step s | peak GiB | GFLOP/token | first loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['tokens_per_second'] / base:.2f}x" if base else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        print(
            f"| {r['variant']} | {r['micro_batch']} | {r['tokens_per_second']:,.0f} | {r['mfu']:.1%} | {ratio} | "
            f"{r['step_seconds']:.3f} | {mem} | {r['flops_per_token'] / 1e9:.3f} | {r['losses'][0]:.3f} |"
        )


if __name__ == "__main__":
    main()
