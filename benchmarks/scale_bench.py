"""A Llama-2-7B-shaped model through kvshare's stages, on the machines its users have (issue 14).

    PYTHONPATH=src python benchmarks/scale_bench.py cpu --work /big/disk/scale      # the 2-core, 24 GB machine
    PYTHONPATH=src python benchmarks/scale_bench.py gpu --work /tmp/scale --out $OUT  # one H200 (see below)

Weights are random (speed and memory depend on shapes, not values): a pool of
2^28 normal bf16 values, each tensor a slice of it at a random offset, written
shard by shard (5 GB safetensors shards and an index, as ``save_pretrained``
writes them), so generating the 13.5 GB checkpoint needs one shard of memory.

``cpu``: ``python -m kvshare.search`` (gqa and qcqa-ac at half the KV heads) and
``python -m kvshare.convert`` on it through their entry points, each under
``/usr/bin/time -v`` (peak RSS, wall). Targets: convert ≤ 8 GB and ≤ 10 minutes,
search ≤ 4 GB. Then the output is checked against a reference: the first
``--check-layers`` layers of the source loaded as a model, converted in memory
(:func:`kvshare.merge.convert_model`, the same arithmetic), and the same layers
of the written output, both run in float32 on the same tokens: max |Δ logits| ≤ 1e-3.

``gpu``: on the device a base model is written the same way, then search and
convert (qcqa-ac 0.5), ``python -m kvshare.finetune`` at several micro batches
with and without ``finetune.activation_checkpointing`` (tokens/s, MFU of useful
FLOPs, peak memory, read back from MLflow), and ``python -m kvshare.evaluate``
(perplexity tokens/s; the zero-shot suite on ``--limit`` items per task,
extrapolated per item). Needs the carried wheels (mlflow, hydra, pymoo, lm-eval,
...) and the evaluation data folder (``--eval-data``).

Writes ``<out>/scale_bench_<phase>.{json,md}`` with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from kvshare.checkpoint import Tensors, read_config, write_folder
from kvshare.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
LLAMA2_7B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=11008,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128, vocab_size=32000,
    max_position_embeddings=4096, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    hidden_act="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False, dtype="bfloat16",
    bos_token_id=1, eos_token_id=2,
)  # fmt: skip
# The same flow in seconds on a CPU, to check the script before spending GPU time on it (--shape tiny).
SHAPES = {"llama2-7b": LLAMA2_7B, "tiny": LLAMA2_7B | dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                                          num_attention_heads=8, num_key_value_heads=8, head_dim=8)}  # fmt: skip


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Llama checkpoint's tensors, in the order save_pretrained writes them."""
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]
        out += [(f"{p}.self_attn.q_proj.weight", (q, h)), (f"{p}.self_attn.k_proj.weight", (kv, h)),
                (f"{p}.self_attn.v_proj.weight", (kv, h)), (f"{p}.self_attn.o_proj.weight", (h, q))]  # fmt: skip
        out += [(f"{p}.mlp.gate_proj.weight", (f, h)), (f"{p}.mlp.up_proj.weight", (f, h)),
                (f"{p}.mlp.down_proj.weight", (h, f))]  # fmt: skip
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def random_tensors(c: dict, seed: int = 0):
    """``(name, bf16 tensor)`` for every weight: slices of one random pool (norm weights 1)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.empty(2**28, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
    pool = torch.cat([pool, pool])
    rng = np.random.default_rng(seed)
    for name, shape in tensor_shapes(c):
        n = int(np.prod(shape))
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=torch.bfloat16)
        else:
            start = int(rng.integers(0, 2**28))
            yield name, pool[start : start + n].clone().view(shape)


def write_base(folder: Path, tokenizer_dir: Path, config: dict) -> None:
    """A random checkpoint of ``config``'s shape in 5 GB shards, with the tokenizer of ``tokenizer_dir``."""
    if (folder / "config.json").exists():
        return
    write_folder(folder, config, random_tensors(config), tokenizer_dir, 5 * 10**9)


def tokenizer(folder: Path, vocab_size: int = 32000) -> Path:
    """A byte-level BPE tokenizer (ids below the model's vocabulary) trained on Python's own documentation."""
    if not (folder / "tokenizer_config.json").exists():
        from pydoc_data.topics import topics

        from kvshare.sources import train_tokenizer

        train_tokenizer(list(topics.values()), vocab_size).save_pretrained(folder)
    return folder


def timed(cmd: list[str], cwd: Path, log: Path) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: wall seconds and peak RSS (GB); its output goes to ``log``."""
    with open(log, "w") as out:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    text = log.read_text()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {text[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)[1])
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)[1]
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    return {"wall_seconds": round(seconds, 1), "peak_rss_gb": round(rss * 1024 / 1e9, 2)}


EXTRA: list[str] = []  # --override: appended to every stage's command line


def stage(module: str, work: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", f"kvshare.{module}", "study=scale", f"hydra.run.dir={work}/hydra",
            f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db", *overrides, *EXTRA]  # fmt: skip


def search_and_convert(work: Path, base: Path, method: str, budget: float) -> dict:
    plan, out = work / f"{method}.json", work / f"{method}-converted"
    rows = {}
    rows["search"] = timed(
        stage("search", work, "model=tiny", f"search.model_dir={base}", f"search.method={method}",
              f"search.budget={budget}", f"search.out={plan}", "search.progress=false", "scale=smoke"),
        work, work / f"search-{method}.log",
    )  # fmt: skip
    rows["convert"] = timed(
        stage("convert", work, "model=tiny", f"convert.model_dir={base}", f"convert.plan={plan}", f"convert.out={out}"),
        work, work / f"convert-{method}.log",
    )  # fmt: skip
    rows["output_gb"] = round(Tensors(out).nbytes() / 1e9, 2)
    rows["output_files"] = len(Tensors(out).files())
    return rows


def sliced_model(folder: Path, layers: int, dtype=torch.float32):
    """The first ``layers`` decoder layers of a checkpoint (embeddings, final norm and head included), as a model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import kvshare.modeling  # noqa: F401  (registers kvshare_llama)

    config = read_config(folder)
    config["num_hidden_layers"] = layers
    for key in ("q_to_kv", "kv_layer"):
        if key in config:
            config[key] = config[key][:layers]
    for key in ("dtype", "auto_map"):
        config.pop(key, None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config)).to(dtype)
    tensors = Tensors(folder)
    keep = [n for n in tensors.names() if not n.startswith("model.layers.") or int(n.split(".")[2]) < layers]
    model.load_state_dict({n: tensors.torch(n).to(dtype) for n in keep}, strict=True)
    return model.eval()


def check_against_reference(base: Path, converted: Path, plan_file: Path, layers: int) -> float:
    """Max |Δ logits| between the written output and an in-memory conversion, on ``layers`` layers."""
    from kvshare.merge import convert_model
    from kvshare.plan import Plan

    plan = Plan.load(plan_file)
    sliced = Plan(replace(plan.shape, num_layers=layers), plan.groups[:layers], plan.kv_layer[:layers], plan.method)
    reference = convert_model(sliced_model(base, layers, torch.bfloat16), sliced, export=True).float()
    written = sliced_model(converted, layers)
    x = torch.randint(0, LLAMA2_7B["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float((written(x).logits - reference(x).logits).abs().max())


def environment() -> dict:
    import transformers

    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "argv": " ".join(sys.argv)}  # fmt: skip


def run_cpu(args) -> dict:
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    t0 = time.perf_counter()
    write_base(base, tokenizer(work / "tokenizer"), SHAPES[args.shape])
    results = {"env": environment(), "base_gb": round(Tensors(base).nbytes() / 1e9, 2),
               "base_files": len(Tensors(base).files()), "generate_seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    for method in ("gqa", "qcqa-ac"):
        results[method] = search_and_convert(work, base, method, 0.5)
        delta = check_against_reference(base, work / f"{method}-converted", work / f"{method}.json", args.check_layers)
        results[method]["max_abs_logit_diff"] = delta
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work / f"{method}-converted")], check=True)
    return results


def cpu_report(r: dict) -> str:
    lines = ["# A Llama-2-7B-shaped checkpoint through search and convert on the CPU machine (issue 14)", "",
             f"Machine and versions: {json.dumps(r['env'])}", "",
             f"Source: random bf16 weights, {r['base_gb']} GB in {r['base_files']} safetensors shards "
             f"(written in {r['generate_seconds']} s).", "",
             "| step | wall (s) | peak RSS (GB) | target |", "|---|---|---|---|"]  # fmt: skip
    for method in ("gqa", "qcqa-ac"):
        m = r[method]
        lines.append(f"| search {method} 0.5 | {m['search']['wall_seconds']} | {m['search']['peak_rss_gb']} | ≤ 4 GB |")
        lines.append(f"| convert {method} 0.5 | {m['convert']['wall_seconds']} | {m['convert']['peak_rss_gb']} | "
                     "≤ 8 GB, ≤ 600 s |")  # fmt: skip
    lines.append("")
    for method in ("gqa", "qcqa-ac"):
        m = r[method]
        lines.append(f"- {method}: output {m['output_gb']} GB in {m['output_files']} files; max |Δ logits| against "
                     f"the in-memory conversion on the first layers, float32: {m['max_abs_logit_diff']:.2e} (≤ 1e-3).")  # fmt: skip
    return "\n".join(lines) + "\n"


def finetune_run(work: Path, converted: Path, data: Path, checkpointing: bool, micro: int, steps: int) -> dict:
    """One ``python -m kvshare.finetune`` at ``micro`` windows of 2048 per step; its summary from MLflow."""
    from kvshare.tracking import runs_frame

    name = f"ft-ac{int(checkpointing)}-mb{micro}"
    cmd = stage("finetune", work, "scale=gpu", f"name={name}", f"finetune.checkpoint={converted}",
                f"finetune.data_dir={data}", f"finetune.out={work}/{name}", f"finetune.micro_batch={micro}",
                f"finetune.global_batch={micro}", f"finetune.max_steps={steps}", "finetune.checkpoint_interval=0",
                "finetune.eval_windows=0", "finetune.peak_flops=null", "finetune.progress=false",
                f"finetune.activation_checkpointing={checkpointing}")  # fmt: skip
    row = {"activation_checkpointing": checkpointing, "micro_batch": micro, "steps": steps}
    try:
        row |= timed(cmd, work, work / f"{name}.log")
    except RuntimeError as e:
        return row | {"error": str(e).splitlines()[-1][-300:]}
    finally:
        subprocess.run(["rm", "-rf", str(work / name)], check=True)
    runs = runs_frame(f"sqlite:///{work}/mlflow.db", experiment="scale")
    got = runs[runs["tags.mlflow.runName"] == f"finetune:{name}"].iloc[0]  # the newest
    keys = ("tokens_per_second_median", "mfu_median", "peak_memory_gib", "peak_flops")
    return row | {k: got.get(f"metrics.{k}") for k in keys}


def evaluate_run(work: Path, converted: Path, base: Path, data: Path, eval_data: str, limit: int, kl: str) -> dict:
    cmd = stage("evaluate", work, "scale=gpu", f"name=eval-{kl}", f"evaluate.checkpoint={converted}",
                f"evaluate.base_dir={base}", f"evaluate.data_dir={data}", f"evaluate.eval_data_dir={eval_data}",
                f"evaluate.limit={limit}", f"evaluate.kl={kl}", f"evaluate.out={work}/eval-{kl}.json")  # fmt: skip
    row = timed(cmd, work, work / f"eval-{kl}.log")
    m = json.loads((work / f"eval-{kl}.json").read_text())["metrics"]
    items = sum(v for k, v in m.items() if k.startswith("n_"))
    windows_tokens = m["eval_tokens"]  # scored tokens; both models read every window once
    return row | {
        "kl": kl,
        "quality_seconds": m["quality_seconds"],
        "scored_tokens": windows_tokens,
        "scored_tokens_per_second": windows_tokens / m["quality_seconds"],
        "zeroshot_seconds": m.get("zeroshot_seconds"),
        "zeroshot_items": items,
        "zeroshot_seconds_per_item": m["zeroshot_seconds"] / items if items else None,
        "perplexity": m["perplexity"],
    }


def run_gpu(args) -> dict:
    """One step per call (a call is limited to 10 minutes): ``prepare``, ``finetune`` or ``evaluate``; the
    results accumulate in the output JSON."""
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base, data, converted = work / "base", work / "data", work / "qcqa-ac-converted"
    path = Path(args.out) / "scale_bench_gpu.json"
    results = json.loads(path.read_text()) if path.exists() else {"env": environment()}
    if args.step == "prepare":
        t0 = time.perf_counter()
        tok = tokenizer(work / "tokenizer")
        write_base(base, tok, SHAPES[args.shape])
        data.mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        for split, n in (("train", 4_000_000), ("val", 300_000)):
            rng.integers(0, 32000, n, dtype=np.uint32).tofile(data / f"{split}.bin")
        results["generate_seconds"] = round(time.perf_counter() - t0, 1)
        results["qcqa-ac"] = search_and_convert(work, base, "qcqa-ac", 0.5)
    elif args.step == "finetune":
        for spec in args.finetune_grid.split(","):
            checkpointing, micro = spec.split(":")
            row = finetune_run(work, converted, data, checkpointing == "1", int(micro), args.steps)
            results.setdefault("finetune", []).append(row)
            print(row, flush=True)
    else:
        results.setdefault("evaluate", []).append(
            evaluate_run(work, converted, base, data, args.eval_data, args.limit, args.kl)
        )
    results["env"] |= environment() | {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return results


def gpu_report(r: dict) -> str:
    lines = ["# A Llama-2-7B-shaped model through fine-tuning and evaluation on one GPU (issue 14)", "",
             f"Machine and versions: {json.dumps(r['env'])}", "",
             "Random bf16 weights and random tokens (speed and memory depend on shapes), QCQA-AC at half the KV "
             "heads, converted on the device's CPUs. Every number below comes from the stage entry points "
             "(Hydra and MLflow included).", ""]  # fmt: skip
    if "qcqa-ac" in r:
        q = r["qcqa-ac"]
        lines += [f"- search: {q['search']['wall_seconds']} s, {q['search']['peak_rss_gb']} GB; convert: "
                  f"{q['convert']['wall_seconds']} s, {q['convert']['peak_rss_gb']} GB peak RSS.", ""]  # fmt: skip
    if r.get("finetune"):
        lines += ["| activation checkpointing | micro batch (x 2048) | tokens/s | MFU (useful FLOPs) | peak GiB | "
                  "note |", "|---|---|---|---|---|---|"]  # fmt: skip
        for f in r["finetune"]:
            if "error" in f:
                lines.append(f"| {f['activation_checkpointing']} | {f['micro_batch']} | - | - | - | {f['error']} |")
            else:
                lines.append(f"| {f['activation_checkpointing']} | {f['micro_batch']} | "
                             f"{f['tokens_per_second_median']:,.0f} | {f['mfu_median']:.1%} | "
                             f"{f['peak_memory_gib'] or float('nan'):.1f} | {f['steps']} steps, matmul rate "
                             f"{f['peak_flops']:.3g} FLOP/s |")  # fmt: skip
        lines += ["", "Targets: ≥ 45% MFU counting only useful FLOPs, peak ≤ 120 GiB.", ""]
    for e in r.get("evaluate", []):
        lines.append(f"- evaluate (kl={e['kl']}): {e['scored_tokens']:,} scored tokens in {e['quality_seconds']:.1f} s "
                     f"({e['scored_tokens_per_second']:,.0f} tokens/s, variant and base model); zero-shot "
                     f"{e['zeroshot_items']} items in {e['zeroshot_seconds']:.1f} s, "
                     f"{e['zeroshot_seconds_per_item'] * 1000:.0f} ms per item; the full suite (22,439 items) "
                     f"would take about {e['zeroshot_seconds_per_item'] * 22439 / 60:.0f} minutes.")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("phase", choices=["cpu", "gpu"])
    ap.add_argument("--work", required=True, help="a folder on a disk with ~45 GB free")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--check-layers", type=int, default=2)
    ap.add_argument("--shape", choices=list(SHAPES), default="llama2-7b")
    ap.add_argument("--keep", action="store_true", help="keep the converted checkpoints")
    ap.add_argument("--step", choices=["prepare", "finetune", "evaluate"], default="prepare", help="gpu: what to run")
    ap.add_argument("--finetune-grid", default="0:1,0:2,1:4,1:8", help="gpu: checkpointing(0/1):micro_batch, ...")
    ap.add_argument("--steps", type=int, default=8, help="gpu: optimizer steps per fine-tuning run")
    ap.add_argument("--eval-data", default="", help="gpu: the evaldata stage's folder")
    ap.add_argument("--limit", type=int, default=50, help="gpu: zero-shot items per task")
    ap.add_argument("--kl", default="auto", help="gpu: evaluate.kl")
    ap.add_argument("--override", action="append", default=[], help="a Hydra override for every stage (device=cpu)")
    args = ap.parse_args()
    EXTRA.extend(args.override)
    results = run_cpu(args) if args.phase == "cpu" else run_gpu(args)
    report = cpu_report(results) if args.phase == "cpu" else gpu_report(results)
    atomic_write_text(Path(args.out) / f"scale_bench_{args.phase}.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(Path(args.out) / f"scale_bench_{args.phase}.md", report)
    print(report)


if __name__ == "__main__":
    main()
