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

    .venv/bin/pip install --target /tmp/llamacpp-target --no-deps llama-cpp-python==0.3.36 diskcache  # builds
    PYTHONPATH=src:/tmp/llamacpp-target .venv/bin/python benchmarks/llamacpp_check.py \
        --base resources/models/smollm2-135m --data resources/data/smollm2-135m/pydoc --work /tmp/llamacpp-check \
        --out benchmarks/results/llamacpp_check.json
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
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import environment  # noqa: E402

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


def stage(name: str, work: Path, *overrides: str) -> subprocess.CompletedProcess:
    common = [f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db", "study=llamacpp_check", f"hydra.run.dir={work}/hydra"]
    cmd = [sys.executable, "-m", f"kvshare.{name}", *overrides, *common]
    return subprocess.run(cmd, capture_output=True, text=True)


def checkpoint(base: Path, work: Path, method: str, budget: float) -> Path:
    folder = work / f"{method}_{budget}"
    plan, out = folder / "plan.json", folder / "converted"
    if not out.exists():
        for name, args in (
            ("search", [f"search.model_dir={base}", f"search.method={method}", f"search.budget={budget}",
                        f"search.out={plan}", "search.solver=exact", "search.progress=false"]),
            ("convert", [f"convert.model_dir={base}", f"convert.plan={plan}", f"convert.out={out}"]),
        ):  # fmt: skip
            p = stage(name, work, "model=smollm2-135m", *args)
            if p.returncode:
                raise SystemExit(f"{name} failed: {p.stderr[-2000:]}")
    return out


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


def load_llama(path: Path, n_ctx: int, flash_attn: bool = False):
    from llama_cpp import Llama

    plain_cpu_kernels()
    with c_stderr() as log:
        llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, logits_all=True, n_threads=2, verbose=True,
                    flash_attn=flash_attn)  # fmt: skip
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
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
        ref = ref[0, len(ids) :].tolist()
        llama_ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        same += out == ref
        rows.append({"prompt": text, "identical": out == ref, "llama_cpp": tok.decode(out),
                     "kvshare": tok.decode(ref), "same_tokenization": llama_ids == ids})  # fmt: skip
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


def check_case(base, work, windows, tok, method, budget, extra, what, flash_attn=False, types=("f16", "q8_0")) -> dict:
    from kvshare.checkpoint import load_model, read_config
    from kvshare.serving import Layout

    ckpt = checkpoint(base, work, method, budget)
    config = read_config(ckpt)
    layout = Layout.of_config(config)
    pad = "export.pad=true" in extra
    counts = [layout.padded_kv_heads(i) if pad else layout.kv_heads(i) for i in range(len(layout.maps))]
    model, _ = load_model(ckpt, dtype=torch.float32)
    bytes_per_head = 2 * 2 * config["head_dim"]  # K and V, 16-bit
    row = {"method": method, "budget": budget, "what": what, "kv_heads": counts,
           "nominal_kv_bytes_per_token": bytes_per_head * sum(layout.kv_heads(i) for i in range(len(layout.maps))),
           "served_kv_bytes_per_token": bytes_per_head * sum(counts), "types": {}}  # fmt: skip
    row["flash_attn"] = flash_attn
    for qtype in types:
        out = work / f"{method}_{budget}" / f"model.{qtype}.gguf"
        p = stage("export", work, f"export.checkpoint={ckpt}", f"export.out={out}", f"export.type={qtype}", *extra)
        if p.returncode:
            row["types"][qtype] = {"export_error": p.stderr.strip()}
            continue
        t0 = time.perf_counter()
        llm, log = load_llama(out, 2048, flash_attn)
        arch = re.search(r"general.architecture +str += (\w+)", log)
        r = {"arch": arch[1] if arch else "?", "file_mib": round(out.stat().st_size / 2**20, 1)}
        r["kv_cache"] = kv_cache(log, row["served_kv_bytes_per_token"])
        r |= logprob_diffs(llm, model, windows)
        r["greedy"] = greedy(llm, model, tok)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        row["types"][qtype] = r
        del llm
    return row


def floors(base, work, windows, method: str = "mqa", budget: float = 0.34) -> dict:
    """Where the f16 differences come from, for one plan: the same comparison with an f32 GGUF and an f32 KV
    cache (llama.cpp's arithmetic alone), and kvshare's own model with its weights rounded to f16."""
    from llama_cpp import Llama

    from kvshare.checkpoint import load_model

    ckpt = checkpoint(base, work, method, budget)
    model, _ = load_model(ckpt, dtype=torch.float32)
    out = {}
    for qtype, cache in (("f32", "f32"), ("f32", "f16"), ("f16", "f32")):
        path = work / f"{method}_{budget}" / f"model.{qtype}.gguf"
        if not path.exists():
            stage("export", work, f"export.checkpoint={ckpt}", f"export.out={path}", f"export.type={qtype}",
                  "export.pad=true")  # fmt: skip
        plain_cpu_kernels()
        kind = {"f32": 0, "f16": 1}[cache]  # GGML_TYPE_F32, GGML_TYPE_F16
        with c_stderr():
            llm = Llama(model_path=str(path), n_ctx=512, n_batch=512, logits_all=True, n_threads=2, verbose=True,
                        type_k=kind, type_v=kind)  # fmt: skip
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
    return {"method": method, "budget": budget, **out}


def refusals(base, work) -> list[dict]:
    rows = []
    for method, budget in REFUSED:
        ckpt = checkpoint(base, work, method, budget)
        p = stage("export", work, f"export.checkpoint={ckpt}", f"export.out={work / 'refused.gguf'}")
        rows.append({"method": method, "budget": budget, "exit": p.returncode, "stderr": p.stderr.strip(),
                     "written": (work / "refused.gguf").exists()})  # fmt: skip
    return rows


def llama_arch_per_layer(base, work) -> dict:
    """The per-layer plan written as llama.cpp's `llama` architecture (per-layer head_count_kv array): loads?"""
    from kvshare import ggufio
    from kvshare.checkpoint import read_config
    from kvshare.serving import Layout

    ckpt = checkpoint(base, work, "qcqa-ec", 0.67)
    config = read_config(ckpt)
    out = work / "per_layer_as_llama.gguf"
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="a tokenize-stage folder (its val split is held out)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llamacpp-check"))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/llamacpp_check.json"))
    ap.add_argument("--floors-only", action="store_true", help="add the f16 floors to an existing --out")
    ap.add_argument("--flash-attn-only", action="store_true", help="add the per-layer plan under flash attention")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    a.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    val = np.fromfile(a.data / "val.bin", dtype=np.uint32)
    windows = np.stack([val[i * a.window : (i + 1) * a.window] for i in range(a.windows)])
    if a.floors_only:
        result = json.loads(a.out.read_text())
        result["floors"] = [floors(a.base, a.work, windows, m, b) for m, b in (("mqa", 0.34), ("gqa", 0.67))]
        a.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result["floors"], indent=1))
        return
    tok = AutoTokenizer.from_pretrained(a.base)
    if a.flash_attn_only:  # without flash attention llama.cpp pads a per-layer V cache to the largest layer
        result = json.loads(a.out.read_text())
        what = "per-layer KV-head counts (deci) under flash attention (V cache not transposed)"
        result["cases"].append(check_case(a.base, a.work, windows, tok, "qcqa-ec", 0.67, [], what, True, ("f16",)))
        a.out.write_text(json.dumps(result, indent=1) + "\n")
        return
    cases = [check_case(a.base, a.work, windows, tok, *case) for case in CASES]
    result = {"environment": environment("cpu", ("llama_cpp_python", "gguf", "numpy")), "cases": cases,
              "refused": refusals(a.base, a.work), "per_layer_as_llama_arch": llama_arch_per_layer(a.base, a.work)}  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
