#!/bin/bash
# Session 9 call 1: keycheck (dtype-keyed descriptors), then the 65,536 profile and SigLIP configs.
T0=$(date +%s); nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/gpu.txt
echo "######## keycheck"; timeout 150 python3 .gpu/s7/keycheck.py 2>&1 | tee $OUT/keycheck.log | tail -20; echo "keycheck done at $(( $(date +%s) - T0 )) s"
echo "######## prof"; timeout 300 python3 .gpu/s9/prof.py 2>&1 | tee $OUT/prof.log | tail -80; echo "prof done at $(( $(date +%s) - T0 )) s"
