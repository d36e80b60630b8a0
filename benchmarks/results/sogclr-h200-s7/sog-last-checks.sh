#!/bin/bash
# expected wall ~90 s (the python step capped at 92 s); no extra folders needed. Helper "sog", session 7, last call:
# the 8 float64-reference checks call 4 skipped for time (committed defaults: one forward pass and pointer loads
# at N = 1,500; bf16/fp32 symmetric, one_way, two_view; plus TMA loads forced on). Output: $OUT/sog.tgz
# (sog/: gpu_check.log, checks_last.json, machine.txt, this script).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT/sog"
cp "$0" "$OUT/sog/sog.sh" 2>/dev/null || true
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/sog/machine.txt" 2>&1
timeout 92 python3 tests/losses/gpu_check_sogclr.py --s7-checks --out "$OUT/sog" > "$OUT/sog/gpu_check.log" 2>&1
echo "exit status $?" >> "$OUT/sog/gpu_check.log"
grep -E "^check |checks:|exit status|Error" "$OUT/sog/gpu_check.log" | tail -20
cd "$OUT" && tar czf sog.tgz --remove-files sog
