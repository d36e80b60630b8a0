#!/bin/bash
# expected wall ~340 s (time budget 320 s). Needs .gpu/st (minilm + site), .gpu/quality/data16k, the pymetis wheel in .gpu/s7/.
# Issue 22, session 7: does batch construction matter more with 4x the data and 4x the steps? 16,384 training pairs,
# 512 steps (2 epochs at 64), seeds 0-2, arms random-64 random-256 community-64-self
# (the study's best batch-64 arms and the batch-size lever). Every setting fixed before the run; same test split.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/s7/pymetis-*.whl 2>&1 | tail -1
export PYTHONPATH=.gpu/st/site:/tmp/site:$PWD
mkdir -p $OUT/qlong /tmp/qL
timeout 360 python3 -m batchlab.cli bench quality --model .gpu/st/minilm --data .gpu/quality/data16k \
  --datasets codesearch wordnet --arms random-64 random-256 community-64-self \
  --seeds 3 --steps 512 --max-seq-length 96 --precision bf16 --device cuda --cache-chunk 1024 --time-budget 320 \
  --no-progress --out /tmp/qL > $OUT/qlong/log.txt 2>&1
echo "rc=$?"
cp /tmp/qL/quality.json /tmp/qL/*.png $OUT/qlong/ 2>/dev/null || echo "no quality.json"
grep -v "Loading weights\|Writing model shards" $OUT/qlong/log.txt | tail -24
cd $OUT && tar czf qlong.tgz --remove-files qlong
