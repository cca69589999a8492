"""GraphDecoder's step under several sets of options, side by side on one model (issue 15).

A mode is a ``gemv`` choice (kvshare.decode.GraphDecoder's: ``triton`` or ``cublas``), with ``+pdl`` (``triton``
only) for launching the step's kernels by programmatic dependent launch (kvshare.pdl). For each shape, variant and
batch: one decoder per mode, all of one model, each timed over ``--new`` steps from a context of ``--prompt``
tokens, alternating, ``--reps`` times (median); then each generates from one prompt, twice, and its tokens and one
step's logits are compared with the first mode's and with its own first run. The same kernels computing the same sums in the same
order give equal outputs (inductor may time its kernels' configurations into other choices); a read that did not
wait for its writer would also differ from run to run.

    python benchmarks/decode_options_bench.py --shapes smollm2-135m,mha-12l --variants gqa,mqa \\
        --modes triton,triton+pdl,cublas --out DIR

Writes DIR/decode_options.json: the machine, versions and command, and one record per cell. Needs a CUDA GPU
(``triton+pdl``: of compute capability 9.0 or later).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_floor_bench as fb  # noqa: E402
import machine  # noqa: E402

from kvshare.decode import GraphDecoder  # noqa: E402
from kvshare.gemv import MAX_ROWS  # noqa: E402
from kvshare.io import atomic_write_json  # noqa: E402

MODES = {  # GraphDecoder's keyword arguments for each mode
    "triton": dict(gemv="triton", pdl=False),
    "triton+pdl": dict(gemv="triton", pdl=True),
    "cublas": dict(gemv="cublas", pdl=False),
}
VARIANTS = tuple(v for v in fb.VARIANTS if v != "hf-static")  # kvshare models: GraphDecoder's


def compare(decoders: dict, prompt: int, new: int, vocab: int, device) -> dict:
    """Per mode: tokens equal to the first mode's generate() and the largest difference of one step's logits, and
    the same against its own second run."""
    batch = next(iter(decoders.values())).batch_size
    ids = torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(1)).to(device)
    pos = torch.tensor([prompt], device=device)
    seqs, logits = {}, {}
    for run in range(2):
        for mode, decoder in decoders.items():
            seqs[mode, run] = decoder.generate(ids, new)
            with torch.no_grad():
                logits[mode, run] = decoder.step(seqs[mode, run][:, prompt : prompt + 1], pos).float()

    def diff(a, b) -> dict:
        same = (seqs[a] == seqs[b]).all(0)[prompt:]
        return dict(tokens_equal=int(same.sum()), of=int(same.numel()),
                    step_logits_max_abs_diff=(logits[a] - logits[b]).abs().max().item())  # fmt: skip

    first = next(iter(decoders))
    return dict(
        logits_max_abs=logits[first, 0].abs().max().item(),
        against_first={mode: diff((first, 0), (mode, 0)) for mode in decoders},
        twice={mode: diff((mode, 0), (mode, 1)) for mode in decoders},
    )


def cell(model, batch: int, modes: list[str], args, device) -> dict:
    length = args.prompt + args.new - 1
    decoders = {m: GraphDecoder(model, batch, length, attention="triton", **MODES[m]) for m in modes}
    for decoder in decoders.values():
        decoder.warm_up()
        fb.graph_run(decoder, batch, args.prompt, min(args.new, 8), 0, device)
    times = {m: [] for m in modes}
    for rep in range(args.reps):
        for m, decoder in decoders.items():
            times[m].append(fb.graph_run(decoder, batch, args.prompt, args.new, rep, device))
    ms = {m: 1e3 * statistics.median(t) for m, t in times.items()}
    rec = dict(batch=batch, step_ms=ms, over_first={m: ms[m] / ms[modes[0]] for m in modes})
    rec |= compare(decoders, args.check_prompt, args.check_new, model.config.vocab_size, device)
    del decoders
    fb.free(device)
    return rec


def report(name: str, variant: str, rec: dict) -> str:
    """One line per cell: each mode's step, its ratio to the first, and its outputs against the first and itself."""
    parts = []
    for mode, ms in rec["step_ms"].items():
        first, twice = rec["against_first"][mode], rec["twice"][mode]
        parts.append(f"{mode} {ms:.4f} ms ({rec['over_first'][mode]:.3f}x; tokens {first['tokens_equal']}/"
                     f"{first['of']}, logits {first['step_logits_max_abs_diff']:.3g}; twice "
                     f"{twice['step_logits_max_abs_diff']:.3g})")  # fmt: skip
    return f"{name} {variant} B={rec['batch']}: " + ", ".join(parts) + f" (logits up to {rec['logits_max_abs']:.3g})"


def parse(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """The arguments, the comma-separated ones as lists, every bad one refused by ap.error (exit 2) before
    anything is built."""
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="smollm2-135m,mha-12l", help=f"comma-separated, of {sorted(fb.SHAPES)}")
    ap.add_argument("--variants", default="gqa,cla2,mqa", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--modes", default="triton,triton+pdl", help=f"comma-separated, of {', '.join(MODES)}; the "
                    "first is what the others are compared with")  # fmt: skip
    ap.add_argument("--batches", default="1,16", help=f"with triton+pdl, up to {MAX_ROWS} (kvshare.gemv's rows)")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--check-prompt", type=int, default=128)
    ap.add_argument("--check-new", type=int, default=32)
    args = ap.parse_args()
    args.shapes, args.variants, args.modes = (a.split(",") for a in (args.shapes, args.variants, args.modes))
    for name in args.shapes:
        if name not in fb.SHAPES:
            ap.error(f"--shapes: unknown shape {name!r}; use one of {', '.join(sorted(fb.SHAPES))}")
    for variant in args.variants:
        if variant not in VARIANTS:
            ap.error(f"--variants: unknown variant {variant!r}; use some of {', '.join(VARIANTS)}")
    for mode in args.modes:
        if mode not in MODES:
            ap.error(f"--modes: unknown mode {mode!r}; use some of {', '.join(MODES)}")
    pdl = any(MODES[m]["pdl"] for m in args.modes)
    most = MAX_ROWS if pdl else float("inf")
    batches = args.batches.split(",")
    if not all(b.isdigit() and 1 <= int(b) <= most for b in batches):
        limit = f"from 1 to {MAX_ROWS} (triton+pdl's limit)" if pdl else "of at least 1"
        ap.error(f"--batches {args.batches!r}: give integers {limit}, e.g. 1,16")
    args.batches = [int(b) for b in batches]
    return args


def main() -> None:
    args = parse(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    device = torch.device("cuda")
    if not torch.cuda.is_available():
        sys.exit("decode_options_bench needs a CUDA GPU (triton+pdl: of compute capability 9.0 or later)")
    result = {"machine": machine.environment(device, ("triton",)), "cells": []}
    built = SimpleNamespace(backend="inductor", smoke=False, prefill_attention="buckets", decoder="graph",
                            decode_attention="triton")  # fmt: skip
    for name in args.shapes:
        models = fb.build_models(name, fb.SHAPES[name], args.variants, device, torch.bfloat16, built)
        for variant, model in models.items():
            for batch in args.batches:
                rec = dict(shape=name, variant=variant, when=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
                rec |= cell(model, batch, args.modes, args, device)
                result["cells"].append(rec)
                atomic_write_json(Path(args.out) / "decode_options.json", result)
                print(report(name, variant, rec), flush=True)
        del models
        fb.free(device)


if __name__ == "__main__":
    main()
