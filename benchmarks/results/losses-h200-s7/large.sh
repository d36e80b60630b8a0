#!/bin/bash
# Expected wall time ~75 s (no install, nothing carried but the tree; one python process, timeout 130 s). Output: $OUT/large/large.tgz
# Issue 21 (helper "large", session 7): tests/losses/gpu_large_run.py s7 = the streaming path's new defaults
# (scale gradient summed in fp32 in the kernels, one-tile TWO_EXP backward, one-launch one-tile forward,
# s*G stored so that no multiply follows the products, SigLIP's epilogue reordered): (1) InfoNCE/DCL/SigLIP
# against the fp32 reference at s = 0.01 and 14.3, N = 20,000 (InfoNCE also 65,536), DS on and off; (2) launches and
# syncs per call at 65,536; (3) ms (median of 10) and memory beyond grads at 65,536, d = 512 and 768:
# default vs looped backward + DS vs DS off; (4) InfoNCE at 1,048,576 twice.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
O=$OUT/large
mkdir -p $O/files
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $O/files/gpu.txt
git log -1 --format=%H > $O/files/commit.txt 2>/dev/null
T0=$(date +%s)
OUT=$O/files timeout 130 python3 tests/losses/gpu_large_run.py s7 > $O/files/s7.log 2>&1
echo "rc=$? at $(( $(date +%s) - T0 )) s"
grep '^\[' $O/files/s7.log | cut -c1-400
grep -i "error\|Traceback" $O/files/s7.log | head -5
cd $OUT && tar czf large/large.tgz -C large files --remove-files && rmdir large/files 2>/dev/null; ls -la $OUT/large
