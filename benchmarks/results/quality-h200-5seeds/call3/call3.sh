#!/bin/bash
# Session 6, call 1: #17 step-peak re-check, #21 one-tile kernels timing, #22 seeds 2-4 of the 2-seed arms.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/s6/*.whl .gpu/large/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/gpu.txt
T0=$(date +%s)
mkdir -p $OUT/st $OUT/large $OUT/qA
echo "== st-cached (issue 17 peak)"
PYTHONPATH=.gpu/st/site:$PYTHONPATH timeout 100 python3 -m batchlab.bench.st_cached --device cuda --model .gpu/st/minilm \
  --batch-size 65536 --mini-batch-size 512 --repeats 1 --warmup 1 --time-limit 70 --precisions highest \
  --out $OUT/st > $OUT/st/st-cached.log 2>&1
tail -25 $OUT/st/st-cached.log
echo "st: $(( $(date +%s) - T0 )) s"
echo "== large (issue 21)"
OUT=$OUT/large timeout 170 bash benchmarks/results/losses-h200-large/next-call.sh 2>&1 | tail -60
echo "large: $(( $(date +%s) - T0 )) s"
echo "== quality part A (issue 22)"
PYTHONPATH=.gpu/st/site:$PYTHONPATH timeout 270 python3 -m batchlab.cli bench quality --model .gpu/st/minilm --data .gpu/quality/data \
  --datasets codesearch wordnet --arms random-64 community-64-self hard-negative-64-self mochi-64 scratch-64 jest-scratch-64 \
  --seed 2 --seeds 3 --steps 128 --max-seq-length 96 --precision bf16 --device cuda --cache-chunk 1024 --time-budget 250 \
  --no-progress --out $OUT/qA > $OUT/qA/log.txt 2>&1
tail -40 $OUT/qA/log.txt
echo "total: $(( $(date +%s) - T0 )) s"
