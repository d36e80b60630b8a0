#!/bin/bash
# expected wall ~120 s (compiles included); needs no extra folders (.whl/, .gpu/st/ not used). Helper "sog", session 7.
# SogCLR/iSogCLR cost on one H200: SPLIT sweep at N=65,536, interleaved cost bench (N=4,096 and 65,536, random and
# clustered embeddings, median of 20 rounds vs info_nce auto), per-step profile at 4,096, no-sync check,
# float64-reference checks (both SPLIT values). Output: $OUT/sog.tgz (sog/: log, sweep.json, sogclr-*.json/png,
# extra_checks.json, checks.json, this script).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT/sog"
cp "$0" "$OUT/sog/sog.sh" 2>/dev/null || true
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/sog/machine.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/sog/machine.txt" 2>&1
timeout 140 python3 tests/losses/gpu_check_sogclr.py --s7 --out "$OUT/sog" > "$OUT/sog/gpu_check.log" 2>&1
echo "exit status $?" >> "$OUT/sog/gpu_check.log"
grep -E "^s7 |chosen|^profile|^PASS|^FAIL|checks:|^\| |exit status|Error|error" "$OUT/sog/gpu_check.log" | grep -v "^check " | tail -60
cd "$OUT" && tar czf sog.tgz --remove-files sog
