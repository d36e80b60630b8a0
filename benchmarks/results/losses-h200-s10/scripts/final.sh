#!/bin/bash
# Session 10 final call (after call A's stash): install the CuTe DSL + quack, then the CuTe checks/timings and the
# sweep against open_clip with the committed defaults. Output: $OUT/final.tgz.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
T0=$(date +%s); F=$OUT/final; mkdir -p $F
CUTE_SCRIPTS=" " bash .gpu/s10/callB.sh || exit $?
git log -1 --format=%h > $F/tree.txt 2>/dev/null; cp .gpu/s10/tree.txt $F/ 2>/dev/null
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $F/gpu.txt
echo "######## cute_check"
OUT=$F/check CUTE_SITE=/tmp/site timeout ${CHECK_S:-330} python3 .gpu/s10/cute_check.py > $F/check.log 2>&1; echo "rc=$? at $(( $(date +%s) - T0 )) s"
grep -v Warn $F/check.log | grep -E '^\[|checks:|^\{' | cut -c1-260 | tail -45
echo "######## bench vs open_clip"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/oc .gpu/large/*.whl 2>&1 | tail -1
PYTHONPATH=/tmp/oc:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD timeout ${BENCH_S:-130} python3 -m batchlab.bench.losses \
  --device cuda --sizes 256,1024,4096,8192,16384,65536 --dim 512 768 --methods "batchlab auto" open_clip --repeats 30 \
  --out $F/bench --tag=-s10 > $F/bench.log 2>&1; echo "rc=$? at $(( $(date +%s) - T0 )) s"
grep "^| info_nce\|^| siglip\|cute" $F/bench.log | cut -c1-170 | tail -30
cd $OUT && tar czf final.tgz final && echo "total $(( $(date +%s) - T0 )) s"
