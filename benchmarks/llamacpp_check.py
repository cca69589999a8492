"""llama.cpp serves kvshare's GGUF exports of SmolLM2, and computes what kvshare's own model does.

For each plan shape it runs the real stages (search → convert → export, each `python -m kvshare.<stage>`),
loads the GGUF in llama.cpp (llama-cpp-python, built from source) and compares, on the same token ids:

- next-token log-probabilities on held-out windows (the tokenize stage's val split): mean and max |difference|
  against the converted checkpoint in kvshare (float32); pass for f16: mean <= 0.02;
- greedy continuations of 32 tokens from 5 prompts: identical;
- the KV cache llama.cpp allocates (its own log line: K and V MiB over its cells) against the bytes per token
  the plan needs when served (kvshare.serving: padded to equal groups where the plan's are unequal).

It also records the export's refusals (unequal groups without export.pad, QCQA-AC), and whether llama.cpp's
`llama` architecture loads a per-layer head_count_kv (the reason per-layer plans are written as `deci`).
Where a greedy continuation differs, the row names the first differing step and both models' top-1 minus top-2
logit margins there (a near-tie is decided by rounding).

    .venv/bin/pip install --target /tmp/llamacpp-target --no-deps llama-cpp-python==0.3.36 diskcache  # builds
    PYTHONPATH=src:/tmp/llamacpp-target .venv/bin/python benchmarks/llamacpp_check.py \
        --base resources/models/smollm2-135m --data resources/data/smollm2-135m/pydoc --work /tmp/llamacpp-check \
        --out benchmarks/results/llamacpp_check.json

`--dtype bfloat16` converts the checkpoints in bfloat16 (as a fine-tuned model usually is: the f16 GGUF then
holds its weights exactly; the reference is still that checkpoint computed in float32), `--finetune-steps N`
fine-tunes each converted checkpoint N steps (kvshare.finetune, on --data's train split) and checks that, and
`--cases-only` adds the plans' rows to an existing --out beside those there (the per-layer plan under flash
attention, where llama.cpp's cache is the plan's).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import environment  # noqa: E402

from kvshare.io import atomic_write_text  # noqa: E402

CASES = [  # (method, budget, export overrides, what it shows)
    ("mqa", 0.34, [], "plain GQA, one KV head per layer: the llama architecture"),
    ("qcqa-ec", 0.67, [], "equal groups, per-layer KV-head counts (1 or 3): the deci architecture"),
    ("gqa", 0.67, ["export.pad=true"], "unequal groups (6+3 query heads) padded by repeating KV heads: llama"),
]
REFUSED = [("gqa", 0.67), ("qcqa-ac", 0.67)]  # exported without export.pad: one line, exit 2
PROMPTS = [
    "The Python standard library",
    "def fibonacci(n):\n    ",
    "The capital of France is",
    "Once upon a time, there was a",
    "To install a package with pip, run",
]
MIB = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers.*K \((\w+)\): +([\d.]+) MiB, "
                 r"V \((\w+)\): +([\d.]+) MiB")  # fmt: skip


def versions() -> dict:
    """The environment and the kvshare commit checked out: the export's code changes what f16 rounds."""
    repo = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return environment("cpu", ("llama_cpp_python", "gguf", "numpy")) | {"kvshare_commit": commit.stdout.strip()}


@dataclass(frozen=True)
class Setup:
    """Where the checkpoints come from and how they are made."""

    base: Path  # the prepared base model
    data: Path  # a tokenize-stage folder: val held out, train for --finetune-steps
    work: Path
    dtype: str | None = None  # convert.dtype; None: the base model's
    finetune_steps: int = 0

    def stage(self, name: str, *overrides: str) -> subprocess.CompletedProcess:
        common = [f"mlflow.tracking_uri=sqlite:///{self.work}/mlflow.db", "study=llamacpp_check",
                  f"hydra.run.dir={self.work}/hydra"]  # fmt: skip
        return subprocess.run([sys.executable, "-m", f"kvshare.{name}", *overrides, *common], capture_output=True,
                              text=True)  # fmt: skip

    def must(self, name: str, *overrides: str) -> None:
        p = self.stage(name, *overrides)
        if p.returncode:
            raise SystemExit(f"{name} failed: {p.stderr[-2000:]}")

    def folder(self, method: str, budget: float) -> Path:
        return self.work / (f"{method}_{budget}" + (f"_{self.dtype}" if self.dtype else ""))

    def variant(self) -> str:
        return f"finetuned {self.finetune_steps} steps" if self.finetune_steps else "converted"


def checkpoint(s: Setup, method: str, budget: float) -> Path:
    """The plan's converted checkpoint (search, convert), fine-tuned if ``s.finetune_steps``; reused if there."""
    folder = s.folder(method, budget)
    plan, out = folder / "plan.json", folder / "converted"
    if not out.exists():
        s.must("search", "model=smollm2-135m", f"search.model_dir={s.base}", f"search.method={method}",
               f"search.budget={budget}", f"search.out={plan}", "search.solver=exact", "search.progress=false")  # fmt: skip
        dtype = [f"convert.dtype={s.dtype}"] if s.dtype else []
        s.must("convert", "model=smollm2-135m", f"convert.model_dir={s.base}", f"convert.plan={plan}",
               f"convert.out={out}", *dtype)  # fmt: skip
    if not s.finetune_steps:
        return out
    tuned = folder / f"finetuned_{s.finetune_steps}"
    if not tuned.exists():  # the smoke scale's CPU settings, longer windows, no resumable checkpoints
        s.must("finetune", f"finetune.checkpoint={out}", f"finetune.data_dir={s.data}", f"finetune.out={tuned}",
               f"finetune.max_steps={s.finetune_steps}", "finetune.seq_len=256", "finetune.checkpoint_interval=0",
               "finetune.progress=false")  # fmt: skip
    return tuned


@contextmanager
def c_stderr():
    """llama.cpp's log (C code writing to file descriptor 2), captured into ``log['text']``."""
    log = {}
    with tempfile.TemporaryFile(mode="w+") as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            yield log
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            log["text"] = f.read()


def plain_cpu_kernels() -> None:
    """Model params with ``use_extra_bufts`` off: on the machine this ran on (a VM whose CPU reports AMX), the CPU
    backend's weight repacking for Q8_0 (extra buffer types) crashed with a general protection fault, as did a
    Q8_0 file made by llama.cpp's own quantizer; f16 and f32 were unaffected. The plain kernels are used for all."""
    import llama_cpp.llama_cpp as lc  # the module whose function Llama() calls

    default = lc.llama_model_default_params
    if getattr(default, "plain", False):
        return

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    params.plain = True
    lc.llama_model_default_params = params


def load_llama(path: Path, n_ctx: int, **params):
    """llama.cpp's model (every position's logits kept) and its load log."""
    from llama_cpp import Llama

    plain_cpu_kernels()
    with c_stderr() as log:
        llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, logits_all=True, n_threads=2, verbose=True,
                    **params)  # fmt: skip
    return llm, log["text"]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def logprob_diffs(llm, model, windows: np.ndarray) -> dict:
    diffs = []
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
        ours = log_softmax(np.array(llm.scores[: len(w)]))[np.arange(len(w) - 1), w[1:]]
        with torch.no_grad():
            logits = model(torch.from_numpy(w.astype(np.int64))[None]).logits[0].double()
        ref = torch.log_softmax(logits, -1)[torch.arange(len(w) - 1), torch.from_numpy(w[1:].astype(np.int64))]
        diffs.append(np.abs(ours - ref.numpy()))
    d = np.concatenate(diffs)
    return {"tokens": int(d.size), "mean_abs_logprob_diff": float(d.mean()), "max_abs_logprob_diff": float(d.max())}


def margin(logits) -> tuple[int, float]:
    """The top-1 token and its logit's lead over the second."""
    top = torch.as_tensor(logits, dtype=torch.float64).topk(2)
    return int(top.indices[0]), float(top.values[0] - top.values[1])


def divergence(ids: list[int], out: list[int], ref: list[int], llm, ref_logits, tok) -> dict | None:
    """The first step where the continuations differ (after the same prefix) and each model's top-1 margin there."""
    step = next((i for i, (a, b) in enumerate(zip(out, ref, strict=True)) if a != b), None)
    if step is None:
        return None
    (ours, ours_margin), (theirs, theirs_margin) = margin(ref_logits[step][0]), margin(llm.scores[len(ids) + step - 1])
    return {"step": step, "kvshare_token": tok.decode([ours]), "kvshare_top1_minus_top2": round(ours_margin, 4),
            "llama_cpp_token": tok.decode([theirs]), "llama_cpp_top1_minus_top2": round(theirs_margin, 4)}  # fmt: skip


def greedy(llm, model, tok, new: int = 32) -> dict:
    same, rows = 0, []
    for text in PROMPTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        llm.reset()
        llm.eval(ids)
        out = []
        for _ in range(new):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        with torch.no_grad():  # raw logits (before min_new_tokens masks the end token) for the margins
            gen = model.generate(torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)  # fmt: skip
        ref = gen.sequences[0, len(ids) :].tolist()
        llama_ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        same += out == ref
        rows.append({"prompt": text, "identical": out == ref, "llama_cpp": tok.decode(out),
                     "kvshare": tok.decode(ref), "same_tokenization": llama_ids == ids,
                     "diverges": divergence(ids, out, ref, llm, gen.logits, tok)})  # fmt: skip
    return {"identical": same, "prompts": len(PROMPTS), "rows": rows}


def kv_cache(log: str, expected_per_token: int) -> dict:
    m = MIB.search(log)
    if m is None:
        return {"error": "no llama_kv_cache line in llama.cpp's log"}
    cells, k, v = int(m[2]), float(m[5]), float(m[7])
    per_token = (k + v) * 2**20 / cells
    return {"cells": cells, "layers": int(m[3]), "k_type": m[4], "k_mib": k, "v_mib": v,
            "bytes_per_token": round(per_token, 1), "expected_bytes_per_token": expected_per_token,
            "equal": abs(per_token - expected_per_token) <= 0.001 * expected_per_token}  # fmt: skip


def export(s: Setup, ckpt: Path, qtype: str, extra=()) -> tuple[Path, str]:
    """The checkpoint's GGUF of ``qtype`` (kvshare.export; reused if there) and the export's error, if any."""
    out = ckpt.with_name(f"{ckpt.name}.{qtype}.gguf")
    if out.exists():
        return out, ""
    p = s.stage("export", f"export.checkpoint={ckpt}", f"export.out={out}", f"export.type={qtype}", *extra,
                f"export.variant={'finetuned' if s.finetune_steps else 'converted'}")  # fmt: skip
    return out, p.stderr.strip() if p.returncode else ""


def plan_row(s: Setup, ckpt: Path, method, budget, extra, what) -> dict:
    """What the plan needs served: KV heads per layer (padded with export.pad) and nominal and served bytes."""
    from kvshare.checkpoint import read_config
    from kvshare.serving import Layout

    config = read_config(ckpt)
    layout = Layout.of_config(config)
    layers = range(len(layout.maps))
    counts = [layout.padded_kv_heads(i) if "export.pad=true" in extra else layout.kv_heads(i) for i in layers]
    bytes_per_head = 2 * 2 * config["head_dim"]  # K and V, 16-bit
    return {"method": method, "budget": budget, "what": what, "checkpoint_dtype": config.get("dtype", "float32"),
            "variant": s.variant(), "kv_heads": counts,
            "nominal_kv_bytes_per_token": bytes_per_head * sum(layout.kv_heads(i) for i in layers),
            "served_kv_bytes_per_token": bytes_per_head * sum(counts), "types": {}}  # fmt: skip


def check_case(s: Setup, windows, tok, method, budget, extra, what, flash_attn=False, types=("f16", "q8_0")) -> dict:
    """One plan against llama.cpp; ``flash_attn="auto"``: on where the layers' KV-head counts differ."""
    from kvshare.checkpoint import load_model

    ckpt = checkpoint(s, method, budget)
    row = plan_row(s, ckpt, method, budget, extra, what)
    if flash_attn == "auto":
        flash_attn = len(set(row["kv_heads"])) > 1
    row["flash_attn"] = flash_attn
    model, _ = load_model(ckpt, dtype=torch.float32)  # a bf16 checkpoint is upcast: the reference is float32
    for qtype in types:
        out, error = export(s, ckpt, qtype, extra)
        if error:
            row["types"][qtype] = {"export_error": error}
            continue
        t0 = time.perf_counter()
        llm, log = load_llama(out, 2048, flash_attn=flash_attn)
        arch = re.search(r"general.architecture +str += (\w+)", log)
        r = {"arch": arch[1] if arch else "?", "file_mib": round(out.stat().st_size / 2**20, 1)}
        r["kv_cache"] = kv_cache(log, row["served_kv_bytes_per_token"])
        r |= logprob_diffs(llm, model, windows)
        r["greedy"] = greedy(llm, model, tok)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        row["types"][qtype] = r
        del llm
    return row


def floors(s: Setup, windows, method: str = "mqa", budget: float = 0.34) -> dict:
    """Where the f16 differences come from, for one plan: the same comparison with an f32 GGUF and an f32 KV
    cache (llama.cpp's arithmetic alone), and kvshare's own model with its weights rounded to f16."""
    from kvshare.checkpoint import load_model

    ckpt = checkpoint(s, method, budget)
    model, _ = load_model(ckpt, dtype=torch.float32)
    out = {}
    for qtype, cache in (("f32", "f32"), ("f32", "f16"), ("f16", "f32")):
        path, error = export(s, ckpt, qtype, ["export.pad=true"])
        if error:
            raise SystemExit(f"export failed: {error}")
        kind = {"f32": 0, "f16": 1}[cache]  # GGML_TYPE_F32, GGML_TYPE_F16
        llm, _ = load_llama(path, 512, type_k=kind, type_v=kind)
        out[f"gguf_{qtype}_kv_{cache}"] = logprob_diffs(llm, model, windows)
        del llm
    rounded, _ = load_model(ckpt, dtype=torch.float32)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
    diffs = []
    for w in windows:
        x = torch.from_numpy(w.astype(np.int64))[None]
        with torch.no_grad():
            a, b = (torch.log_softmax(m(x).logits[0].double(), -1) for m in (model, rounded))
        idx = torch.arange(len(w) - 1), torch.from_numpy(w[1:].astype(np.int64))
        diffs.append((a[idx] - b[idx]).abs().numpy())
    d = np.concatenate(diffs)
    out["kvshare_f16_weights"] = {"mean_abs_logprob_diff": float(d.mean()), "max_abs_logprob_diff": float(d.max())}
    return {"method": method, "budget": budget, "checkpoint_dtype": s.dtype or "float32", **out}


def refusals(s: Setup) -> list[dict]:
    rows = []
    for method, budget in REFUSED:
        ckpt = checkpoint(s, method, budget)
        p = s.stage("export", f"export.checkpoint={ckpt}", f"export.out={s.work / 'refused.gguf'}")
        rows.append({"method": method, "budget": budget, "exit": p.returncode, "stderr": p.stderr.strip(),
                     "written": (s.work / "refused.gguf").exists()})  # fmt: skip
    return rows


def llama_arch_per_layer(s: Setup) -> dict:
    """The per-layer plan written as llama.cpp's `llama` architecture (per-layer head_count_kv array): loads?"""
    from kvshare import ggufio
    from kvshare.checkpoint import read_config
    from kvshare.serving import Layout

    ckpt = checkpoint(s, "qcqa-ec", 0.67)
    config = read_config(ckpt)
    out = s.work / "per_layer_as_llama.gguf"
    saved = dict(ggufio.ARCH)
    ggufio.ARCH["per-layer"] = "llama"
    try:
        ggufio.write_gguf(out, ckpt, config, Layout.of_config(config), "f16", False, "smollm", {})
    finally:
        ggufio.ARCH.update(saved)
    from llama_cpp import Llama

    plain_cpu_kernels()
    with c_stderr() as log:
        try:
            Llama(model_path=str(out), n_ctx=256, verbose=True)
            loads, error = True, ""
        except Exception as e:  # llama-cpp-python raises ValueError when the model does not load
            loads, error = False, str(e)
    lines = [x for x in log["text"].splitlines() if "error" in x.lower() or "wrong shape" in x or "failed" in x]
    return {"loads": loads, "error": error, "log": lines[:6]}


def merged(old: list[dict], new: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """``old`` with ``new`` added, replacing the rows they measure again (the same values of ``keys``)."""
    again = {tuple(r.get(k) for k in keys) for r in new}
    return [r for r in old if tuple(r.get(k) for k in keys) not in again] + new


def add_to(out: Path, part: str, rows: list[dict], keys: tuple[str, ...]) -> None:
    """Add rows to a part of the existing results file (written atomically), each with what made it."""
    result = json.loads(out.read_text())
    env = versions()
    rows = [{**r, "environment": env, "kvshare_commit": env["kvshare_commit"]} for r in rows]
    result[part] = merged(result.get(part, []), rows, keys)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="a tokenize-stage folder (its val split is held out)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llamacpp-check"))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/llamacpp_check.json"))
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), help="convert.dtype (default: the base model's)")
    ap.add_argument("--finetune-steps", type=int, default=0, help="fine-tune each converted checkpoint first")
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0"], help="the GGUF types checked")
    ap.add_argument("--methods", nargs="+", choices=[c[0] for c in CASES], help="only these plans (default: all)")
    ap.add_argument("--cases-only", action="store_true", help="add the plans' rows to an existing --out")
    ap.add_argument("--floors-only", action="store_true", help="add the f16 floors to an existing --out")
    ap.add_argument("--flash-attn-only", action="store_true", help="add the per-layer plan under flash attention")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    a.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    s = Setup(a.base, a.data, a.work, a.dtype, a.finetune_steps)
    cases = [c for c in CASES if not a.methods or c[0] in a.methods]
    val = np.fromfile(a.data / "val.bin", dtype=np.uint32)
    windows = np.stack([val[i * a.window : (i + 1) * a.window] for i in range(a.windows)])
    if a.floors_only:
        rows = [floors(s, windows, m, b) for m, b in (("mqa", 0.34), ("gqa", 0.67))]
        return add_to(a.out, "floors", rows, ("method", "budget", "checkpoint_dtype", "kvshare_commit"))
    tok = AutoTokenizer.from_pretrained(a.base)
    if a.cases_only or a.flash_attn_only:  # without flash attention llama.cpp pads a per-layer V cache
        what = "per-layer KV-head counts (deci) under flash attention (V cache not transposed)"
        rows = ([check_case(s, windows, tok, *c, "auto", tuple(a.types)) for c in cases] if a.cases_only else
                [check_case(s, windows, tok, "qcqa-ec", 0.67, [], what, True, ("f16",))])  # fmt: skip
        keys = ("method", "budget", "checkpoint_dtype", "variant", "flash_attn", "kvshare_commit")
        return add_to(a.out, "cases", rows, keys)
    rows = [check_case(s, windows, tok, *case, False, tuple(a.types)) for case in cases]
    result = {"environment": versions(), "cases": rows,
              "refused": refusals(s), "per_layer_as_llama_arch": llama_arch_per_layer(s)}  # fmt: skip
    atomic_write_text(a.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
