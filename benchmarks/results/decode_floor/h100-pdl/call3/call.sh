#!/usr/bin/env bash
# Scratch (session 9): H200 -> the cells first; then pdl against not at 16 rows (run twice each).
set -u
W=$OUT/w; mkdir -p $W
log=$OUT/log.txt
nvidia-smi --query-gpu=name,uuid,driver_version --format=csv,noheader | tee $log
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
t0=$(date +%s)
if [[ $name == *H200* ]]; then
  OUT=$W/h200 bash benchmarks/decode_floor_gpu.sh 560 decode:gqa,qcqa-ac,qcqa-ec,mqa decode:cla2,hf-static,gqa check:qcqa-ac,mqa 2>&1 | tee -a $log
else
  export PYTHONPATH=src
  echo "##### 7b $(date +%T)" | tee -a $log
  timeout 330 python3 benchmarks/decode_pdl_bench.py --shapes llama2-7b --variants mqa,gqa --batches 1,16 --out $W/7b 2>&1 | grep -E "^(llama2|smollm2|mha)|Error|error" | tee -a $log
  echo "##### small $(date +%T)" | tee -a $log
  timeout 200 python3 benchmarks/decode_pdl_bench.py --shapes smollm2-135m,mha-12l --variants gqa,mqa --batches 16 --out $W/small 2>&1 | grep -E "^(llama2|smollm2|mha)|Error|error" | tee -a $log
fi
echo "##### end $(date +%T)" | tee -a $log
tar czf $OUT/all.tgz -C $W .
rm -rf $W
