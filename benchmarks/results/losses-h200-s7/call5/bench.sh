#!/bin/bash
# ~120 s. Needs .gpu/large (open_clip wheels). Issue 21 final sweep: batchlab auto vs open_clip, 256 ... 65,536, d 512/768, launches, syncs, memory.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/large/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
O=$OUT/bench; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $O/gpu.txt
T0=$(date +%s)
timeout 100 python3 -m batchlab.bench.losses --device cuda --sizes 256,1024,4096,8192,16384,65536 --dim 512 768 \
  --methods "batchlab auto" open_clip --repeats 30 --out $O --tag=-s7 > $O/bench.log 2>&1
echo "rc=$? at $(( $(date +%s) - T0 )) s"
grep "^| info_nce\|^| siglip" $O/bench.log | cut -c1-170 | tail -48
echo "== SigLIP 1M"; timeout 60 python3 .gpu/s7/siglip1m.py 2>&1 | tail -2
cd $OUT && tar czf bench.tgz --remove-files bench
