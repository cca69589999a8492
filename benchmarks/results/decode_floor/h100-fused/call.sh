#!/usr/bin/env bash
# Scratch (session 9): H200 -> the cells; else kvshare.gemv's fused form against the product alone, with and without pdl.
set -u
W=$OUT/w; mkdir -p $W
log=$OUT/log.txt
nvidia-smi --query-gpu=name,uuid,driver_version --format=csv,noheader | tee $log
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
export PYTHONPATH=src
if [[ $name == *H200* ]]; then
  OUT=$W/h200 bash benchmarks/decode_floor_gpu.sh 560 decode:gqa,qcqa-ac,qcqa-ec,mqa decode:cla2,hf-static,gqa check:qcqa-ac,mqa 2>&1 | tee -a $log
else
  echo "##### small $(date +%T)" | tee -a $log
  timeout 300 python3 benchmarks/decode_options_bench.py --shapes smollm2-135m,mha-12l --variants gqa,mqa --modes triton,triton+pdl,triton-fused,triton-fused+pdl --batches 1,16 --out $W/small 2>&1 | grep -E "^(llama2|smollm2|mha)|Error|error" | tee -a $log
  echo "##### 7b $(date +%T)" | tee -a $log
  timeout 140 python3 benchmarks/decode_options_bench.py --shapes llama2-7b --variants gqa,mqa --modes triton,triton-fused,triton-fused+pdl --batches 1 --out $W/7b 2>&1 | grep -E "^(llama2|smollm2|mha)|Error|error" | tee -a $log
fi
echo "##### end $(date +%T)" | tee -a $log
tar czf $OUT/all.tgz -C $W .
rm -rf $W
