#!/bin/bash
# expected wall ~115 s (compiles included; the python step is capped at 130 s); no extra folders needed (.whl/, .gpu/st/ unused). Helper "sog", session 7, re-run.
# SogCLR/iSogCLR cost on one H200: float64-reference checks first (budget 35 s), the forward sweep at N=65,536
# (one pass vs two row-only passes per tile shape), the interleaved cost bench (N=4,096 and 65,536, random and
# clustered, median of 20 rounds vs info_nce auto), no-sync check, host/wall/device profile at 4,096 (TMA on/off,
# one/two passes). Output: $OUT/sog.tgz (sog/: gpu_check.log, checks.json, sweep.json, sogclr-*.json/png,
# extra_checks.json, machine.txt, this script).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT/sog"
cp "$0" "$OUT/sog/sog.sh" 2>/dev/null || true
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/sog/machine.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/sog/machine.txt" 2>&1
git log -1 --format=%h >> "$OUT/sog/machine.txt" 2>&1
timeout 130 python3 tests/losses/gpu_check_sogclr.py --s7 --out "$OUT/sog" > "$OUT/sog/gpu_check.log" 2>&1
echo "exit status $?" >> "$OUT/sog/gpu_check.log"
grep -E "^s7 |chosen|^profile|^PASS|^FAIL|checks:|^\| |exit status|Error|\] " "$OUT/sog/gpu_check.log" | grep -v "^check " | tail -60
cd "$OUT" && tar czf sog.tgz --remove-files sog
