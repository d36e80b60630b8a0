#!/bin/bash
# expected wall time ~120 s on a cold 1x H200 (Triton compiles ~20 kernel variants); carries nothing (repo only)
# Issue 19 (helper sog): SogCLR/iSogCLR Triton cost vs InfoNCE at N=4,096 and 65,536 + correctness, all under $OUT/sog/.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
mkdir -p $OUT/sog
T0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/sog/gpu.txt 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee $OUT/sog/versions.txt
# 1. sweep of tile shapes at 65,536 (module steps) -> 2. bench info_nce auto / sogclr triton / isogclr triton at
# 4,096 and 65,536 (median of 20) -> 3. float64-reference check (checks.json) -> 4. extra checks (panels, chunks,
# sync-free module steps, fused update vs tiled, kernels per step at 4,096, clustered vs random at 65,536)
timeout 140 python3 tests/losses/gpu_check_sogclr.py --out $OUT/sog > $OUT/sog/gpu_check.log 2>&1
echo "gpu_check exit $? after $(( $(date +%s) - T0 )) s"
grep -E "^first steps|^sweep|^chosen|^\| (4096|65536) |launches per step|^SogCLRLoss N=|^checks:|^check .*FAIL|^(PASS|FAIL) |^\[|Traceback|Error" \
  $OUT/sog/gpu_check.log | cut -c1-240 | head -70
echo "total: $(( $(date +%s) - T0 )) s"
