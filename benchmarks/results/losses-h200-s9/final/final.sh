#!/bin/bash
# Session 9 final call (~420 s): the new defaults end to end. Output: $OUT/final.tgz (+ logs).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
T0=$(date +%s); F=$OUT/final; mkdir -p $F
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $F/gpu.txt; cp .gpu/s9/tree_final.txt $F/tree.txt
echo "######## large (checks vs fp32 reference, launches/syncs, 65,536 time/memory, 1M InfoNCE)"
OUT=$F/large timeout 110 python3 tests/losses/gpu_large_run.py s7 > $F/large.log 2>&1; echo "rc=$? at $(( $(date +%s) - T0 )) s"
grep '^\[' $F/large.log | cut -c1-300 | tail -40
echo "######## glue compile"; mkdir -p $F/gluecompile; OUT=$F/gluecompile GLUE_ONLY=compile timeout 40 python3 .gpu/s9/glue_check.py > $F/gluecompile/stdout.txt 2>&1; echo "rc=$?"; tail -6 $F/gluecompile/stdout.txt
echo "######## graph"; OUT=$F timeout 60 python3 .gpu/s7/graph.py > $F/graph.log 2>&1; echo "rc=$? at $(( $(date +%s) - T0 )) s"; tail -3 $F/graph.log
echo "######## siglip 1M"; OUT=$F timeout 45 python3 .gpu/s7/siglip1m.py > $F/siglip1m.log 2>&1; echo "rc=$?"; tail -2 $F/siglip1m.log
echo "######## bench vs open_clip"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/large/*.whl 2>&1 | tail -1
PYTHONPATH=/tmp/site:$PWD timeout 115 python3 -m batchlab.bench.losses --device cuda --sizes 256,1024,4096,8192,16384,65536 --dim 512 768 \
  --methods "batchlab auto" open_clip --repeats 30 --out $F/bench --tag=-s9 > $F/bench.log 2>&1; echo "rc=$? at $(( $(date +%s) - T0 )) s"
grep "^| info_nce\|^| siglip" $F/bench.log | cut -c1-170 | tail -48
echo "######## sogclr bench"; timeout 85 python3 -m batchlab.bench.sogclr --device cuda --data random,clustered --repeats 20 --out $F/sog > $F/sog.log 2>&1; echo "rc=$? at $(( $(date +%s) - T0 )) s"; tail -12 $F/sog.log
if [ -f .gpu/s9/sog.ready ]; then echo "######## sog checks"; mkdir -p $F/sogcheck; OUT=$F/sogcheck timeout 85 $(cat .gpu/s9/sog.ready) > $F/sogcheck/stdout.txt 2>&1; echo "rc=$?"; tail -15 $F/sogcheck/stdout.txt; fi
cd $OUT && tar czf final.tgz final && echo "total $(( $(date +%s) - T0 )) s"
