#!/bin/bash
# Session 10 call A: stash the CuTe DSL IR library (call B installs it), check the s9 glue tidy on the GPU, 1M A/B.
mkdir -p /root/cute && cp .cute/a/ir.so.xz /root/cute/ && echo "stashed $(du -sh /root/cute | cut -f1)"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
T0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
git log -1 --format=%h > $OUT/tree.txt 2>/dev/null
mkdir -p $OUT/a/gluecompile $OUT/a/ab
OUT=$OUT/a/gluecompile GLUE_ONLY=compile timeout 50 python3 .gpu/s9/glue_check.py > $OUT/a/gluecompile/stdout.txt 2>&1; echo "glue rc=$? at $(( $(date +%s) - T0 )) s"; tail -6 $OUT/a/gluecompile/stdout.txt
OUT=$OUT/a/ab timeout 200 python3 .gpu/s9/ab.py > $OUT/a/ab/stdout.txt 2>&1; echo "ab rc=$? at $(( $(date +%s) - T0 )) s"; grep -v Warn $OUT/a/ab/stdout.txt | tail -14
cd $OUT && tar czf a.tgz a && rm -rf a
