#!/bin/bash
# Call 2: correctness of the non-warp-specialised one-tile kernels (4 processes) while the grid
# compiles; grid at N=65,536 (default vs variants, losses end to end); best vs open_clip.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/large/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/gpu.txt
T0=$(date +%s)
for i in 0 1 2 3; do
  timeout 55 python3 tests/losses/gpu_check_triton.py --configs .gpu/large/candidates.json --part $i 4 --out $OUT \
    > $OUT/check$i.log 2>&1 &
done
timeout 55 python3 -m batchlab.bench.losses_triton --device cuda --grid --grid-compile-only --grid-jobs 10 --out $OUT 2>&1 | tail -1
wait
echo "check+compile: $(( $(date +%s) - T0 )) s"; grep -h "^PASS\|^FAIL\|FAILED\|cases passed" $OUT/check*.log
timeout 40 python3 -m batchlab.bench.losses_triton --device cuda --grid --grid-jobs 1 --grid-sizes 65536 \
  --grid-losses-sizes 65536 --losses info_nce siglip --out $OUT --tag=-v2 > $OUT/grid.log 2>&1
echo "grid: $(( $(date +%s) - T0 )) s"
grep "^| [fbs]\|^| fp32\|^| torch\|^best\|^| batchlab" $OUT/grid.log | cut -c1-150
timeout 45 python3 -m batchlab.bench.losses_triton --device cuda --sizes 65536 262144 --losses info_nce siglip \
  --anchors open_clip_clip open_clip_siglip --anchor-max-n 65536 --configs $OUT/losses-triton-grid-h200-v2.json \
  --out $OUT --tag=-best > $OUT/best.log 2>&1
echo "total: $(( $(date +%s) - T0 )) s"
grep "^| batchlab\|^| open_clip" $OUT/best.log | cut -c1-200
