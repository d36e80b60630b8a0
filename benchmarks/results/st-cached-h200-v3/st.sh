#!/bin/bash
# Expected wall time ~85 s (row-block GPU check ~20 s; st-cached step peak ~65 s incl. model load). Needs .gpu/st/ carried (minilm/, site/).
# Session 6, helper st (issue 17). 1) GPU parity of the row-block pass moved to batchlab.losses (+ offloaded cached
# gradients bitwise). 2) The step peak with a fair bench (each side starts without parameter gradients: call 1's 0.969x
# credited batchlab with freeing ST's ~89 MiB of parameter gradients) and offloaded cached gradients (the new CUDA
# default), plus batchlab with the gradients kept on the GPU (--compare-offload); phases say where each side peaks.
# Writes one file, $OUT/st.tar.gz (JSON + logs); the summary is on stdout.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export PYTHONPATH=.gpu/st/site:$PWD
W=/tmp/st-out; rm -rf $W; mkdir -p $W
T0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $W/gpu.txt
echo "== row-block GPU check"
timeout 30 python3 tests/losses/gpu_check_row_blocks.py --out $W > $W/row-blocks-check.log 2>&1
echo "check rc=$? after $(( $(date +%s) - T0 )) s"
cut -c1-150 $W/row-blocks-check.log | tail -11
echo "== st-cached, global batch 65,536, highest"
timeout 80 python3 -m batchlab.bench.st_cached --device cuda --model .gpu/st/minilm --batch-size 65536 \
  --mini-batch-size 512 --repeats 1 --warmup 1 --time-limit 70 --precisions highest --variants --compare-offload \
  --out $W > $W/st-cached.log 2>&1
echo "st-cached rc=$? after $(( $(date +%s) - T0 )) s"
grep -E "^  step|peak .* reached|^\| highest|targets" $W/st-cached.log | cut -c1-400
tar -czf $OUT/st.tar.gz -C $W .
echo "total: $(( $(date +%s) - T0 )) s"
