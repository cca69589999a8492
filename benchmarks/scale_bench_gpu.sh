#!/usr/bin/env bash
# Issue 14's GPU phase on the lent H200, in steps that fit one call of at most 10 minutes:
#   bash benchmarks/scale_bench_gpu.sh DEADLINE_S STEP...   (STEP: prepare | ft:AC:MB | eval:KL)
# Runs from a checkout with .carry/whl (wheels of the pinned closure the machine lacks, made as
# workflow/scripts/offline_bundle.sh makes them, snakemake left out) and .carry/evaldata.tar.xz (the evaldata
# stage's folder) for eval steps; what a step writes is copied to $OUT after it, so a timed-out call keeps
# the steps before. The results of 2026-12-02 came from two calls on one machine:
#   bash benchmarks/scale_bench_gpu.sh 570 prepare ft:0:2 ft:1:8 ft:1:4 ft:0:1   (ft:0:1 ran out of time)
#   bash benchmarks/scale_bench_gpu.sh 400 eval:auto
set -uo pipefail
deadline=$(( $(date +%s) + $1 )); shift
site=/tmp/site
if [ ! -f $site/.ok ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target $site .carry/whl/*.whl && touch $site/.ok
fi
export PYTHONPATH=$site:$PWD/src PATH=$site/bin:$PATH HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
command -v python >/dev/null || ln -sf "$(command -v python3)" $site/bin/python
mkdir -p /tmp/scale/out
if [ -f .carry/evaldata.tar.xz ] && [ ! -d /tmp/evaldata ]; then mkdir -p /tmp/evaldata && tar -xJf .carry/evaldata.tar.xz -C /tmp/evaldata; fi
sb="python benchmarks/scale_bench.py gpu --work /tmp/scale --out /tmp/scale/out"
for step in "$@"; do
  left=$(( deadline - $(date +%s) ))
  [ $left -gt 30 ] || { echo "SKIP $step (no time)"; continue; }
  echo "=== $step ($left s left) $(date +%T)"
  case $step in
    prepare) timeout $left $sb --step prepare ;;
    ft:*) timeout $left $sb --step finetune --finetune-grid "${step#ft:}" --steps 8 ;;
    eval:*) timeout $left $sb --step evaluate --eval-data /tmp/evaldata/eval_data --limit 50 --kl "${step#eval:}" ;;
  esac
  echo "=== $step rc=$? $(date +%T)"
  cp /tmp/scale/out/* /tmp/scale/mlflow.db "$OUT"/ 2>/dev/null
done
nvidia-smi --query-gpu=name,memory.used --format=csv
tail -n 5 /tmp/scale/*.log | tail -40
