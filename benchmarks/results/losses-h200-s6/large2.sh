#!/bin/bash
# Expected wall time ~70 s (no install, nothing carried; one python process, timeout 80 s). Output: $OUT/large2/large2.tgz
# Issue 21 (helper "large", session 6), second call: tests/losses/gpu_large_run.py verify = (1) syncs
# (bench's fixed counter + set_sync_debug_mode("error")) and peak memory, first call vs later calls, at
# N = 256 ... 8,192; (2) N = 20,000 streaming: two identical calls (atomic sums in the forward);
# (3) N = 65,536 InfoNCE/SigLIP time and beyond-grads memory at d = 512 and 768 after the memory fix;
# (4) forward one-tile vs looped at 262,144 and 1,048,576 and InfoNCE at 1M with the new default.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
O=$OUT/large2
mkdir -p $O/files
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $O/files/gpu.txt
T0=$(date +%s)
OUT=$O/files timeout 80 python3 tests/losses/gpu_large_run.py verify > $O/files/verify.log 2>&1
echo "rc=$? at $(( $(date +%s) - T0 )) s"
grep '^\[' $O/files/verify.log | cut -c1-300
tar -czf $O/large2.tgz -C $O files && rm -rf $O/files
ls -la $O
