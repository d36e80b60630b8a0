#!/bin/bash
# Call 1 of the issue-21 large-N work: correctness of the new kernels (candidate set, 3 processes)
# while the grid's variants compile (12 processes); then the grid timing and the losses end to end.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm --format=csv > $OUT/gpu.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $OUT/gpu.txt
T0=$(date +%s)
for i in 0 1 2; do
  python3 tests/losses/gpu_check_triton.py --configs .gpu/large/candidates.json --part $i 3 --out $OUT \
    > $OUT/check$i.log 2>&1 &
done
python3 -m batchlab.bench.losses_triton --device cuda --grid --grid-compile-only --grid-jobs 12 --out $OUT 2>&1 | tail -3
wait
echo "check+compile: $(( $(date +%s) - T0 )) s"; grep -h "PASS\|FAIL\|cases passed" $OUT/check*.log
python3 -m batchlab.bench.losses_triton --device cuda --grid --grid-jobs 1 --grid-sizes 16384 65536 \
  --grid-losses-sizes 65536 --losses info_nce siglip --out $OUT --tag=-v1 > $OUT/grid.log 2>&1
echo "total: $(( $(date +%s) - T0 )) s"
grep -v "^|--" $OUT/grid.log | grep -v "^| kernel\|^| method" | cut -c1-200
