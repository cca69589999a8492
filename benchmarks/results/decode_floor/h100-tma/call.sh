#!/usr/bin/env bash
# Scratch (session 9): H200 -> the cells first; any card -> TMA against cp.async in the chunk kernel.
set -u
W=$OUT/w; mkdir -p $W
log=$OUT/log.txt
nvidia-smi --query-gpu=name,uuid,driver_version --format=csv,noheader | tee $log
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $log
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
t0=$(date +%s)
if [[ $name == *H200* ]]; then
  OUT=$W/h200 bash benchmarks/decode_floor_gpu.sh ${H200_S:-420} decode:gqa,qcqa-ac,qcqa-ec,mqa decode:cla2,hf-static,gqa check:qcqa-ac,mqa 2>&1 | tee -a $log
fi
left=$(( ${BUDGET:-570} - ($(date +%s) - t0) ))
echo "##### tma_ab ($left s left) $(date +%T)" | tee -a $log
PYTHONPATH=src OUT=$W/ab timeout $(( left < 200 ? left : 200 )) python3 tma_ab.py 2>&1 | grep -E "^(check|attention)|Error|error" | cut -c1-400 | tee -a $log
for r in off on off2 on2; do
  left=$(( ${BUDGET:-570} - ($(date +%s) - t0) ))
  [ $left -gt 60 ] || break
  e=$([[ $r == on* ]] && echo 1 || echo 0)
  echo "##### $r KVSHARE_TMA=$e $(date +%T)" | tee -a $log
  KVSHARE_TMA=$e OUT=$W/$r bash benchmarks/decode_floor_gpu.sh $(( left < 90 ? left : 90 )) decode:gqa,mqa 2>&1 | tee -a $log
done
tar czf $OUT/all.tgz -C $W .
rm -rf $W
