"""GraphDecoder's step with and without programmatic dependent launch (``pdl``, kvshare.pdl), side by side (issue 15).

For each shape, variant and batch: two decoders of one model, ``pdl=False`` and ``pdl=True``, each timed over
``--new`` steps from a context of ``--prompt`` tokens, alternating, ``--reps`` times (median); then both generate
from one prompt, twice each, and their tokens and one step's logits are compared. kvshare's kernels compute the same
sums in the same order either way (inductor may time its kernels' configurations into other choices); a read that
did not wait for its writer would also differ from run to run.

    python benchmarks/decode_pdl_bench.py --shapes smollm2-135m,mha-12l --variants gqa,cla2,mqa --out DIR

Writes DIR/decode_pdl.json: the machine, versions and command, and one record per cell. Needs a GPU of compute
capability 9.0 or later.
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

MODES = {"off": False, "on": True}
VARIANTS = tuple(v for v in fb.VARIANTS if v != "hf-static")  # kvshare models: GraphDecoder's


def compare(decoders: dict, prompt: int, new: int, vocab: int, device) -> dict:
    """Tokens equal between the two decoders' generate(), and the largest difference of one step's logits; each
    decoder also runs twice, since a read that does not wait would differ from run to run."""
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

    rec = diff(("off", 0), ("on", 0))
    for mode in decoders:
        rec[f"{mode}_twice"] = diff((mode, 0), (mode, 1))
    rec["logits_max_abs"] = logits["off", 0].abs().max().item()
    return rec


def cell(model, batch: int, args, device) -> dict:
    length = args.prompt + args.new - 1
    decoders = {m: GraphDecoder(model, batch, length, attention="triton", pdl=pdl) for m, pdl in MODES.items()}
    for decoder in decoders.values():
        decoder.warm_up()
        fb.graph_run(decoder, batch, args.prompt, min(args.new, 8), 0, device)
    times = {m: [] for m in MODES}
    for rep in range(args.reps):
        for m, decoder in decoders.items():
            times[m].append(fb.graph_run(decoder, batch, args.prompt, args.new, rep, device))
    ms = {m: 1e3 * statistics.median(t) for m, t in times.items()}
    rec = dict(batch=batch, step_ms_off=ms["off"], step_ms_on=ms["on"], on_over_off=ms["on"] / ms["off"])
    rec |= compare(decoders, args.check_prompt, args.check_new, model.config.vocab_size, device)
    del decoders
    fb.free(device)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="smollm2-135m,mha-12l", help=f"comma-separated, of {sorted(fb.SHAPES)}")
    ap.add_argument("--variants", default="gqa,cla2,mqa", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--batches", default="1,16", help=f"up to {MAX_ROWS}: GraphDecoder's pdl=True refuses more")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--check-prompt", type=int, default=128)
    ap.add_argument("--check-new", type=int, default=32)
    args = ap.parse_args()
    for name in args.shapes.split(","):
        if name not in fb.SHAPES:
            ap.error(f"--shapes: unknown shape {name!r}; use one of {', '.join(sorted(fb.SHAPES))}")
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            ap.error(f"--variants: unknown variant {variant!r}; use some of {', '.join(VARIANTS)}")
    batches = args.batches.split(",")
    if not all(b.isdigit() and 1 <= int(b) <= MAX_ROWS for b in batches):
        ap.error(f"--batches {args.batches!r}: give integers from 1 to {MAX_ROWS} (pdl=True's limit), e.g. 1,16")
    device = torch.device("cuda")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability(device)[0] < 9:
        sys.exit("decode_pdl_bench needs a CUDA GPU of compute capability 9.0 or later (programmatic dependent launch)")
    result = {"machine": machine.environment(device, ("triton",)), "cells": []}
    built = SimpleNamespace(backend="inductor", smoke=False, prefill_attention="buckets", decoder="graph",
                            decode_attention="triton")  # fmt: skip
    for name in args.shapes.split(","):
        models = fb.build_models(name, fb.SHAPES[name], args.variants.split(","), device, torch.bfloat16, built)
        for variant, model in models.items():
            for batch in map(int, batches):
                rec = dict(shape=name, variant=variant, when=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
                rec |= cell(model, batch, args, device)
                result["cells"].append(rec)
                atomic_write_json(Path(args.out) / "decode_pdl.json", result)
                print(f"{name} {variant} B={batch}: off {rec['step_ms_off']:.4f} ms, on {rec['step_ms_on']:.4f} ms "
                      f"({rec['on_over_off']:.3f}x); tokens equal {rec['tokens_equal']}/{rec['of']}, step logits "
                      f"max abs diff {rec['step_logits_max_abs_diff']:.3g} (of {rec['logits_max_abs']:.3g}); run twice: "
                      f"off {rec['off_twice']['step_logits_max_abs_diff']:.3g}, on {rec['on_twice']['step_logits_max_abs_diff']:.3g}",
                      flush=True)  # fmt: skip
        del models
        fb.free(device)


if __name__ == "__main__":
    main()
