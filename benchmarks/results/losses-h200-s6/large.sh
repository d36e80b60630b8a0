#!/bin/bash
# Expected wall time ~190 s (install 5, check+A/B+kernels+DS+compile <= 90, bench <= 65, 1M <= 40). Needs .gpu/large/ (open_clip wheels).
# Issue 21 (helper "large", session 6): GPU check of the in-kernel totals / raw launch / one-tile
# forward default, the tiled forward's DOT A/B at 16,384, kernel names per call, then
# `batchlab bench losses` 256 ... 65,536 at d=512 and 768 (auto vs open_clip, launches, syncs, memory)
# and InfoNCE + SigLIP at 1,048,576 (d=512) once. Everything ends in $OUT/large/large.tgz.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/large/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
O=$OUT/large
mkdir -p $O/files
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $O/files/gpu.txt
T0=$(date +%s)
echo "== check, A/B, kernels"
OUT=$O/files GPU_LARGE_CHECK_S=30 timeout 90 python3 tests/losses/gpu_large_run.py all > $O/files/run.log 2>&1
echo "rc=$? at $(( $(date +%s) - T0 )) s" | tee -a $O/files/run.log
grep -E "checks passed|choice|\"ok\": false|failed|scale_grad_err|\"N\": 65536" $O/files/run.log | cut -c1-300 | head -24
[ -s $O/files/large-ab.env ] && cat $O/files/large-ab.env && source $O/files/large-ab.env
echo "== bench 256 ... 65,536 (t=$(( $(date +%s) - T0 )) s)"
timeout 65 python3 -m batchlab.bench.losses --device cuda --sizes 256,1024,4096,8192,16384,65536 --dim 512 768 \
  --methods "batchlab auto" open_clip --repeats 30 --out $O/files --tag=-s6 > $O/files/bench.log 2>&1
echo "rc=$? at $(( $(date +%s) - T0 )) s"
grep "^| info_nce\|^| siglip" $O/files/bench.log | cut -c1-160 | tail -48
echo "== 1M (t=$(( $(date +%s) - T0 )) s)"
timeout 40 python3 -m batchlab.bench.losses --device cuda --sizes 1048576 --dim 512 --methods "batchlab auto" \
  --siglip-max-n 1048576 --out $O/files --tag=-s6-1m > $O/files/bench-1m.log 2>&1
echo "rc=$? at $(( $(date +%s) - T0 )) s"
grep "^| info_nce\|^| siglip" $O/files/bench-1m.log | cut -c1-160 | tail -4
tar -czf $O/large.tgz -C $O files && rm -rf $O/files
ls -la $O
