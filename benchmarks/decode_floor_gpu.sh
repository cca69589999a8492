#!/usr/bin/env bash
# Issue 15's GPU runs, in steps that fit calls of at most 10 minutes (the machine has torch, transformers and
# triton; nothing is carried). Each step writes under $OUT (or ./decode_out), merged afterwards with
#   python benchmarks/decode_floor_bench.py --merge DIR/*/decode_floor.json --out benchmarks/results/decode_floor
#   bash benchmarks/decode_floor_gpu.sh DEADLINE_S STEP...
# STEP: kernels[:PARTS] (decode_kernels_bench: the parts of a step, which pick the options of the steps after it;
# kernels:splits, the attention's split of the context; kernels:tune, its block, warps and stages; kernels:few,
# MQA at batch 32 in 1 to 17 chunks) |
# decode:V1,V2,... (7B, batch 1 and 32, the variants alternating; at most two GQA-sized 7B variants at once on
# an 80 GB card, three with MQA) | step:V,... (the same, the step compiled as one graph) |
# cublas:V,... | triton:V,... (batch 1 and 32, the products by cuBLAS or by kvshare.gemv) |
# max:V (7B at its largest batch) | prefill:MODE (gqa and qcqa-ac, MODE buckets or gather) |
# small:SHAPE (decode of a small shape, every variant) | smallmax:SHAPE (a small shape at its largest batch, every
# variant) | check:V,... (graph decoder against eager generate)
set -uo pipefail
for step in "${@:2}"; do
  case $step in kernels|kernels:*|decode:*|cublas:*|triton:*|step:*|max:*|prefill:*|small:*|smallmax:*|check:*) ;;
    *) echo "unknown step '$step': use kernels[:PARTS], decode:, cublas:, triton:, step:, max:, prefill:, small:, smallmax: or check:" >&2; exit 2 ;;
  esac
done
deadline=$(( $(date +%s) + $1 )); shift
out=${OUT:-decode_out}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
mkdir -p "$out"
bench="python benchmarks/decode_floor_bench.py --reps 3 --profile"  # graph cells also record their kernels
# The options the kernels step chose, else the best measured (H100, 2026-12-06).
opts() { python benchmarks/decode_kernels_bench.py --out "$out" --best 2>/dev/null || echo "--decode-attention triton --gemv triton"; }
for step in "$@"; do
  left=$(( deadline - $(date +%s) ))
  [ $left -gt 30 ] || { echo "SKIP $step (no time)"; continue; }
  arg=${step#*:}
  dir="$out/$(echo "$step" | tr ':,' '__')"
  echo "=== $step ($left s left) $(date +%T) $(opts)"
  case $step in
    kernels) timeout $left python benchmarks/decode_kernels_bench.py --out "$out" --parts gemv,attention ;;
    kernels:*) timeout $left python benchmarks/decode_kernels_bench.py --out "$out" --parts "$arg" ;;
    decode:*) timeout $left $bench --shape llama2-7b --variants "$arg" --batches 1,32 $(opts) --out "$dir" ;;
    cublas:*|triton:*) timeout $left $bench --shape llama2-7b --variants "$arg" --batches 1,32 $(opts | sed "s/--gemv [a-z-]*/--gemv ${step%%:*}/") --out "$dir" ;;
    step:*) timeout $left $bench --shape llama2-7b --variants "$arg" --batches 1,32 $(opts) --compile-unit step --out "$dir" ;;
    max:*) timeout $left $bench --shape llama2-7b --phase max --variants "$arg" $(opts) --out "$dir" ;;
    prefill:*) timeout $left $bench --shape llama2-7b --phase prefill --variants gqa,qcqa-ac --prefill-attention "$arg" --reps 5 --out "$dir" ;;
    small:*) timeout $left $bench --shape "$arg" --variants gqa,qcqa-ac,qcqa-ec,cla2,mqa,hf-static --batches 1,32 $(opts) --out "$dir" ;;
    smallmax:*) timeout $left $bench --shape "$arg" --phase max --variants gqa,qcqa-ac,qcqa-ec,cla2,mqa $(opts) --out "$dir" ;;
    check:*) timeout $left python benchmarks/decode_kernels_bench.py --out "$dir" --parts check --variants "$arg" $(opts | sed 's/--decode-attention/--attention/') ;;
  esac 2>&1 | grep -v -i warn | grep -E "^(llama2|smollm2|mha|gemv|attention|splits|check)|Error|error|OOM" | cut -c1-300
  echo "=== $step rc=${PIPESTATUS[0]} $(date +%T)"
done
