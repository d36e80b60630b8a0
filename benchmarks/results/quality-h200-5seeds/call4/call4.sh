#!/bin/bash
# Session 6, call 2: #22 part B: cluster/TAS/GIST arms (pretrained and self teachers) + mochi-noquery, 5 seeds (~400 s).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/s6/*.whl 2>&1 | tail -1
export PYTHONPATH=.gpu/st/site:/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/gpu.txt
T0=$(date +%s); mkdir -p $OUT/qB $OUT/prev
for f in $(find / -path /proc -prune -o -name quality.json -print 2>/dev/null | grep -v "^/work\|site-packages" | head -5); do echo "found $f"; cp --parents $f $OUT/prev/ 2>/dev/null; done
timeout 540 python3 -m batchlab.cli bench quality --model .gpu/st/minilm --data .gpu/quality/data \
  --datasets codesearch wordnet --arms random-64 cluster-64 cluster-64-self tas-64 tas-64-self gist-64 gist-64-self mochi-noquery-64 \
  --seeds 5 --steps 128 --max-seq-length 96 --precision bf16 --device cuda --cache-chunk 1024 --time-budget 500 \
  --no-progress --out $OUT/qB > $OUT/qB/log.txt 2>&1
tail -45 $OUT/qB/log.txt
echo "total: $(( $(date +%s) - T0 )) s"
cd $OUT && tar czf all.tgz --remove-files qB prev gpu.txt && ls -la $OUT
