#!/usr/bin/env bash
# Session 10. H200 -> the cells. H100 -> MQA at batch 32 (7B), one run after another, each a switch of
# the experiment patch (KVSHARE_EXP) or inductor's max-autotune GEMMs: RUNS="name:ENV=VAL ..." (X=1: none).
set -u
W=$OUT/w; mkdir -p $W
log=$OUT/log.txt
nvidia-smi --query-gpu=name,uuid,driver_version --format=csv,noheader | tee $log
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $log
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
t0=$(date +%s)
left() { echo $(( ${BUDGET:-575} - ($(date +%s) - t0) )); }
if [[ $name == *H200* ]]; then
  OUT=$W/h200 bash benchmarks/decode_floor_gpu.sh 560 decode:gqa,qcqa-ac,qcqa-ec,mqa decode:cla2,hf-static,gqa check:qcqa-ac,mqa 2>&1 | tee -a $log
else
  export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
  for r in $RUNS; do
    n=${r%%:*} e=${r#*:}
    lim=$(( $(left) - 5 )); [ $lim -gt 40 ] || { echo "SKIP $n" | tee -a $log; continue; }
    lim=$(( lim < ${PER:-150} ? lim : ${PER:-150} ))
    echo "##### $n $e ($(left) s left) $(date +%T)" | tee -a $log
    env ${e//;/ } timeout $lim python benchmarks/decode_floor_bench.py --reps 3 --profile --shape llama2-7b \
      --variants ${VARIANTS:-mqa} --batches ${BATCHES:-32} --decode-attention triton --gemv triton --out $W/$n 2>&1 \
      | grep -v -i warn | grep -E "^llama2|Error|error|OOM" | cut -c1-300 | tee -a $log
    echo "##### $n rc=${PIPESTATUS[0]} $(date +%T)" | tee -a $log
  done
fi
tar czf $OUT/all.tgz -C $W .
rm -rf $W
