"""Decode step of QCQA-AC against GQA at equal KV bytes, side by side (issue 3).

For each shape (decode_bench's MHA-shaped 12-layer model, 4 KV heads per layer,
and SmolLM2's shape, 2 of 3 KV heads), both variants are built from the same
random weights and run with the static KV cache at batch 256, prompt 2048:

* step time: 5 generate() runs of 34 new tokens, the two variants *alternating*,
  so drift of the shared machine hits both alike (decode_bench runs one variant
  after the other); median over runs of each run's median step;
* device time per decode step: torch.profiler's kernel time of a 34-token run
  minus that of a 2-token run (same prefill), over the 32 extra steps, with the
  top kernels.

    PYTHONPATH=src python benchmarks/decode_step_profile.py [BATCH]   # GPU (batch 256); on CPU: tiny shapes

Results: benchmarks/results/decode_step_profile.md.
"""

import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import decode_bench as db  # noqa: E402

cuda = torch.cuda.is_available()
dev = torch.device("cuda" if cuda else "cpu")
dtype = torch.bfloat16 if cuda else torch.float32
B, P, NS, NL = (256, 2048, 2, 34) if cuda else (2, 32, 2, 6)
if len(sys.argv) > 1:  # another batch size: decode_step_profile.py 1
    B = int(sys.argv[1])
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])


def kern(prof):
    out = {}
    for e in prof.key_averages():
        t = e.self_device_time_total if cuda else e.self_cpu_time_total
        if t and (not cuda or e.device_type.name == "CUDA"):
            out[e.key] = out.get(e.key, 0) + t
    return out


for shape, pair in (("mha-12l", ("gqa-4", "qcqa-ac-4")), ("smollm2-135m", ("gqa-2/3", "qcqa-ac-2/3"))):
    dims = (db.SHAPES if cuda else db.SMOKE_SHAPES)[shape]
    cache, models = {}, {}
    for v in pair:
        models[v] = db.build(shape, dims, v, dev, dtype, cache)[0]
        db.one_run(models[v], dev, B, P, 4, cache_kind="static")
    steps = {v: [] for v in pair}
    for rep in range(5):  # interleaved, so drift hits both alike
        for v in pair:
            steps[v].append(db.one_run(models[v], dev, B, P, NL, seed=rep, cache_kind="static")["step_ms_median"])
    per = {}
    for v in pair:
        k = []
        for n in (NS, NL):
            with profile(activities=acts) as prof:
                db.one_run(models[v], dev, B, P, n, cache_kind="static")
            k.append(kern(prof))
        diff = {name: (k[1].get(name, 0) - k[0].get(name, 0)) / (NL - NS) / 1e3 for name in k[1]}
        per[v] = diff
        print(
            f"== {shape} {v}: step ms reps {[round(s, 2) for s in steps[v]]} median {statistics.median(steps[v]):.2f}; "
            f"device ms per decode step {sum(diff.values()):.2f}"
        )
        for name, t in sorted(diff.items(), key=lambda x: -x[1])[:8]:
            print(f"   {t:7.3f} ms  {name[:90]}")
    a, b = pair
    print(
        f"RATIO {shape} {b}/{a} tok/s (step-time ratio) {statistics.median(steps[a]) / statistics.median(steps[b]):.3f}; "
        f"device-time ratio {sum(per[a].values()) / sum(per[b].values()):.3f}"
    )
    del models
